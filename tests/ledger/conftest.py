"""Fixtures for the ledger tests: owner keys and run directories with real SQLite ledgers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from trainguard.integrity import keygen
from trainguard.ledger import Ledger


@pytest.fixture
def owner(tmp_path: Path) -> tuple[Path, Path]:
    """The job owner's key pair: (private, public)."""
    return keygen(tmp_path / "owner")


@pytest.fixture
def make_run(tmp_path: Path, owner: tuple[Path, Path]):
    """Build a run directory with ``n`` step entries, closed unless told otherwise."""

    def build(n: int = 10, *, closed: bool = True, name: str = "run") -> Path:
        run_dir = tmp_path / name
        with Ledger.create(run_dir, owner_key=owner[0], run_id=f"test-{name}") as ledger:
            for i in range(n):
                ledger.append("step", {"step": i, "note": f"marker-{i:04d}"}, rank=i % 2)
            if closed:
                ledger.close_run({"steps": n})
        return run_dir

    return build


def db(run_dir: Path) -> sqlite3.Connection:
    """A plain connection to the ledger file, as an attacker with write access has."""
    return sqlite3.connect(run_dir / "ledger.db", isolation_level=None)
