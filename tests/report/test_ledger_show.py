"""`trainguard ledger show`: whole messages, kind filters in and out, routine sensor
events hidden unless asked, -o FILE."""

from __future__ import annotations

import json

from tests.report.test_incidents import alert, write_run
from trainguard.cli import EXIT_CLEAN, main
from trainguard.ledger.verify import read_entries

LONG = "x" * 300 + " the end of a long message"


def make(tmp_path, owner_key):
    run = tmp_path / "run"
    message = alert(7, 1)
    message["message"] = LONG
    routine = {"event": "compile", "origin": "job", "detail": "code compiled", "step": 0}
    write_run(
        run,
        owner_key,
        [("sensor.event", routine, 0), ("alert", message, 1), ("sensor.event", routine, 1)],
    )
    return run


def show(capsys, *args):
    status = main(["ledger", "show", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_messages_are_whole_and_routine_events_hidden(capsys, tmp_path, owner_key):
    run = make(tmp_path, owner_key)
    status, _, err = show(capsys, str(run))
    assert status == EXIT_CLEAN
    assert LONG in err  # not cut at 120 characters
    assert "sensor.event" not in err.replace("sensor.event entries hidden", "")
    assert err.splitlines()[-1] == (
        "4 entries (2 routine sensor.event entries hidden: --all shows them)"
    )
    for asked in (["--all"], ["--kind", "sensor.event"]):
        _, _, err = show(capsys, str(run), *asked)
        assert err.count(" sensor.event ") == 2, asked


def test_kind_filters_in_and_out(capsys, tmp_path, owner_key):
    run = make(tmp_path, owner_key)
    _, _, err = show(capsys, str(run), "--kind", "alert", "--kind", "run.closed")
    kinds = [line.split()[2] for line in err.splitlines()[:-1]]
    assert kinds == ["alert", "run.closed"]
    _, out, _ = show(
        capsys, str(run), "--format", "json", "--exclude-kind", "alert", "--exclude-kind", "x"
    )
    kinds = [e["kind"] for e in json.loads(out)["entries"]]
    # JSON lists every entry the filters let through, routine events included
    assert kinds == [
        "run.certificate",
        "run.started",
        "sensor.event",
        "sensor.event",
        "run.closed",
    ]


def test_output_file(capsys, tmp_path, owner_key):
    run = make(tmp_path, owner_key)
    target = tmp_path / "entries.json"
    status, out, err = show(capsys, str(run), "--format", "json", "-o", str(target))
    assert status == EXIT_CLEAN
    assert out == ""
    assert "written to" in err
    listed = json.loads(target.read_text())["entries"]
    assert [e["seq"] for e in listed] == [e.seq for e in read_entries(run)[0]]
    assert listed[3]["payload"]["message"] == LONG
