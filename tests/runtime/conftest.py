"""Runtime test helpers: code that comes from outside the job, as an insider's would."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture
def foreign(tmp_path: Path):
    """``foreign(source)`` imports ``source`` as a module from a folder that is neither the
    job's code nor an installed package (an insider's file in /tmp, a sitecustomize on a
    writable path): what it does is of unknown origin to the Guard."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    count = 0

    def load(source: str) -> ModuleType:
        nonlocal count
        count += 1
        path = folder / f"implant{count}.py"
        path.write_text(textwrap.dedent(source))
        spec = importlib.util.spec_from_file_location(f"implant{count}", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="module")
def owner_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job owner's signing key (``trainguard keygen``), in a temporary folder."""
    from trainguard.cli import main

    folder = tmp_path_factory.mktemp("owner") / "keys"
    assert main(["keygen", "-o", str(folder)]) == 0
    return folder / "trainguard.key"
