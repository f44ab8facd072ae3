"""Cross-rank agreement: one small collective of fixed-size fingerprints per check.

Every rank contributes one row of int64 fields (parameter hash, optimizer settings and
state, RNG states, code hash, sensor evidence, busy time...). Replicas must agree on
most fields. A rank that does not is named only when the evidence proves it: by a strict
majority (three or more ranks), or — with two ranks, where there is no majority — by the
evidence its own sensors recorded in the same interval (a learning rate off schedule,
changed settings, parameters written outside the optimizer). Otherwise the alert says the
ranks disagree and that it cannot tell which: a wrong name is an accusation.

RNG states are recorded in every row but not required to agree: ordinary jobs draw from
the global generator on one rank only (rank 0 evaluates, samples text, builds a
validation loader), so a difference there proves nothing by itself.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trainguard.errors import Severity
from trainguard.runtime.fields import (
    AUDIT_EVENT,
    BUFFERS_WRITTEN,
    DATA_ALTERED,
    EVIDENCE,
    FIELDS,
    GRADS_ALTERED,
    GUARD_FAILED,
    HYPER_CHANGED,
    INDEX,
    LR_OFF_SCHEDULE,
    MUST_AGREE,
    PARAMS_WRITTEN,
    PATCHED,
    RESEEDED,
    RNG_ALTERED,
)
from trainguard.runtime.fingerprint import bits_float
from trainguard.runtime.interface import Alert

__all__ = [
    "AUDIT_EVENT",
    "BUFFERS_WRITTEN",
    "DATA_ALTERED",
    "EVIDENCE",
    "FIELDS",
    "GRADS_ALTERED",
    "GUARD_FAILED",
    "HYPER_CHANGED",
    "INDEX",
    "LR_OFF_SCHEDULE",
    "MUST_AGREE",
    "PARAMS_WRITTEN",
    "PATCHED",
    "RESEEDED",
    "RNG_ALTERED",
    "Reported",
    "Straggler",
    "compare",
    "gather",
    "shared_at_start",
]


def gather(row: torch.Tensor, group: Any = None) -> torch.Tensor:
    """All ranks' rows, as a [world, fields] int64 tensor on the CPU (one all_gather)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return row.reshape(1, -1).cpu()
    world = dist.get_world_size(group)
    out = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(out, row, group=group)
    return torch.stack(out).cpu()


@dataclass
class Straggler:
    """A rank steadily slower than its peers, by two measures that do not count the time
    a rank spends waiting for the others: its busy time per step (wall time less the
    wait in DDP's all-reduce, when the guard could time it), and how late it reaches the
    check's collective (the last to arrive waits least).

    "Steadily" needs evidence: ``patience`` checks in a row *and* at least ``min_steps``
    steps observed slow, so that a few checks a few steps apart on a busy machine (a
    neighbour's job, a compile) are not enough to call a colleague's rank slow.
    """

    factor: float = 1.5
    min_seconds: float = 0.02
    patience: int = 2
    min_steps: int = 50
    streaks: dict[int, tuple[int, int]] = field(default_factory=dict)  # checks, steps
    fired: set[int] = field(default_factory=set)

    def check(
        self, step: int, busy: Sequence[float], arrival: Sequence[float], steps: int = 1
    ) -> list[Alert]:
        alerts = []
        for rank, mine in enumerate(busy):
            others = [b for r, b in enumerate(busy) if r != rank]
            if not others:
                continue
            typical = statistics.median(others)
            lag = arrival[rank] - statistics.median(a for r, a in enumerate(arrival) if r != rank)
            slow_work = mine > self.factor * typical and mine - typical > self.min_seconds
            late = lag > self.min_seconds and lag > (self.factor - 1) * typical
            if not (slow_work or late):
                self.streaks.pop(rank, None)
                self.fired.discard(rank)
                continue
            checks, slow_steps = self.streaks.get(rank, (0, 0))
            checks, slow_steps = checks + 1, slow_steps + steps
            self.streaks[rank] = (checks, slow_steps)
            if checks >= self.patience and slow_steps >= self.min_steps and rank not in self.fired:
                self.fired.add(rank)
                how = (
                    f"{mine * 1e3:.0f} ms of work per step against {typical * 1e3:.0f} ms"
                    if slow_work
                    else f"reaches the check {lag * 1e3:.0f} ms after its peers"
                )
                alerts.append(
                    Alert(
                        step,
                        rank,
                        "straggler",
                        Severity.MEDIUM,
                        f"rank {rank} is steadily slower: {how}",
                        {"busy_s": mine, "peers_s": typical, "lag_s": lag},
                    )
                )
        return alerts


class Reported:
    """Which disagreements were reported: a divergence does not heal, so each field is
    reported once; a field already blamed on a rank is not reported again as "cannot
    tell"."""

    def __init__(self) -> None:
        self.diverged: set[str] = set()
        self.blamed: dict[str, int] = {}

    def new(self, alerts: list[Alert]) -> list[Alert]:
        fresh: list[Alert] = []
        pending: set[str] = set()
        for alert in alerts:
            key = str(alert.details.get("field"))
            if key in self.diverged:
                continue  # reported at an earlier check
            if alert.rank is not None:
                self.blamed[key] = alert.rank
            if alert.rank is None and key in self.blamed:
                continue
            pending.add(key)
            fresh.append(alert)
        self.diverged |= pending
        return fresh


def _odd_ranks(values: Sequence[int]) -> list[int] | None:
    """Positions outside a strict majority; None when there is no majority."""
    counts = Counter(values)
    value, count = counts.most_common(1)[0]
    if count * 2 > len(values):
        return [r for r, v in enumerate(values) if v != value]
    return None


def shared_at_start(table: torch.Tensor) -> frozenset[str]:
    """The fields all ranks agreed on at start: RNGs seeded per rank (or not at all)
    legitimately differ, and are then not compared."""
    rows = table.tolist()
    return frozenset(name for name in MUST_AGREE if len({row[INDEX[name]] for row in rows}) == 1)


def compare(step: int, table: torch.Tensor, fields: frozenset[str] | None = None) -> list[Alert]:
    """Alerts for every field on which the ranks disagree, naming the odd rank only when
    a majority or its own evidence proves it. A row whose guard failed to compute it
    (``GUARD_FAILED``) takes the other rows' values: it proves nothing either way."""
    rows = table.tolist()
    known = [row for row in rows if not row[INDEX["flags"]] & GUARD_FAILED]
    # a majority is counted among the rows that are known: a stand-in is not a vote
    voters = [r for r, row in enumerate(rows) if not row[INDEX["flags"]] & GUARD_FAILED]
    if not known:
        return []
    if len(known) < len(rows):
        stand_in = known[0]
        rows = [
            row
            if not row[INDEX["flags"]] & GUARD_FAILED
            else [
                stand_in[i] if name in MUST_AGREE or name == "lr0" else row[i]
                for i, name in enumerate(FIELDS)
            ]
            for row in rows
        ]
    alerts: list[Alert] = []
    for name, meaning in MUST_AGREE.items():
        if fields is not None and name not in fields:
            continue
        column = [row[INDEX[name]] for row in rows]
        if len(set(column)) == 1:
            continue
        majority = _odd_ranks([column[r] for r in voters])
        odd = None if majority is None else [voters[i] for i in majority]
        how = "majority"
        if odd is None:
            odd, how = _by_evidence(name, rows)
        shown = _values(name, rows)
        details = {"field": name, "values": shown, "named_by": how}
        if not odd:
            alerts.append(
                Alert(
                    step,
                    None,
                    "agreement",
                    Severity.HIGH,
                    f"ranks disagree: {name} differs ({_grouped(name, rows)}); "
                    "cannot tell which rank is wrong",
                    details,
                )
            )
            continue
        alerts.extend(
            Alert(
                step,
                rank,
                "agreement",
                Severity.HIGH,
                f"rank {rank} {meaning} ({_grouped(name, rows)}; named by {how})",
                details,
            )
            for rank in odd
        )
    return alerts


def _values(name: str, rows: list[list[int]]) -> list[Any]:
    """What each rank holds, as a person reads it where the value is known."""
    if name == "lr":
        return [bits_float(row[INDEX["lr0"]]) for row in rows]
    if name == "step":
        return [row[INDEX["step"]] for row in rows]
    return [f"{row[INDEX[name]] & 0xFFFFFFFF:08x}" for row in rows]


def _grouped(name: str, rows: list[list[int]]) -> str:
    """'lr 0.025 on rank 1, 0.0025 on ranks 0, 2' (or groups of ranks where only hashes
    are known)."""
    values = _values(name, rows)
    groups: dict[Any, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(value, []).append(rank)
    ordered = sorted(groups.items(), key=lambda kv: len(kv[1]))

    def ranks(rs: list[int]) -> str:
        return f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"

    if name in ("lr", "step"):
        label = "lr" if name == "lr" else "step"
        return ", ".join(f"{label} {v:.6g} on {ranks(rs)}" for v, rs in ordered)
    agreeing = [rs for _, rs in ordered if len(rs) > 1]
    alone = [r for _, rs in ordered if len(rs) == 1 for r in rs]
    said = [f"{ranks(rs)} agree" for rs in agreeing]
    if alone:
        said.append(f"{ranks(alone)} {'differs' if len(alone) == 1 else 'each differ'}")
    return ", ".join(said)


def _by_evidence(name: str, rows: list[list[int]]) -> tuple[list[int], str]:
    mask = EVIDENCE.get(name, 0)
    flagged = [r for r, row in enumerate(rows) if row[INDEX["flags"]] & mask]
    if flagged and len(flagged) < len(rows):
        return flagged, "its own sensors"
    return [], "none"
