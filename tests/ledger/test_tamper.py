"""Tampering with a real ledger file is detected and the first bad entry is named.

Each test plays an attacker with write access to the run directory (or, where said,
code execution inside the job and so the run key) and checks ``trainguard ledger
verify`` through ``main`` (exit 1 and ``first_bad_seq``), plus real subprocesses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.ledger.conftest import db
from trainguard.cli import EXIT_CLEAN, EXIT_ERROR, EXIT_FINDINGS, main
from trainguard.integrity import signing
from trainguard.ledger import Ledger, verify
from trainguard.ledger.chain import entry_hash, entry_message, now


def run_verify(capsys, run_dir: Path, *extra: str) -> tuple[int, dict]:
    capsys.readouterr()
    status = main(["ledger", "verify", str(run_dir), "--format", "json", *extra])
    return status, json.loads(capsys.readouterr().out)


def rechain(run_dir: Path, start: int, key: Ed25519PrivateKey, payload: str | None) -> None:
    """Replace entry ``start``'s payload, then re-hash and re-sign it and all later ones."""
    conn = db(run_dir)
    rows = conn.execute(
        "SELECT seq, time, kind, actor, payload, prev_hash FROM entries ORDER BY seq"
    ).fetchall()
    prev = None
    conn.execute("BEGIN")
    for seq, time, kind, actor, body, prev_hash in rows:
        if seq < start:
            prev = conn.execute("SELECT hash FROM entries WHERE seq = ?", (seq,)).fetchone()[0]
            continue
        if seq == start and payload is not None:
            body = payload
        digest = entry_hash(seq, time, kind, actor, body, prev or prev_hash)
        signature = signing.sign(key, entry_message(digest))
        conn.execute(
            "UPDATE entries SET payload = ?, prev_hash = ?, hash = ?, signature = ?, key_id = ? "
            "WHERE seq = ?",
            (body, prev or prev_hash, digest, signature, signing.key_id(key.public_key()), seq),
        )
        prev = digest
    conn.execute("COMMIT")
    conn.close()


def test_untouched_ledger_verifies(capsys, make_run, owner):
    run_dir = make_run(10)
    status, report = run_verify(capsys, run_dir, "--pubkey", str(owner[1]))
    assert status == EXIT_CLEAN
    assert report["verdict"] == "intact"
    assert report["entries"] == 12  # certificate, 10 steps, closing entry
    assert report["first_bad_seq"] is None


def test_one_payload_byte_edited_in_the_file(capsys, make_run):
    """Flip one byte of an entry's payload inside the SQLite file itself."""
    run_dir = make_run(10)
    path = run_dir / "ledger.db"
    data = bytearray(path.read_bytes())
    at = data.find(b"marker-0004")
    assert at > 0
    assert data.count(b"marker-0004") == 1
    data[at + len("marker-000")] = ord("7")
    path.write_bytes(bytes(data))
    status, report = run_verify(capsys, run_dir)
    assert status == EXIT_FINDINGS
    assert report["first_bad_seq"] == 6  # seq 1 is the certificate, step 4 is seq 6
    assert report["problems"][0]["damage"] == "edited"


def test_deleted_entry(capsys, make_run):
    run_dir = make_run(10)
    with db(run_dir) as conn:
        conn.execute("DELETE FROM entries WHERE seq = 5")
    status, report = run_verify(capsys, run_dir)
    assert status == EXIT_FINDINGS
    assert report["first_bad_seq"] == 5
    assert report["problems"][0]["damage"] == "deleted"


def test_deleted_entry_and_renumbered(capsys, make_run):
    """The attacker closes the gap by moving every later entry down by one."""
    run_dir = make_run(10)
    conn = db(run_dir)
    conn.execute("DELETE FROM entries WHERE seq = 5")
    for seq in range(6, 13):
        conn.execute("UPDATE entries SET seq = ? WHERE seq = ?", (seq - 1, seq))
    conn.close()
    status, report = run_verify(capsys, run_dir)
    assert status == EXIT_FINDINGS
    assert report["first_bad_seq"] == 5
    assert report["problems"][0]["damage"] == "deleted"


def test_two_entries_swapped(capsys, make_run):
    run_dir = make_run(10)
    conn = db(run_dir)
    conn.execute("BEGIN")
    conn.execute("UPDATE entries SET seq = -1 WHERE seq = 7")
    conn.execute("UPDATE entries SET seq = 7 WHERE seq = 8")
    conn.execute("UPDATE entries SET seq = 8 WHERE seq = -1")
    conn.execute("COMMIT")
    conn.close()
    status, report = run_verify(capsys, run_dir)
    assert status == EXIT_FINDINGS
    assert report["first_bad_seq"] == 7
    assert report["problems"][0]["damage"] == "reordered"


def test_truncated_tail_needs_and_uses_a_head_kept_elsewhere(capsys, make_run, tmp_path):
    run_dir = make_run(10)
    head = tmp_path / "ticket-1234-head.json"
    assert main(["ledger", "head", str(run_dir), "-o", str(head)]) == EXIT_CLEAN
    with db(run_dir) as conn:
        conn.execute("DELETE FROM entries WHERE seq > 8")  # the last steps and run.closed
    status, report = run_verify(capsys, run_dir)
    # without the head, a cut tail looks like a crashed run: reported, not "tampered"
    assert status == EXIT_CLEAN
    assert report["verdict"] == "open"
    assert main(["ledger", "verify", str(run_dir), "--require-closed"]) == EXIT_FINDINGS
    status, report = run_verify(capsys, run_dir, "--head", str(head))
    assert status == EXIT_FINDINGS
    assert report["first_bad_seq"] == 9
    assert report["problems"][0]["damage"] == "truncated"


def test_edit_resigned_with_another_key(capsys, make_run):
    """Edit entry 5, then re-hash and re-sign it and every later entry with a new key."""
    run_dir = make_run(10)
    rechain(run_dir, 5, Ed25519PrivateKey.generate(), '{"note":"nothing happened","step":3}')
    status, report = run_verify(capsys, run_dir)
    assert status == EXIT_FINDINGS
    assert report["first_bad_seq"] == 5
    assert report["problems"][0]["damage"] == "bad-signature"


def test_edit_rehashed_without_any_key(capsys, make_run):
    run_dir = make_run(10)
    with db(run_dir) as conn:
        seq, time, kind, actor, prev = conn.execute(
            "SELECT seq, time, kind, actor, prev_hash FROM entries WHERE seq = 4"
        ).fetchone()
        body = '{"note":"edited","step":2}'
        conn.execute(
            "UPDATE entries SET payload = ?, hash = ? WHERE seq = 4",
            (body, entry_hash(seq, time, kind, actor, body, prev)),
        )
    status, report = run_verify(capsys, run_dir)
    assert status == EXIT_FINDINGS
    assert report["first_bad_seq"] == 4
    assert report["problems"][0]["damage"] == "bad-signature"


def test_whole_ledger_forged_under_another_owner_key(capsys, make_run, tmp_path, owner):
    """A new ledger from scratch, certified by the attacker's own 'owner' key."""
    genuine = make_run(10, name="genuine")
    head = tmp_path / "head.json"
    assert main(["ledger", "head", str(genuine), "-o", str(head)]) == EXIT_CLEAN
    forged_owner = Ed25519PrivateKey.generate()
    (genuine / "ledger.db").unlink()
    with Ledger.create(genuine, owner_key=forged_owner, run_id="test-genuine") as forged:
        for i in range(12):
            forged.append("step", {"step": i})
    # internally consistent, so only a pinned key or a head kept elsewhere can tell
    status, report = run_verify(capsys, genuine)
    assert status == EXIT_CLEAN
    assert any("not pinned" in note for note in report["notes"])
    status, report = run_verify(capsys, genuine, "--pubkey", str(owner[1]))
    assert status == EXIT_FINDINGS
    assert report["first_bad_seq"] == 1
    assert report["problems"][0]["damage"] == "untrusted-owner"
    status, report = run_verify(capsys, genuine, "--head", str(head))
    assert status == EXIT_FINDINGS
    assert report["first_bad_seq"] == 1
    assert report["problems"][0]["damage"] == "rewritten"


def test_insider_with_the_run_key_rewrites_consistently(capsys, make_run, tmp_path):
    """Code inside the job holds the run key: only a head kept elsewhere catches a rewrite."""
    run_dir = make_run(10, closed=False)
    head = tmp_path / "head.json"
    assert main(["ledger", "head", str(run_dir), "-o", str(head)]) == EXIT_CLEAN
    run_key = signing.load_private(run_dir / "run.key")
    rechain(run_dir, 4, run_key, '{"note":"all good","step":2}')
    status, report = run_verify(capsys, run_dir)
    assert status == EXIT_CLEAN  # the chain itself is consistent
    status, report = run_verify(capsys, run_dir, "--head", str(head))
    assert status == EXIT_FINDINGS
    assert report["problems"][0]["damage"] == "rewritten"
    assert report["first_bad_seq"] == 11


def test_entry_appended_after_close(make_run):
    """An insider kept a copy of the run key and adds an entry after the run closed."""
    run_dir = make_run(3, closed=False)
    run_key = signing.load_private(run_dir / "run.key")
    with Ledger.open(run_dir) as ledger:
        ledger.close_run()
    assert not (run_dir / "run.key").exists()
    with db(run_dir) as conn:
        last = conn.execute("SELECT seq, hash FROM entries ORDER BY seq DESC").fetchone()
        seq, time, actor = last[0] + 1, now(), "{}"
        digest = entry_hash(seq, time, "step", actor, "{}", last[1])
        conn.execute(
            "INSERT INTO entries VALUES (?, ?, 'step', ?, '{}', ?, ?, ?, ?)",
            (
                seq,
                time,
                actor,
                last[1],
                digest,
                signing.sign(run_key, entry_message(digest)),
                signing.key_id(run_key.public_key()),
            ),
        )
    report = verify(run_dir)
    assert report.first_bad_seq == seq
    assert [p.damage for p in report.problems] == ["after-close"]


def test_forged_head_file_is_an_error(capsys, make_run, tmp_path):
    run_dir = make_run(3)
    head = tmp_path / "head.json"
    assert main(["ledger", "head", str(run_dir), "-o", str(head)]) == EXIT_CLEAN
    data = json.loads(head.read_text())
    data["hash"] = "0" * 64
    head.write_text(json.dumps(data))
    assert main(["ledger", "verify", str(run_dir), "--head", str(head)]) == EXIT_ERROR
    assert "not a genuine head" in capsys.readouterr().err


@pytest.mark.parametrize("tampered", [False, True])
def test_cli_subprocess(make_run, tampered):
    run_dir = make_run(5)
    if tampered:
        with db(run_dir) as conn:
            conn.execute("DELETE FROM entries WHERE seq = 3")
    done = subprocess.run(
        [sys.executable, "-m", "trainguard", "ledger", "verify", str(run_dir), "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(done.stdout)
    assert done.returncode == (EXIT_FINDINGS if tampered else EXIT_CLEAN), done.stderr
    assert report["first_bad_seq"] == (3 if tampered else None)
    text = subprocess.run(
        [sys.executable, "-m", "trainguard", "ledger", "verify", str(run_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert text.stdout == ""
    assert ("TAMPERED" in text.stderr) == tampered
    assert ("first bad entry: 3" in text.stderr) == tampered
