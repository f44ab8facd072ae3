"""The practice matrix (tests/runtime/practice.py): ordinary training under policy="halt".

Every entry is a real job on real gloo ranks; each must train to its last step with zero
alerts of any severity, and leave a ledger that verifies. A false alarm is a bug of the
same weight as a missed attack; a halted healthy job is the worst outcome.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.runtime.practice import ENTRIES, STEPS
from tests.runtime.test_guard_distributed import start_ranks
from trainguard.cli import main

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

#: entries also run on four ranks (a majority exists there, so naming works differently)
ON_FOUR = ("plain", "dataloader-workers", "workers-accumulation-scheduler", "zero-redundancy")


def run_entry(entry: str, world: int, run_dir: Path, key: Path) -> list[tuple[int, str]]:
    procs = start_ranks(
        "tests.runtime.practice", [entry], world, [str(run_dir), str(key)], text=True
    )
    out = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        out.append((proc.returncode, err))
    return out


@pytest.mark.parametrize(
    ("entry", "world"),
    [(name, 2) for name in ENTRIES] + [(name, 4) for name in ON_FOUR],
)
def test_ordinary_practice_raises_no_alert(tmp_path, owner_key, entry, world):
    needs = {"accelerate-optimizer": "accelerate", "lightning-optimizer": "lightning"}
    if entry in needs:
        # installed by .ci/run (`pip install -e '.[accelerate,lightning]'`)
        pytest.importorskip(needs[entry], reason=f"{needs[entry]} is not installed")
    run_dir = tmp_path / "run"
    outcomes = run_entry(entry, world, run_dir, owner_key)
    for rank, (code, err) in enumerate(outcomes):
        assert code == 0, f"rank {rank} exited {code}:\n{err[-3000:]}"
    for rank in range(world):
        result = json.loads((run_dir / f"result-rank{rank}.json").read_text())
        assert result["alerts"] == [], result["alerts"]
        assert result["steps"][-1] == STEPS - 1
        stream = run_dir / f"alerts-rank{rank}.jsonl"
        assert not stream.exists() or stream.read_text() == ""
    for rank, (_, err) in enumerate(outcomes):
        lines = [
            x for x in err.splitlines() if x.startswith("trainguard:") and "guarding run" not in x
        ]
        assert not [x for x in lines if " [" in x], f"rank {rank} printed alerts: {lines}"
    assert main(["ledger", "verify", str(run_dir)]) == 0
