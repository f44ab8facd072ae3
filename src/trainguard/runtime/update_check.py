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
guard drains its detectors (at checks), all pending records at once (``update_math``).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainguard.errors import Severity
from trainguard.runtime.interface import Alert, BaseDetector, Coins, StepInfo
from trainguard.runtime.update_math import (
    _FIRST,
    _between,
    _f64,
    _Found,
    _Item,
    _num,
    _Reading,
    _scalar_value,
    _Slot,
    _unchanged,
    _updates,
)

#: coordinates read per checked optimizer step, over ``DEFAULT_TENSORS`` tensors
DEFAULT_COORDINATES = 64
#: the share of optimizer steps checked, drawn under the key (about 40 us per step on
#: average at 1/16, where checking every step costs about 630 us on the reference job)
DEFAULT_RATE = 1 / 32
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


#: the dtypes read through a NumPy view: whether NumPy sees them as int16 bits (bf16)
_VIEWED = {torch.float32: False, torch.float64: False, torch.float16: False, torch.bfloat16: True}


def _flat(tensor: torch.Tensor) -> np.ndarray | None:
    """A flat NumPy view of a contiguous CPU float tensor (bf16 as its int16 bits)."""
    bf16 = _VIEWED.get(tensor.dtype)  # complex and integer dtypes are not viewed
    if bf16 is None or not tensor.is_cpu or not tensor.is_contiguous():
        return None
    t = tensor.detach() if tensor.requires_grad else tensor
    if bf16:
        return t.view(torch.int16).numpy().reshape(-1)
    return t.numpy().reshape(-1)


class _Views:
    """Flat NumPy views of the parameters and their state, kept across steps (one per
    parameter and field, so replaced tensors are let go): reading a few coordinates of a
    CPU tensor is then one fancy index instead of a tensor operation."""

    def __init__(self) -> None:
        self._views: dict[tuple[int, str], tuple[torch.Tensor, int, np.ndarray | None, bool]] = {}

    def _view(self, key: tuple[int, str], tensor: torch.Tensor, pointer: int) -> Any:
        view = self._views.get(key)
        if view is None or view[0] is not tensor or view[1] != pointer:
            flat = _flat(tensor)
            view = (tensor, pointer, flat, flat is not None and flat.dtype == np.int16)
            self._views[key] = view
        return view

    def take(self, key: tuple[int, str], tensor: torch.Tensor, index: np.ndarray) -> Any:
        return self.take_at(key, tensor, index)[0]

    def take_at(
        self, key: tuple[int, str], tensor: torch.Tensor, index: np.ndarray
    ) -> tuple[Any, int]:
        """The values at ``index`` and the tensor's data pointer."""
        pointer = tensor.data_ptr()
        _, _, flat, bf16 = self._view(key, tensor, pointer)
        if flat is None:
            return _take(tensor, index), pointer
        return (("bf16", flat[index]) if bf16 else flat[index]), pointer

    def first(self, key: tuple[int, str], tensor: torch.Tensor) -> Any:
        """A one-element tensor's value: a float where it is on the CPU (no sync)."""
        _, _, flat, bf16 = self._view(key, tensor, tensor.data_ptr())
        if flat is None:
            return _take(tensor, _FIRST)
        return float(_f64(("bf16", flat[:1]))[0]) if bf16 else float(flat[0])

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
        # the coin of optimizer step ``_decided``, flipped ahead at the end of the one before
        self._decided, self._due = -1, False
        self._next: list[_Slot] | None = None  # drawn for the next step, with baselines
        self._next_for = -1  # the step count it was drawn for
        self._current: _Record | None = None
        self._pending: list[_Record] = []
        self._early: list[Alert] = []  # found when too many records were pending
        self._reported: set[str] = set()
        self._unchecked: set[str] = set()
        self._layout: tuple[int, ...] = ()
        self._params: list[torch.Tensor] = []
        self._groups: list[int] = []
        self._cumulative: list[int] = []
        self._complex = False
        self._views = _Views()
        self._fields = _STATE_FIELDS[self._kind or "sgd"]
        self._eps: dict[torch.dtype, float] = {}

    # --- drawing ----------------------------------------------------------------------

    def _refresh(self) -> None:
        groups = self.optimizer.param_groups
        layout = tuple(len(g["params"]) for g in groups)
        if layout == self._layout:
            return
        self._layout = layout
        self._params = [p for g in groups for p in g["params"]]
        self._groups = [i for i, g in enumerate(groups) for _ in g["params"]]
        self._cumulative = list(itertools.accumulate(p.numel() for p in self._params))
        self._complex = any(p.is_complex() for p in self._params)
        self._views.clear()
        self._next = None

    def _chosen(self, n: int) -> bool:
        """Whether optimizer step ``n`` is checked: a keyed draw, unpredictable without
        the key, so interference kept to unchecked steps cannot be planned."""
        return self._coins(self._key, n)

    def _draw(self, n: int) -> list[_Slot]:
        # plain Python on 8-byte words and one NumPy array at the end: a few tiny NumPy
        # calls cost more than the arithmetic, the more so with caches cold after a step
        cumulative = self._cumulative
        total = cumulative[-1] if cumulative else 0
        if total == 0:
            return []
        width = 1 + self.per_tensor
        digest = hashlib.shake_256(self._key + n.to_bytes(8, "little")).digest(
            8 * width * self.tensors
        )
        words = struct.unpack(f"<{width * self.tensors}Q", digest)
        chosen: list[tuple[int, int]] = []
        coords: list[int] = []
        for i in range(self.tensors):
            head = words[i * width]
            if i % 2 == 0:  # by size: every coordinate equally likely
                index = bisect.bisect_right(cumulative, head % total)
            else:  # by tensor: a small tensor (a bias, a norm) as likely as a large one
                index = head % len(self._params)
            size = self._params[index].numel()
            if size:
                chosen.append((index, len(coords)))
                coords += [w % size for w in words[i * width + 1 : (i + 1) * width]]
        every = np.array(coords, dtype=np.int64)
        k = self.per_tensor
        return [_Slot(index, every[at : at + k]) for index, at in chosen]

    # --- reading ----------------------------------------------------------------------

    def _read(self, slot: _Slot, *, grad: bool) -> _Reading:
        i, coords, views = slot.index, slot.coords, self._views
        p = self._params[i]
        values, pointer = views.take_at((i, ""), p, coords)
        reading = _Reading(values, p._version, pointer)
        gradient = p.grad if grad else None
        if gradient is not None:
            if gradient.is_sparse:
                raise _Unsupported(f"{type(self.optimizer).__name__} with sparse gradients")
            # a new tensor at every zero_grad: not worth a kept view
            g = _flat(gradient)
            if g is None:
                reading.grad = _take(gradient, coords)
            else:
                reading.grad = ("bf16", g[coords]) if g.dtype == np.int16 else g[coords]
        state = self.optimizer.state.get(p)
        if state:
            size = p.numel()
            for name in self._fields:
                value = state.get(name)
                if isinstance(value, torch.Tensor) and value.numel() == size:
                    reading.state[name] = (value, views.take((i, name), value, coords))
            step = state.get("step")
            if isinstance(step, torch.Tensor) and step.numel() == 1:
                reading.step = (step, views.first((i, "step"), step))
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
        # the coin for this step was flipped at the end of the previous one
        due = self._due if self._decided == self._count else self._chosen(self._count)
        if not due:
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
                h = settings[g] = {}
                for k in _SETTINGS:
                    if k in group:
                        value = group[k]
                        h[k] = _scalar(value) if isinstance(value, torch.Tensor) else value
                if "betas" in group:
                    h["betas"] = tuple(_scalar(b) for b in group["betas"])
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
                # compared now (a long interval), reported at the next drain
                self._early += self._alerts_now()
        self._decided, self._due = self._count, self._chosen(self._count)
        if not self._due:
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
        early, self._early = self._early, []
        return early + self._alerts_now()

    def _alerts_now(self) -> list[Alert]:
        pending, self._pending = self._pending, []
        want = {"update", "between"} - self._reported
        if not pending or not want:
            return []  # one alert per kind: nothing left to find
        first: dict[str, _Found] = {}
        for found in self._compare(pending, want):
            kind = found[2]
            if kind not in first or found[0] < first[kind][0]:
                first[kind] = found
        alerts = []
        for _, step, kind, text, details in sorted(first.values(), key=lambda f: f[0]):
            self._reported.add(kind)
            alerts.append(Alert(step, self.rank, self.name, Severity.HIGH, text, details))
        return alerts

    def _compare(self, pending: list[_Record], want: set[str]) -> list[_Found]:
        """All pending records compared at once; each kind's findings in (record, slot,
        field) order, the first of each the one the record-by-record order would meet."""
        items: list[_Item] = []
        skipped_items: list[_Item] = []
        stepped: list[_Item] = []
        for record in pending:
            skipped = record.found_inf is not None and _num(_scalar_value(record.found_inf)) != 0
            scale = _scalar_value(record.scale)
            scale = 1.0 if scale is None else float(scale)
            for slot in record.slots:
                p = self._params[slot.index]
                eps = self._eps.get(p.dtype)
                if eps is None:
                    eps = self._eps[p.dtype] = float(torch.finfo(p.dtype).eps)
                name = self._names.get(id(p))
                if name is None:
                    name = f"param[{slot.index}]"
                item = _Item(len(items), record.step, slot, name, eps, scale)
                items.append(item)
                before = slot.before
                assert before is not None
                assert slot.after is not None
                # torch leaves the parameter and its state as they were
                (skipped_items if skipped or before.grad is None else stepped).append(item)
        found: list[_Found] = []
        if "between" in want:
            between = _between(items)
            if between is not None:
                found.append(between)
        if "update" in want:
            unchanged = _unchanged(skipped_items, "a step that torch skips for this parameter")
            if unchanged is not None:
                found.append(unchanged)
            if stepped:
                found += _updates(self._kind or "sgd", stepped)
        return found
