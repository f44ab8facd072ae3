"""The ledger's tail as the ranks remember it: carried in the check, recorded by rank 0.

Entries deleted from the end of a ledger while they are last leave a chain that still
verifies, and writing simply goes on from the new end. What such a deletion cannot
reach is each rank's memory of what it wrote (kept by its :class:`Ledger`: the
(seq, hash) of the highest entry it wrote, and the number it was handed out again if
the end went back). Every check carries that memory in three fields of the fingerprint
row; rank 0 records the values that changed in one ``check`` entry (``ledger.tail`` in
older runs), and each rank's closing entry carries its own (how many entries it wrote,
its first and last). The same entry carries one digest of every rank's data commitment at
the check (``data``), for replay, and what the incident report reads: every rank's row as
gathered, the check's metrics per rank and each rank's per-step metrics chain
(metrics_log.py). One entry per check, written off the training thread.
``trainguard ledger verify`` checks them: a recorded (seq, hash) proves that entry
existed, a count proves how many a rank wrote. See docs/ledger.md, "The tail".
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
from typing import TYPE_CHECKING, Any

from trainguard.errors import Severity
from trainguard.runtime.fingerprint import bits_float
from trainguard.runtime.interface import Alert
from trainguard.runtime.metrics_log import bits_link

if TYPE_CHECKING:
    from trainguard.runtime.guard import Guard

#: the kind of rank 0's one entry per check: the ranks' tails, rows and metrics
CHECK_KIND = "check"
#: the kind of the same record before it held the rows (read by ``ledger verify``)
TAIL_KIND = "ledger.tail"
#: the fingerprint fields this module fills (declared in ``agreement.FIELDS``)
ROW_FIELDS = ("tail_seq", "tail_hash", "tail_cut")
_MASK = (1 << 64) - 1
_METRICS = ("data_loss", "grad_norm_mean", "lr0", "busy_us", "wall_us", "metrics_chain")


def hash_bits(digest: str) -> int:
    """The first 16 hex digits of an entry hash as a signed int64 (a row field)."""
    return int.from_bytes(bytes.fromhex(digest[:16]), "big", signed=True)


def bits_hash(value: int) -> str:
    return f"{value & _MASK:016x}"


def row_values(ledger: Any) -> dict[str, int]:
    """This rank's tail fields: 0 when its ledger wrote nothing yet (or there is none)."""
    claim = getattr(ledger, "tail_claim", None)
    if claim is None:
        return dict.fromkeys(ROW_FIELDS, 0)
    return {
        "tail_seq": claim[0],
        "tail_hash": hash_bits(claim[1]),
        "tail_cut": getattr(ledger, "cut_from", None) or 0,
    }


def _float(bits: int) -> float | None:
    value = bits_float(bits)
    return value if math.isfinite(value) else None


def check_values(rows: list[list[int]], index: dict[str, int], severity: int) -> dict[str, Any]:
    """What a ``check`` entry holds besides the tails: every rank's row as gathered, the
    check's metrics per rank (for the incident report) and each rank's metrics chain."""
    column = {name: [row[index[name]] for row in rows] for name in _METRICS}
    return {
        "fields": list(index),
        "rows": rows,
        "severity": severity,
        "metrics": {
            "loss": [_float(b) for b in column["data_loss"]],
            "grad_norm": [_float(b) for b in column["grad_norm_mean"]],
            "lr": [_float(b) for b in column["lr0"]],
            "busy_s": [v / 1e6 for v in column["busy_us"]],
            "wall_s": [v / 1e6 for v in column["wall_us"]],
        },
        "metrics_chain": [bits_link(v) for v in column["metrics_chain"]],
    }


def closing_values(ledger: Any) -> dict[str, Any] | None:
    """What a rank's closing entry says about the entries it wrote (None: nothing)."""
    first = getattr(ledger, "first_claim", None)
    last = getattr(ledger, "tail_claim", None)
    if first is None or last is None:
        return None
    out: dict[str, Any] = {
        "entries": int(ledger.written),
        "first": [first[0], first[1][:16]],
        "last": [last[0], last[1][:16]],
    }
    if ledger.cut_from is not None:
        out["cut_from"] = ledger.cut_from
    return out


class TailRecord:
    """What the check does with the tail fields, held by each rank's Guard.

    Rank 0 writes one ``check`` entry per check with the tail values that changed since
    its last record (a rank's value changes only when it writes; rank 0's own at every
    record, which is also how rank 0 finds out, by writing, that the end went back). The
    write waits for the disk (a durable append: milliseconds), so a thread of its own does
    it, in order, and the training step never waits for it; :meth:`flush` (before the
    closing entries) waits for what is left. Then every rank reports a cut its own ledger
    saw, once.
    """

    def __init__(self) -> None:
        self.recorded: dict[int, tuple[int, int, int]] = {}
        self.cut_reported = False
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None

    def _write(self, guard: Guard, payload: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._run, args=(guard,), name="trainguard-ledger-tail", daemon=True
            )
            self._writer.start()
        self._queue.put(payload)

    def _run(self, guard: Guard) -> None:
        while (payload := self._queue.get()) is not None:
            try:
                guard.ledger.append(CHECK_KIND, payload, rank=guard.rank)
            except Exception as exc:  # noqa: PERF203 - each record on its own
                guard._sensor_failed("writing the ledger's tail record", exc)

    def flush(self, timeout: float = 70.0) -> None:
        """Write the records still waiting (before the closing entries); stop the writer."""
        writer, self._writer = self._writer, None
        if writer is not None and writer.is_alive():
            self._queue.put(None)
            writer.join(timeout)

    def payload(self, step: int, rows: list[list[int]], index: dict[str, int]) -> dict[str, Any]:
        tails: list[list[Any]] = []
        for rank, row in enumerate(rows):
            value = (row[index["tail_seq"]], row[index["tail_hash"]], row[index["tail_cut"]])
            if value[0] <= 0 or self.recorded.get(rank) == value:
                continue
            self.recorded[rank] = value
            tails.append([rank, value[0], bits_hash(value[1]), *([value[2]] if value[2] else [])])
        out: dict[str, Any] = {"step": step, "tails": tails}
        commits = [row[index["data_commit"]] for row in rows]
        if any(commits):
            # one digest of every rank's data commitment (data_check.py), whatever the ranks
            digest = hashlib.blake2b(repr(commits).encode(), digest_size=16).hexdigest()
            out["data"] = digest
        return out

    def at_check(self, guard: Guard, rows: list[list[int]], index: dict[str, int]) -> None:
        """After the check's collective (``rows``: every rank's fingerprint row)."""
        if guard.rank == 0:
            payload = self.payload(guard.at, rows, index)
            payload.update(check_values(rows, index, guard._compared_severity))
            self._write(guard, payload)
        self.report_cut(guard)

    def report_cut(self, guard: Guard) -> None:
        """A cut this rank's ledger saw, reported once: at a check, and at close after the
        last records are written (the writer may see it only then)."""
        ledger = guard.ledger
        cut = getattr(ledger, "cut_from", None)
        if cut is None or self.cut_reported:
            return
        self.cut_reported = True
        if getattr(getattr(guard, "ledger_watch", None), "tampered", False):
            return  # the live look at this rank's entries reported it already
        gone = ledger.tail_claim[0]
        guard._raise(
            Alert(
                guard.at,
                None,
                "ledger",
                Severity.HIGH,
                "entries were deleted from the end of the run's ledger during training: "
                f"entry {gone}, written by rank {guard.rank}, is gone (number {cut} was "
                "handed out again)",
                {"gone": gone, "reused_from": cut, "seen_by": guard.rank},
            )
        )
