"""Update integrity: the optimizer's step recomputed on a secret sample of coordinates.

The invariant: what ``optimizer.step`` writes into a parameter is a known function of
what it read (the parameter, its gradient, the optimizer state and the group's settings).
torch's ``SGD``, ``Adam`` and ``AdamW`` (single-tensor, foreach and fused) are modelled
here, in float64, from their sources. Before every step a few coordinates are read, after
it their new values; a coordinate that did not become what the optimizer computes is a
HIGH alert naming this rank, whatever changed it: an edited torch source, a patched
function or closure, a wrapper around ``step``, state or settings changed in place.

Between steps the optimizer state (and a parameter whose version counter did not move,
as ``p.data.add_`` leaves it) must not change either: the coordinates of step ``n + 1``
are drawn at the end of step ``n`` and their values kept until step ``n + 1`` begins.

The coordinates are drawn by a keyed hash of the optimizer step count under a key from
``os.urandom`` taken at start (never torch's, NumPy's or Python's generators, which the
job owns and an attacker can steer): code that does not hold the key cannot tell which
coordinates will be read. Per step, ``tensors`` tensors are drawn (the first with a
probability proportional to its size, the next uniformly among tensors, and so on in
turn), and ``coordinates / tensors`` coordinates in each. A persistent corruption of a
fraction ``f`` of the coordinates is missed by one step's size-weighted draw with
probability at most ``1 - f`` (``(1 - f) ** 32`` when it is spread evenly), so after ``n``
steps at most ``(1 - f) ** n``; a corruption of one whole tensor among ``T`` is found by
one uniform draw with probability ``1 / T`` per step.

Optimizers or options it does not model (another class, ``differentiable``,
``capturable``, complex parameters, sparse gradients) are recorded once as unchecked,
never guessed at. Values are read without a device sync; they are compared when the
guard drains its detectors (at checks).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainguard.errors import Severity
from trainguard.runtime.interface import Alert, BaseDetector, Coins, StepInfo
from trainguard.runtime.update_math import (
    _FIRST,
    _adam,
    _between,
    _f64,
    _finding,
    _mismatch,
    _num,
    _Reading,
    _scalar_value,
    _sgd,
    _Slot,
    _unchanged,
)

#: coordinates read per checked optimizer step, over ``DEFAULT_TENSORS`` tensors
DEFAULT_COORDINATES = 64
#: the share of optimizer steps checked, drawn under the key (about 40 us per step on
#: average at 1/16, where checking every step costs about 630 us on the reference job)
DEFAULT_RATE = 1 / 16
DEFAULT_TENSORS = 2
#: pending records kept for the next drain before they are compared on the spot
_MAX_PENDING = 256

#: the group settings the updates read (read at the pre-step: a scheduler's change counts)
_SETTINGS = (
    "lr",
    "eps",
    "weight_decay",
    "momentum",
    "dampening",
    "nesterov",
    "maximize",
    "amsgrad",
    "decoupled_weight_decay",
    "foreach",
    "fused",
    "capturable",
    "differentiable",
)
_STATE_FIELDS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


def _kind(optimizer: Any) -> str | None:
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        return "sgd"
    if kind is torch.optim.Adam or kind is torch.optim.AdamW:
        return "adam"
    return None


def _take(tensor: torch.Tensor, index: np.ndarray) -> Any:
    """The values at flat ``index``, as a small tensor on the tensor's device (no sync)."""
    t = tensor.detach()
    return torch.take(t, torch.from_numpy(index).to(t.device, non_blocking=True))


def _flat(tensor: torch.Tensor) -> np.ndarray | None:
    """A flat NumPy view of a contiguous CPU float tensor (bf16 as its int16 bits)."""
    t = tensor.detach()
    if t.device.type != "cpu" or not t.is_contiguous() or t.is_complex():
        return None
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().reshape(-1)
    if t.dtype in (torch.float32, torch.float64, torch.float16):
        return t.numpy().reshape(-1)
    return None


class _Views:
    """Flat NumPy views of the parameters and their state, kept across steps (one per
    parameter and field, so replaced tensors are let go): reading a few coordinates of a
    CPU tensor is then one fancy index instead of a tensor operation."""

    def __init__(self) -> None:
        self._views: dict[tuple[int, str], tuple[torch.Tensor, int, np.ndarray | None]] = {}

    def take(self, key: tuple[int, str], tensor: torch.Tensor, index: np.ndarray) -> Any:
        view = self._views.get(key)
        if view is None or view[0] is not tensor or view[1] != tensor.data_ptr():
            view = (tensor, tensor.data_ptr(), _flat(tensor))
            self._views[key] = view
        flat = view[2]
        if flat is None:
            return _take(tensor, index)
        if flat.dtype == np.int16:
            return ("bf16", flat[index])
        return flat[index]

    def clear(self) -> None:
        self._views.clear()


def _scalar(value: Any) -> Any:
    """A setting or a step count: a float, or a copy kept on its device (no sync)."""
    if isinstance(value, torch.Tensor):
        return float(value) if value.device.type == "cpu" else value.detach().clone()
    return value


class _Unsupported(Exception):
    """An option met while reading that the check does not model."""


@dataclass
class _Record:
    step: int
    slots: list[_Slot]
    scale: Any = None
    found_inf: Any = None


class UpdateCheck(BaseDetector):
    """The update-integrity detector; see the module docstring."""

    name = "update"

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        rank: int,
        *,
        clock: Callable[[], int],
        record: Callable[[dict[str, Any]], None],
        coordinates: int = DEFAULT_COORDINATES,
        tensors: int = DEFAULT_TENSORS,
        key: bytes | None = None,
        rate: float = DEFAULT_RATE,
    ) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"update check rate must be in (0, 1], not {rate}")
        self.optimizer = optimizer
        self._coins = Coins(b"step", rate)
        self.rank = rank
        self.clock = clock
        self.record = record
        self.tensors = max(1, tensors)
        self.per_tensor = max(1, coordinates // self.tensors)
        self._key = key if key is not None else os.urandom(32)
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._kind = _kind(optimizer)
        self._count = 0  # optimizer steps seen: the draw's counter
        self._next: list[_Slot] | None = None  # drawn for the next step, with baselines
        self._next_for = -1  # the step count it was drawn for
        self._current: _Record | None = None
        self._pending: list[_Record] = []
        self._reported: set[str] = set()
        self._unchecked: set[str] = set()
        self._layout: tuple[int, ...] = ()
        self._params: list[torch.Tensor] = []
        self._groups: list[int] = []
        self._cumulative = np.zeros(0, dtype=np.uint64)
        self._complex = False
        self._views = _Views()
        self._fields = _STATE_FIELDS[self._kind or "sgd"]

    # --- drawing ----------------------------------------------------------------------

    def _refresh(self) -> None:
        groups = self.optimizer.param_groups
        layout = tuple(len(g["params"]) for g in groups)
        if layout == self._layout:
            return
        self._layout = layout
        self._params = [p for g in groups for p in g["params"]]
        self._groups = [i for i, g in enumerate(groups) for _ in g["params"]]
        sizes = np.array([max(p.numel(), 0) for p in self._params], dtype=np.uint64)
        self._cumulative = np.cumsum(sizes, dtype=np.uint64)
        self._complex = any(p.is_complex() for p in self._params)
        self._views.clear()
        self._next = None

    def _chosen(self, n: int) -> bool:
        """Whether optimizer step ``n`` is checked: a keyed draw, unpredictable without
        the key, so interference kept to unchecked steps cannot be planned."""
        return self._coins(self._key, n)

    def _draw(self, n: int) -> list[_Slot]:
        total = int(self._cumulative[-1]) if len(self._cumulative) else 0
        if total == 0:
            return []
        width = self.tensors * (1 + self.per_tensor)
        digest = hashlib.shake_256(self._key + n.to_bytes(8, "little")).digest(8 * width)
        words = np.frombuffer(digest, dtype=np.uint64).reshape(self.tensors, 1 + self.per_tensor)
        slots = []
        for i, row in enumerate(words):
            if i % 2 == 0:  # by size: every coordinate equally likely
                at = np.uint64(int(row[0]) % total)
                index = int(np.searchsorted(self._cumulative, at, side="right"))
            else:  # by tensor: a small tensor (a bias, a norm) as likely as a large one
                index = int(row[0]) % len(self._params)
            size = self._params[index].numel()
            if size:
                slots.append(_Slot(index, (row[1:] % np.uint64(size)).astype(np.int64)))
        return slots

    # --- reading ----------------------------------------------------------------------

    def _read(self, slot: _Slot, *, grad: bool) -> _Reading:
        i, p, coords = slot.index, self._params[slot.index], slot.coords
        reading = _Reading(self._views.take((i, ""), p, coords), p._version, p.data_ptr())
        if grad and p.grad is not None:
            if p.grad.is_sparse:
                raise _Unsupported(f"{type(self.optimizer).__name__} with sparse gradients")
            # a new tensor at every zero_grad: not worth a kept view
            g = _flat(p.grad)
            reading.grad = _take(p.grad, coords) if g is None else g[coords]
            if g is not None and g.dtype == np.int16:
                reading.grad = ("bf16", reading.grad)
        state = self.optimizer.state.get(p)
        if state:
            for name in self._fields:
                value = state.get(name)
                if isinstance(value, torch.Tensor) and value.numel() == p.numel():
                    reading.state[name] = (value, self._views.take((i, name), value, coords))
            step = state.get("step")
            if isinstance(step, torch.Tensor) and step.numel() == 1:
                reading.step = (step, self._views.take((i, "step"), step, _FIRST))
            elif step is not None:
                reading.step = (step, step)
        return reading

    def _unsupported(self) -> str | None:
        if self._kind is None:
            return f"{type(self.optimizer).__module__}.{type(self.optimizer).__qualname__}"
        for group in self.optimizer.param_groups:
            for option in ("differentiable", "capturable"):
                if group.get(option):
                    return f"{type(self.optimizer).__name__} with {option}=True"
        if self._complex:
            return f"{type(self.optimizer).__name__} with complex parameters"
        return None

    def before_step(self) -> None:
        """The optimizer's step pre-hook: read the sample drawn for this step."""
        self._current = None
        if not self._chosen(self._count):
            return
        self._refresh()
        reason = self._unsupported()
        slots: list[_Slot] | None = None
        if reason is None:
            slots = self._next if self._next_for == self._count and self._next else None
            if slots is None:
                slots = self._draw(self._count)
            try:
                self._read_before(slots)
            except _Unsupported as exc:
                reason = str(exc)
        self._next = None
        if reason is not None or slots is None:
            self._unchecked_once(reason or "")
            return
        record = _Record(self.clock(), slots)
        record.scale = _scalar(getattr(self.optimizer, "grad_scale", None))
        record.found_inf = _scalar(getattr(self.optimizer, "found_inf", None))
        self._current = record

    def _read_before(self, slots: list[_Slot]) -> None:
        groups = self.optimizer.param_groups
        settings: dict[int, dict[str, Any]] = {}
        for slot in slots:
            slot.before = self._read(slot, grad=True)
            g = self._groups[slot.index]
            if g not in settings:
                group = groups[g]
                settings[g] = {k: _scalar(group[k]) for k in _SETTINGS if k in group}
                if "betas" in group:
                    settings[g]["betas"] = tuple(_scalar(b) for b in group["betas"])
            slot.group = settings[g]

    def _unchecked_once(self, reason: str) -> None:
        if reason not in self._unchecked:
            self._unchecked.add(reason)
            self.record(
                {
                    "step": self.clock(),
                    "rank": self.rank,
                    "event": "update-unchecked",
                    "detail": f"optimizer updates not recomputed: {reason}",
                }
            )

    def after_step(self) -> None:
        """The optimizer's step post-hook: read what the step wrote; draw the next sample
        and keep its values, to be compared when the next step begins."""
        record, self._current = self._current, None
        self._count += 1
        self._next = None
        if record is not None:
            for slot in record.slots:
                slot.after = self._read(slot, grad=False)
            self._pending.append(record)
            if len(self._pending) > _MAX_PENDING:
                self._alerts_now()
        if not self._chosen(self._count):
            return
        self._refresh()
        if self._unsupported() is not None:
            return
        nxt = self._draw(self._count)
        try:
            for slot in nxt:
                slot.baseline = self._read(slot, grad=False)
        except _Unsupported:
            return  # recorded as unchecked when the step begins
        self._next, self._next_for = nxt, self._count

    def reset(self) -> None:
        """A new baseline (after a declared restore): nothing read so far is compared."""
        self._next = None
        self._current = None
        self._pending.clear()

    # --- comparing --------------------------------------------------------------------

    def on_step(self, info: StepInfo) -> Iterable[Alert]:
        return self._alerts_now()

    def _alerts_now(self) -> list[Alert]:
        pending, self._pending = self._pending, []
        alerts = []
        for record in pending:
            for kind, text, details in self._compare(record):
                if kind in self._reported:
                    continue
                self._reported.add(kind)
                alerts.append(
                    Alert(record.step, self.rank, self.name, Severity.HIGH, text, details)
                )
        return alerts

    def _compare(self, record: _Record) -> list[tuple[str, str, dict[str, Any]]]:
        found: list[tuple[str, str, dict[str, Any]]] = []
        skipped = record.found_inf is not None and _num(_scalar_value(record.found_inf)) != 0
        scale = _scalar_value(record.scale)
        for slot in record.slots:
            p = self._params[slot.index]
            name = self._names.get(id(p), f"param[{slot.index}]")
            before, after = slot.before, slot.after
            assert before is not None
            assert after is not None
            eps = float(torch.finfo(p.dtype).eps)
            if slot.baseline is not None:
                found += _between(name, slot, eps)
            if skipped or before.grad is None:
                # torch leaves the parameter and its state as they were
                found += _unchanged(name, slot, "a step that torch skips for this parameter")
                continue
            model = _sgd if self._kind == "sgd" else _adam
            g = _f64(before.grad)
            if scale is not None:
                g = g / float(scale)
            with np.errstate(all="ignore"):  # non-finite inputs are NonFinite's to report
                checks = model(slot, g, eps)
            for field_name, expected, actual, tol in checks:
                bad = _mismatch(expected, actual, tol)
                if bad is not None:
                    found.append(_finding(name, slot, field_name, bad, expected, actual, tol))
        return found
