"""The polyglot and parser-differential matrix: every file a real loader runs is not SAFE.

A verdict is only worth the file the victim loads. Each sample below is built so that
trainguard and a real loader could read the same bytes differently: a file valid as
two formats at once, a ZIP member name PyTorch's reader matches and a case-sensitive
reader does not, joblib array-wrapper fields read differently from joblib, a pickle
hidden in bytes a scanner skips as array data. Each carries a harmless payload (it
creates a marker file named after the sample, relative to the loader's working folder).

The real loaders (``torch.load(weights_only=False)``, ``pickle.load``,
``numpy.load(allow_pickle=True)`` with every npz key read, ``joblib.load`` with and
without ``mmap_mode``) each run once, in their own subprocess and folder, over all the
samples; the markers that appear say which loader ran which payload. Every sample
states which loaders run it, and the test checks that first (a sample no loader runs
proves nothing, so the test would be wrong), then that the scan of every file some
loader runs is UNSAFE or UNVERIFIABLE (never SAFE, never skipped as unsupported) and
that the scan itself creates no marker.

A plain pickle, a legacy torch.save file and an uncompressed joblib dump all start with
a pickle at byte 0, which every loader but numpy-on-npy runs: a polyglot with one is a
polyglot with each, and the loaders each sample names say which ran it.

Pairs of formats that cannot be one file (each comment says why) are left out:
- zip first, pickle second: a ZIP starts with ``PK``, and ``P`` (PERSID) makes every
  unpickler stop at once without a ``persistent_load``; joblib and numpy then fail too.
- npy first, anything second: ``\\x93`` is no pickle opcode and every other loader needs
  its own magic at byte 0.
- zip or npy with safetensors: the first 8 bytes would declare a header of tens of GB
  (``PK\\x03\\x04...``) or more; the safetensors library refuses a header over 100 MB.
- safetensors with zip or npy data inside: no victim loader looks past byte 0 for them
  (torch and numpy need ``PK\\x03\\x04`` or ``\\x93NUMPY`` at byte 0).
- an npy's numeric data hiding a pickle: numpy never unpickles it, and every other
  loader stops at ``\\x93``; only the dtype's object flag matters (the npy samples).
Samples tried and left out because no loader runs them: a ZIP whose entries sit in two
folders (PyTorch's reader refuses any entry outside the first entry's folder), gzip and
zlib streams in several members (joblib's reader does not go past the first: it loops).
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from trainguard.artifacts.interface import Verdict
from trainguard.artifacts.scanner import scan_file

TORCH, PICKLE, NUMPY, JOBLIB = "torch", "pickle", "numpy", "joblib"
LOADERS = (TORCH, PICKLE, NUMPY, JOBLIB)


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    #: the loaders that run its payload (checked: the test is wrong otherwise)
    runs: frozenset[str]
    why: str


def payload(name: str) -> bytes:
    """Protocol-0 opcodes that call ``open(marker, "w")`` and drop the file object.

    They leave the stack as they found it, so they can be spliced between any two
    opcodes of a pickle.
    """
    return b"cbuiltins\nopen\n(Vm-" + name.encode() + b"\nVw\ntR0"


def evil_pickle(name: str) -> bytes:
    return payload(name) + b"N."


class _Opens:
    """An object whose unpickling opens the marker (for real pickler output)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, ("m-" + self.name, "w"))


def zip_of(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w", method) as archive:
        warnings.simplefilter("ignore")  # duplicate names are the point of some samples
        for name, data in entries:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return out.getvalue()


def torch_records(prefix: str = "archive") -> list[tuple[str, bytes]]:
    return [
        (f"{prefix}/byteorder", b"little"),
        (f"{prefix}/version", b"3\n"),
        (f"{prefix}/.data/serialization_id", b"0" * 40),
    ]


def torch_zip(data_pkl: bytes, *, name: str = "archive/data.pkl") -> bytes:
    return zip_of([(name, data_pkl), *torch_records(name.split("/")[0])])


def npy_object(
    name: str, version: tuple[int, int] = (1, 0), descr: str = "'|O'", shape: str = "(1,)"
) -> bytes:
    """An ``.npy`` object array whose data (a pickle) runs the payload."""
    header = f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}"
    text = header.encode("utf8" if version == (3, 0) else "latin1")
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    size = struct.pack("<H" if version == (1, 0) else "<I", len(text))
    return b"\x93NUMPY" + bytes(version) + size + text + b"\x80\x02" + evil_pickle(name)


def torch_saved(obj: object, **kwargs: object) -> bytes:
    import torch

    out = io.BytesIO()
    torch.save(obj, out, **kwargs)  # type: ignore[arg-type]
    return out.getvalue()


def safetensors_pickle(name: str, *, trailing: bool = False) -> bytes:
    """A valid safetensors file whose first bytes are a pickle.

    The length field starts ``S"``: STRING reads up to the first newline, which sits
    in the JSON after a quoted metadata value, then ``}}`` closes the JSON as two
    EMPTY_DICTs and the pickle goes on in the tensor bytes (or the trailing bytes).
    """
    length = 0x2253  # b'S"' then zeros: 8787 bytes of JSON
    body = payload(name) + b"."
    tensor = {"dtype": "U8", "shape": [0 if trailing else len(body)]}
    tensor["data_offsets"] = [0, 0 if trailing else len(body)]
    head = '{"t":' + json.dumps(tensor, separators=(",", ":")) + ',"__metadata__":{"a":"'
    head += "x" * (length - len(head) - 4) + '"\n}}'
    assert len(head) == length
    return struct.pack("<Q", length) + head.encode() + body


def tar_of(members: list[tuple[str, bytes]], *, v7: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(out.getvalue())
    if v7:  # the pre-POSIX layout: no "ustar" magic, which Python's tarfile still reads
        pos = 0
        while raw[pos : pos + 1] not in (b"", b"\0"):
            size = int(raw[pos + 124 : pos + 135].decode() or "0", 8)
            raw[pos + 257 : pos + 265] = bytes(8)
            raw[pos + 148 : pos + 156] = b" " * 8
            raw[pos + 148 : pos + 156] = b"%06o\0 " % sum(raw[pos : pos + 512])
            pos += 512 + (size + 511) // 512 * 512
    return bytes(raw)


def torch_tar(name: str, *, v7: bool) -> bytes:
    """The oldest torch.save layout: tar members storages, tensors and pickle."""
    empty = b"\x80\x02K\x00.\x80\x02]q\x00."  # no storages, then no storage views
    members = [("storages", empty), ("tensors", b"\x80\x02K\x00."), ("pickle", evil_pickle(name))]
    return tar_of(members, v7=v7)


# --- joblib array wrappers, written field by field ---------------------------------


class _Dtype:
    """Pickles as ``numpy.dtype(descr)`` with a chosen ``__setstate__`` tuple."""

    def __init__(self, descr: str, state: tuple[object, ...]) -> None:
        self.descr, self.state = descr, state

    def __reduce__(self) -> tuple[object, ...]:
        return (np.dtype, (self.descr, False, True), self.state)


class _Reduced:
    """Pickles as ``callable(*args)`` then BUILD ``state``."""

    def __init__(self, func: object, args: tuple[object, ...], state: object) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[object, ...]:
        return (self.func, self.args, self.state)


def wrapper_pickle(dtype: object, shape: tuple[int, ...], **fields: object) -> bytes:
    """A protocol-2 pickle of a joblib NumpyArrayWrapper, cut just after its BUILD."""
    from joblib.numpy_pickle import NumpyArrayWrapper

    wrapper = NumpyArrayWrapper.__new__(NumpyArrayWrapper)
    wrapper.__dict__.update(
        {"subclass": np.ndarray, "shape": shape, "order": "C", "dtype": dtype, **fields}
    )
    data = pickle_dumps(wrapper)
    assert data.endswith(b"b."), data[-8:]
    return data[:-1]


def pickle_dumps(obj: object) -> bytes:
    import pickle

    return pickle.dumps(obj, protocol=2)


def joblib_samples() -> list[Sample]:
    from joblib.numpy_pickle import NumpyArrayWrapper

    u1 = np.dtype("u1")
    out = []
    n = "joblib-alignment-none"
    pay = payload(n) + b"."
    # joblib reads padding only when the attribute is not None; read as "present" the
    # padding byte (len(pay)) would skip the payload
    data = bytes([len(pay) - 1]) + b"\0" * 3 + pay + b"."
    blob = wrapper_pickle(u1, (4,), numpy_array_alignment_bytes=None) + data
    out.append(Sample(n, blob, frozenset({JOBLIB}), "padding read though the field is None"))

    n = "joblib-dtype-elsize"
    pay = payload(n) + b"."
    fake = _Dtype("u1", (3, "|", None, None, None, 8, 1, 0))  # numpy ignores elsize for u1
    count = len(pay) + 1
    data = b"\0" * count + pay + b"\0" * (7 * count - len(pay)) + b"."
    blob = wrapper_pickle(fake, (count,)) + data
    out.append(Sample(n, blob, frozenset({JOBLIB}), "dtype state elsize numpy ignores"))

    n = "joblib-dtype-flags"
    # a copied dtype takes the object flag from its state: the data is then a pickle
    fake = _Dtype("u1", (3, "|", None, None, None, -1, -1, 1))
    blob = wrapper_pickle(fake, (4,)) + evil_pickle(n) + b"."
    out.append(Sample(n, blob, frozenset(LOADERS), "object flag in a u1 dtype's state"))

    n = "joblib-constructor-alignment"
    pay = payload(n) + b"."
    state = {"subclass": np.ndarray, "shape": (4,), "order": "C", "dtype": u1}
    made = _Reduced(NumpyArrayWrapper, (np.ndarray, (4,), "C", u1, False, 16), state)
    head = pickle_dumps(made)
    assert head.endswith(b"b.")
    # joblib: padding byte 5, five bytes, four array bytes, then the payload; read from
    # the BUILD state alone: four array bytes, STOP, then a pickle of one bytes object
    data = b"\x05" + b"\0" * 3 + b"." + b"B" + struct.pack("<I", len(pay)) + pay + b"."
    out.append(Sample(n, head[:-1] + data, frozenset({JOBLIB}), "wrapper made by its __init__"))

    n = "joblib-nested-wrapper"
    pay = payload(n) + b"."
    # an object array's data is a pickle joblib reads with a plain unpickler: a wrapper
    # in it is not followed by array bytes
    inner = wrapper_pickle(u1, (len(pay) + 1,))
    blob = wrapper_pickle(np.dtype("O"), (1,)) + inner + pay + b"..."
    # a plain unpickler reads the whole stream as one pickle, and runs it too
    out.append(Sample(n, blob, frozenset(LOADERS), "wrapper inside an object array"))

    for n, blob in compressed_samples():
        out.append(Sample(n, blob, frozenset({JOBLIB}), "a stream joblib inflates"))

    n = "joblib-object-array"
    from joblib import dump

    buf = io.BytesIO()
    dump(np.array([_Opens(n)], dtype=object), buf)
    out.append(Sample(n, buf.getvalue(), frozenset({JOBLIB}), "joblib.dump of an object array"))

    n = "joblib-array-bytes-are-pickle"
    pay = payload(n)
    blob = wrapper_pickle(u1, (len(pay),)) + pay + b"."
    runs = frozenset({PICKLE, NUMPY, TORCH})  # joblib skips the bytes as array data
    out.append(Sample(n, blob, runs, "array bytes a plain unpickler runs"))
    return out


def compressed_samples() -> list[tuple[str, bytes]]:
    """Streams joblib inflates whole, while reading only the first would show nothing.

    bz2.BZ2File and lzma.LZMAFile go on into concatenated streams (an lzma container may
    follow an xz one); joblib < 0.10's "ZF" files are still read by joblib.load.
    """
    import bz2
    import lzma
    import zlib

    def body(n: str) -> bytes:
        return pickle_dumps(["x" * 16, _Opens(n)])

    def xz(data: bytes) -> bytes:
        return lzma.compress(data)

    def alone(data: bytes) -> bytes:
        return lzma.compress(data, format=lzma.FORMAT_ALONE)

    pairs = [("bz2", bz2.compress, bz2.compress), ("xz", xz, xz), ("xz-then-lzma", xz, alone)]
    pairs.append(("lzma", alone, alone))
    out = []
    for codec, first, second in pairs:
        n = f"joblib-{codec}-second-stream"
        out.append((n, first(b"") + second(body(n))))
    zfile = body("joblib-zfile")
    out.append(
        ("joblib-zfile", b"ZF" + f"{len(zfile):#x}".encode().ljust(19) + zlib.compress(zfile))
    )
    return out


def polyglot_samples() -> list[Sample]:
    out = []
    n = "pickle+torch-zip"
    benign_zip = torch_saved({"w": 1})
    out.append(Sample(n, evil_pickle(n) + benign_zip, frozenset(LOADERS), "pickle, then a ZIP"))
    n = "safetensors+pickle"
    out.append(
        Sample(n, safetensors_pickle(n), frozenset(LOADERS), "pickle in the length and JSON")
    )
    n = "safetensors-trailing+pickle"
    out.append(
        Sample(n, safetensors_pickle(n, trailing=True), frozenset(LOADERS), "trailing bytes")
    )
    n = "torch-zip+npz-member"
    entries = [("archive/data.pkl", b"\x80\x02N."), *torch_records(), ("evil.npy", npy_object(n))]
    out.append(Sample(n, zip_of(entries), frozenset({NUMPY}), "an npy member beside data.pkl"))
    n = "torch-zip-storage-is-npy"
    import torch

    tensor = torch.frombuffer(bytearray(npy_object(n)), dtype=torch.uint8)
    out.append(
        Sample(n, torch_saved(tensor), frozenset({NUMPY}), "a storage record that is an npy")
    )
    n = "zip-npy-without-suffix"
    out.append(
        Sample(n, zip_of([("weights", npy_object(n))]), frozenset({NUMPY}), "npy not named .npy")
    )
    n = "pickle+tar"
    tar = tar_of([(evil_pickle(n).decode(), b"x")])
    out.append(Sample(n, tar, frozenset({PICKLE, NUMPY, JOBLIB}), "tar whose first name runs"))
    n = "pickle+tar-v7"
    tar = tar_of([(evil_pickle(n).decode(), b"x")], v7=True)
    out.append(Sample(n, tar, frozenset({PICKLE, NUMPY, JOBLIB}), "the same, no ustar magic"))
    n = "torch-tar"
    out.append(Sample(n, torch_tar(n, v7=False), frozenset({TORCH}), "legacy tar checkpoint"))
    n = "torch-tar-v7"
    out.append(Sample(n, torch_tar(n, v7=True), frozenset({TORCH}), "tar with no ustar magic"))
    n = "torch-legacy"
    legacy = torch_saved({"x": _Opens(n)}, _use_new_zipfile_serialization=False)
    out.append(Sample(n, legacy, frozenset({TORCH}), "legacy pickle-sequence checkpoint"))
    return out


def zip_samples() -> list[Sample]:
    out = []

    def add(n: str, build: Callable[[bytes], bytes], runs: set[str], why: str) -> None:
        out.append(Sample(n, build(evil_pickle(n)), frozenset(runs), why))

    add("zip-baseline", torch_zip, {TORCH}, "data.pkl runs the payload")
    add(
        "zip-case-data.pkl",
        lambda p: torch_zip(p, name="archive/DATA.PKL"),
        {TORCH},
        "PyTorch's reader looks names up ignoring case",
    )
    add(
        "zip-case-everything",
        lambda p: zip_of([("ARCHIVE/DATA.PKL", p), *((k.upper(), v) for k, v in torch_records())]),
        {TORCH},
        "every name in capitals",
    )
    add(
        "zip-duplicate-name",
        lambda p: zip_of(
            [("archive/data.pkl", p), *torch_records(), ("archive/data.pkl", b"\x80\x02N.")]
        ),  # fmt: skip
        {TORCH},
        "two entries named data.pkl",
    )
    add(
        "zip-deflated",
        lambda p: zip_of([("archive/data.pkl", p), *torch_records()], zipfile.ZIP_DEFLATED),
        {TORCH},
        "deflated members",
    )
    add(
        "zip-directory-entry-first",
        lambda p: zip_of([("archive/", b""), ("archive/data.pkl", p), *torch_records()]),
        {TORCH},
        "a folder entry first",
    )

    def local_name(p: bytes) -> bytes:
        raw = bytearray(torch_zip(p))
        at = raw.index(b"archive/data.pkl")  # the first, in the local header
        raw[at : at + 16] = b"archive/xxxx.pkl"
        return bytes(raw)

    add("zip-local-name-differs", local_name, {TORCH}, "local header names another member")
    add(
        "zip-dotdot-folder",
        lambda p: zip_of([("../data.pkl", p), *torch_records("..")]),
        {TORCH},
        "every name under '..'",
    )

    def zip64(p: bytes) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            for name, data in [("archive/data.pkl", p), *torch_records()]:
                with archive.open(name, "w", force_zip64=True) as member:
                    member.write(data)
        return out.getvalue()

    add("zip-zip64", zip64, {TORCH}, "zip64 extra fields")

    def end_record_in_comment(p: bytes) -> bytes:
        raw = torch_zip(p)
        end = raw.rindex(b"PK\x05\x06")
        record = raw[end:]  # the end record, no comment: copied into a comment
        return raw[: end + 20] + struct.pack("<H", len(record)) + record

    add("zip-end-record-in-comment", end_record_in_comment, {TORCH}, "a second end record")
    n = "npz-deflated-object"
    npz = zip_of([("a.npy", npy_object(n))], zipfile.ZIP_DEFLATED)
    out.append(Sample(n, npz, frozenset({NUMPY}), "an object array in an npz"))
    return out


def npy_samples() -> list[Sample]:
    out = []
    for n, kwargs in (
        ("npy-object", {}),
        ("npy-structured-object", {"descr": "[('a', '|O')]"}),
        ("npy-v2-header", {"version": (2, 0)}),
        ("npy-v3-header", {"version": (3, 0)}),
        ("npy-subarray-descr", {"descr": "('|O', (1,))"}),
    ):
        out.append(Sample(n, npy_object(n, **kwargs), frozenset({NUMPY}), "object array"))
    n = "npy-python2-long"
    data = npy_object(n, shape="(1L,)")
    out.append(Sample(n, data, frozenset({NUMPY}), "shape written by Python 2"))
    return out


def all_samples() -> list[Sample]:
    samples = polyglot_samples() + zip_samples() + npy_samples() + joblib_samples()
    names = [s.name for s in samples]
    assert len(names) == len(set(names))
    return samples


# --- running the real loaders -------------------------------------------------------

_RUNNER = r"""
import json, os, sys, warnings
warnings.simplefilter("ignore")
loader, paths = sys.argv[1], json.loads(sys.argv[2])
def run(path):
    if loader == "torch":
        import torch
        torch.load(path, weights_only=False)
    elif loader == "pickle":
        import pickle
        with open(path, "rb") as f:
            pickle.load(f)
    elif loader == "numpy":
        import numpy
        got = numpy.load(path, allow_pickle=True)
        for key in getattr(got, "files", ()):
            try:
                got[key]
            except Exception:
                pass
    elif loader == "joblib":
        import joblib
        try:
            joblib.load(path)
        finally:
            joblib.load(path, mmap_mode="r")
for path in paths:
    try:
        run(path)
    except BaseException:
        pass
"""


@dataclass
class Matrix:
    samples: list[Sample]
    paths: dict[str, Path]
    #: loader -> the names of the samples whose payload it ran
    ran: dict[str, set[str]]

    def runners(self, sample: Sample) -> frozenset[str]:
        return frozenset(loader for loader in LOADERS if sample.name in self.ran[loader])


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Matrix:
    """All samples written to files, each real loader run once over all of them."""
    root = tmp_path_factory.mktemp("differentials")
    samples = all_samples()
    paths = {}
    for sample in samples:
        paths[sample.name] = root / f"{sample.name}.bin"
        paths[sample.name].write_bytes(sample.data)
    listing = json.dumps([str(p) for p in paths.values()])
    procs = {}
    for loader in LOADERS:
        cwd = root / f"ran-{loader}"
        cwd.mkdir()
        argv = [sys.executable, "-c", _RUNNER, loader, listing]
        procs[loader] = (cwd, subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL))
    ran: dict[str, set[str]] = {}
    for loader, (cwd, proc) in procs.items():
        proc.wait(timeout=120)
        ran[loader] = {p.name[2:] for p in cwd.iterdir() if p.name.startswith("m-")}
    return Matrix(samples, paths, ran)


def test_every_sample_runs_under_the_loaders_it_names(matrix: Matrix) -> None:
    """A differential sample no loader runs proves nothing: the test would be wrong."""
    wrong = {
        s.name: (sorted(s.runs), sorted(matrix.runners(s)))
        for s in matrix.samples
        if matrix.runners(s) != s.runs
    }
    assert not wrong, f"expected vs observed loaders: {wrong}"


def test_no_file_a_loader_runs_is_safe(
    matrix: Matrix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0 SAFE verdicts (and none skipped as unsupported) on files whose payload runs."""
    monkeypatch.chdir(tmp_path)  # a payload the scan ran would leave its marker here
    passed = {}
    for sample in matrix.samples:
        if not matrix.runners(sample):
            continue
        report = scan_file(matrix.paths[sample.name])
        if report.verdict not in (Verdict.UNSAFE, Verdict.UNVERIFIABLE):
            passed[sample.name] = (report.format, report.verdict.value, report.reasons[:3])
    assert not passed, f"loaded by a real loader, yet not refused: {passed}"
    assert not list(tmp_path.iterdir()), "the scan ran a payload"


def test_the_polyglots_are_valid_in_both_formats(matrix: Matrix) -> None:
    """The safetensors library loads the safetensors/pickle file, tarfile the v7 tar."""
    from safetensors.numpy import load

    data = {s.name: s.data for s in matrix.samples}
    assert load(data["safetensors+pickle"])["t"].nbytes > 0
    with tarfile.open(fileobj=io.BytesIO(data["torch-tar-v7"])) as tar:
        assert tar.getnames() == ["storages", "tensors", "pickle"]


def test_joblib_dumps_read_twice_stay_safe() -> None:
    """Reading joblib files also as plain pickles must not condemn random array bytes.

    ``joblib.dump`` to a file writes a padding byte (0-15, no opcode) before each array,
    where a plain unpickler stops; 200 dumps of random arrays of every common dtype.
    """
    from joblib import dump

    from trainguard.artifacts.scanner import scan_bytes

    rng = np.random.default_rng(12)
    dtypes = ("f8", "f4", "i8", "f2", "c8")
    unsafe = []
    for i in range(200):
        arrays = {d: rng.standard_normal(int(rng.integers(1, 64))).astype(d) for d in dtypes}
        arrays["u1"] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype="u1")
        buf = io.BytesIO()
        dump({"arrays": arrays, "objects": np.array([1, "x"], dtype=object)}, buf)
        report = scan_bytes(buf.getvalue())
        if report.verdict is not Verdict.SAFE:
            unsafe.append((i, report.reasons[:2]))
    assert not unsafe
