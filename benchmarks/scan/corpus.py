"""The generated corpus of malicious and benign model files the scanner is tested on.

``build_malicious(directory, marker)`` writes one file per known evasion of pickle
scanners (picklescan, modelscan, fickling and friends); every payload's only effect,
if a naive loader ever runs it, is creating ``marker``. ``build_benign(directory)``
writes real, payload-free checkpoints, arrays and pickles of the kinds a training
cluster holds. ``naive_load`` opens a sample the way a careless victim would; it is
only ever called in a throwaway subprocess (tests/artifacts/test_corpus_live.py).

This module holds the public API, a small pickle-opcode assembler and the helpers
that splice payload pickles into real containers (torch zip, legacy torch, tar,
npy). The catalogues live in :mod:`benchmarks.scan.corpus_malicious` and
:mod:`benchmarks.scan.corpus_benign`.

The benchmark adds two parts the regression tests do not iterate:
``build_differential(directory, marker)`` (polyglots and reader differentials,
:mod:`benchmarks.scan.corpus_differential`) and ``build_real(directory)`` (the folders
real training code writes, :mod:`benchmarks.scan.corpus_real`).
"""

from __future__ import annotations

import copyreg
import dataclasses
import functools
import io
import pickle
import pickletools
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Every container format the corpus writes (``Sample.format``).
FORMATS: tuple[str, ...] = (
    "torch-zip",
    "torch-legacy",
    "torch-tar",
    "pickle",
    "npy",
    "npz",
    "joblib",
    "safetensors",
)


@dataclass(frozen=True)
class Sample:
    """One file of the corpus and what a scanner should know about it."""

    name: str
    path: Path
    technique: str
    reference: str
    malicious: bool
    format: str
    loader: str
    #: False when the naive loader would not run the payload; ``technique`` says why
    live: bool = True
    #: "core" (the regression corpus), "differential" or "real" (benign files as training
    #: code writes them); the extra parts are built by the benchmark only
    part: str = "core"
    #: for "real" samples: the trainguard outcome a user should see ("clean" for model
    #: files, "skipped" for files no model loader opens); the run reports what it got
    expected: str = ""


#: The naive loaders (``Sample.loader``).
LOADERS: tuple[str, ...] = ("torch.load", "pickle.load", "numpy.load", "joblib.load", "safetensors")

#: Extension codes the EXT1/EXT2/EXT4 samples use. Stock CPython registers none, so a
#: victim is exposed only if some library registered them; ``naive_load`` plays that
#: library. Values are (module, name) as copyreg.add_extension takes them.
EXTENSION_CODES: dict[int, tuple[str, str]] = {
    0xE1: ("os", "system"),
    0x1F2E: ("builtins", "exec"),
    0x7F3E2D1C: ("subprocess", "run"),
}


# --- a pickle-opcode assembler -------------------------------------------------------


class Ops(bytes):
    """Raw opcodes; anything else given to :func:`lit` is a Python literal to encode."""


def lit(value: object) -> Ops:
    """Opcodes that push ``value`` (protocol 2 opcodes, plus BINBYTES for bytes)."""
    if isinstance(value, Ops):
        return value
    if value is None:
        return Ops(b"N")
    if isinstance(value, bool):
        return Ops(b"\x88" if value else b"\x89")
    if isinstance(value, int):
        return Ops(b"J" + struct.pack("<i", value))
    if isinstance(value, str):
        data = value.encode("utf-8")
        return Ops(b"X" + struct.pack("<I", len(data)) + data)
    if isinstance(value, bytes):
        return Ops(b"B" + struct.pack("<I", len(value)) + value)
    if isinstance(value, tuple):
        return Ops(b"(" + b"".join(lit(v) for v in value) + b"t")
    if isinstance(value, list):
        return Ops(b"](" + b"".join(lit(v) for v in value) + b"e")
    if isinstance(value, dict):
        pairs = b"".join(lit(k) + lit(v) for k, v in value.items())
        return Ops(b"}(" + pairs + b"u")
    raise TypeError(f"cannot encode {type(value).__name__}")


def text0(value: str) -> Ops:
    """Protocol-0 UNICODE, escaped the way pickle's own protocol-0 writer does."""
    for raw, esc in (("\\", "\\u005c"), ("\0", "\\u0000"), ("\n", "\\u000a"), ("\r", "\\u000d")):
        value = value.replace(raw, esc)
    return Ops(b"V" + value.encode("raw-unicode-escape") + b"\n")


def short(value: str) -> Ops:
    """SHORT_BINUNICODE (protocol 4)."""
    data = value.encode("utf-8")
    return Ops(b"\x8c" + bytes([len(data)]) + data)


def glob(dotted: str) -> Ops:
    """GLOBAL of ``module.name`` (split at the last dot): the opcode every scanner knows."""
    module, _, name = dotted.rpartition(".")
    return Ops(b"c" + module.encode() + b"\n" + name.encode() + b"\n")


def sglob(module: str, name: str) -> Ops:
    """STACK_GLOBAL with both names pushed right before it (protocol 4)."""
    return Ops(short(module) + short(name) + b"\x93")


def call(func: object, *args: object) -> Ops:
    """REDUCE: ``func(*args)``."""
    return Ops(lit(func) + lit(tuple(args)) + b"R")


def attr(obj: object, name: str) -> Ops:
    """``builtins.getattr(obj, name)``."""
    return call(glob("builtins.getattr"), obj, name)


def pickled(body: bytes, protocol: int = 2) -> bytes:
    """A whole pickle: PROTO (from protocol 2 on), ``body``, STOP."""
    head = b"\x80" + bytes([protocol]) if protocol >= 2 else b""
    return head + body + b"."


class Reduce:
    """An object that pickles as ``func(*args)``: lets real writers emit a payload.

    torch.save, numpy.save and joblib.dump write it with their own picklers, so the
    surrounding container is exactly what those libraries produce. Pickling it never
    calls ``func``.
    """

    def __init__(self, func: Callable[..., object], args: tuple[object, ...]) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.func, self.args


# --- containers --------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def torch_template() -> bytes:
    """A real ``torch.save`` zip of a tiny state dict; payloads are spliced into copies."""
    import torch

    state = {"fc.weight": torch.arange(6.0).reshape(2, 3), "fc.bias": torch.zeros(2)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@functools.lru_cache(maxsize=1)
def torch_legacy_template() -> bytes:
    """A real pre-zip ``torch.save`` file (``_use_new_zipfile_serialization=False``)."""
    import torch

    state = {"fc.weight": torch.arange(6.0).reshape(2, 3), "fc.bias": torch.zeros(2)}
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def zip_members(raw: bytes) -> list[tuple[str, bytes]]:
    """The members of a zip in stored order."""
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def write_zip(members: Iterable[tuple[str, bytes]], deflate: Sequence[str] = ()) -> bytes:
    """A zip of ``members`` (stored, except names listed in ``deflate``); names may repeat."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are deliberate
        for name, data in members:
            method = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = method
            archive.writestr(info, data)
    return buffer.getvalue()


def torch_zip(
    data_pkl: bytes,
    *,
    folder: str = "archive",
    extra: Sequence[tuple[str, bytes]] = (),
    deflate_data_pkl: bool = False,
) -> bytes:
    """The members of a real torch.save zip, re-zipped with ``data.pkl`` replaced.

    ``folder`` renames the top folder torch calls ``archive``; ``extra`` members are
    appended; torch's 64-byte member alignment is not kept (its reader does not need it).
    """
    members = []
    for name, data in zip_members(torch_template()):
        inner = name.split("/", 1)[1]
        members.append((f"{folder}/{inner}", data_pkl if inner == "data.pkl" else data))
    members.extend(extra)
    deflate = [f"{folder}/data.pkl"] if deflate_data_pkl else []
    return write_zip(members, deflate)


def _central_directory(raw: bytes) -> list[tuple[int, str]]:
    """(offset, name) of every central-directory entry."""
    end = raw.rfind(b"PK\x05\x06")
    count, _, offset = struct.unpack_from("<HII", raw, end + 10)
    entries = []
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", raw, offset + 28)
        entries.append((offset, raw[offset + 46 : offset + 46 + name_len].decode()))
        offset += 46 + name_len + extra_len + comment_len
    return entries


def patch_zip_entry(
    raw: bytes,
    name: str,
    *,
    set_flags: int = 0,
    crc_xor: int = 0,
    local_name: str | None = None,
) -> bytes:
    """Tamper with one entry's headers: flag bits, CRC, or the local header's file name."""
    out = bytearray(raw)
    for central, entry_name in _central_directory(raw):
        if entry_name != name:
            continue
        local = struct.unpack_from("<I", raw, central + 42)[0]
        for flags_at, crc_at in ((central + 8, central + 16), (local + 6, local + 14)):
            (flags,) = struct.unpack_from("<H", out, flags_at)
            (crc,) = struct.unpack_from("<I", out, crc_at)
            struct.pack_into("<H", out, flags_at, flags | set_flags)
            struct.pack_into("<I", out, crc_at, crc ^ crc_xor)
        if local_name is not None:
            encoded = local_name.encode()
            if len(encoded) != len(name.encode()):
                raise ValueError("the replacement local name must keep the length")
            out[local + 30 : local + 30 + len(encoded)] = encoded
    return bytes(out)


def split_pickles(raw: bytes) -> tuple[list[bytes], bytes]:
    """Consecutive pickles at the start of ``raw`` (read, never run), and the rest.

    Stops at the first position that does not parse as a pickle (legacy torch files
    end in raw storage bytes).
    """
    stream = io.BytesIO(raw)
    pickles: list[bytes] = []
    while stream.tell() < len(raw):
        start = stream.tell()
        try:
            for _ in pickletools.genops(stream):
                pass
        except ValueError:
            stream.seek(start)
            break
        pickles.append(raw[start : stream.tell()])
        if len(pickles) == 5:  # magic, protocol, sys_info, main, storage keys
            break
    return pickles, raw[stream.tell() :]


def legacy_tar(storages: bytes, tensors: bytes, main: bytes, sys_info: bytes) -> bytes:
    """The pre-1.0 torch tar layout (members sys_info, pickle, tensors, storages)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            ("sys_info", sys_info),
            ("pickle", main),
            ("tensors", tensors),
            ("storages", storages),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# --- loading -----------------------------------------------------------------------


def register_extensions() -> None:
    """Register :data:`EXTENSION_CODES` as a library in the victim's process might."""
    for code, (module, name) in EXTENSION_CODES.items():
        copyreg.add_extension(module, name, code)


def naive_load(sample: Sample) -> object:
    """Load ``sample`` with the naive, UNSAFE loader a victim would use.

    Runs any payload the file carries: call it only in a disposable subprocess.
    ``pickle.load`` reads every pickle in the file, as readers of appended pickle
    streams do; npz members are all read, as ``dict(np.load(...))`` does.
    """
    if sample.loader != "safetensors":
        register_extensions()
    if sample.loader == "torch.load":
        import torch

        return torch.load(sample.path, map_location="cpu", weights_only=False)
    if sample.loader == "pickle.load":
        objects: list[object] = []
        with sample.path.open("rb") as stream:
            while stream.peek(1):
                objects.append(pickle.load(stream))
        return objects[0] if len(objects) == 1 else objects
    if sample.loader == "numpy.load":
        import numpy

        loaded = numpy.load(sample.path, allow_pickle=True)
        if isinstance(loaded, numpy.lib.npyio.NpzFile):
            with loaded:
                return {key: loaded[key] for key in loaded.files}
        return loaded
    if sample.loader == "joblib.load":
        import joblib

        return joblib.load(sample.path)
    if sample.loader == "safetensors":
        from safetensors.torch import load_file

        return load_file(sample.path)
    if sample.loader == "none":  # a text file of the real part: no model loader opens it
        return sample.path.read_bytes()
    raise ValueError(f"unknown loader {sample.loader!r}")


def build_malicious(directory: Path, marker: Path) -> list[Sample]:
    """Write every malicious sample into ``directory``; payloads only create ``marker``."""
    from benchmarks.scan import corpus_malicious

    directory.mkdir(parents=True, exist_ok=True)
    return corpus_malicious.build(directory, marker.resolve())


def build_benign(directory: Path) -> list[Sample]:
    """Write the benign corpus (real checkpoints, arrays, pickles) into ``directory``."""
    from benchmarks.scan import corpus_benign

    directory.mkdir(parents=True, exist_ok=True)
    return corpus_benign.build(directory)


def build_differential(directory: Path, marker: Path) -> list[Sample]:
    """Write the differential samples (polyglots, reader differentials); see
    :mod:`benchmarks.scan.corpus_differential`. Payloads only create ``marker``."""
    from benchmarks.scan import corpus_differential

    return corpus_differential.build(directory, marker)


def build_real(directory: Path) -> list[Sample]:
    """Write the real-world benign folders (what training code writes); see
    :mod:`benchmarks.scan.corpus_real`."""
    from benchmarks.scan import corpus_real

    return corpus_real.build(directory)


def describe(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """The catalogue as plain JSON-able data (for reports, benchmarks and subprocesses)."""
    return [{**dataclasses.asdict(s), "path": str(s.path)} for s in samples]
