"""Tamper-evident run ledger: a hash-chained, signed, append-only event log per run.

    ledger = Ledger.create(run_dir, owner_key="~/.trainguard/trainguard.key")  # launcher
    ledger = Ledger.open(run_dir, rank=rank)                                # each rank
    ledger.append("alert", {"detector": "rng", "step": 120}, rank=rank)
    ledger.close_run({"steps": 1000})
    report = verify(run_dir, heads=["head.json"], owner_public_key="owner.pub")

SQLite (``RUN_DIR/ledger.db``) by default, PostgreSQL for clusters (extra
``postgres``). See docs/ledger.md for the format and docs/keys.md for who holds which
key and what an attacker inside the job can and cannot forge.
"""

from __future__ import annotations

from trainguard.ledger.core import Ledger, open_backend
from trainguard.ledger.interface import (
    CERTIFICATE_KIND,
    CLOSED_KIND,
    Actor,
    Damage,
    Entry,
    HeadError,
    LedgerBackend,
    LedgerBusyError,
    LedgerClosedError,
    LedgerError,
    Problem,
    Rank,
    RunId,
    SignedHead,
    VerifyReport,
)
from trainguard.ledger.verify import parse_head, read_head, verify

__all__ = [
    "CERTIFICATE_KIND",
    "CLOSED_KIND",
    "Actor",
    "Damage",
    "Entry",
    "HeadError",
    "Ledger",
    "LedgerBackend",
    "LedgerBusyError",
    "LedgerClosedError",
    "LedgerError",
    "Problem",
    "Rank",
    "RunId",
    "SignedHead",
    "VerifyReport",
    "open_backend",
    "parse_head",
    "read_head",
    "verify",
]
