"""Loading NumPy (``.npy``, ``.npz``) and safetensors files from bytes already checked.

Numeric arrays and tensors are views into the caller's private buffer; object arrays
are rebuilt by the restricted unpickler. A safetensors file written by ``convert``
carries its original structure (nested dicts, epochs, configs) in its metadata and is
rebuilt into it.
"""

from __future__ import annotations

import io
import json
from typing import Any

from trainguard.artifacts.budget import MemoryBudget
from trainguard.artifacts.interface import Analysis, Format, FormatError
from trainguard.artifacts.npy import npy_data_size, parse_npy_header
from trainguard.artifacts.safetensors_check import check_safetensors
from trainguard.artifacts.zipcheck import parse_zip, read_member
from trainguard.errors import UnsupportedFormatError

STRUCTURE_KEY = "trainguard.structure"

#: safetensors dtype names -> torch dtype attribute names
TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "F64": "float64", "I64": "int64", "U64": "uint64", "C64": "complex64",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}  # fmt: skip


def load_npz(buf: memoryview, budget: MemoryBudget) -> dict[str, Any]:
    """Each member of an npz archive: its array, or its raw bytes if it is not a .npy."""
    out: dict[str, Any] = {}
    for member in parse_zip(buf, Analysis(Format.NPZ)):
        budget.reserve(member.size, "the array", member=member.name)  # kept by the result
        got = read_member(buf, member, limit=member.size)
        raw = got if isinstance(got, bytearray) else bytearray(got)
        key = member.name[:-4] if member.name.endswith(".npy") else member.name
        out[key] = load_npy(raw, 0, len(raw)) if raw.startswith(b"\x93NUMPY") else bytes(raw)
    return out


def load_npy(data: bytearray, start: int, end: int) -> Any:
    import numpy

    view = memoryview(data)[start:end]
    header = parse_npy_header(view, 0)
    size = npy_data_size(header)
    if size is None:
        from trainguard.artifacts.unpickler import RestrictedUnpickler

        return RestrictedUnpickler(io.BytesIO(view[header.data_offset :])).load()
    descr: Any = header.descr
    dtype = numpy.lib.format.descr_to_dtype(descr)
    count = size // dtype.itemsize if dtype.itemsize else 0
    flat = numpy.frombuffer(data, dtype=dtype, count=count, offset=start + header.data_offset)
    if header.fortran_order:
        return flat.reshape(header.shape, order="F")
    return flat.reshape(header.shape, order="C")


def load_safetensors(data: bytearray, buf: memoryview, map_location: Any) -> Any:
    import torch

    infos = check_safetensors(buf, Analysis(Format.SAFETENSORS))
    header_len = int.from_bytes(buf[:8], "little")
    start = 8 + header_len
    header = json.loads(bytes(buf[8:start]))
    metadata = header.get("__metadata__") or {}
    tensors: dict[str, torch.Tensor] = {}
    for name, info in infos.items():
        dtype_name = TORCH_DTYPES.get(info.dtype)
        if dtype_name is None or not hasattr(torch, dtype_name):
            raise UnsupportedFormatError(f"tensor {name!r}: dtype {info.dtype} is not supported")
        dtype = getattr(torch, dtype_name)
        nbytes = info.end - info.begin
        if nbytes == 0:
            tensor = torch.empty(info.shape, dtype=dtype)
        else:
            raw = torch.frombuffer(data, dtype=torch.uint8, count=nbytes, offset=start + info.begin)
            tensor = raw.view(dtype).reshape(info.shape)
        if (
            map_location is not None
            and not callable(map_location)
            and not isinstance(map_location, dict)
        ):
            tensor = tensor.to(map_location)
        tensors[name] = tensor
    if STRUCTURE_KEY not in metadata:
        return tensors
    from trainguard.artifacts.convert import decode_structure

    try:
        return decode_structure(json.loads(metadata[STRUCTURE_KEY]), tensors)
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"invalid {STRUCTURE_KEY} metadata: {exc}") from exc
