"""Verification of a run's ledger: chain, signatures, certificates, heads kept elsewhere.

Every entry is checked in sequence order: its hash against its fields, its link to the
entry before, its signature against the run key its certificate names (certificates
against the owner's key), its time against the certificate's validity. A break is
classified by what the surviving links say: an entry whose ``prev_hash`` names an
entry stored elsewhere was moved (``reordered``); one that names an entry no longer
present, or a gap in the numbers, means ``deleted``. Heads kept elsewhere add what the
chain alone cannot show: truncation of the tail and consistent rewrites.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from trainguard import _io
from trainguard.errors import InputError
from trainguard.integrity import signing
from trainguard.ledger import chain
from trainguard.ledger.core import head_from, open_backend
from trainguard.ledger.interface import (
    CERTIFICATE_KIND,
    CLOSED_KIND,
    Damage,
    Entry,
    HeadError,
    LedgerError,
    Problem,
    SignedHead,
    VerifyReport,
)

#: problems listed in full; the rest are counted in ``problems_omitted``
MAX_PROBLEMS = 100

PublicKeyLike = str | os.PathLike[str] | Ed25519PublicKey


def read_head(path: str | os.PathLike[str]) -> SignedHead:
    """Parse a head file written by ``trainguard ledger head`` (JSON, any spacing).

    At most :data:`trainguard._io.HEAD_CAP` bytes, a regular file (a FIFO or device is
    refused before it is read), JSON nested no deeper than ``_io.JSON_DEPTH``.
    """
    where = _io.display(path)
    try:
        data = _io.parse_json(_io.read_text_capped(path, _io.HEAD_CAP, "head file"), where)
    except InputError as exc:
        raise HeadError(str(exc)) from exc
    return parse_head(data, where)


def parse_head(data: object, where: str = "head") -> SignedHead:
    if not isinstance(data, dict) or data.get("format") != "trainguard-ledger-head":
        raise HeadError(f"{where}: not a trainguard ledger head")
    try:
        return SignedHead(
            run_id=str(data["run_id"]),
            seq=int(data["seq"]),
            hash=str(data["hash"]),
            signature=str(data["signature"]),
            key_id=str(data["key_id"]),
            root=str(data["root"]),
            owner_key_id=str(data["owner_key_id"]),
            time=str(data["time"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise HeadError(f"{where}: incomplete ledger head ({exc})") from exc


class _Checker:
    def __init__(self, report: VerifyReport) -> None:
        self.report = report

    def add(self, seq: int, damage: Damage, message: str) -> None:
        if len(self.report.problems) >= MAX_PROBLEMS:
            self.report.problems_omitted += 1
            return
        self.report.problems.append(Problem(seq, damage, message))


def verify(
    run_dir: str | os.PathLike[str],
    *,
    heads: Sequence[SignedHead | str | os.PathLike[str]] = (),
    owner_public_key: PublicKeyLike | Sequence[PublicKeyLike] | None = None,
) -> VerifyReport:
    """Verify the ledger of ``run_dir``; never changes it.

    ``heads`` are heads kept elsewhere (objects or files). ``owner_public_key`` pins the
    owner; without it (and without a head) a ledger forged from scratch under someone
    else's key is internally consistent, and the report's notes say so.
    """
    parsed = [h if isinstance(h, SignedHead) else read_head(h) for h in heads]
    owners = _owner_ids(owner_public_key)
    entries, notes = read_entries(run_dir)
    report = verify_entries(entries, heads=parsed, owner_keys=owners)
    report.notes.extend(notes)
    return report


def read_entries(run_dir: str | os.PathLike[str]) -> tuple[list[Entry], list[str]]:
    """Every entry of ``run_dir``'s ledger, read-only, and notes on how it was read."""
    store = open_backend(run_dir, readonly=True)
    try:
        entries = list(store.entries())
        mode = getattr(store, "read_mode", None)
    finally:
        store.close()
    notes = []
    if mode == "snapshot":
        notes.append(
            "read from a private copy of ledger.db and its WAL: the run folder is read-only "
            "and entries were still in the WAL (a run whose writer did not close it)"
        )
    return entries, notes


def signed_head(run_dir: str | os.PathLike[str]) -> SignedHead:
    """The head of ``run_dir``'s ledger, only once every entry reads and verifies.

    The same reader as :func:`verify`. A head pins entries as the reference later
    verifications compare with, so it is refused (HeadError) for a ledger that does
    not verify (tampered, damaged rows, no certificate): it would pin the damage.
    """
    entries, _ = read_entries(run_dir)
    report = verify_entries(entries)
    problem = report.first_problem
    if problem is not None:
        raise HeadError(
            f"{_io.display(run_dir)}: refusing to take the head of a tampered ledger: "
            f"entry {problem.seq} ({problem.damage}): {problem.message}; "
            "run `trainguard ledger verify` for the details"
        )
    return head_from(entries)


def _owner_ids(keys: PublicKeyLike | Sequence[PublicKeyLike] | None) -> set[str] | None:
    if keys is None:
        return None
    items = [keys] if isinstance(keys, (str, os.PathLike, Ed25519PublicKey)) else list(keys)
    return {
        signing.key_id(k if isinstance(k, Ed25519PublicKey) else signing.load_public(k))
        for k in items
    }


def verify_entries(
    entries: Iterable[Entry],
    *,
    heads: Sequence[SignedHead] = (),
    owner_keys: set[str] | None = None,
) -> VerifyReport:
    """Verify entries as a backend returned them (in sequence order)."""
    rows = sorted(entries, key=lambda e: e.seq)
    report = VerifyReport(
        run_id=None,
        entries=len(rows),
        last_seq=rows[-1].seq if rows else 0,
        closed=bool(rows) and rows[-1].kind == CLOSED_KIND,
        owner_key_id=None,
        owner_pinned=owner_keys is not None,
        heads_checked=len(heads),
    )
    check = _Checker(report)
    if not rows:
        check.add(1, "deleted", "the ledger is empty: the run certificate is missing")
        return report
    where = {e.hash: e.seq for e in rows}
    expected, prev = 1, chain.GENESIS
    cert: chain.Certificate | None = None
    run_key: Ed25519PublicKey | None = None
    after_close = False
    for entry in rows:
        if entry.seq < expected:
            check.add(entry.seq, "edited", f"sequence number {entry.seq} appears more than once")
        elif entry.seq != expected:
            missing = f"{expected}" if entry.seq == expected + 1 else f"{expected}-{entry.seq - 1}"
            check.add(expected, "deleted", f"entries {missing} are missing")
        if entry.defect is not None:
            check.add(entry.seq, "edited", f"entry {entry.seq} is damaged: {entry.defect}")
        elif chain.recompute(entry) != entry.hash:
            damage = _moved(entry, prev, where) or "edited"
            check.add(entry.seq, damage, _explain(entry, damage, where))
        elif entry.prev_hash != prev:
            damage = _moved(entry, prev, where) or "deleted"
            check.add(entry.seq, damage, _explain(entry, damage, where))
        if entry.kind == CERTIFICATE_KIND:
            new = _certificate(entry, cert, owner_keys, check)
            if new is not None:
                cert, run_key = new, new.run_public()
                report.run_id = report.run_id or new.run_id
                report.owner_key_id = report.owner_key_id or new.owner_key_id
        elif entry.seq == 1:
            check.add(1, "bad-certificate", f"entry 1 is a {entry.kind!r}, not a run certificate")
        elif run_key is None or cert is None:
            check.add(entry.seq, "bad-signature", "no valid run certificate precedes this entry")
        elif entry.key_id != cert.run_key_id or not chain.signature_ok(entry, run_key):
            check.add(
                entry.seq,
                "bad-signature",
                f"signature does not verify with run key {cert.run_key_id}"
                + (
                    f" (entry claims key {entry.key_id})" if entry.key_id != cert.run_key_id else ""
                ),
            )
        elif not cert.covers(entry.time):
            check.add(
                entry.seq,
                "outside-validity",
                f"entry time {entry.time} is outside the run key's validity "
                f"({cert.not_before} .. {cert.not_after})",
            )
        if after_close and entry.kind != CERTIFICATE_KIND:
            check.add(entry.seq, "after-close", "entry written after the run was closed")
        expected, prev = entry.seq + 1, entry.hash
        after_close = entry.kind == CLOSED_KIND
    _check_tail(rows, check)
    for head in heads:
        _check_head(head, rows, check)
    if owner_keys is None and not heads:
        report.notes.append(
            "owner key not pinned: pass --pubkey or --head to detect a ledger forged "
            "from scratch under another key"
        )
    if not report.closed and not report.problems:
        last = rows[-1]
        report.notes.append(
            f"not closed: no {CLOSED_KIND} entry; the ledger ends at entry {last.seq} "
            f"({last.kind}, {last.time}). The run is still running, crashed, or everything "
            "after that entry was deleted, closing entries included: the ledger's own tail "
            "records only prove what came before them, so only a head kept elsewhere "
            "(`trainguard ledger head`) tells these apart"
        )
    report.problems.sort(key=lambda p: p.seq)
    return report


def _bisect(rows: list[Entry], seq: int) -> int:
    lo, hi = 0, len(rows)
    while lo < hi:
        mid = (lo + hi) // 2
        if rows[mid].seq < seq:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _moved(entry: Entry, prev: str, where: dict[str, int]) -> Damage | None:
    """Classify a broken link by where the entry's ``prev_hash`` points."""
    if entry.prev_hash == prev:
        return None
    if entry.prev_hash in where and where[entry.prev_hash] + 1 != entry.seq:
        return "reordered"
    if entry.prev_hash not in where and entry.prev_hash != chain.GENESIS:
        return "deleted"
    return None


def _explain(entry: Entry, damage: Damage, where: dict[str, int]) -> str:
    if damage == "reordered":
        return (
            f"entry {entry.seq} ({entry.kind}) belongs after entry "
            f"{where[entry.prev_hash]}: entries were moved"
        )
    if damage == "deleted":
        return f"entry {entry.seq} ({entry.kind}) follows an entry that is no longer there"
    return f"entry {entry.seq} ({entry.kind}) does not match its hash: its content was changed"


def _certificate(
    entry: Entry,
    current: chain.Certificate | None,
    owner_keys: set[str] | None,
    check: _Checker,
) -> chain.Certificate | None:
    try:
        cert = chain.Certificate.from_entry(entry)
    except LedgerError as exc:
        check.add(entry.seq, "bad-certificate", str(exc))
        return None
    if owner_keys is not None and cert.owner_key_id not in owner_keys:
        check.add(
            entry.seq,
            "untrusted-owner",
            f"run certificate is signed by key {cert.owner_key_id}, not by the pinned owner key",
        )
        return None
    if current is not None and (
        cert.owner_key_id != current.owner_key_id or cert.run_id != current.run_id
    ):
        check.add(
            entry.seq,
            "bad-certificate",
            f"certificate for run {cert.run_id} by key {cert.owner_key_id} does not continue "
            f"run {current.run_id} of key {current.owner_key_id}",
        )
        return None
    return cert


def _check_head(head: SignedHead, rows: list[Entry], check: _Checker) -> None:
    first = rows[0]
    if head.root != first.hash:
        check.add(
            1,
            "rewritten",
            f"entry 1 (the run certificate) is not the one head {head.seq} of run "
            f"{head.run_id} was taken from: the ledger was replaced",
        )
        return
    cert = None
    with_key = [e for e in rows if e.kind == CERTIFICATE_KIND and e.seq <= head.seq]
    for entry in with_key:
        try:
            candidate = chain.Certificate.from_entry(entry)
        except LedgerError:
            continue
        if head.key_id in (candidate.run_key_id, candidate.owner_key_id):
            cert = candidate
    if cert is None:
        if check.report.problems:
            # the certificates are damaged (already reported): the head cannot be checked,
            # and the verdict is "tampered" without it
            check.report.notes.append(
                f"head {head.seq} not checked: no intact certificate names its key {head.key_id}"
            )
            return
        raise HeadError(f"head {head.seq} is signed by key {head.key_id}, unknown to this run")
    key = cert.owner_public() if head.key_id == cert.owner_key_id else cert.run_public()
    try:
        message = chain.entry_message(head.hash)
    except ValueError as exc:
        raise HeadError(
            f"head {head.seq}: its hash is not hexadecimal; not a genuine head"
        ) from exc
    if not signing.verify(key, message, head.signature):
        raise HeadError(f"head {head.seq}: its signature does not verify; not a genuine head")
    # the signature covers the hash, and the hash the entry's seq: a head naming another seq
    # for a hash in this ledger was edited
    moved = next(
        (
            e.seq
            for e in rows
            if e.hash == head.hash and e.seq != head.seq and chain.recompute(e) == e.hash
        ),
        None,
    )
    if moved is not None:
        raise HeadError(f"head {head.seq}: its hash is that of entry {moved}; the head was edited")
    index = _bisect(rows, head.seq)
    if index >= len(rows) or rows[index].seq != head.seq:
        last = rows[-1].seq
        if head.seq > last:
            check.add(
                last + 1,
                "truncated",
                f"entries {last + 1}-{head.seq} are missing: the head kept elsewhere "
                f"covers up to {head.seq}, the ledger ends at {last}",
            )
        return
    if rows[index].hash != head.hash:
        check.add(
            head.seq,
            "rewritten",
            f"entry {head.seq} differs from the head kept elsewhere: entries up to "
            f"{head.seq} were rewritten",
        )


# --- the tail as the writers remember it (runtime/ledger_tail.py) -------------------------

#: the kinds of a record of the writers' tails (written by rank 0 at the Guard's checks):
#: ``check`` (with the ranks' rows and metrics) and ``ledger.tail`` (older runs)
TAIL_KINDS = frozenset({"check", "ledger.tail"})


class _Claim:
    """ "A writer wrote entry ``seq`` with a hash starting ``digest``": from its memory."""

    def __init__(self, seq: int, digest: str, rank: object, source: Entry, cut: int) -> None:
        self.seq, self.digest, self.rank, self.source, self.cut = seq, digest, rank, source, cut


def _check_tail(rows: list[Entry], check: _Checker) -> None:
    """Entries cut from the end while they were last, shown by what their writers
    remember: a recorded (seq, hash) proves that entry existed; a closing entry's count
    proves how many entries its writer wrote. Only intact entries are read."""
    bad = {p.seq for p in check.report.problems}
    by_seq = {e.seq: e for e in rows}
    writers: dict[tuple[str, int], list[int]] = {}
    claims: list[_Claim] = []
    counts: list[tuple[Entry, dict[str, object]]] = []
    for entry in rows:
        try:
            actor = entry.actor
            payload = entry.payload
        except (ValueError, TypeError, AttributeError, RecursionError):
            continue
        writers.setdefault((actor.host, actor.pid), []).append(entry.seq)
        if entry.seq in bad or entry.defect is not None or not isinstance(payload, dict):
            continue
        if entry.kind in TAIL_KINDS:
            for item in payload.get("tails") or ():
                claim = _parse_claim(item[1:] if isinstance(item, list) else None, entry)
                if claim is not None:
                    claim.rank = item[0]
                    claims.append(claim)
        mine = payload.get("ledger")
        if isinstance(mine, dict):
            counts.append((entry, mine))
            for name in ("first", "last"):
                claim = _parse_claim(mine.get(name), entry, mine.get("cut_from"))
                if claim is not None:
                    claims.append(claim)
    seen: set[tuple[int, str]] = set()
    for claim in claims:
        if (claim.seq, claim.digest) in seen:
            continue
        seen.add((claim.seq, claim.digest))
        _check_claim(claim, by_seq, check)
    for entry, mine in counts:
        _check_count(entry, mine, writers, check)


def _parse_claim(item: object, source: Entry, cut: object = None) -> _Claim | None:
    if not isinstance(item, list) or len(item) < 2:
        return None
    seq, digest = item[0], item[1]
    if not isinstance(seq, int) or not isinstance(digest, str) or seq < 1:
        return None
    if len(item) > 2:
        cut = item[2]
    rank = source.actor.rank
    return _Claim(seq, digest.lower(), rank, source, cut if isinstance(cut, int) else 0)


def _check_claim(claim: _Claim, by_seq: dict[int, Entry], check: _Checker) -> None:
    entry = by_seq.get(claim.seq)
    if entry is not None and entry.hash.startswith(claim.digest):
        return
    start = claim.cut if 0 < claim.cut <= claim.seq else claim.seq
    span = f"entry {start}" if start == claim.seq else f"entries {start}-{claim.seq}"
    said = f"entry {claim.source.seq} ({claim.source.kind})"
    if claim.source.seq == claim.seq:
        said = f"the {claim.source.kind} entry now numbered {claim.seq}"
    now = (
        "is missing"
        if entry is None
        else f"is now another entry ({entry.kind}): the run wrote on after the deletion"
    )
    check.add(
        start,
        "truncated",
        f"{span} deleted from the end of the ledger while last: entry {claim.seq}, which rank "
        f"{claim.rank} wrote (hash {claim.digest[:16]}..., as {said} records), {now}",
    )


def _check_count(
    entry: Entry,
    mine: dict[str, object],
    writers: dict[tuple[str, int], list[int]],
    check: _Checker,
) -> None:
    wrote, first = mine.get("entries"), mine.get("first")
    if not isinstance(wrote, int) or not isinstance(first, list) or not first:
        return
    start = first[0]
    if not isinstance(start, int):
        return
    actor = entry.actor
    seqs = writers.get((actor.host, actor.pid), [])
    found = _bisect_seqs(seqs, entry.seq) - _bisect_seqs(seqs, start)
    if found >= wrote:
        return
    cut, gone = mine.get("cut_from"), wrote - found
    check.add(
        cut if isinstance(cut, int) and start <= cut < entry.seq else entry.seq,
        "truncated",
        f"rank {actor.rank} (pid {actor.pid} on {actor.host}) wrote {wrote} entries from entry "
        f"{start} up to its closing entry {entry.seq}, which says so; {found} of them are in "
        f"the ledger: {gone} {'was' if gone == 1 else 'were'} deleted from the end of the "
        "ledger while last, "
        f"between entries {start} and {entry.seq}, and the run wrote on",
    )


def _bisect_seqs(seqs: list[int], seq: int) -> int:
    """How many of the sorted ``seqs`` are below ``seq``."""
    lo, hi = 0, len(seqs)
    while lo < hi:
        mid = (lo + hi) // 2
        if seqs[mid] < seq:
            lo = mid + 1
        else:
            hi = mid
    return lo
