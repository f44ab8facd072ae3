"""Red team of issue 12's scan rules: the skip rule (``artifacts/model_files.py``) and
data that is not code (``artifacts/classdefs.py``).

Each sample is proved with the real loader (it creates a marker); the scan must then
neither skip it nor call it safe, and never create the marker itself.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import hashlib
import pickle
import struct
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import joblib
import numpy
import pytest
import torch

import trainguard
from trainguard.artifacts.interface import Verdict
from trainguard.artifacts.scanner import scan_file
from trainguard.errors import UnsafeCheckpointError

LOADERS: dict[str, Callable[[Path], object]] = {
    "pickle.load": lambda p: pickle.loads(p.read_bytes()),  # noqa: S301
    "torch.load": lambda p: torch.load(p, weights_only=False),
    "numpy.load": lambda p: numpy.load(p, allow_pickle=True),
    "joblib.load": lambda p: joblib.load(p),
}


def _payload(marker: Path) -> bytes:
    return f"cbuiltins\nopen\n(V{marker}\nVw\ntR.".encode()


def _frame(marker: Path) -> bytes:
    body = _payload(marker)
    return b"N0\x95" + struct.pack("<Q", len(body) + 50) + body


def _hyphen(marker: Path) -> bytes:
    module = sysconfig._get_sysconfigdata_name()  # type: ignore[attr-defined]
    assert not module.isidentifier()
    call = f"__import__('builtins').open({str(marker)!r}, 'w')"
    text = f"c{module}\n__builtins__.get\n(Veval\ntR(V{call}\ntR."
    return b"N0\x80\x04" + text.encode()


#: text-looking pickles whose first failure, as the scanner simulates it, is one where a
#: real unpickler goes on to the payload; (bytes, the loader that runs them)
SKIP_BYPASSES: dict[str, tuple[Callable[[Path], bytes], str]] = {
    # the C unpickler reads INT with strtol and accepts a NUL where the line ends
    "int-nul": (lambda m: b"I5\x00junk\n0" + _payload(m), "pickle.load"),
    "int-empty-nul": (lambda m: b"I\x00\n0" + _payload(m), "torch.load"),
    # LONG, GET and PUT with PyLong_FromString on the C string: it ends at the NUL
    "long-nul": (lambda m: b"L5\x00junk\n0" + _payload(m), "numpy.load"),
    "put-nul": (lambda m: b"Np1\x00junk\n0" + _payload(m), "pickle.load"),
    "get-nul": (lambda m: b"Np1\ng1\x00junk\n00" + _payload(m), "pickle.load"),
    # FLOAT with PyOS_string_to_double: the same
    "float-nul": (lambda m: b"F1.5\x00junk\n0" + _payload(m), "pickle.load"),
    # a FRAME longer than the file: the C unpickler fails, joblib's pure-Python one reads
    # what there is as the frame and runs it
    "frame-past-end": (_frame, "joblib.load"),
    # the pure-Python unpickler reads a last line without its newline: INST imports and
    # calls ``builtins.open`` (the class name loses its last byte, "X") before the end
    "inst-at-end": (lambda m: f"(V{m}\nVw\nibuiltins\nopenX".encode(), "joblib.load"),
    # a module name that is no identifier is still imported: the stdlib has one
    "hyphen-module": (_hyphen, "pickle.load"),
}


@pytest.mark.parametrize("name", sorted(SKIP_BYPASSES))
def test_text_pickle_a_real_loader_runs_is_not_skipped(name: str, tmp_path: Path) -> None:
    build, loader = SKIP_BYPASSES[name]
    marker = tmp_path / "PAYLOAD-RAN"
    path = tmp_path / "notes.txt"
    path.write_bytes(build(marker))
    with contextlib.suppress(Exception):
        LOADERS[loader](path)
    assert marker.exists(), f"{loader} did not run the payload"
    marker.unlink()
    report = scan_file(path)
    assert report.verdict not in (Verdict.SKIPPED, Verdict.SAFE), report.findings
    assert not marker.exists()


def test_binary_files_with_a_nul_in_a_number_line_stay_skipped(tmp_path: Path) -> None:
    """A NUL only keeps a file when what precedes it is a number: a TIFF header (``II*``)
    is still no model file."""
    path = tmp_path / "scan.tif"
    path.write_bytes(b"II*\x00\x08\x00\x00\x00" + b"\x00" * 32)
    assert scan_file(path).verdict is Verdict.SKIPPED


# --- code in a class statement that the name check did not see ----------------------

_CLASS_BODIES = {
    # a nested class named __setstate__: BUILD "calls" it, which runs its __init__
    "nested-class": "    class __setstate__:\n        def __init__(self, s):\n            MARK()\n",
    # a method inside an if block of the class body
    "if-block": "    if True:\n        def __setstate__(self, s):\n            MARK()\n",
    # tuple unpacking binds __setstate__ too
    "tuple-target": "    __setstate__, other = (lambda self, s: MARK()), 1\n",
    # through the class namespace
    "locals": "    locals()['__setstate__'] = lambda self, s: MARK()\n",
    # imported into the class body
    "import": "    from tgrt.gadgets import hook as __setstate__\n",
    # a for loop's target
    "for-target": "    for __setstate__ in [lambda self, s: MARK()]:\n        pass\n",
    # an assignment expression
    "walrus": "    x = (__setstate__ := (lambda self, s: MARK()))\n",
    # in a method's annotation, which the class body evaluates
    "annotation": "    def f(self, x: (__setstate__ := (lambda self, s: MARK()))): pass\n",
    # (module level, after the inert class) a class statement in a loop rebinds the name
    "rebound-in-loop": "for _ in [0]:\n    class Config:\n"
    "        def __setstate__(self, s):\n            MARK()\n",
    # (module level) a function run at import rebinds it through ``global``
    "rebound-by-global": "def _swap():\n    global Config\n    class Config:\n"
    "        def __setstate__(self, s):\n            MARK()\n_swap()\n",
}
_PRELUDE = """import pathlib
MARKER = pathlib.Path({marker!r})
def MARK():
    MARKER.write_text("ran")
class Config:
    lr = 0.1
"""


def _record(site: Path, files: list[str]) -> None:
    lines = []
    for name in files:
        digest = hashlib.sha256((site / name).read_bytes()).digest()
        encoded = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        lines.append(f"{name},sha256={encoded},{(site / name).stat().st_size}")
    info = site / "tgrt-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tgrt\nVersion: 1.0\n")
    (info / "RECORD").write_text("\n".join([*lines, "tgrt-1.0.dist-info/RECORD,,"]) + "\n")


def _forget() -> None:
    for name in [n for n in sys.modules if n == "tgrt" or n.startswith("tgrt.")]:
        del sys.modules[name]


@pytest.mark.parametrize("kind", sorted(_CLASS_BODIES))
def test_class_body_that_binds_a_rebuild_hook_is_refused(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    (site / "tgrt").mkdir(parents=True)
    (site / "tgrt" / "__init__.py").write_text("")
    marker = tmp_path / "PAYLOAD-RAN"
    prelude = _PRELUDE.format(marker=str(marker))
    (site / "tgrt" / "config.py").write_text(prelude + _CLASS_BODIES[kind])
    (site / "tgrt" / "gadgets.py").write_text(prelude + "def hook(self, s):\n    MARK()\n")
    _record(site, ["tgrt/__init__.py", "tgrt/config.py", "tgrt/gadgets.py"])
    monkeypatch.syspath_prepend(str(site))
    # NEWOBJ with no arguments, then BUILD with a plain dict: how pickle writes an object
    data = b"\x80\x02ctgrt.config\nConfig\n)\x81}X\x02\x00\x00\x00lrK\x03sb."
    try:
        _forget()
        with contextlib.suppress(Exception):
            pickle.loads(data)  # noqa: S301
        assert marker.exists(), "the real loader did not run the payload"
        marker.unlink()
        _forget()
        path = tmp_path / "cfg.pkl"
        path.write_bytes(data)
        report = trainguard.scan(path)
        assert report.files[0].verdict.value == "UNSAFE", report.files[0].findings
        with pytest.raises(UnsafeCheckpointError):
            trainguard.load(path)
        gc.collect()
        assert not marker.exists()
    finally:
        _forget()


def test_package_that_shadows_a_recorded_module_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tgrt/config/__init__.pyc`` (a sourceless package) beside a recorded, inert
    ``tgrt/config.py``: the path finder takes the package, whatever its ``__init__``
    suffix, so the import runs the bytecode while the scan read the recorded source."""
    import py_compile

    site = tmp_path / "site"
    (site / "tgrt" / "config").mkdir(parents=True)
    (site / "tgrt" / "__init__.py").write_text("")
    marker = tmp_path / "PAYLOAD-RAN"
    prelude = _PRELUDE.format(marker=str(marker))
    (site / "tgrt" / "config.py").write_text(prelude)
    evil = tmp_path / "evil.py"
    evil.write_text(prelude + "    def __setstate__(self, s):\n        MARK()\n")
    py_compile.compile(str(evil), cfile=str(site / "tgrt" / "config" / "__init__.pyc"))
    _record(site, ["tgrt/__init__.py", "tgrt/config.py"])
    monkeypatch.syspath_prepend(str(site))
    data = b"\x80\x02ctgrt.config\nConfig\n)\x81}X\x02\x00\x00\x00lrK\x03sb."
    try:
        _forget()
        with contextlib.suppress(Exception):
            pickle.loads(data)  # noqa: S301
        assert marker.exists(), "the real loader did not run the payload"
        marker.unlink()
        _forget()
        path = tmp_path / "cfg.pkl"
        path.write_bytes(data)
        report = trainguard.scan(path)
        assert report.files[0].verdict.value == "UNSAFE", report.files[0].findings
        with pytest.raises(UnsafeCheckpointError):
            trainguard.load(path)
        assert not marker.exists()
    finally:
        _forget()
