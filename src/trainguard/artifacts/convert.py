"""Conversion to safetensors: tensors as tensors, everything else as JSON metadata.

safetensors holds flat named tensors and a string-to-string metadata map. A training
checkpoint is a tree (``{"model": ..., "optimizer": {"state": {0: ...}}, "epoch": 3}``),
so the tree is kept as tagged JSON under the ``trainguard.structure`` metadata key, each
tensor replaced by its name. Tensors that are the same view of the same storage (tied
weights) are written once and restored as one object, the dropped names listed under
``trainguard.aliases`` (alias -> stored name, plain JSON, so a user of
``safetensors.torch.load_file`` can put them back); other overlapping views are written as
independent copies and listed under ``trainguard.shared``. Every file written is read back
with safetensors and compared with the tensors it was made from (names, dtype, shape,
bytes) before it is renamed into place: a mismatch leaves no output.

Folders and sharded checkpoints are in :mod:`trainguard.artifacts.convert_folder`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from trainguard._io import check_output, describe_mode, display, reason, write_atomic
from trainguard.artifacts.arrays import STRUCTURE_KEY
from trainguard.artifacts.budget import DEFAULT_MAX_MEMORY, BudgetExceeded, MemoryBudget
from trainguard.errors import CheckpointError, InputError, UsageError

SHARED_KEY = "trainguard.shared"
ALIASES_KEY = "trainguard.aliases"


@dataclass
class ConvertResult:
    """What a conversion wrote."""

    output: str
    tensors: int = 0
    aliases: dict[str, str] = field(default_factory=dict)
    copied_views: list[list[str]] = field(default_factory=list)
    bytes_written: int = 0
    source: str = ""


@dataclass
class Encoded:
    """A tree split for safetensors: the tensors to store and the metadata that rebuilds it."""

    tensors: dict[str, Any]
    metadata: dict[str, str]
    aliases: dict[str, str]
    copied_views: list[list[str]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class _Encoder:
    def __init__(self, budget: MemoryBudget | None = None) -> None:
        # what the output costs beyond what load already holds: tensors that must be copied
        # (non-contiguous views, shared storages) and text that is encoded several times
        self.budget = budget if budget is not None else MemoryBudget()
        self.tensors: dict[str, Any] = {}
        self.aliases: dict[str, str] = {}
        self._views: dict[tuple[Any, ...], str] = {}
        self._storages: dict[tuple[str, int], list[str]] = {}

    def tensor(self, value: Any, path: str) -> dict[str, Any]:
        import torch

        if value.is_quantized or value.layout != torch.strided:
            raise CheckpointError(
                f"entry {path!r}: {value.layout} / quantized tensors have no safetensors form"
            )
        storage = value.untyped_storage()
        view = (
            value.device.type,
            storage.data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            tuple(value.stride()),
            value.dtype,
        )
        tag: dict[str, Any] = {"__tensor__": self._views.get(view)}
        if isinstance(value, torch.nn.Parameter):
            tag["parameter"] = True
            tag["requires_grad"] = value.requires_grad
        if tag["__tensor__"] is not None:
            self.aliases[path] = tag["__tensor__"]
            return tag
        name = path
        while name in self.tensors:
            name += "_"
        self._views[view] = name
        group: list[str] = []
        if storage.nbytes() > 0:
            group = self._storages.setdefault((value.device.type, storage.data_ptr()), [])
        copied = bool(group) or value.device.type != "cpu" or not value.is_contiguous()
        if copied:
            # checked before the copy: a view can claim far more elements than its storage
            # holds (a stride of 0), and .contiguous() would allocate them all
            nbytes = value.numel() * value.element_size()
            self.budget.reserve(nbytes, f"entry {path!r}: a copy of the tensor")
        out = value.detach().to("cpu").contiguous()
        if storage.nbytes() > 0:
            if group:
                # another view of a storage already written: safetensors needs its own bytes
                out = out.clone()
            group.append(name)
        self.tensors[name] = out
        tag["__tensor__"] = name
        return tag

    def encode(self, value: Any, path: str) -> Any:
        import numpy
        import torch

        if isinstance(value, str) and len(value) > 4096:
            self.budget.reserve(3 * len(value), f"entry {path!r}: a string of {len(value)}")
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value if abs(value) < 2**53 else {"__int__": str(value)}
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, torch.Tensor):
            return self.tensor(value, path)
        if isinstance(value, numpy.ndarray) and value.dtype != object:
            try:
                as_tensor = torch.from_numpy(numpy.ascontiguousarray(value))
            except TypeError as exc:
                raise CheckpointError(
                    f"entry {path!r}: numpy {value.dtype} arrays have no safetensors form"
                ) from exc
            tag = self.tensor(as_tensor, path)
            tag["numpy"] = True
            return tag
        if isinstance(value, dict):
            kind = "__odict__" if isinstance(value, OrderedDict) else "__dict__"
            return {
                kind: [
                    [self.encode(k, f"{path}.key"), self.encode(v, _join(path, k))]
                    for k, v in value.items()
                ]
            }
        if isinstance(value, (list, tuple, set, frozenset)):
            tagname = _SEQUENCE_TAGS.get(type(value))
            if tagname is not None:
                return {tagname: [self.encode(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"__device__": str(value)}
        if isinstance(value, (bytes, bytearray)):
            # base64 text, then the JSON structure, then the header: three copies
            self.budget.reserve(4 * len(value), f"entry {path!r}: {len(value)} bytes as text")
            return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, complex):
            return {"__complex__": [repr(value.real), repr(value.imag)]}
        if isinstance(value, numpy.generic):
            return {"__numpy__": [str(value.dtype), self.encode(value.item(), path)]}
        raise CheckpointError(
            f"entry {path!r}: a {type(value).__name__} has no safetensors representation"
        )

    def shared_groups(self) -> list[list[str]]:
        return [names for names in self._storages.values() if len(names) > 1]


_SEQUENCE_TAGS: dict[type, str] = {
    list: "__list__",
    tuple: "__tuple__",
    set: "__set__",
    frozenset: "__frozenset__",
}


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def decode_structure(node: Any, tensors: dict[str, Any]) -> Any:
    """Rebuild the tree that :class:`_Encoder` wrote, tensors taken from ``tensors``."""
    import numpy
    import torch

    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        tensor = tensors[node["__tensor__"]]
        if node.get("numpy"):
            return tensor.numpy()
        if node.get("parameter"):
            return torch.nn.Parameter(tensor, requires_grad=bool(node.get("requires_grad")))
        return tensor
    ((tag, body),) = node.items()
    if tag in ("__dict__", "__odict__"):
        pairs = [
            (_hashable(decode_structure(k, tensors)), decode_structure(v, tensors)) for k, v in body
        ]
        return OrderedDict(pairs) if tag == "__odict__" else dict(pairs)
    decoders: dict[str, Any] = {
        "__list__": lambda b: [decode_structure(v, tensors) for v in b],
        "__tuple__": lambda b: tuple(decode_structure(v, tensors) for v in b),
        "__set__": lambda b: {_hashable(decode_structure(v, tensors)) for v in b},
        "__frozenset__": lambda b: frozenset(_hashable(decode_structure(v, tensors)) for v in b),
        "__int__": int,
        "__float__": float,
        "__dtype__": lambda b: _dtype(b),
        "__device__": torch.device,
        "__bytes__": lambda b: base64.b64decode(b),
        "__complex__": lambda b: complex(float(b[0]), float(b[1])),
        "__numpy__": lambda b: numpy.dtype(b[0]).type(decode_structure(b[1], tensors)),
    }
    if tag not in decoders:
        raise ValueError(f"unknown tag {tag}")
    return decoders[tag](body)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _dtype(name: str) -> Any:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name}")
    return dtype


def encode_tree(obj: Any) -> tuple[dict[str, Any], Any]:
    """Split a tensor tree into (named contiguous CPU tensors, tagged-JSON structure).

    :func:`decode_structure` turns the pair back into the tree. Raises
    :class:`CheckpointError` for values with no safe representation.
    """
    encoder = _Encoder()
    try:
        structure = encoder.encode(obj, "")
    except RecursionError as exc:
        raise CheckpointError("checkpoint nested too deeply to convert") from exc
    return encoder.tensors, structure


def encode_file(obj: Any, shown: str, budget: MemoryBudget | None = None) -> Encoded:
    """Split ``obj`` into what one safetensors file stores; CheckpointError if it cannot be.

    ``budget`` bounds the copies the split makes (1 GiB when not given).
    """
    encoder = _Encoder(budget)
    try:
        structure = encoder.encode(obj, "")
    except RecursionError as exc:
        raise CheckpointError("checkpoint nested too deeply to convert") from exc
    except BudgetExceeded as exc:
        raise CheckpointError(f"{shown}: not written: {exc}") from exc
    metadata = {"format": "pt", STRUCTURE_KEY: json.dumps(structure, separators=(",", ":"))}
    groups = encoder.shared_groups()
    if groups:
        metadata[SHARED_KEY] = json.dumps(groups)
    if encoder.aliases:
        metadata[ALIASES_KEY] = json.dumps(encoder.aliases, separators=(",", ":"))
    return Encoded(encoder.tensors, metadata, encoder.aliases, groups)


def write_verified(
    encoded: Encoded, path: str | os.PathLike[str], shown: str, budget: MemoryBudget
) -> None:
    """Write ``encoded`` to ``path`` (a temporary name), then read it back and compare.

    Raises CheckpointError when safetensors cannot write it or when what it reads back
    differs from what was handed to it; the caller removes ``path`` then.
    """
    from safetensors.torch import save_file

    try:
        save_file(encoded.tensors, os.fspath(path), metadata=encoded.metadata)
    except OSError:
        raise
    except Exception as exc:  # safetensors reports I/O failures as its own errors
        raise CheckpointError(f"{shown}: cannot write: {exc}") from exc
    verify_written(path, encoded.tensors, shown, budget)
    os.chmod(path, _new_file_mode())  # save_file leaves a temporary file 0600


def verify_written(
    path: str | os.PathLike[str],
    expected: dict[str, Any],
    shown: str,
    budget: MemoryBudget | None = None,
) -> None:
    """Read ``path`` back with safetensors: the same names, and for each the same dtype,
    shape and bytes as ``expected`` (CheckpointError naming the first difference).

    One tensor is read back at a time; the largest is reserved in ``budget`` first.
    """
    from safetensors import safe_open

    budget = budget if budget is not None else MemoryBudget()
    largest = max((t.numel() * t.element_size() for t in expected.values()), default=0)
    try:
        with (
            budget.hold(largest, "reading the written tensors back"),
            safe_open(os.fspath(path), framework="pt") as written,
        ):
            names = set(written.keys())
            if names != set(expected):
                extra = sorted(names ^ set(expected))[:3]
                raise CheckpointError(
                    f"{shown}: not written: read back, it holds other tensors than were "
                    f"written ({', '.join(map(repr, extra))})"
                )
            for name, want in expected.items():
                got = written.get_tensor(name)
                what = _difference(got, want)
                if what:
                    raise CheckpointError(
                        f"{shown}: not written: tensor {name!r} read back has {what} "
                        "than the original"
                    )
    except BudgetExceeded as exc:
        raise CheckpointError(f"{shown}: not written: {exc}") from exc
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors cannot read what it wrote: not a valid output
        raise CheckpointError(f"{shown}: not written: cannot read it back: {exc}") from exc


def _difference(got: Any, want: Any) -> str:
    import torch

    if got.dtype != want.dtype:
        return f"another dtype ({got.dtype}, not {want.dtype})"
    if tuple(got.shape) != tuple(want.shape):
        return f"another shape ({tuple(got.shape)}, not {tuple(want.shape)})"

    def raw(t: Any) -> Any:
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        if flat.numel() % 4 == 0:
            # the same bytes compared four at a time: several times faster than bytewise
            with contextlib.suppress(RuntimeError):  # a storage offset not 4-byte aligned
                return flat.view(torch.int32)
        return flat

    if not torch.equal(raw(got), raw(want)):
        return "other bytes"
    return ""


def save_safetensors(
    obj: Any,
    output: str | os.PathLike[str],
    *,
    force: bool = False,
    budget: MemoryBudget | None = None,
) -> ConvertResult:
    """Write a tensor tree as safetensors, atomically; never overwrite unless ``force``.

    The output must be a regular file or nothing (a device or a FIFO is refused, never
    replaced); the temporary file never outlives a failure, and the file is read back and
    compared with the tensors before it is renamed into place. ``budget`` bounds the copies
    the conversion makes (1 GiB when not given).
    """
    out = check_output(output, force=force)
    budget = budget if budget is not None else MemoryBudget()
    encoded = encode_file(obj, display(out), budget)
    write_atomic(
        out, lambda tmp: write_verified(encoded, tmp, display(out), budget), what="safetensors file"
    )
    return ConvertResult(
        str(out),
        len(encoded.tensors),
        encoded.aliases,
        encoded.copied_views,
        out.stat().st_size,
    )


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask, read without changing
    it (the temporary file the output is written through is created 0600)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def convert(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    force: bool = False,
    max_memory: int | None = None,
    baseline: int = 0,
) -> ConvertResult:
    """Load ``source`` with the safe loader (raises if unsafe) and write it as safetensors.

    Everything that can be refused is refused before the load: an output that is a device,
    a FIFO, an existing file without ``force``, or a name too long; an input that is not
    a regular file. ``max_memory`` (bytes, default 1 GiB) bounds the whole conversion:
    the private copy of the input, what the analysis inflates, and the copies written;
    ``baseline`` is memory already in use that counts against it.
    """
    from trainguard.artifacts.loader import load_bytes, read_private

    out = check_output(output, force=force)
    try:
        info = os.stat(source)
    except OSError as exc:
        raise InputError(f"{display(source)}: cannot read: {reason(exc)}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{display(source)}: is {describe_mode(info.st_mode)}, not a file")
    with contextlib.suppress(OSError):
        if os.path.samefile(source, out):
            raise UsageError(f"{display(output)}: the output would overwrite the input")
    budget = MemoryBudget(
        DEFAULT_MAX_MEMORY if max_memory is None else max_memory, baseline=baseline
    )
    data = read_private(source, budget)
    obj = load_bytes(data, display(source), map_location="cpu", budget=budget)
    result = save_safetensors(obj, out, force=force, budget=budget)
    result.source = os.fspath(source)
    return result
