"""Batch digests: what of a batch is kept, and how it is digested.

A digest is of a strided sample of at most ``SAMPLE_BYTES`` of every tensor, with the
batch's layout (where each tensor sits, its shape and dtype). On the CPU the sample's bits
are hashed with BLAKE2b; on an accelerator they are folded into a 0-d integer tensor
resolved at the check (no device sync per step). Small CPU batches are kept whole until
the check (:func:`holdable`): right after ``optimizer.step`` every call runs from cold CPU
caches, and keeping a reference is the cheapest work there is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "HOLD_BYTES",
    "SAMPLE_BYTES",
    "Sampled",
    "batch_digest",
    "batch_sample",
    "digest",
    "holdable",
    "leaves",
    "sample_leaves",
    "small",
]

#: at most this many bytes of each tensor of a batch are digested
SAMPLE_BYTES = 2048
_MASK63 = (1 << 63) - 1
_GOLDEN = -7046029254386353131
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_INTS = frozenset((torch.int8, *_INT_VIEW.values()))
#: a CPU batch of at most this many bytes is kept whole until the check (digesting it at
#: its step costs more: right after optimizer.step every call runs from cold CPU caches)
HOLD_BYTES = 64 * 1024


def leaves(batch: Any, path: str, out: list[tuple[str, torch.Tensor]], depth: int) -> bool:
    """The batch's tensors with where they sit; False for a structure of unknown type."""
    if isinstance(batch, torch.Tensor):
        out.append((path, batch))
        return True
    if depth > 4:
        return False
    if isinstance(batch, Mapping):
        return all(leaves(batch[k], f"{path}.{k}", out, depth + 1) for k in sorted(batch, key=str))
    if isinstance(batch, (list, tuple)):
        return all(leaves(v, f"{path}[{i}]", out, depth + 1) for i, v in enumerate(batch))
    if type(batch).__module__ == "numpy" and hasattr(batch, "__array_interface__"):
        out.append((path, torch.from_numpy(batch)))
        return True
    # numbers and strings beside the tensors (ids, file names) carry no training data
    return isinstance(batch, (int, float, str, bytes, type(None)))


def _cpu_sample(tensor: torch.Tensor, copy: bool) -> torch.Tensor | bytes:
    """A strided sample of at most SAMPLE_BYTES of the tensor, its bits as integers: a
    copy (torch ops only: the step's own code paths, still warm in the CPU's caches; the
    hashing waits for the check), or its bytes at once (``copy=False``, at the check)."""
    if not copy and tensor.dtype in _INTS and not tensor.requires_grad:
        ints = tensor.numpy().reshape(-1)  # the same elements in the same order, one call
        return bytes(ints[:: max(1, -(-ints.nbytes // SAMPLE_BYTES))].tobytes())
    flat = tensor.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype not in _INTS:  # floats, bool, unsigned: their bits as signed integers
        flat = flat.view(_INT_VIEW[flat.element_size()])
    stride = max(1, -(-flat.numel() * flat.element_size() // SAMPLE_BYTES))
    if not copy:
        return bytes(flat.numpy()[::stride].tobytes())
    return flat[::stride].clone() if stride > 1 else flat.clone()


def _device_sample(tensor: torch.Tensor, index: int) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)
    if not flat.numel():
        return torch.zeros((), dtype=torch.int64, device=flat.device)
    stride = max(1, -(-flat.numel() * flat.element_size() // SAMPLE_BYTES))
    sample = flat[::stride].contiguous()
    bits = sample.view(_INT_VIEW[sample.element_size()]).to(torch.int64)
    weights = torch.arange(1, 2 * bits.numel(), 2, device=bits.device) + index * 1_000_003
    return (((bits ^ (bits >> 17)) * _GOLDEN) * weights).sum()


@dataclass
class Sampled:
    """A batch as taken at its step: its layout and a copy of each CPU tensor's sample
    (digested at the check), and the device part of its digest (a 0-d tensor, or None)."""

    layout: list[tuple[str, Any, Any]]
    samples: list[torch.Tensor | bytes]
    on_device: torch.Tensor | None


def batch_sample(batch: Any, copy: bool = True) -> Sampled | None:
    """What of a batch is kept until the check (``copy=False``: to be digested now);
    None for a batch of no known type."""
    found: list[tuple[str, torch.Tensor]] = []
    if not leaves(batch, "", found, 0) or not found:
        return None
    return sample_leaves(found, copy)


def sample_leaves(found: list[tuple[str, torch.Tensor]], copy: bool = True) -> Sampled:
    """:func:`batch_sample` of a batch whose tensors :func:`leaves` has found."""
    samples: list[torch.Tensor | bytes] = []
    on_device: torch.Tensor | None = None
    for index, (_, tensor) in enumerate(found):
        if tensor.layout is not torch.strided:
            continue
        if tensor.is_cpu:
            samples.append(_cpu_sample(tensor, copy))
            continue
        part = _device_sample(tensor, index)
        on_device = part if on_device is None else on_device + part
    return Sampled([(p, t.shape, t.dtype) for p, t in found], samples, on_device)


def _host_digest(sampled: Sampled) -> int:
    return _hashed(sampled.layout, sampled.samples)


def _hashed(layout: list[tuple[str, Any, Any]], samples: list[torch.Tensor | bytes]) -> int:
    hasher = hashlib.blake2b(_layout_text(layout), digest_size=8)
    for sample in samples:
        hasher.update(sample if isinstance(sample, bytes) else sample.numpy().tobytes())
    return int.from_bytes(hasher.digest(), "little") & _MASK63


#: the layout strings of the batches digested lately (a job's batches share a few layouts:
#: building the string costs more than hashing a small batch's sample)
_LAYOUTS: dict[tuple[tuple[str, Any, Any], ...], bytes] = {}


def _layout_text(layout: list[tuple[str, Any, Any]]) -> bytes:
    key = tuple(layout)
    text = _LAYOUTS.get(key)
    if text is None:
        if len(_LAYOUTS) >= 256:
            _LAYOUTS.clear()
        text = _LAYOUTS[key] = repr(layout).encode()
    return text


def batch_digest(batch: Any) -> int | torch.Tensor | None:
    """A 63-bit digest of a batch: an int (CPU tensors), a 0-d int64 tensor on the device
    (resolved later: no sync), or None for a batch of no known type."""
    sampled = batch_sample(batch)
    return None if sampled is None else digest(sampled)


def digest(sampled: Sampled) -> int | torch.Tensor:
    value = _host_digest(sampled)
    if sampled.on_device is None:
        return value | 1  # never 0: 0 means "no batch"
    return ((sampled.on_device + value) & _MASK63) | 1


def holdable(batches: list[Any]) -> bool:
    """Whether batches are small enough, and on the CPU, to be kept until the check."""
    for batch in batches:
        found: list[tuple[str, torch.Tensor]] = []
        if not leaves(batch, "", found, 0) or not found:
            return False
        if not small(found):
            return False
    return True


def small(found: list[tuple[str, torch.Tensor]]) -> bool:
    """Whether a batch's tensors are all on the CPU and HOLD_BYTES or fewer together."""
    return all(t.is_cpu for _, t in found) and sum(t.nbytes for _, t in found) <= HOLD_BYTES
