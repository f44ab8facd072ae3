"""Fixtures that build real environments: a venv with a wheel installed by pip, and keys.

The venv is built once per session (``python -m venv --without-pip`` plus
``pip --python VENV install --no-index`` of a wheel the fixture writes itself) and
copied for each test with its timestamps kept, so the ``.pyc`` headers pip wrote
still match their sources in every copy.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainguard.integrity import keygen

MODULES = {
    "demopkg/__init__.py": '"""A tiny package for integrity tests."""\nVERSION = "1.0"\n',
    "demopkg/core.py": 'VALUE = "genuine"\n\n\ndef add(a, b):\n    return a + b\n',
    "demopkg/util.py": "def double(x):\n    return 2 * x\n",
    "demopkg/sub/__init__.py": "",
    "demopkg/sub/deep.py": "DEPTH = 2\n",
}


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(folder: Path) -> Path:
    """A minimal, valid pure-Python wheel for ``demopkg`` 1.0."""
    info = "demopkg-1.0.dist-info"
    files = dict(MODULES)
    files[f"{info}/METADATA"] = "Metadata-Version: 2.1\nName: demopkg\nVersion: 1.0\n"
    files[f"{info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: tg-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{info}/top_level.txt"] = "demopkg\n"
    record = "".join(
        f"{name},{_record_hash(text.encode())},{len(text.encode())}\n"
        for name, text in files.items()
    )
    files[f"{info}/RECORD"] = record + f"{info}/RECORD,,\n"
    wheel = folder / "demopkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


@dataclass
class Env:
    root: Path
    python: Path
    site: Path

    @property
    def pkg(self) -> Path:
        return self.site / "demopkg"


@pytest.fixture(scope="session")
def base_env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    top = tmp_path_factory.mktemp("base")
    root = top / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    wheel = build_wheel(top)
    python = root / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=True,
    )
    site = next(root.glob("lib/python*/site-packages"))
    assert list((site / "demopkg" / "__pycache__").glob("core.*.pyc")), "pip did not compile"
    return Env(root, python, site)


@pytest.fixture
def env(base_env: Env, tmp_path: Path) -> Env:
    root = tmp_path / "venv"
    shutil.copytree(base_env.root, root, symlinks=True)  # copy2 keeps mtimes: pyc headers match
    site = root / base_env.site.relative_to(base_env.root)
    return Env(root, root / "bin" / "python", site)


@dataclass
class Keys:
    private: Path
    public: Path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    private, public = keygen(tmp_path / "keys")
    return Keys(private, public)


@pytest.fixture
def other_keys(tmp_path: Path) -> Keys:
    private, public = keygen(tmp_path / "other-keys")
    return Keys(private, public)
