"""The report of a real two-rank gloo run whose rank 1 had its parameters edited."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.report.dist_job import AT, VICTIM
from trainguard.cli import EXIT_FINDINGS, main
from trainguard.ledger.chain import parse_time
from trainguard.ledger.verify import read_entries

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_ranks_edited_parameters(capsys, tmp_path, owner_key):
    run_dir = tmp_path / "run"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.report.dist_job", str(rank), "2", port]
            + [str(run_dir), str(owner_key)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    status = main(["report", str(run_dir), "--format", "json", "--gpus-per-rank", "4"])
    doc = json.loads(capsys.readouterr().out)
    assert status == EXIT_FINDINGS
    assert doc["run"]["world"] == 2
    first = doc["incidents"][0]
    assert first["rank"] == VICTIM, doc["incidents"]
    # seen no later than the check after the edit (checks every 5 steps)
    assert AT <= first["first_step"] <= 15
    damage = doc["damage"]
    assert Path(damage["last_clean_checkpoint"]["path"]).name == "ck10.st"
    assert damage["last_clean_checkpoint"]["file"] == "verified"
    assert [Path(c["path"]).name for c in damage["not_to_resume"]] == ["ck20.st"]
    entries = read_entries(run_dir)[0]
    saved = next(e for e in entries if e.kind == "checkpoint.saved" and e.payload["step"] == 10)
    end = next(e for e in entries if e.kind == "run.closed")
    wall = (parse_time(end.time) - parse_time(saved.time)).total_seconds()
    assert damage["gpu_hours"] == pytest.approx(2 * 4 * wall / 3600)
    # both ranks' metrics files match their chains; the fingerprint shows the difference
    assert [f["status"] for f in doc["metrics_files"]] == ["verified", "verified"]
    assert sorted(doc["loss"]["by_rank"]) == ["0", "1"]
    agreement = doc["agreement"]
    params = dict(zip(agreement["steps"], agreement["fields"]["params"], strict=True))
    assert params[5]
    assert params[10]
    assert not params[15]
