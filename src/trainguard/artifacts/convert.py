"""Conversion to safetensors: tensors as tensors, everything else as JSON metadata.

safetensors holds flat named tensors and a string-to-string metadata map. A training
checkpoint is a tree (``{"model": ..., "optimizer": {"state": {0: ...}}, "epoch": 3}``),
so the tree is kept as tagged JSON under the ``trainguard.structure`` metadata key, each
tensor replaced by its name. Tensors that are the same view of the same storage (tied
weights) are written once and restored as one object; other overlapping views are
written as independent copies and listed under ``trainguard.shared``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainguard.artifacts.arrays import STRUCTURE_KEY
from trainguard.errors import CheckpointError, UsageError

SHARED_KEY = "trainguard.shared"


@dataclass
class ConvertResult:
    """What a conversion wrote."""

    output: str
    tensors: int = 0
    aliases: dict[str, str] = field(default_factory=dict)
    copied_views: list[list[str]] = field(default_factory=list)
    bytes_written: int = 0


class _Encoder:
    def __init__(self) -> None:
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
        out = value.detach().to("cpu").contiguous()
        if storage.nbytes() > 0:
            group = self._storages.setdefault((value.device.type, storage.data_ptr()), [])
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

        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value if abs(value) < 2**53 else {"__int__": str(value)}
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, torch.Tensor):
            return self.tensor(value, path)
        if isinstance(value, numpy.ndarray) and value.dtype != object:
            tag = self.tensor(torch.from_numpy(numpy.ascontiguousarray(value)), path)
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


def save_safetensors(
    obj: Any, output: str | os.PathLike[str], *, force: bool = False
) -> ConvertResult:
    """Write a tensor tree as safetensors, atomically; never overwrite unless ``force``."""
    from safetensors.torch import save_file

    out = Path(output)
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists (use --force to overwrite)")
    encoder = _Encoder()
    try:
        structure = encoder.encode(obj, "")
    except RecursionError as exc:
        raise CheckpointError("checkpoint nested too deeply to convert") from exc
    metadata = {"format": "pt", STRUCTURE_KEY: json.dumps(structure, separators=(",", ":"))}
    groups = encoder.shared_groups()
    if groups:
        metadata[SHARED_KEY] = json.dumps(groups)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(encoder.tensors, tmp, metadata=metadata)
        os.replace(tmp, out)
    except OSError as exc:
        raise CheckpointError(f"{out}: cannot write: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ConvertResult(
        str(out), len(encoder.tensors), encoder.aliases, groups, out.stat().st_size
    )


def convert(
    source: str | os.PathLike[str], output: str | os.PathLike[str], *, force: bool = False
) -> ConvertResult:
    """Load ``source`` with the safe loader (raises if unsafe) and write it as safetensors."""
    from trainguard.artifacts.loader import load

    if Path(source).resolve() == Path(output).resolve():
        raise UsageError(f"{output}: the output would overwrite the input")
    obj = load(source, map_location="cpu")
    return save_safetensors(obj, output, force=force)
