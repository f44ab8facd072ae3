"""Cross-rank agreement: one small collective of fixed-size fingerprints per check.

Every rank contributes one row of int64 fields (parameter hash, optimizer settings and
state, RNG states, code hash, sensor evidence, busy time...). Replicas must agree on
most fields; a rank that does not is named by majority, or — with two ranks, where
there is no majority — by the evidence its own sensors recorded (a re-seed, a
learning rate off schedule, parameters written outside the optimizer), and failing
that by which rank's loss moved away from its own history.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainguard.errors import Severity
from trainguard.runtime.fingerprint import bits_float
from trainguard.runtime.interface import Alert

FIELDS = (
    "step",
    "params",
    "hyperparameters",
    "lr",
    "optimizer_state",
    "rng_torch",
    "rng_cuda",
    "rng_python",
    "rng_numpy",
    "code",
    "events",
    "flags",
    "busy_us",
    "loss_drift",
    "pid",
    "severity",
    "arrival_us",
)
INDEX = {name: i for i, name in enumerate(FIELDS)}

# evidence bits a rank sets about itself
LR_OFF_SCHEDULE = 1
HYPER_CHANGED = 2
RESEEDED = 4
PATCHED = 8
PARAMS_WRITTEN = 16
DATA_ALTERED = 32
AUDIT_EVENT = 64
GRADS_ALTERED = 128

#: which evidence explains a disagreement on which field
EVIDENCE = {
    "params": PARAMS_WRITTEN
    | PATCHED
    | LR_OFF_SCHEDULE
    | HYPER_CHANGED
    | DATA_ALTERED
    | GRADS_ALTERED,
    "optimizer_state": PATCHED | HYPER_CHANGED | LR_OFF_SCHEDULE | GRADS_ALTERED,
    "hyperparameters": HYPER_CHANGED,
    "lr": LR_OFF_SCHEDULE,
    # foreign code that ran on a rank (a re-seed, a patch, a write) explains its RNG moving
    "rng_torch": RESEEDED | PATCHED | PARAMS_WRITTEN | AUDIT_EVENT | DATA_ALTERED,
    "rng_cuda": RESEEDED | PATCHED | PARAMS_WRITTEN | AUDIT_EVENT | DATA_ALTERED,
    "rng_python": RESEEDED | PATCHED | PARAMS_WRITTEN | AUDIT_EVENT | DATA_ALTERED,
    "rng_numpy": RESEEDED | PATCHED | PARAMS_WRITTEN | AUDIT_EVENT | DATA_ALTERED,
    "code": PATCHED,
}
#: fields every replica must hold identical, and what a difference means
MUST_AGREE = {
    "step": "is at another step",
    "params": "holds different parameters",
    "hyperparameters": "runs other optimizer settings",
    "lr": "uses another learning rate",
    "optimizer_state": "holds a different optimizer state",
    "rng_torch": "has a different torch RNG state",
    "rng_cuda": "has a different CUDA RNG state",
    "rng_python": "has a different Python RNG state",
    "rng_numpy": "has a different NumPy RNG state",
    "code": "runs different code",
}


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
    check's collective (the last to arrive waits least)."""

    factor: float = 1.5
    min_seconds: float = 0.02
    patience: int = 2
    streaks: dict[int, int] | None = None

    def check(self, step: int, busy: Sequence[float], arrival: Sequence[float]) -> list[Alert]:
        if self.streaks is None:
            self.streaks = {}
        alerts = []
        for rank, mine in enumerate(busy):
            others = [b for r, b in enumerate(busy) if r != rank]
            if not others:
                continue
            typical = statistics.median(others)
            lag = arrival[rank] - statistics.median(a for r, a in enumerate(arrival) if r != rank)
            slow_work = mine > self.factor * typical and mine - typical > self.min_seconds
            late = lag > self.min_seconds and lag > (self.factor - 1) * typical
            self.streaks[rank] = self.streaks.get(rank, 0) + 1 if slow_work or late else 0
            if self.streaks[rank] == self.patience:
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


def _odd_ranks(values: Sequence[int]) -> list[int] | None:
    """Ranks outside a strict majority; None when there is no majority."""
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
    """Alerts for every field on which the ranks disagree, naming the odd rank."""
    rows = table.tolist()
    alerts: list[Alert] = []
    for name, meaning in MUST_AGREE.items():
        if fields is not None and name not in fields:
            continue
        column = [row[INDEX[name]] for row in rows]
        if len(set(column)) == 1:
            continue
        odd = _odd_ranks(column)
        how = "majority"
        if odd is None:
            odd, how = _by_evidence(name, rows)
        details = {"field": name, "values": column, "named_by": how}
        if not odd:
            alerts.append(
                Alert(
                    step,
                    None,
                    "agreement",
                    Severity.HIGH,
                    f"ranks disagree: {name} differs ({', '.join(map(str, column))}) "
                    "and no rank can be singled out",
                    details,
                )
            )
            continue
        alerts.extend(
            Alert(step, rank, "agreement", Severity.HIGH, f"rank {rank} {meaning}", details)
            for rank in odd
        )
    return alerts


def _by_evidence(name: str, rows: list[list[int]]) -> tuple[list[int], str]:
    mask = EVIDENCE.get(name, 0)
    flagged = [r for r, row in enumerate(rows) if row[INDEX["flags"]] & mask]
    if flagged and len(flagged) < len(rows):
        return flagged, "its own sensors"
    if name in ("params", "optimizer_state"):
        drifts = [bits_float(row[INDEX["loss_drift"]]) for row in rows]
        ranked = sorted(range(len(rows)), key=lambda r: drifts[r], reverse=True)
        if len(ranked) > 1 and drifts[ranked[0]] > 1.02 * max(drifts[ranked[1]], 1e-12):
            return [ranked[0]], "its loss moving away from its own history"
    return [], "none"
