"""Does a verified checkpoint fit the live model, optimizer and generators? Then restore it.

Everything is checked before anything is written: the model's tensor names, shapes and
dtypes; the optimizer's param groups (how many, how many parameters each), which
parameters its state belongs to and the shapes of the state tensors; every RNG state,
tried on a scratch generator of the same kind. Only then is the optimizer loaded (its
previous state is kept, so a failure after it can be undone), the RNGs set, and last the
model, whose weights are copied in place and so cannot be taken back.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from trainguard.checkpoint import rng as _rng
from trainguard.errors import CheckpointError

#: optimizer state tensors shaped like their parameter, in torch's own optimizers
_PER_ELEMENT = frozenset(
    {
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "momentum_buffer",
        "sum",
        "prev",
        "step_size",
        "ax",
        "square_avg",
        "acc_delta",
        "grad_avg",
        "exp_inf",
    }
)


class CheckpointMismatchError(CheckpointError):
    """A genuine checkpoint that does not fit the model or optimizer it is loaded into."""


def restore(
    where: str,
    trees: Mapping[str, Any],
    *,
    model: Any,
    optimizer: Any,
    restore_rng: bool,
    generators: Mapping[str, Any] | None,
) -> list[str]:
    """Check that ``trees`` fit, then load them; return notes on what was not restored."""
    if model is not None:
        check_model(where, model, trees.get("model"))
    if optimizer is not None:
        if "optimizer" not in trees:
            raise CheckpointMismatchError(f"{where}: the checkpoint holds no optimizer state")
        check_optimizer(where, optimizer, trees["optimizer"])
    if restore_rng:
        if "rng" not in trees:
            raise CheckpointMismatchError(f"{where}: the checkpoint holds no rng state")
        try:
            _rng.check(trees["rng"], generators)
        except CheckpointError as exc:
            raise CheckpointMismatchError(f"{where}: {exc}") from exc
    previous_optimizer = optimizer.state_dict() if optimizer is not None else None
    previous_rng = _rng.capture(generators) if restore_rng else None
    previous_model = _model_backup(model)
    notes: list[str] = []
    try:
        try:
            if optimizer is not None:
                try:
                    optimizer.load_state_dict(trees["optimizer"])
                except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                    raise CheckpointMismatchError(
                        f"{where}: optimizer state does not fit: {exc}"
                    ) from exc
            if restore_rng:
                notes = _rng.restore(trees["rng"], generators)
            if model is not None:
                # last: tensors checked above copy in place and cannot fail; a module's own
                # extra state (set_extra_state) can, and then the backup puts it back
                model.load_state_dict(trees["model"])
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointMismatchError(
                f"{where}: does not fit: {type(exc).__name__}: {str(exc)[:200]}"
            ) from exc
    except BaseException:
        if previous_model is not None:
            model.load_state_dict(previous_model)
        if previous_optimizer is not None:
            optimizer.load_state_dict(previous_optimizer)
        if previous_rng is not None:
            _rng.restore(previous_rng, generators)
        raise
    return notes


def _model_backup(model: Any) -> dict[str, Any] | None:
    """A copy of the model's state, taken only when loading it could fail part-way.

    Tensors that passed :func:`check_model` (same names, shapes and dtypes) copy in place
    without error; only a module's extra state (``set_extra_state``, given any value) can
    refuse after other modules were written. Models without it cost no copy.
    """
    import torch

    if model is None or not hasattr(model, "state_dict"):
        return None
    own = model.state_dict()
    if all(isinstance(v, torch.Tensor) for v in own.values()):
        return None
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        for k, v in own.items()
    }


def check_model(where: str, model: Any, state: Any) -> None:
    """Refuse a model state with other names, shapes or dtypes, or values not tensors."""
    import torch

    if state is None:
        raise CheckpointMismatchError(f"{where}: the checkpoint holds no model state")
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(f"{where}: the model state is not a mapping")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(map(str, set(state) - set(own)))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{where}: does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, value in own.items():
        if not isinstance(value, torch.Tensor):
            continue  # extra state a module serialises itself
        saved = state[name]
        if not isinstance(saved, torch.Tensor):
            raise CheckpointMismatchError(f"{where}: {name} is not a tensor in the checkpoint")
        if tuple(value.shape) != tuple(saved.shape):
            raise CheckpointMismatchError(
                f"{where}: {name} is {tuple(saved.shape)}, the model has {tuple(value.shape)}"
            )
        if value.dtype != saved.dtype:
            raise CheckpointMismatchError(
                f"{where}: {name} is {saved.dtype}, the model has {value.dtype}"
            )


def check_optimizer(where: str, optimizer: Any, state: Any) -> None:
    """Refuse optimizer state that does not fit the live optimizer's param groups.

    Checked for torch optimizers: the number of groups and of parameters in each, that
    state belongs to a saved parameter, and that each state tensor has the shape the live
    optimizer holds for it, or else a scalar, the parameter's shape (required for torch's
    per-element buffers), a shape that broadcasts to it (factored moments), or a flat
    vector over the whole group (L-BFGS).
    """
    import torch

    def refuse(reason: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(f"{where}: optimizer state does not fit: {reason}")

    if not isinstance(optimizer, torch.optim.Optimizer):
        return  # a wrapper with its own state layout: its load_state_dict checks it
    if not isinstance(state, Mapping) or not isinstance(state.get("param_groups"), list):
        raise refuse("no param_groups")
    groups, saved_groups = optimizer.param_groups, state["param_groups"]
    if len(groups) != len(saved_groups):
        raise refuse(f"{len(saved_groups)} param groups saved, the optimizer has {len(groups)}")
    params: dict[Any, tuple[Any, int]] = {}
    for index, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        ids = saved.get("params") if isinstance(saved, Mapping) else None
        if not isinstance(ids, list):
            raise refuse(f"param group {index} lists no parameters")
        if len(ids) != len(group["params"]):
            raise refuse(
                f"param group {index} has {len(ids)} parameters saved, "
                f"the optimizer has {len(group['params'])}"
            )
        total = sum(p.numel() for p in group["params"])
        if not all(isinstance(pid, (int, str)) for pid in ids):
            raise refuse(f"param group {index} names parameters by other than numbers")
        params.update({pid: (p, total) for pid, p in zip(ids, group["params"], strict=True)})
    saved_state = state.get("state") or {}
    if not isinstance(saved_state, Mapping):
        raise refuse("state is not a mapping")
    for pid, values in saved_state.items():
        if pid not in params:
            raise refuse(f"state for parameter {pid!r}, which no param group lists")
        if not isinstance(values, Mapping):
            raise refuse(f"state of parameter {pid!r} is not a mapping")
        param, total = params[pid]
        live = optimizer.state.get(param, {})
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                continue
            shape, want = tuple(value.shape), tuple(param.shape)
            held = live.get(key)
            if isinstance(held, torch.Tensor):
                fits = shape == tuple(held.shape)
            elif key in _PER_ELEMENT:
                fits = shape == want
            else:
                fits = value.numel() == 1 or _broadcasts(shape, want) or shape == (total,)
            if not fits:
                raise refuse(f"{key} of parameter {pid!r} is {shape}, the parameter is {want}")


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(target), strict=False))
