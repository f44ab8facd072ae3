"""The skip rule (``artifacts/model_files.py``): what is not a model file, and what only
looks like text.

A table of ordinary files that must be SKIPPED, each also handed to every real loader
the scan stands in for, which must all refuse it (the rule's claim); then one named test
per way a file could look like text to a scanner while a loader runs it, each proved
with the real loader and a harmless marker.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import joblib
import numpy
import pytest
import torch

from trainguard.artifacts.interface import Verdict
from trainguard.artifacts.scanner import scan_bytes, scan_file

ORDINARY = {
    "config.json": b'{"architectures": ["GPT2LMHeadModel"], "n_layer": 2}\n',
    "README.md": b"# tiny\n\nNotes on the model.\n",
    "notes.txt": b"This is a note\n",
    "LICENSE": b"MIT License\n\nCopyright (c) 2026\n",
    "train.py": b"import torch\nfrom x import y\n",
    "model.py": b"class Net:\n    pass\n",
    "config.yaml": b"config: base\nlr: 0.1\ndata: x\n",
    "accelerate.yaml": b"compute_environment: LOCAL_MACHINE\ndebug: false\n",
    "requirements.txt": b"certifi==2024.2.2\ntorch>=2.1\n",
    "Introduction.rst": b"Installation\n============\n",
    "fix.txt": b"Fix the bug\n",
    "logo.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 20,
    "git-commit-object": zlib.compress(b"commit 180\x00tree 4b825dc642cb\nauthor a\n\nmsg\n"),
    "git-blob-object": zlib.compress(b"blob 12\x00hello world\n"),
    "__init__.py": b"",
    # LONG_BINGET of a huge index: a lookup that fails, never a memo grown for it
    "RECORD": b"jinja2-3.1.6.dist-info/INSTALLER,sha256=zuuue4knoyJ-UwPPXg8f,4\n",
    "top_level.txt": b"joblib\n",
    # CRLF: SHORT_BINBYTES, then an INT line "LC\r" that no integer syntax reads
    # APPEND on a literal (None.append): a lookup on a built-in type that fails
    "appends-to-a-literal": b"NU\x03abca then text",
    "miniz-LICENSE": b"Copyright 2013-2014 RAD Game Tools and Valve Software\r\n"
    b"Copyright 2010-2014 Rich Geldreich and Tenacious Software LLC\r\n\r\n",
}

LOADERS: dict[str, Callable[[Path], object]] = {
    "pickle.load": lambda p: pickle.loads(p.read_bytes()),  # noqa: S301
    "pure-python pickle": lambda p: pickle._loads(p.read_bytes()),  # type: ignore[attr-defined]
    "torch.load": lambda p: torch.load(p, weights_only=False),
    "numpy.load": lambda p: numpy.load(p, allow_pickle=True),
    "joblib.load": lambda p: joblib.load(p),
}


@pytest.mark.parametrize("name", sorted(ORDINARY))
def test_an_ordinary_file_is_skipped_and_every_loader_refuses_it(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(ORDINARY[name])
    report = scan_file(path)
    assert report.verdict is Verdict.SKIPPED, report.findings
    assert report.findings[0].message.startswith("not a model file")
    for load in LOADERS.values():
        with pytest.raises(Exception):  # noqa: B017,PT011  (each raises its own kind)
            load(path)


def _marker_payload(marker: Path) -> bytes:
    return f"cbuiltins\nopen\n(V{marker}\nVw\ntR.".encode()


def _runs(data: bytes, load: Callable[[bytes], object], marker: Path) -> bool:
    with contextlib.suppress(Exception):  # a payload may break the load after it ran
        load(data)
    return marker.exists()


def test_an_integer_in_base_16_is_not_a_reason_to_skip(tmp_path):
    """``I0x1``: the unpicklers read INT in base 0 (hex, octal), the simulation in base
    10. A text-looking file whose first INT fails only in the simulation is not skipped,
    since pickle.load goes on past it to the payload."""
    marker = tmp_path / "ran"
    data = b"I0x1\n0" + _marker_payload(marker)
    assert scan_bytes(data).verdict is not Verdict.SKIPPED
    assert _runs(data, pickle.loads, marker)


def test_a_float_longer_than_the_simulation_reads_is_not_a_reason_to_skip(tmp_path):
    """A FLOAT line the simulation reads only 64 characters of: its prefix ``10...0e`` is
    no number, the whole line ``10...0e5`` is one, and pickle.load goes on."""
    marker = tmp_path / "ran"
    data = b"F1" + b"0" * 62 + b"e5\n0" + _marker_payload(marker)
    assert scan_bytes(data).verdict is not Verdict.SKIPPED
    assert _runs(data, pickle.loads, marker)


def test_inst_imports_before_its_mark_is_checked_in_the_pure_python_unpickler(
    tmp_path, monkeypatch
):
    """``INST`` with no MARK: the C unpickler fails before importing, the pure-Python one
    (joblib's) imports the module first, running its import-time code. Not skipped."""
    marker = tmp_path / "ran"
    (tmp_path / "importer_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = b"iimporter_mod\nx\n"
    assert scan_bytes(data).verdict is not Verdict.SKIPPED
    assert not _runs(data, pickle.loads, marker)
    assert _runs(data, pickle._loads, marker)  # type: ignore[attr-defined]


def test_a_tar_without_the_ustar_magic_is_analysed_as_a_tar_not_skipped():
    """``tarfile`` (which torch.load's legacy reader tries first) accepts any header whose
    checksum holds; the old V7 layout has no ``ustar`` magic to sniff."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("storages")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    raw = bytearray(buf.getvalue())
    raw[257:265] = bytes(8)  # no magic, no version: a V7 header
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\x00 " % sum(raw[:512])
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
        assert tar.getnames() == ["storages"]
    report = scan_bytes(bytes(raw))
    assert (report.format, report.verdict) == ("tar", Verdict.UNSUPPORTED)


def test_a_stream_joblib_opens_is_not_skipped():
    """joblib < 0.10's ``ZF`` zlib files and lz4 frames: joblib.load decompresses them
    and unpickles what comes out, whatever the first bytes look like to a sniffer."""
    for head in (b"ZF0x00000000000000000f", b"\x04\x22\x4d\x18\x64\x40"):
        report = scan_bytes(head + b"\x00" * 32)
        assert report.verdict in (Verdict.UNSUPPORTED, Verdict.UNVERIFIABLE), head


def test_a_persistent_id_ends_the_stream_for_every_loader(tmp_path):
    """``P`` (PERSID) in the pickle at byte 0: no loader gives that pickle a
    ``persistent_load``, so all refuse there, before the payload that follows."""
    marker = tmp_path / "ran"
    data = b"Pid\n0" + _marker_payload(marker)
    assert scan_bytes(data).verdict is Verdict.SKIPPED
    path = tmp_path / "f"
    path.write_bytes(data)
    for load in LOADERS.values():
        with pytest.raises(Exception):  # noqa: B017,PT011
            load(path)
    assert not marker.exists()


def test_a_complete_protocol_0_pickle_named_as_text_is_analysed(tmp_path):
    marker = tmp_path / "ran"
    report = scan_bytes(_marker_payload(marker), "notes.txt")
    assert (report.format, report.verdict) == ("pickle", Verdict.UNSAFE)
    assert not marker.exists()
    assert _runs(_marker_payload(marker), pickle.loads, marker)


def test_text_whose_first_lines_read_as_an_importable_name_is_not_skipped():
    """Known limit: ``click\\ntorch\\n`` reads as GLOBAL ``lick.torch``, a name a module
    could have; the import would run its code if it existed, so the file is analysed as
    the pickle it could be (and refused), not skipped."""
    assert scan_bytes(b"click\ntorch\n").verdict is not Verdict.SKIPPED


def test_a_huge_memo_index_stored_from_a_value_is_not_a_reason_to_skip():
    """LONG_BINPUT 2**30 with a value on the stack: the C unpickler grows its memo table
    to twice that (16 GiB) before the stream fails, so the file is no inert text (not run
    here with a real loader: it would take that memory)."""
    report = scan_bytes(b"Nr\x00\x00\x00\x40xx")
    assert report.verdict is not Verdict.SKIPPED
    assert any("memory exhaustion" in f.message for f in report.findings)
