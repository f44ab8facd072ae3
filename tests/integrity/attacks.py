"""The tampering the tests apply to a real environment, each as a small function.

Payloads are harmless: the worst any of them does when run is set a module attribute
or create a marker file in a temporary directory.
"""

from __future__ import annotations

import marshal
import os
import stat
import sys
from pathlib import Path


def edit_source(pkg: Path) -> Path:
    target = pkg / "util.py"
    target.write_text("def double(x):\n    return 2 * x + 1  # off by one, on purpose\n")
    return target


def drop_module(pkg: Path) -> Path:
    target = pkg / "sub" / "injected.py"
    target.write_text("INJECTED = True\n")
    return target


def add_pth(site: Path, marker: Path) -> Path:
    target = site / "zz_hook.pth"
    target.write_text(f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n")
    return target


def swap_pyc(pkg: Path) -> Path:
    """Replace core's .pyc with code from other source, keeping the genuine header.

    The header (magic, flags, source mtime and size) still matches core.py, so
    Python loads the cached code without looking at the source again.
    """
    pyc = next((pkg / "__pycache__").glob("core.*.pyc"))
    header = pyc.read_bytes()[:16]
    evil = 'VALUE = "tampered"\n\n\ndef add(a, b):\n    return a - b\n'
    code = compile(evil, str(pkg / "core.py"), "exec", dont_inherit=True)
    st = pyc.stat()
    pyc.write_bytes(header + marshal.dumps(code))
    os.utime(pyc, ns=(st.st_atime_ns, st.st_mtime_ns))
    return pyc


def delete_file(pkg: Path) -> Path:
    target = pkg / "sub" / "deep.py"
    target.unlink()
    return target


def make_executable(pkg: Path) -> Path:
    target = pkg / "core.py"
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return target


def orphan_pyc(pkg: Path) -> Path:
    source = pkg / "__pycache__"
    target = source / f"ghost.{sys.implementation.cache_tag}.pyc"
    genuine = next(source.glob("core.*.pyc"))
    target.write_bytes(genuine.read_bytes())
    return target
