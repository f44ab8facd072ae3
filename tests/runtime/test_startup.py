"""Start-up: the environment is verified once per host, and every rank says what it guards.

Real two-process gloo jobs (tests/runtime/startup_worker.py) on one host: one rank
verifies, the other waits for its result and uses it; a drift it finds is reported once
and, under policy "halt", stops both ranks before their first step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.test_guard_distributed import free_port
from trainguard.cli import main
from trainguard.ledger import Ledger
from trainguard.runtime.startup import startup_line

ROOT = Path(__file__).resolve().parents[2]
SMALL = "pluggy"  # a small installed distribution: its RECORD is checked in well under 1 s
GUARDING = re.compile(r"^trainguard: guarding run (\S+), rank (\d) of 2: (.*)$", re.M)


def launch(
    run_dir: Path, key: Path, options: dict, local_ranks: tuple[str, str] | None = None
) -> tuple[list[int], list[str]]:
    """Both ranks to the end; (exit codes, stderr texts)."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    base.update(OMP_NUM_THREADS="1", STARTUP_WORKER=json.dumps(options))
    procs = []
    for rank in range(2):
        env = dict(base)
        if local_ranks is not None:
            env["LOCAL_RANK"] = local_ranks[rank]
        argv = [str(rank), "2", port, str(run_dir), str(key)]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.runtime.startup_worker", *argv],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        errors.append(err)
    return [p.returncode for p in procs], errors


def started(run_dir: Path) -> dict[int, dict]:
    """Each rank's run.started payload."""
    with Ledger.open(run_dir, readonly=True) as ledger:
        return {e.payload["rank"]: e.payload for e in ledger.entries("run.started")}


def ledger_alerts(run_dir: Path) -> list[dict]:
    with Ledger.open(run_dir, readonly=True) as ledger:
        return [e.payload for e in ledger.entries("alert")]


def sealed(tmp_path: Path, key: Path) -> tuple[Path, Path]:
    """A manifest of one small file (the job's code stands in for it), and that file."""
    code = tmp_path / "train.py"
    code.write_text("print('train')\n")
    manifest = tmp_path / "env.manifest"
    assert main(["seal", str(code), "--key", str(key), "-o", str(manifest)]) == 0
    return manifest, code


@pytest.mark.slow
@pytest.mark.distributed
def test_one_rank_per_host_verifies_and_both_use_its_result(tmp_path: Path, owner_key: Path):
    run_dir = tmp_path / "run"
    codes, errors = launch(run_dir, owner_key, {"packages": [SMALL]})
    assert codes == [0, 0], errors
    # no LOCAL_RANK: the ranks found by host name that rank 0 is first on this host
    assert (run_dir / "verified-rank0").exists()
    assert not (run_dir / "verified-rank1").exists()
    assert f"trainguard: verifying the environment against the RECORD of {SMALL}..." in errors[0]
    assert re.search(r"trainguard: verified \d+ files in [\d.]+ s: clean", errors[0])
    assert "trainguard: verif" not in errors[1]

    entries = started(run_dir)
    assert entries[0]["environment"] == entries[1]["environment"]
    env = entries[0]["environment"]
    assert env["verified_by"] == 0
    assert env["mode"] == "record"
    assert env["clean"] is True
    assert env["files"] > 0
    assert entries[0]["code"].split(":")[1:] == entries[1]["code"].split(":")[1:]

    for rank, text in enumerate(errors):
        lines = GUARDING.findall(text)
        assert len(lines) == 1, text
        run_id, said_rank, what = lines[0]
        with Ledger.open(run_dir, readonly=True) as ledger:
            assert run_id == ledger.run_id
        assert int(said_rank) == rank
        assert f"environment verified against the RECORD of {SMALL}" in what
        assert what.endswith("checks every 3 steps")
        assert ("by rank 0" in what) == (rank == 1)
    assert json.loads((run_dir / "alerts-rank0.json").read_text()) == []
    assert json.loads((run_dir / "alerts-rank1.json").read_text()) == []


@pytest.mark.slow
@pytest.mark.distributed
def test_local_rank_from_the_launcher_names_the_verifier(tmp_path: Path, owner_key: Path):
    run_dir = tmp_path / "run"
    # a launcher numbering the host's processes the other way round
    codes, errors = launch(run_dir, owner_key, {"packages": [SMALL]}, local_ranks=("1", "0"))
    assert codes == [0, 0], errors
    assert (run_dir / "verified-rank1").exists()
    assert not (run_dir / "verified-rank0").exists()
    assert "trainguard: verifying" in errors[1]
    assert "trainguard: verif" not in errors[0]
    assert {e["environment"]["verified_by"] for e in started(run_dir).values()} == {1}


@pytest.mark.slow
@pytest.mark.distributed
def test_manifest_signed_by_another_key_halts_both_ranks_before_the_first_step(
    tmp_path: Path, owner_key: Path
):
    manifest, _ = sealed(tmp_path, owner_key)
    stranger = tmp_path / "stranger"
    assert main(["keygen", "-o", str(stranger)]) == 0
    run_dir = tmp_path / "run"
    options = {
        "manifest": str(manifest),
        "pubkey": str(stranger / "trainguard.pub"),
        "policy": "halt",
    }
    codes, errors = launch(run_dir, owner_key, options)
    assert all(code != 0 for code in codes), errors
    assert not list(run_dir.glob("stepped-rank*")), "a rank started training"
    assert (run_dir / "verified-rank0").exists()
    assert not (run_dir / "verified-rank1").exists()
    for rank in (0, 1):
        assert "GuardHalt" in errors[rank]
        assert not GUARDING.search(errors[rank]), "a halted rank is not guarding"
        kept = json.loads((run_dir / f"alerts-rank{rank}.json").read_text())
        drift = [a for a in kept if a["detector"] == "environment"]
        assert len(drift) == 1, kept
        # about the host, not a rank; who looked is in the details
        assert drift[0]["rank"] is None
        assert drift[0]["details"]["verified_by"] == 0
        assert "manifest signature invalid" in drift[0]["message"]
    # reported once for the host, not once per rank
    assert [a["detector"] for a in ledger_alerts(run_dir)] == ["environment"]
    assert main(["ledger", "verify", str(run_dir)]) == 0


@pytest.mark.slow
@pytest.mark.distributed
def test_drift_under_alert_is_reported_once_and_named_on_every_rank(
    tmp_path: Path, owner_key: Path
):
    manifest, code = sealed(tmp_path, owner_key)
    code.write_text("print('sabotaged')\n")
    run_dir = tmp_path / "run"
    options = {"manifest": str(manifest), "pubkey": str(owner_key.with_suffix(".pub"))}
    codes, errors = launch(run_dir, owner_key, options)
    assert codes == [0, 0], errors
    assert (run_dir / "stepped-rank1").exists()
    found = ledger_alerts(run_dir)
    assert len(found) == 1, found
    assert found[0]["rank"] is None
    assert str(code) in found[0]["message"]
    assert sum("[environment]" in line for line in errors[0].splitlines()) == 1
    assert "[environment]" not in errors[1]
    for rank, text in enumerate(errors):
        (line,) = GUARDING.findall(text)
        assert int(line[1]) == rank
        assert "environment differs from manifest env.manifest in 1 of 1 files" in line[2]


def test_startup_line_says_what_was_verified():
    env = {
        "mode": "manifest",
        "against": "manifest env.manifest",
        "clean": True,
        "files": 2311,
        "drift": 0,
        "signature": "valid",
        "seconds": 0.43,
        "verified_by": 0,
        "host": "gpu-07",
    }
    assert startup_line("run-1", 1, 2, {"environment": env}, 50) == (
        "trainguard: guarding run run-1, rank 1 of 2: environment verified against "
        "manifest env.manifest (2,311 files, 0.4 s, by rank 0), checks every 50 steps"
    )
    assert startup_line("run-1", 0, 1, {"environment": None}, 10) == (
        "trainguard: guarding run run-1, rank 0 of 1: environment not verified "
        "(verify_env=False), checks every 10 steps"
    )
    bad = {**env, "clean": False, "signature": "invalid"}
    assert "NOT verified: manifest env.manifest signature invalid" in startup_line(
        "r", 0, 2, {"environment": bad}, 5
    )
    failed = {**env, "mode": "error", "clean": False}
    assert "could not be verified" in startup_line("r", 0, 2, {"environment": failed}, 5)
