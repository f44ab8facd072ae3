"""Real runs for the report's tests: a Guard in this process, built once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.report.job import train_run

#: the step at which the sabotage run's learning rate is changed
LR_AT = 17


@pytest.fixture(scope="session")
def owner_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job owner's signing key (``trainguard keygen``)."""
    from trainguard.cli import main

    folder = tmp_path_factory.mktemp("report-owner") / "keys"
    assert main(["keygen", "-o", str(folder)]) == 0
    return folder / "trainguard.key"


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory: pytest.TempPathFactory, owner_key: Path) -> Path:
    """30 steps, checks every 5, checkpoints after steps 10 and 20: nothing happens."""
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    assert train_run(run_dir, owner_key, save_after=(9, 19)) == []
    return run_dir


@pytest.fixture(scope="session")
def sabotage_run(tmp_path_factory: pytest.TempPathFactory, owner_key: Path) -> Path:
    """30 steps; the learning rate is changed at step 17; checkpoints at steps 10, 15
    (before it) and 25 (after it)."""
    run_dir = tmp_path_factory.mktemp("sabotage") / "run"
    alerts = train_run(run_dir, owner_key, lr_at=LR_AT, save_after=(9, 14, 24))
    assert [(a.detector, a.step) for a in alerts] == [("lr-schedule", LR_AT)]
    return run_dir


def copy_run(run_dir: Path, where: Path) -> Path:
    """The run folder copied (ledger and metrics files), for a test to damage."""
    target = where / "copy"
    shutil.copytree(run_dir, target)
    return target
