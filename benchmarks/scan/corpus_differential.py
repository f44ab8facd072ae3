"""The differential part of the scanner corpus: files a naive scanner and the loader read apart.

Each file is built so that a scanner reading the bytes one way and the victim's loader
reading them another way disagree: a file valid as two formats at once (a polyglot), a
ZIP member the way PyTorch's reader finds it but a name-matching scanner does not, an
``.npy`` header variant, joblib array-wrapper fields read the way joblib reads them, the
oldest tar layout of ``torch.save`` without its ``ustar`` magic. The payload is the
corpus's harmless one (it only creates the marker file) and ``Sample.loader`` names the
loader that runs it; tests/benchmarks/test_scan_differential.py proves every sample runs
its payload under that loader. The DIFFERENTIALS matrix in
tests/artifacts/test_differentials.py tries each trick against every loader; these are
the benchmark's own copies, written here so that they target the benchmark's marker.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.scan.corpus import Ops, Sample, glob, text0, torch_template, write_zip, zip_members

#: ``Sample.format`` of the polyglots, kept out of :data:`benchmarks.scan.corpus.FORMATS`
#: (the core corpus's formats, which its own tests check one for one).
POLYGLOT = "polyglot"
PART = "differential"


def payload(marker: Path) -> Ops:
    """Protocol-0 opcodes for ``builtins.open(marker, "w")`` that leave the stack as found.

    They can be spliced between any two opcodes of a pickle (POP drops the file object).
    """
    return Ops(glob("builtins.open") + b"(" + text0(str(marker)) + text0("w") + b"tR0")


def evil(marker: Path) -> bytes:
    """A whole pickle: the payload, then None."""
    return payload(marker) + b"N."


def npy_object(
    marker: Path, *, descr: str = "'|O'", version: int = 1, shape: str = "(1,)"
) -> bytes:
    """An ``.npy`` whose header declares Python objects, so its data area is a pickle."""
    text = f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}".encode()
    prefix = 10 if version == 1 else 12
    text += b" " * (63 - (len(text) + prefix) % 64) + b"\n"
    size = struct.pack("<H" if version == 1 else "<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + size + text + b"\x80\x02" + evil(marker)


def _torch_members(
    data_pkl: bytes, rename: Callable[[str], str] = lambda n: n
) -> list[tuple[str, bytes]]:
    """The members of a real torch.save zip, ``data.pkl`` replaced, names passed on."""
    out = []
    for name, data in zip_members(torch_template()):
        out.append((rename(name), data_pkl if name.endswith("/data.pkl") else data))
    return out


def _saved(obj: object, **kwargs: object) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)  # type: ignore[arg-type]
    return buffer.getvalue()


def _safetensors_pickle(marker: Path) -> bytes:
    """A valid safetensors file whose first bytes are also a pickle.

    The header length is chosen so its first two bytes are ``S"``: STRING takes the
    line up to a newline placed at the end of the JSON header, right after a closing
    quote; ``}}`` closes the JSON and is two EMPTY_DICTs to the unpickler, which goes
    on into the tensor bytes: the payload, then STOP.
    """
    length = 0x2253
    body = payload(marker) + b"."
    tensor = {"dtype": "U8", "shape": [len(body)], "data_offsets": [0, len(body)]}
    head = '{"t":' + json.dumps(tensor, separators=(",", ":")) + ',"__metadata__":{"pad":"'
    head += "x" * (length - len(head) - 4) + '"\n}}'
    return struct.pack("<Q", length) + head.encode() + body


def _tar_v7(members: list[tuple[str, bytes]]) -> bytes:
    """A tar in the pre-POSIX layout (no ``ustar`` magic), which ``tarfile`` still reads."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(buffer.getvalue())
    at = 0
    while raw[at : at + 1] not in (b"", b"\0"):
        size = int(raw[at + 124 : at + 135].decode() or "0", 8)
        raw[at + 257 : at + 265] = bytes(8)  # magic and version gone
        raw[at + 148 : at + 156] = b" " * 8
        raw[at + 148 : at + 155] = b"%06o\0" % sum(raw[at : at + 512])
        at += 512 + (size + 511) // 512 * 512
    return bytes(raw)


class _Wrapped:
    """Pickles as ``func(*args)`` followed by BUILD ``state`` (real pickler output)."""

    def __init__(self, func: object, args: tuple[object, ...], state: object = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[object, ...]:
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _joblib_wrapper(**fields: object) -> bytes:
    """A protocol-2 pickle of joblib's NumpyArrayWrapper for 4 uint8s, cut after its BUILD.

    joblib reads the array bytes right after that BUILD, then goes on unpickling.
    """
    import numpy as np
    from joblib.numpy_pickle import NumpyArrayWrapper

    wrapper = NumpyArrayWrapper.__new__(NumpyArrayWrapper)
    state = {"subclass": np.ndarray, "shape": (4,), "order": "C", "dtype": np.dtype("u1")}
    wrapper.__dict__.update({**state, **fields})
    data = pickle.dumps(wrapper, protocol=2)
    assert data.endswith(b"b.")
    return data[:-1]


def build(directory: Path, marker: Path) -> list[Sample]:
    """Write every differential sample into ``directory``; payloads only create ``marker``."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = marker.resolve()
    samples: list[Sample] = []

    def add(name: str, data: bytes, fmt: str, loader: str, technique: str, suffix: str) -> None:
        path = directory / f"{name}{suffix}"
        path.write_bytes(data)
        samples.append(Sample(name, path, technique, "issue 12", True, fmt, loader, part=PART))

    bad = evil(marker)
    # --- polyglots: one file, two formats ------------------------------------------
    add(
        "diff_pickle_then_torchzip",
        bad + _saved({"w": 1}),
        POLYGLOT,
        "pickle.load",
        "a pickle, then a whole torch.save zip: torch.load finds the zip's directory at "
        "the end and loads the zip; pickle.load (and joblib, numpy) runs the pickle at byte 0",
        ".pt",
    )
    add(
        "diff_safetensors_pickle",
        _safetensors_pickle(marker),
        POLYGLOT,
        "pickle.load",
        "a valid safetensors file whose length field and JSON header also unpickle",
        ".safetensors",
    )
    npy_member = ("archive/extra/x.npy", npy_object(marker))
    add(
        "diff_torchzip_npy_member",
        write_zip([*_torch_members(b"\x80\x02}q\x00."), npy_member]),
        POLYGLOT,
        "numpy.load",
        "a torch zip with an object-array .npy member: numpy.load reads the zip as npz",
        ".pt",
    )
    import torch

    storage = torch.frombuffer(bytearray(npy_object(marker)), dtype=torch.uint8)
    add(
        "diff_torch_storage_is_npy",
        _saved({"weight": storage}),
        POLYGLOT,
        "numpy.load",
        "a real torch.save whose tensor bytes are an object-array .npy: numpy.load reads "
        "the zip as npz and the storage record as an array",
        ".pt",
    )
    # --- ZIP members found the way PyTorch's reader finds them -----------------------
    add(
        "diff_zip_data_pkl_upper_case",
        write_zip(_torch_members(bad, lambda n: n.replace("data.pkl", "DATA.PKL"))),
        "torch-zip",
        "torch.load",
        "data.pkl stored as DATA.PKL: PyTorch's reader looks names up ignoring case",
        ".pt",
    )
    add(
        "diff_zip_directory_entry_first",
        write_zip([("archive/", b""), *_torch_members(bad)]),
        "torch-zip",
        "torch.load",
        "a folder entry before the members",
        ".pt",
    )
    # --- .npy header variants numpy accepts ------------------------------------------
    for name, kwargs, what in (
        ("diff_npy_structured_object", {"descr": "[('a', '|O')]"}, "a structured dtype"),
        ("diff_npy_subarray_object", {"descr": "('|O', (1,))"}, "a subarray dtype"),
        ("diff_npy_v2_header", {"version": 2}, "a version 2.0 header"),
        ("diff_npy_v3_header", {"version": 3}, "a version 3.0 (utf-8) header"),
        ("diff_npy_python2_long", {"shape": "(1L,)"}, "a shape written by Python 2"),
    ):
        add(
            name, npy_object(marker, **kwargs), "npy", "numpy.load", f"object array, {what}", ".npy"
        )
    # --- joblib wrapper fields, read as joblib reads them ------------------------------
    inner = payload(marker) + b"."
    add(
        "diff_joblib_alignment_none",
        _joblib_wrapper(numpy_array_alignment_bytes=None)
        + bytes([len(inner) - 1])
        + b"\0" * 3
        + inner
        + b".",
        "joblib",
        "joblib.load",
        "numpy_array_alignment_bytes=None: joblib reads no padding byte, so the byte a "
        "scanner takes for the padding length is the first array byte",
        ".joblib",
    )
    import numpy as np
    from joblib.numpy_pickle import NumpyArrayWrapper

    state = {"subclass": np.ndarray, "shape": (4,), "order": "C", "dtype": np.dtype("u1")}
    made = pickle.dumps(
        _Wrapped(NumpyArrayWrapper, (np.ndarray, (4,), "C", np.dtype("u1"), False, 16), state),
        protocol=2,
    )
    add(
        "diff_joblib_constructor_alignment",
        made[:-1]
        + b"\x05"
        + b"\0" * 3
        + b"."
        + b"B"
        + struct.pack("<I", len(inner))
        + inner
        + b".",
        "joblib",
        "joblib.load",
        "a wrapper built by its constructor (alignment 16) whose BUILD state has no "
        "alignment field: the padding byte is read only by joblib",
        ".joblib",
    )
    # --- the oldest torch.save layout ----------------------------------------------------
    empty = b"\x80\x02K\x00.\x80\x02]q\x00."  # no storages, then no storage views
    add(
        "diff_torch_tar_v7",
        _tar_v7([("storages", empty), ("tensors", b"\x80\x02K\x00."), ("pickle", bad)]),
        "torch-tar",
        "torch.load",
        "a pre-1.0 torch.save tar without the ustar magic (tarfile and torch.load read it)",
        ".pt",
    )
    return samples
