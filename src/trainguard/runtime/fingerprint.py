"""Exact, cheap fingerprints of a rank's state: parameters, optimizer, RNG, code.

Data-parallel replicas must be bit-identical, so the parameter fingerprint is an exact
hash, not a norm. On CPU the tensors' bytes go through BLAKE3; on a GPU the hash is an
integer reduction computed on the device at memory speed (no copy to the CPU): each
element's bit pattern, mixed and weighted by its position, summed modulo 2**64. Integer
addition is associative, so the result does not depend on the reduction order.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

_MASK63 = (1 << 63) - 1
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_CHUNK = 1 << 24


def _digest(data: bytes | memoryview) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _MASK63


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array)


#: below this many bytes one thread hashes faster than a pool started for it
_THREADED_BYTES = 4 << 20
#: the layout string of each tensor list hashed lately (shapes and dtypes rarely change)
_LAYOUTS: dict[tuple[Any, ...], bytes] = {}


def _layout(tensors: Sequence[torch.Tensor]) -> bytes:
    key = tuple(x for t in tensors for x in (t.shape, t.dtype))
    found = _LAYOUTS.get(key)
    if found is None:
        if len(_LAYOUTS) >= 64:
            _LAYOUTS.clear()
        found = _LAYOUTS[key] = ";".join(f"{tuple(t.shape)}{t.dtype}" for t in tensors).encode()
    return found


def _cpu_hash(tensors: Sequence[torch.Tensor]) -> int:
    total = sum(t.nbytes for t in tensors)
    try:
        from blake3 import blake3

        hasher: Any = blake3(max_threads=blake3.AUTO if total >= _THREADED_BYTES else 1)
    except ImportError:  # pragma: no cover - blake3 is a dependency
        hasher = hashlib.blake2b(digest_size=8)
    hasher.update(_layout(tensors))
    # one concatenation, one hash: the per-tensor Python overhead is what costs on CPU
    flat = [t.detach().reshape(-1).view(torch.uint8) for t in tensors if t.numel()]
    if flat:
        array: Any = torch.cat(flat).numpy()
        hasher.update(memoryview(array))
    return int.from_bytes(hasher.digest()[:8], "little") & _MASK63


def _device_hash(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    device = tensors[0].device
    total = torch.zeros((), dtype=torch.int64, device=device)
    base = torch.arange(min(_CHUNK, max(t.numel() for t in tensors)), device=device)
    base = base * 2 + 1  # odd weights: every element moves the sum
    for index, tensor in enumerate(tensors):
        flat = tensor.detach().reshape(-1)
        bits = flat.view(_INT_VIEW[flat.element_size()]).to(torch.int64)
        for start in range(0, bits.numel(), _CHUNK):
            chunk = bits[start : start + _CHUNK]
            mixed = (chunk ^ (chunk >> 17)) * _GOLDEN
            weights = base[: chunk.numel()] + (2 * start + index * 1_000_003)
            total += (mixed * weights).sum()
        total += (index + 1) * 0x51ED27 + flat.numel()
    return total & _MASK63


def tensors_hash(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """An exact 63-bit hash of the tensors' values, as a 0-d int64 tensor on their device."""
    dense = [t for t in tensors if t.layout == torch.strided and not t.is_quantized]
    if not dense:
        return torch.zeros((), dtype=torch.int64)
    device = dense[0].device
    if device.type == "cpu" or any(t.device != device for t in dense):
        return torch.tensor(_cpu_hash([t.cpu() for t in dense]), dtype=torch.int64)
    return _device_hash(dense)


def params_hash(model: torch.nn.Module) -> torch.Tensor:
    return tensors_hash(p for p in model.parameters())


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist() if value.numel() <= 16 else f"tensor{value.shape}"
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return repr(value)
    return value if isinstance(value, (int, str, bool, type(None))) else repr(value)


#: kept in param groups but not read by the update: schedulers' bookkeeping
_NOT_SETTINGS = frozenset({"params", "lr", "initial_lr", "max_lr", "min_lr", "base_lr"})


def _settings(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> list[str]:
    """The group keys the update reads: the optimizer's defaults (a scheduler's own keys,
    added to the groups later, are not settings); every key for optimizers without any."""
    defaults = getattr(optimizer, "defaults", None) or group
    return sorted(k for k in group if k in defaults and k not in _NOT_SETTINGS)


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's settings except its parameters and learning rate."""
    return [
        {k: _jsonable(_plain(group[k])) for k in _settings(optimizer, group)}
        for group in optimizer.param_groups
    ]


def hyperparameter_values(
    optimizer: torch.optim.Optimizer, skip: frozenset[str] = frozenset()
) -> list[tuple[Any, ...]]:
    """The same settings as raw values, cheap enough to compare at every step; ``skip``
    names keys a declared scheduler sets itself (OneCycleLR's momentum)."""
    return [
        tuple((k, _plain(group[k])) for k in _settings(optimizer, group) if k not in skip)
        for group in optimizer.param_groups
    ]


def _plain(value: Any) -> Any:
    """The value the optimizer's arithmetic sees. A float or int subclass can make itself
    compare equal and print as anything; its builtin value is what the update uses."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, bool):
        return bool(int.__int__(value))
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, int):
        return int.__int__(value)
    return value


def settings_changes(before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]) -> list[str]:
    """'weight_decay of group 0 from 0.1 to 2.0' for each setting that differs."""
    if len(before) != len(after):
        return [f"the optimizer has {len(after)} parameter groups, not {len(before)}"]
    changes: list[str] = []
    for index, (old, new) in enumerate(zip(before, after, strict=True)):
        was, now = dict(old), dict(new)
        changes += [
            f"{key} of group {index} from {was.get(key, '<unset>')!r} "
            f"to {now.get(key, '<unset>')!r}"
            for key in sorted(set(was) | set(now))
            if was.get(key, "<unset>") != now.get(key, "<unset>")
        ]
    return changes


def hyperparameters_hash(optimizer: torch.optim.Optimizer) -> int:
    return _digest(json.dumps(hyperparameters(optimizer), sort_keys=True).encode())


def learning_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's rate as the update sees it (through a float subclass's disguise)."""
    rates = []
    for group in optimizer.param_groups:
        lr = group["lr"]
        # a plain float (the common case) as it is; anything else through _plain
        rates.append(lr if type(lr) is float else float(_plain(lr)))
    return rates


def float_bits(value: float) -> int:
    """A float's IEEE bits as a signed int64, so it travels in an int64 tensor exactly."""
    (bits,) = struct.unpack("<q", struct.pack("<d", float(value)))
    return int(bits)


def bits_float(bits: int) -> float:
    (value,) = struct.unpack("<d", struct.pack("<q", int(bits)))
    return float(value)


def optimizer_state_hash(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    tensors: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key in sorted(state):
                value = state[key]
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
                else:
                    tensors.append(torch.tensor(float_bits(float(value)), dtype=torch.int64))
    return tensors_hash(tensors)


def rng_hashes() -> dict[str, int]:
    """Hashes of the process's random number generator states."""
    out = {
        "torch": _digest(_as_bytes(torch.get_rng_state())),
        # hashes of tuples of ints are not salted: the same in every process, and cheap
        "python": hash(random.getstate()) & _MASK63,
        "numpy": 0,
        "cuda": 0,
    }
    try:
        import numpy

        state: Any = numpy.random.get_state(legacy=True)
        out["numpy"] = _digest(bytes(state[1].tobytes()) + struct.pack("<q", int(state[2])))
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        states = torch.cuda.get_rng_state_all()
        out["cuda"] = _digest(b"".join(bytes(_as_bytes(s)) for s in states))
    return out


def text_hash(text: str | bytes) -> int:
    return _digest(text.encode() if isinstance(text, str) else text)


LARGEST = 8


class WriteWatch:
    """Notices parameters written between optimizer steps, without a device sync.

    A strided sample of the largest parameters (views, so they follow the live values) is
    copied after each step and compared before the next; the comparison accumulates into a
    device-side flag read only at checks. Replacing a parameter's storage (``p.data = ...``)
    is caught by its data pointer. CPU tensors are sampled through NumPy views of their
    bits, and compared at the check without a tensor operation.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self._snapshot: list[Any] | None = None
        self._pointers = self._data_pointers()
        self._views = self._make_views()
        self._pairs: list[tuple[list[Any], list[Any]]] = []

    def _data_pointers(self) -> int:
        return sum(p.data_ptr() for p in self.params)

    def _make_views(self, per_tensor: int = 64) -> dict[Any, list[Any]]:
        # the largest tensors hold most of the weights; in-place writes to any tensor are
        # also caught by the guard's version counters, and all of them by the exact
        # cross-rank hash: this sample only has to be cheap enough for every step
        views: dict[Any, list[Any]] = {}
        largest = sorted(self.params, key=lambda p: p.numel(), reverse=True)[:LARGEST]
        for p in largest:
            flat = p.detach().reshape(-1)
            if flat.numel() and flat.is_contiguous():
                step = max(1, flat.numel() // per_tensor)
                dtype = _INT_VIEW[flat.element_size()]
                bits = flat[::step].view(dtype)
                if flat.device.type == "cpu":
                    # a NumPy view of the same strided elements (shares the storage)
                    views.setdefault(("numpy", dtype), []).append(bits.numpy())
                else:
                    views.setdefault(dtype, []).append(bits)
        return views

    def _sample(self) -> list[Any]:
        return [
            np.concatenate(group) if isinstance(key, tuple) else torch.cat(group)
            for key, group in self._views.items()
        ]

    def after_step(self) -> None:
        self._snapshot = self._sample()

    def before_step(self) -> None:
        # one concatenation per step; the comparison waits for the next check
        if self._snapshot is not None:
            self._pairs.append((self._snapshot, self._sample()))
            self._snapshot = None

    def written(self) -> bool:
        """True if a write happened between any two steps since the last call (one sync)."""
        pointers = self._data_pointers()
        moved = pointers != self._pointers
        if moved:
            self._pointers = pointers
            self._views = self._make_views()
            self._snapshot = None
        pairs, self._pairs = self._pairs, []
        if not pairs:
            return moved
        flags = []
        for after, before in pairs:
            for now, then in zip(before, after, strict=True):
                if isinstance(now, np.ndarray):
                    if not np.array_equal(now, then):
                        return True
                else:
                    flags.append((now != then).any())
        return bool(flags and torch.stack(flags).any()) or moved
