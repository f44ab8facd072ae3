"""Shared pytest options: ``--update-golden`` rewrites golden files instead of comparing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite golden files from the current output instead of comparing",
    )


@pytest.fixture
def golden(request: pytest.FixtureRequest):
    """Compare a JSON-able value with a golden file next to the test (or rewrite it)."""
    update = request.config.getoption("--update-golden")

    def check(value: object, name: str) -> None:
        path = Path(request.path).parent / "golden" / name
        text = json.dumps(value, indent=2, sort_keys=True) + "\n"
        if update or not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if not update:
                pytest.fail(f"golden file {path} was missing and has been written; rerun")
        assert json.loads(path.read_text()) == value, f"output differs from {path}"

    return check
