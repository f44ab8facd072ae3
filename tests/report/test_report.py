"""`trainguard report` on real runs: clean, sabotaged, and with a damaged ledger or
metrics file. Runs are built once (conftest); each damaging test works on a copy."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from tests.report.conftest import LR_AT, copy_run
from trainguard.cli import EXIT_CLEAN, EXIT_ERROR, EXIT_FINDINGS, main
from trainguard.ledger.chain import parse_time
from trainguard.ledger.verify import read_entries


def report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    status = main(["report", *args, "--format", "json"])
    return status, json.loads(capsys.readouterr().out)


def text(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    status = main(["report", *args])
    return status, capsys.readouterr().err


def test_clean_run_is_clean(capsys, clean_run):
    status, doc = report(capsys, str(clean_run))
    assert status == EXIT_CLEAN
    assert doc["clean"] is True
    assert doc["incidents"] == []
    assert doc["damage"] is None
    assert doc["ledger"]["verdict"] == "intact"
    # what the plots draw: per-step loss and step time from the verified metrics file,
    # every compared fingerprint field agreeing at every check
    assert doc["metrics_files"] == [
        {
            "rank": 0,
            "status": "verified",
            "message": doc["metrics_files"][0]["message"],
            "steps": 30,
        }
    ]
    assert doc["loss"]["source"].startswith("per step")
    assert len(doc["loss"]["by_rank"]["0"]) == 30
    assert doc["agreement"]["steps"] == [5, 10, 15, 20, 25, 30]
    assert all(all(v) for v in doc["agreement"]["fields"].values())
    status, out = text(capsys, str(clean_run))
    assert status == EXIT_CLEAN
    assert out.splitlines()[-1] == "CLEAN: no incidents, ledger intact"


def test_sabotage_names_the_incident_and_the_damage(capsys, sabotage_run):
    """The learning rate changed at step 17: one incident at step 17 on rank 0, written
    by this process; the checkpoint of step 15 is the last clean one, the one of step 25
    is not to be resumed; the GPU-hours lost run from the step-15 checkpoint's entry to
    the run's closing entry, by the recorded times."""
    status, doc = report(
        capsys, str(sabotage_run), "--gpus-per-rank", "8", "--cost-per-gpu-hour", "2.5"
    )
    assert status == EXIT_FINDINGS
    (incident,) = doc["incidents"]
    assert incident["detector"] == "lr-schedule"
    assert incident["first_step"] == LR_AT
    assert incident["rank"] == 0
    assert incident["values"] == {"expected": 0.01, "group": 0, "lr": 0.05}
    (writer,) = incident["written_by"]
    assert writer["pid"] == os.getpid()
    assert writer["uid"] == os.getuid()
    assert writer["argv"]  # this process recorded its command line in run.started
    damage = doc["damage"]
    assert damage["first_step"] == LR_AT
    folder = sabotage_run.parent
    clean = damage["last_clean_checkpoint"]
    assert Path(clean["path"]) == (folder / "ck15.safetensors").resolve()
    assert clean["file"] == "verified"
    assert [Path(c["path"]).name for c in damage["not_to_resume"]] == ["ck25.safetensors"]
    entries = read_entries(sabotage_run)[0]
    saved = next(e for e in entries if e.kind == "checkpoint.saved" and e.payload["step"] == 15)
    closed = next(e for e in entries if e.kind == "run.closed")
    wall = (parse_time(closed.time) - parse_time(saved.time)).total_seconds()
    assert damage["wall_s"] == pytest.approx(wall)
    assert damage["gpu_hours"] == pytest.approx(1 * 8 * wall / 3600)
    assert damage["cost"] == pytest.approx(damage["gpu_hours"] * 2.5)
    status, out = text(capsys, str(sabotage_run))
    assert status == EXIT_FINDINGS
    assert f"incident 1: HIGH first seen at step {LR_AT}" in out
    assert f"step {LR_AT}, rank 0 [lr-schedule] HIGH: learning rate of group 0 is 0.05" in out
    assert "last clean checkpoint: " + str((folder / "ck15.safetensors").resolve()) in out
    assert out.splitlines()[-1] == "NOT CLEAN: 1 incident"


def _execute(db: Path, sql: str, *args: object) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(sql, args)
    conn.close()


def test_edited_entry_is_reported_first_and_later_entries_are_not_used(
    capsys, sabotage_run, tmp_path
):
    """Someone moves the alert to a later step in the ledger: the report says the ledger
    is not intact, at the top, and rests on the entries before the edited one only."""
    run = copy_run(sabotage_run, tmp_path)
    entries = read_entries(run)[0]
    alert = next(e for e in entries if e.kind == "alert")
    edited = alert.payload_json.replace(f'"step":{LR_AT}', '"step":29')
    assert edited != alert.payload_json
    _execute(run / "ledger.db", "UPDATE entries SET payload = ? WHERE seq = ?", edited, alert.seq)
    status, out = text(capsys, str(run))
    assert status == EXIT_FINDINGS
    first = out.splitlines()[1]
    assert first.startswith(f"LEDGER NOT INTACT: entry {alert.seq} is damaged (edited")
    assert f"uses entries 1 to {alert.seq - 1} only" in first
    assert "incidents: none" in out  # the edited alert is not used, at its step or any
    assert "ledger tampered" in out.splitlines()[-1]


def test_cut_ledger_is_not_intact(capsys, sabotage_run, tmp_path):
    """The end of the ledger cut off (the alert and everything after it): the report
    does not call the run clean."""
    run = copy_run(sabotage_run, tmp_path)
    alert = next(e for e in read_entries(run)[0] if e.kind == "alert")
    _execute(run / "ledger.db", "DELETE FROM entries WHERE seq >= ?", alert.seq)
    status, doc = report(capsys, str(run))
    assert status == EXIT_FINDINGS
    assert doc["clean"] is False
    assert doc["ledger"]["verdict"] in ("open", "tampered")
    assert doc["headline"][0].startswith(("LEDGER NOT CLOSED", "LEDGER NOT INTACT"))


@pytest.mark.parametrize(
    ("change", "status"), [("edited", "tampered"), ("cut", "tampered"), ("fifo", "unreadable")]
)
def test_metrics_file_not_as_recorded_is_reported_and_not_used(
    capsys, clean_run, tmp_path, change, status
):
    """A loss value edited for a prettier curve, the file's end cut, the file replaced by
    a FIFO (read, it would block the report forever): said at the top, exit 1, and none
    of its values used (the plots fall back to the check entries' interval means)."""
    run = copy_run(clean_run, tmp_path)
    path = run / "metrics" / "rank0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    if change == "edited":
        record = json.loads(lines[3])
        record["loss"] = 0.001
        lines[3] = json.dumps(record) + "\n"
        path.write_text("".join(lines))
    elif change == "cut":
        path.write_text("".join(lines[:-2]))
    else:
        path.unlink()
        os.mkfifo(path)
    code, doc = report(capsys, str(run))
    assert code == EXIT_FINDINGS
    assert doc["metrics_files"][0]["status"] == status
    assert any(h.startswith("METRICS FILE NOT AS RECORDED: rank 0") for h in doc["headline"])
    assert doc["loss"]["source"].startswith("per check")
    assert 0.001 not in [v for _, v in doc["loss"]["by_rank"]["0"]]


def test_altered_checkpoint_file_is_not_the_clean_one(capsys, owner_key, tmp_path):
    """The checkpoint before the deviation was altered on disk since: it does not verify,
    so the one before it is the last clean checkpoint."""
    from tests.report.job import train_run

    run = tmp_path / "run"
    train_run(run, owner_key, steps=20, lr_at=12, save_after=(4, 9))
    data = bytearray((tmp_path / "ck10.safetensors").read_bytes())
    data[-3] ^= 0x01
    (tmp_path / "ck10.safetensors").write_bytes(bytes(data))
    status, doc = report(capsys, str(run))
    assert status == EXIT_FINDINGS
    damage = doc["damage"]
    assert Path(damage["last_clean_checkpoint"]["path"]).name == "ck5.safetensors"
    (altered,) = damage["not_to_resume"]
    assert Path(altered["path"]).name == "ck10.safetensors"
    assert altered["file"] == "altered"


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_no_run_is_an_error(capsys, tmp_path, kind):
    target = tmp_path / "run"
    if kind == "file":
        target.write_text("x")
    elif kind == "empty":
        target.mkdir()
    assert main(["report", str(target)]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("trainguard: error: ")
    assert "Traceback" not in err[0]


def test_output_file(capsys, sabotage_run, tmp_path):
    out = tmp_path / "report.json"
    assert main(["report", str(sabotage_run), "--format", "json", "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "report written to" in captured.err
    assert json.loads(out.read_text())["incidents"][0]["first_step"] == LR_AT


def test_ledger_of_another_owner_is_not_used(capsys, sabotage_run, tmp_path):
    """The owner pinned (--pubkey) is not the one that certified the run: a ledger
    forged whole under someone else's key. Nothing in it is used."""
    assert main(["keygen", "-o", str(tmp_path / "other")]) == EXIT_CLEAN
    capsys.readouterr()
    status, doc = report(
        capsys, str(sabotage_run), "--pubkey", str(tmp_path / "other" / "trainguard.pub")
    )
    assert status == EXIT_FINDINGS
    assert doc["headline"][0].startswith("LEDGER NOT INTACT: entry 1 is damaged (untrusted-owner")
    assert "can use no entry" in doc["headline"][0]
    assert doc["incidents"] == []
    assert doc["checkpoints"] == []
