"""Smoke test of the scanner benchmark runner (benchmarks/scan), with trainguard alone.

The competitors live in .venv-bench and are never needed here: the runner is run as a
real subprocess with ``--tools trainguard`` and a 10 MB "big" checkpoint, so the runner,
its corpus wiring and its output format cannot rot unnoticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CAUGHT = ("flagged", "failed_closed")


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.scan", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_trainguard_only_run_writes_consistent_results(tmp_path: Path) -> None:
    quick = ("--big-gb", "0.01", "--repeat", "1", "--corpus-repeat", "1", "--folder-copies", "2")
    proc = run_bench("--out", str(tmp_path), "--tools", "trainguard", *quick)
    assert proc.returncode == 0, proc.stderr

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tools"] == ["trainguard"]
    assert results["corpus"]["payload_ran"] is False
    samples = results["samples"]
    core = [s for s in samples if s["part"] == "core"]
    malicious = [s for s in core if s["malicious"]]
    assert len(malicious) == results["corpus"]["malicious"] > 0
    assert len(core) - len(malicious) == results["corpus"]["benign"] > 0

    bad = results["detection"]["trainguard"]["malicious"]
    assert bad["total"] == len(malicious)
    assert bad["caught"] + bad["missed"] + bad["errors"] == bad["total"]
    assert bad["caught"] == sum(s["verdicts"]["trainguard"]["outcome"] in CAUGHT for s in malicious)
    for sample in samples:
        verdict = sample["verdicts"]["trainguard"]
        assert verdict["verdict"] in {"SAFE", "UNSAFE", "UNVERIFIABLE", "UNSUPPORTED", "SKIPPED"}, (
            sample
        )
    # the verdict mapping itself: the plainest payloads are flagged, safetensors pass
    plain = [s for s in malicious if s["name"].startswith("os_system_proto")]
    assert plain
    assert all(s["verdicts"]["trainguard"]["outcome"] == "flagged" for s in plain)
    tensors = [s for s in samples if s["format"] == "safetensors" and not s["malicious"]]
    assert tensors
    assert all(s["verdicts"]["trainguard"]["outcome"] == "clean" for s in tensors)
    assert set(bad["missed_samples"]) == {
        s["name"]
        for s in malicious
        if s["verdicts"]["trainguard"]["outcome"] in ("clean", "skipped")
    }

    # the extra parts: differentials are malicious, the real-world files benign, each
    # real file labelled with the outcome a user should get; counts are as observed
    differential = [s for s in samples if s["part"] == "differential"]
    real = [s for s in samples if s["part"] == "real"]
    assert len(differential) == results["corpus"]["differential"] > 0
    assert len(real) == results["corpus"]["real"] > 0
    assert all(s["malicious"] for s in differential)
    assert not any(s["malicious"] for s in real)
    assert {s["expected"] for s in real} == {"clean", "skipped"}
    found = results["detection"]["trainguard"]
    assert found["differential"]["total"] == len(differential)
    assert found["real"]["total"] == len(real)
    alarms = [s["name"] for s in real if s["verdicts"]["trainguard"]["outcome"] in CAUGHT]
    assert sorted(found["real"]["false_alarm_samples"]) == sorted(alarms)
    assert found["real"]["passed_skipped"] == sum(
        s["verdicts"]["trainguard"]["outcome"] == "skipped" for s in real
    )

    folder = results["folder"]
    assert folder["copies"] == 2
    assert folder["files"] == 2 * len(real)
    on_folder = results["folder_throughput"]["trainguard"]
    assert sum(on_folder["outcomes"].values()) == on_folder["files"] == folder["files"]
    assert on_folder["files_per_s"] > 0

    speed = results["throughput"]["trainguard"]
    assert speed["files"] >= len(samples)
    assert speed["files_per_s"] > 0
    sizes = results["size_scaling"]
    assert list(sizes) == ["tiny", "10MB", "0.01GB"]
    assert sizes["tiny"]["bytes"] < sizes["10MB"]["bytes"] <= sizes["0.01GB"]["bytes"]
    assert all(e["tools"]["trainguard"]["outcome"] == "clean" for e in sizes.values())
    summary = (tmp_path / "summary.md").read_text()
    assert "| trainguard |" in summary
    assert "## Folder throughput" in summary
    assert "`diff_pickle_then_torchzip`" in summary


def test_missing_bench_environment_is_a_usage_error(tmp_path: Path) -> None:
    absent = tmp_path / "no-venv"
    proc = run_bench("--out", str(tmp_path), "--tools", "picklescan", "--bench-venv", str(absent))
    assert proc.returncode == 2
    assert "make bench-scan" in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_unknown_tool_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_bench("--out", str(tmp_path), "--tools", "trainguard,clamav")
    assert proc.returncode == 2
    assert "clamav" in proc.stderr
