"""The grouping rule and the actors, on ledgers written entry by entry (real, signed
ledgers; the entries are what the Guard writes, placed where a test needs them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainguard.cli import EXIT_FINDINGS, main
from trainguard.ledger import Ledger


def alert(step: int, rank: int | None, detector: str = "params", **details: object) -> dict:
    return {
        "step": step,
        "rank": rank,
        "detector": detector,
        "severity": "HIGH",
        "message": f"{detector} at {step}",
        "details": details,
    }


def write_run(run_dir: Path, key: Path, entries: list[tuple[str, dict, int | None]]) -> None:
    with Ledger.create(run_dir, owner_key=key) as ledger:
        ledger.append(
            "run.started",
            {
                "rank": 0,
                "world": 2,
                "every": 5,
                "policy": "alert",
                "argv": ["train.py", "--lr", "1"],
            },
            rank=0,
        )
        for kind, payload, rank in entries:
            ledger.append(kind, payload, rank=rank)
        ledger.close_run({"steps": 40})


def report(capsys: pytest.CaptureFixture[str], run_dir: Path) -> tuple[int, dict]:
    status = main(["report", str(run_dir), "--format", "json"])
    return status, json.loads(capsys.readouterr().out)


def test_alerts_group_across_ranks_and_time(capsys, tmp_path, owner_key):
    """An alert within one check interval of the incident's last alert joins it, whatever
    its rank or detector; one much later opens a new incident; unnamed stays unnamed."""
    write_run(
        tmp_path / "run",
        owner_key,
        [
            ("alert", alert(10, 1), 0),
            ("alert", alert(12, 0), 0),
            ("alert", alert(11, None, "lr-schedule"), 0),
            ("alert", alert(15, 1), 0),
            ("alert", alert(35, None), 0),
        ],
    )
    status, doc = report(capsys, tmp_path / "run")
    assert status == EXIT_FINDINGS
    got = [
        (i["detectors"], i["first_step"], i["last_step"], i["alerts"], i["rank_text"], i["rank"])
        for i in doc["incidents"]
    ]
    assert got == [
        (["params", "lr-schedule"], 10, 15, 4, "ranks 0, 1 (some alerts cannot tell)", None),
        (["params"], 35, 35, 1, "cannot tell", None),
    ]
    # the writer is this process, with the command line its run.started recorded
    assert doc["incidents"][0]["written_by"][0]["argv"] == ["train.py", "--lr", "1"]
    assert doc["damage"]["first_step"] == 10


def test_signal_sender_is_named_as_recorded(capsys, tmp_path, owner_key):
    sender = {
        "signal": "SIGTERM",
        "action": "default",
        "sender_pid": 4242,
        "sender_uid": 1001,
        "sender": "python /home/intern/kill_jobs.py --all",
    }
    write_run(tmp_path / "run", owner_key, [("alert", alert(20, 1, "signal", **sender), 1)])
    status, doc = report(capsys, tmp_path / "run")
    assert status == EXIT_FINDINGS
    (incident,) = doc["incidents"]
    assert incident["signal_senders"] == [
        {
            "signal": "SIGTERM",
            "pid": 4242,
            "uid": 1001,
            "command": "python /home/intern/kill_jobs.py --all",
            "to_rank": 1,
        }
    ]
    main(["report", str(tmp_path / "run")])
    out = capsys.readouterr().err
    assert "signal SIGTERM sent by pid 4242 (uid 1001): python /home/intern/kill_jobs.py" in out


def test_run_without_check_records_says_what_cannot_be_told(capsys, tmp_path, owner_key):
    """A run from before check records (ledger.tail entries): incidents and damage from
    the alerts and checkpoints; agreement, loss and step time cannot be told."""
    write_run(
        tmp_path / "run",
        owner_key,
        [
            ("ledger.tail", {"step": 5, "tails": []}, 0),
            ("checkpoint.saved", {"path": "/nowhere/ck5", "step": 5, "manifest_blake3": "ab"}, 0),
            ("alert", alert(8, 1), 0),
            ("checkpoint.saved", {"path": "/nowhere/ck10", "step": 10, "manifest_blake3": "cd"}, 0),
        ],
    )
    status, doc = report(capsys, tmp_path / "run")
    assert status == EXIT_FINDINGS
    assert doc["agreement"] is None
    assert doc["loss"] is None
    assert any("no check records" in n for n in doc["notes"])
    damage = doc["damage"]
    assert damage["last_clean_checkpoint"]["path"] == "/nowhere/ck5"
    assert damage["last_clean_checkpoint"]["file"] == "missing"
    assert [c["path"] for c in damage["not_to_resume"]] == ["/nowhere/ck10"]
    assert damage["ranks"] == 2
    assert any("up to one interval (5 steps)" in n for n in damage["notes"])


def test_a_check_that_found_a_deviation_bounds_the_clean_checkpoints(capsys, tmp_path, owner_key):
    """With check records, a checkpoint is clean only up to the last check that found
    nothing: a deviation seen at step 15 may have begun after the check at step 10."""
    fields = ["step", "params"]

    def check(step: int, severity: int, params: list[int]) -> dict:
        return {
            "step": step,
            "fields": fields,
            "rows": [[step, p] for p in params],
            "severity": severity,
            "metrics": {"loss": [1.0, 1.0], "wall_s": [0.1, 0.1]},
            "metrics_chain": [],
            "tails": [],
        }

    write_run(
        tmp_path / "run",
        owner_key,
        [
            ("check", check(5, 0, [1, 1]), 0),
            ("check", check(10, 0, [2, 2]), 0),
            ("checkpoint.saved", {"path": "/nowhere/ck12", "step": 12, "manifest_blake3": "a"}, 0),
            ("check", check(15, 40, [3, 4]), 0),
        ],
    )
    status, doc = report(capsys, tmp_path / "run")
    assert status == EXIT_FINDINGS
    (incident,) = doc["incidents"]
    assert (incident["detector"], incident["first_step"], incident["rank_text"]) == (
        "check",
        15,
        "cannot tell",
    )
    assert doc["damage"]["clean_bound"] == 10
    assert doc["damage"]["last_clean_checkpoint"] is None
    assert [c["path"] for c in doc["damage"]["not_to_resume"]] == ["/nowhere/ck12"]
    assert doc["agreement"]["fields"]["params"] == [True, True, False]
