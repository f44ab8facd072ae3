"""The ledger's Python API and the ``ledger init/head/show`` commands, on real SQLite files."""

from __future__ import annotations

import json
import stat
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trainguard.cli import EXIT_CLEAN, EXIT_ERROR, main
from trainguard.ledger import (
    Ledger,
    LedgerClosedError,
    LedgerError,
    verify,
)


def test_create_append_close(tmp_path, owner):
    run_dir = tmp_path / "run"
    with Ledger.create(run_dir, owner_key=owner[0], info={"git": "abc123"}) as ledger:
        first = ledger.append("alert", {"detector": "rng", "step": 12}, rank=3)
        assert first.seq == 2
        assert first.actor.rank == 3
        assert first.payload == {"detector": "rng", "step": 12}
        assert first.payload_json == '{"detector":"rng","step":12}'
        assert stat.S_IMODE((run_dir / "run.key").stat().st_mode) == 0o600
        ledger.close_run({"steps": 12})
        assert not (run_dir / "run.key").exists()
        with pytest.raises(LedgerError):
            ledger.append("alert", {})
    assert [e.kind for e in Ledger.open(run_dir, readonly=True).entries()] == [
        "run.certificate",
        "alert",
        "run.closed",
    ]
    assert verify(run_dir, owner_public_key=owner[1]).verdict == "intact"


def test_closed_run_refuses_appends_from_other_processes(make_run):
    run_dir = make_run(2, closed=False)
    other = Ledger.open(run_dir)
    with Ledger.open(run_dir) as ledger:
        ledger.close_run()
    with pytest.raises(LedgerClosedError):
        other.append("alert", {})
    other.close()


def test_resume_recertifies_the_same_chain(make_run, owner):
    run_dir = make_run(3, closed=True)
    with Ledger.create(run_dir, owner_key=owner[0]) as resumed:
        assert resumed.run_id == "test-run"
        resumed.append("step", {"step": 3})
        resumed.close_run()
    report = verify(run_dir, owner_public_key=owner[1])
    assert report.verdict == "intact"
    assert [e.kind for e in Ledger.open(run_dir, readonly=True).entries()][-4:] == [
        "run.closed",
        "run.certificate",
        "step",
        "run.closed",
    ]


def test_other_owner_cannot_take_over_a_run(make_run):
    run_dir = make_run(1, closed=False)
    with pytest.raises(LedgerError, match="belongs to owner key"):
        Ledger.create(run_dir, owner_key=Ed25519PrivateKey.generate())


def test_open_pins_the_owner(make_run, tmp_path):
    from trainguard.integrity import keygen

    run_dir = make_run(1, closed=False)
    _, stranger = keygen(tmp_path / "stranger")
    with pytest.raises(LedgerError, match="not by the expected owner key"):
        Ledger.open(run_dir, owner_public_key=stranger)


def test_refuses_reserved_kinds_and_non_json(make_run):
    with Ledger.open(make_run(0, closed=False)) as ledger:
        for kind in ("run.closed", "run.certificate", "Bad Kind", ""):
            with pytest.raises(LedgerError):
                ledger.append(kind, {})
        with pytest.raises(LedgerError, match="not plain json"):
            ledger.append("alert", {"value": object()})
        with pytest.raises(LedgerError, match="not plain json"):
            ledger.append("alert", {"value": float("nan")})


def test_threads_share_one_ledger(make_run):
    run_dir = make_run(0, closed=False)
    with Ledger.open(run_dir) as ledger:
        workers = [
            threading.Thread(
                target=lambda r=r: [ledger.append("step", {"r": r, "i": i}) for i in range(50)]
            )
            for r in range(4)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert verify(run_dir).problems == []
    assert len(list(Ledger.open(run_dir, readonly=True).entries("step"))) == 200


def test_cli_init_show_head(tmp_path, owner, capsys):
    run_dir = tmp_path / "run"
    assert main(["ledger", "init", str(run_dir), "--key", str(owner[0]), "--format", "json"]) == 0
    created = json.loads(capsys.readouterr().out)
    with Ledger.open(run_dir, rank=0) as ledger:
        ledger.append("alert", {"message": "optimizer state diverged across ranks"})
    assert main(["ledger", "show", str(run_dir), "--kind", "alert", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)["entries"]
    assert [e["payload"]["message"] for e in shown] == ["optimizer state diverged across ranks"]
    assert shown[0]["actor"]["rank"] == 0
    assert main(["ledger", "show", str(run_dir)]) == EXIT_CLEAN
    out = capsys.readouterr()
    assert out.out == ""
    assert "optimizer state diverged" in out.err
    assert "2 entries" in out.err
    assert main(["ledger", "head", str(run_dir), "--format", "json"]) == EXIT_CLEAN
    head = json.loads(capsys.readouterr().out)
    assert head["seq"] == 2
    assert head["run_id"] == created["run_id"]
    assert main(["ledger", "head", str(run_dir)]) == EXIT_CLEAN
    line = capsys.readouterr().err.strip()
    assert len(line) < 600
    assert json.loads(line) == head


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["ledger", "verify", str(tmp_path / "nothing")]) == EXIT_ERROR
    assert "no ledger here" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ledger.db").write_bytes(b"not a database at all" * 100)
    assert main(["ledger", "show", str(tmp_path / "bad")]) == EXIT_ERROR
    assert main(["ledger", "head", str(tmp_path / "nothing")]) == EXIT_ERROR


def test_verify_does_not_modify_the_ledger(make_run):
    run_dir = make_run(5)
    before = (run_dir / "ledger.db").read_bytes()
    verify(run_dir)
    assert (run_dir / "ledger.db").read_bytes() == before
