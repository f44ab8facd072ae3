"""Smoke test of the start-up benchmark runner (benchmarks/startup) on a tiny job.

The runner is run as a real subprocess with ``--repeat 1`` and a small package sealed and
verified in place of torch, so the launcher, the job, the three modes and the fields of
``results.json`` cannot rot unnoticed. The timings themselves are not judged here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.distributed
def test_one_round_writes_every_mode_and_the_added_time(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.startup",
            "--repeat",
            "1",
            "--package",
            "pluggy",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["package"] == "pluggy"
    assert results["nproc"] == 2
    assert results["repeat"] == 1
    assert results["sealed_files"] > 0
    assert "--repeat 1" in results["command"]
    modes = results["modes"]
    assert list(modes) == ["unguarded", "manifest", "record"]
    base = modes["unguarded"]
    assert base["trainguard_lines"] == []
    assert "added_s" not in base
    for mode, budget in (("manifest", 2.0), ("record", 10.0)):
        entry = modes[mode]
        assert len(entry["runs_s"]) == 1
        assert entry["median_s"] == entry["runs_s"][0] > 0
        assert entry["added_s"] == pytest.approx(entry["median_s"] - base["median_s"], abs=2e-3)
        assert entry["ratio"] == pytest.approx(entry["median_s"] / base["median_s"], abs=2e-3)
        assert entry["budget_s"] == budget
        assert entry["within_budget"] == (entry["added_s"] <= budget)
        assert entry["cpu_median_s"] > 0
        assert entry["added_cpu_s"] == pytest.approx(
            entry["cpu_median_s"] - base["cpu_median_s"], abs=2e-3
        )
        phases = entry["phases_median_s"]
        assert list(phases) == ["imported", "initialized", "guarded", "first_step"]
        assert 0 < phases["imported"] <= phases["guarded"] <= phases["first_step"]
        guarding = [line for line in entry["trainguard_lines"] if "guarding run" in line]
        # one start-up line per rank, saying what this mode verified
        assert len(guarding) == 2, entry["trainguard_lines"]
        against = "manifest env.manifest" if mode == "manifest" else "the RECORD of pluggy"
        assert all(f"environment verified against {against}" in line for line in guarding)
