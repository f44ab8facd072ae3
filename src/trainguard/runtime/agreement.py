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

from collections import Counter
from collections.abc import Callable, Sequence
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
    return gather_start(row, group)()


def gather_start(row: torch.Tensor, group: Any = None) -> Callable[[], torch.Tensor]:
    """Start the all_gather of :func:`gather` and return what waits for its table: the
    rank goes on with its step meanwhile, instead of waiting for the last rank here (it
    waits for it at the job's next collective anyway)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        table = row.reshape(1, -1).cpu()
        return lambda: table
    world = dist.get_world_size(group)
    out = [torch.empty_like(row) for _ in range(world)]
    work = dist.all_gather(out, row, group=group, async_op=True)

    def wait() -> torch.Tensor:
        if work is not None:
            work.wait()
        return torch.stack(out).cpu()

    return wait


@dataclass
class Straggler:
    """A rank steadily slower than its peers, by two measures that do not count the time
    a rank spends waiting for the others: its busy time per step (the median over the
    steps since the last check of the wall time less the wait in DDP's all-reduce, when
    the guard could time it), and how late it reaches the check's collective (the last to
    arrive waits least).

    "Steadily" needs evidence graded by the size of the effect (``tiers``): checks
    in a row *and* steps observed slow, so that a few checks a few steps apart on a busy
    machine are not enough to call a colleague's rank slow, while a rank many times
    slower than its peers is named within two checks. Lateness at the check is one
    sample per check (a checkpoint saved just before it makes rank 0 late each time), so
    it counts only towards the first, patient tier.
    """

    @dataclass(frozen=True)
    class Tier:
        """A rank slower than ``factor`` times its peers' median *and* ``seconds`` more,
        on ``checks`` checks in a row that cover at least ``steps`` steps."""

        factor: float
        seconds: float
        checks: int
        steps: int

    #: the evidence each size of slowness needs, smallest first. A small excess (1.5x)
    #: is what a busy neighbour or a compile makes: it needs 50 slow steps. A large one
    #: (4x and 50 ms more per step, each a median over the window, so that a one-off slow
    #: step -- a checkpoint save, a log line, an evaluation on rank 0 -- moves nothing)
    #: is unmistakable after two checks that cover 16 steps.
    tiers: tuple[Tier, ...] = (Tier(1.5, 0.02, 2, 50), Tier(4.0, 0.05, 2, 16))
    #: per rank, per tier: checks and steps in the current slow streak
    streaks: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    fired: set[int] = field(default_factory=set)

    def check(
        self, step: int, busy: Sequence[float], arrival: Sequence[float], steps: int = 1
    ) -> list[Alert]:
        alerts: list[Alert] = []
        if len(busy) < 2:
            return alerts
        # each rank against the median of the others, from one sort of each measure
        peers_busy, peers_arrival = _peer_medians(busy), _peer_medians(arrival)
        for rank, mine in enumerate(busy):
            typical = peers_busy[rank]
            lag = arrival[rank] - peers_arrival[rank]
            streaks = self.streaks.get(rank) or [(0, 0)] * len(self.tiers)
            hit: tuple[int, bool] | None = None
            for i, tier in enumerate(self.tiers):
                slow_work = mine > tier.factor * typical and mine - typical > tier.seconds
                late = i == 0 and lag > tier.seconds and lag > (tier.factor - 1) * typical
                if not (slow_work or late):
                    streaks[i] = (0, 0)
                    continue
                checks, slow_steps = streaks[i][0] + 1, streaks[i][1] + steps
                streaks[i] = (checks, slow_steps)
                if hit is None and checks >= tier.checks and slow_steps >= tier.steps:
                    hit = (i, slow_work)
            if not any(checks for checks, _ in streaks):
                self.streaks.pop(rank, None)
                self.fired.discard(rank)
                continue
            self.streaks[rank] = streaks
            if hit is None or rank in self.fired:
                continue
            self.fired.add(rank)
            which, slow_work = hit
            checks, slow_steps = streaks[which]
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
                    f"rank {rank} is steadily slower: {how} ({slow_steps} steps, {checks} checks)",
                    {"busy_s": mine, "peers_s": typical, "lag_s": lag, "steps": slow_steps},
                )
            )
        return alerts


def _peer_medians(values: Sequence[float]) -> list[float]:
    """For each position, the median of the other values: O(n log n), not O(n^2), so a
    check on thousands of ranks stays cheap."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ordered = [values[i] for i in order]
    position = {rank: p for p, rank in enumerate(order)}
    n = len(values) - 1  # the others: the middle one or two of them
    lo, hi = (n - 1) // 2, n // 2
    out = []
    for rank in range(len(values)):
        p = position[rank]  # skipping this rank's own place in the order
        out.append((ordered[lo + (lo >= p)] + ordered[hi + (hi >= p)]) / 2)
    return out


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
