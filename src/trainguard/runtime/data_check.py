"""Data integrity: what each rank trains on, committed and compared across ranks.

``guard.step(batch=...)`` folds a digest of each batch (``batches.py``: a strided sample
of at most ``SAMPLE_BYTES`` of every tensor, with its shape and dtype) into a running commitment of
everything this rank has read and into this interval's digest; both travel in the check's
row, and the commitment is what a replay checks later. At a check every rank compares:

- two ranks with the same interval digest read the same data (data parallelism splits
  it): which one is wrong cannot be told, unless the sampler check names one;
- a rank that trained on the same batch again where its peers did not is named (its own
  digests prove it);
- per-rank interval losses: a rank whose loss is out of family (``LossFamily``) stands
  out, which is how labels altered after the loader are found; with two ranks there is
  no family and the alert cannot tell which rank;
- the sampler behind ``Guard(..., loader=...)`` (``sampler.SamplerWatch``): indices
  recomputed from the process group's rank, settings and draw counts shared by all.

Digests are computed where the batch lives: on the CPU with BLAKE2b, on an accelerator as
a 0-d integer tensor resolved at the check (no device sync per step). Small CPU batches are
kept whole and digested at the check; a loader that refills its buffers in place is seen
there (one storage at two steps), and that interval's batches are recorded as undigested.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from trainguard.errors import Severity
from trainguard.runtime import batches, fields
from trainguard.runtime.batches import (
    Sampled,
    batch_sample,
    holdable,
    leaves,
    sample_leaves,
    small,
)
from trainguard.runtime.fingerprint import bits_float, float_bits, text_hash
from trainguard.runtime.interface import Alert, BaseDetector, Context, StepInfo
from trainguard.runtime.sampler import SamplerWatch

__all__ = ["DataCheck", "LossFamily", "same_data"]

_MASK63 = (1 << 63) - 1
_MULT = 0x100000001B3  # an odd multiplier: the commitment depends on the order of batches
#: batches whose samples are held until the check, at most (then digested at once)
_HELD = 256
#: a batch digested once more within this many steps is a repeat
REPEAT_WINDOW = 64


def _fold(state: int, digest: int) -> int:
    return ((state * _MULT + digest) & _MASK63) | 1


@dataclass
class LossFamily:
    """Per-rank interval losses out of family, decided alike on every rank from the rows.

    A rank's deviation is ``|ln(loss / median of the others' losses)|``. It is out of
    family when the deviation passes ``max(floor, factor * the largest spread of the
    last clean checks)`` at ``patience`` checks in a row. Before ``learn`` clean checks
    are known the threshold is ``first_floor``. The checks in a row must find the rank on
    the same side of its peers (noise falls on either side). Checks where any loss is
    missing, zero or negative are skipped (a log-ratio needs positive losses)."""

    floor: float = math.log(4.0)
    first_floor: float = math.log(8.0)
    factor: float = 3.0
    patience: int = 2
    learn: int = 2
    history: deque[float] = field(default_factory=lambda: deque(maxlen=32))
    #: per rank: checks in a row out of family on the same side, and that side
    streaks: dict[int, tuple[int, bool]] = field(default_factory=dict)

    def threshold(self) -> float:
        if len(self.history) < self.learn:
            return self.first_floor
        return max(self.floor, self.factor * max(self.history))

    def check(self, losses: list[float]) -> tuple[list[int], dict[int, float]]:
        """The ranks out of family for ``patience`` checks (with two ranks: both, as
        neither can be told from the other), and each rank's signed log-deviation."""
        if len(losses) < 2 or not all(math.isfinite(x) and x > 0 for x in losses):
            return [], {}
        logs = [math.log(x) for x in losses]
        deviation = {r: v - statistics.median(logs[:r] + logs[r + 1 :]) for r, v in enumerate(logs)}
        limit = self.threshold()
        out = [r for r, d in deviation.items() if abs(d) > limit]
        if len(losses) > 2 and len(out) * 2 >= len(losses):
            out = []  # no family to stand out from: the whole run moved
        for r in range(len(losses)):
            count, above = self.streaks.get(r, (0, True))
            side = deviation[r] > 0
            # noise falls on either side; a rank fed altered data stays on one
            count = (count + 1 if side == above else 1) if r in out else 0
            self.streaks[r] = (count, side)
        if not out:
            self.history.append(max(map(abs, deviation.values())))
        return [r for r in out if self.streaks[r][0] >= self.patience], deviation


def same_data(digests: list[int]) -> list[list[int]]:
    """Groups of two or more ranks with the same non-empty interval digest."""
    groups: dict[int, list[int]] = {}
    for rank, digest in enumerate(digests):
        if digest:
            groups.setdefault(digest, []).append(rank)
    return [ranks for ranks in groups.values() if len(ranks) > 1]


def repeaters(repeats: list[int]) -> list[int]:
    """Ranks that trained on the same batch again (twice or more this interval) where at
    least as many peers repeated none: legitimate repetition is done by every rank."""
    again = [r for r, n in enumerate(repeats) if n >= 2]
    clean = [r for r, n in enumerate(repeats) if n == 0]
    if again and len(clean) >= len(again) and len(again) + len(clean) == len(repeats):
        return again
    return []


def _odd(values: list[int]) -> list[int] | None:
    """Ranks outside a strict majority of equal values; None without a majority."""
    common = max(set(values), key=values.count)
    if values.count(common) * 2 > len(values):
        return [r for r, v in enumerate(values) if v != common]
    return None


class DataCheck(BaseDetector):
    """Batch digests, per-rank losses and the sampler check (see the module's text)."""

    name = "data"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        try:
            self.sampler = SamplerWatch(ctx.options.get("loader"), ctx.rank, ctx.world, ctx.fault)
        except Exception as exc:  # a loader it cannot read: unchecked, never the job's end
            ctx.fault("the data sampler check", exc)
            self.sampler = SamplerWatch(None, ctx.rank, ctx.world, ctx.fault)
        self.pending: list[Sampled | int | torch.Tensor] = []
        #: small CPU batches are kept whole until the check (None: not decided yet)
        self._hold: bool | None = None
        self.held: list[Any] = []
        self.commitment = 0
        self.recent: deque[int] = deque(maxlen=REPEAT_WINDOW)
        self.losses: list[float] = []
        self.family = LossFamily()
        self.unchecked_seen = False
        self.reported: set[tuple[Any, ...]] = set()
        #: checks in a row at which the ranks' values of a field differed
        self.disagree: dict[str, int] = {}
        self._drawn = 0
        #: (step, commitment) at every check, written to the ledger at close
        self.commitments: list[tuple[int, int]] = []
        self._batches = 0
        self._row: dict[str, int] = self._values(0, 0, math.nan, 0)

    # --- per step ------------------------------------------------------------------

    def observe(self, loss: Any, batch: Any) -> None:
        if batch is None:
            return
        if self._hold is None:
            self._hold = holdable([batch])
        if self._hold:
            # the batch itself, kept to the check: no per-step work (a container copied,
            # the job may refill its own)
            kind = type(batch)
            self.held.append(
                dict(batch) if kind is dict else list(batch) if kind is list else batch
            )
            if len(self.held) >= _HELD:
                self._take_held()
            return
        self._take(batch, batch_sample(batch))
        if len(self.pending) % _HELD == 0:
            # a long interval: what is held is digested now, so memory stays bounded
            self.pending = [
                batches.digest(p) if isinstance(p, Sampled) else p for p in self.pending
            ]

    def _take(self, batch: Any, sampled: Sampled | int | torch.Tensor | None) -> None:
        if sampled is None:
            if not self.unchecked_seen:
                self.unchecked_seen = True
                self._unchecked(f"batches of type {type(batch).__qualname__} are not digested")
            return
        self.pending.append(sampled)
        self._batches += 1

    def _unchecked(self, detail: str) -> None:
        self.ctx.record(
            {
                "step": self.ctx.at(),
                "rank": self.ctx.rank,
                "event": "data-unchecked",
                "detail": detail,
            }
        )

    def _take_held(self) -> None:
        """Digest the batches kept since the last check, unless the loader refilled one
        in place (a buffer seen at two steps): those are lost, and every batch is digested
        at its step from then on."""
        held, self.held = self.held, []
        if not held:
            return
        owner: dict[int, int] = {}
        walked: list[tuple[Any, list[tuple[str, torch.Tensor]] | None]] = []
        for index, batch in enumerate(held):
            found: list[tuple[str, torch.Tensor]] = []
            known = leaves(batch, "", found, 0) and bool(found)
            walked.append((batch, found if known else None))
            for _, tensor in found:
                pointer = tensor.untyped_storage().data_ptr()
                if pointer and owner.setdefault(pointer, index) != index:
                    self._hold = False
                    self._unchecked(
                        f"the loader refills its batch buffers: {len(held)} batches not "
                        "digested; from now on each batch is digested at its step"
                    )
                    return
        for batch, tensors in walked:
            sampled = None if tensors is None else sample_leaves(tensors, copy=False)
            self._take(batch, None if sampled is None else batches.digest(sampled))
        if any(tensors is None or not small(tensors) for _, tensors in walked):
            self._hold = False

    def on_step(self, info: StepInfo) -> Iterable[Alert]:
        if info.loss is not None and math.isfinite(info.loss):
            self.losses.append(float(info.loss))
        return ()

    # --- at the check --------------------------------------------------------------

    def _fold_pending(self) -> tuple[int, int]:
        """Fold the digests since the last check (one device sync for all): the interval's
        digest and how many of its batches were repeats."""
        self._take_held()
        pending = [batches.digest(p) if isinstance(p, Sampled) else p for p in self.pending]
        self.pending = []
        devices = [d for d in pending if isinstance(d, torch.Tensor)]
        values: list[int] = []
        if devices:
            where = devices[0].device
            values = torch.stack([d.to(where) for d in devices]).cpu().tolist()
        resolved = iter(values)
        interval, repeats = 0, 0
        for digest in pending:
            value = int(next(resolved)) if isinstance(digest, torch.Tensor) else digest
            repeats += value in self.recent
            self.recent.append(value)
            self.commitment = _fold(self.commitment, value)
            interval = _fold(interval, value)
        return interval, repeats

    def at_check(self) -> None:
        interval, repeats = self._fold_pending()
        loss = statistics.fmean(self.losses) if self.losses else math.nan
        self.losses = []
        drawn, self._drawn = self.sampler.drawn - self._drawn, self.sampler.drawn
        self.commitments.append((self.ctx.at(), self.commitment))
        self._row = self._values(interval, repeats, loss, drawn)
        if self.sampler.active:
            self.sampler.check_settings()
            problems, self.sampler.problems = self.sampler.problems, []
            for text, details in problems:
                alert = Alert(self.ctx.at(), self.ctx.rank, self.name, Severity.HIGH, text, details)
                self.ctx.alert(alert, fields.DATA_ALTERED)
            if self.sampler.altered:
                self.ctx.flag(fields.DATA_ALTERED)

    def _values(self, interval: int, repeats: int, loss: float, drawn: int) -> dict[str, int]:
        shared = self.sampler.digest()
        return {
            "data_commit": self.commitment,
            "data_interval": interval,
            "data_loss": float_bits(loss),
            "data_repeats": repeats,
            "data_sampler": text_hash(repr(shared)) if shared else 0,
            "data_drawn": drawn,
        }

    def row(self) -> Mapping[str, Any]:
        return self._row

    def compare(self, rows: list[list[int]]) -> None:
        index = fields.INDEX
        column = {name: [row[index[name]] for row in rows] for name in fields.FIELDS}
        known = [r for r, row in enumerate(rows) if not row[index["flags"]] & fields.GUARD_FAILED]
        if len(known) < 2 or len(known) < len(rows):
            return  # a rank's values unknown: nothing to compare them with
        flagged = {r for r, row in enumerate(rows) if row[index["flags"]] & fields.DATA_ALTERED}
        self._compare_settings(column, flagged)
        self._compare_digests(column, flagged)
        self._compare_losses([bits_float(b) for b in column["data_loss"]], flagged)

    def _once(self, key: tuple[Any, ...], alert: Alert) -> None:
        if key not in self.reported:
            self.reported.add(key)
            self.ctx.alert_once(alert)

    def _blame(self, ranks: list[int], flagged: set[int]) -> int | None:
        """The one rank of ``ranks`` whose own sensors flagged its data, if exactly one."""
        mine = [r for r in ranks if r in flagged]
        return mine[0] if len(mine) == 1 else None

    def _compare_settings(self, column: dict[str, list[int]], flagged: set[int]) -> None:
        # settings must agree at every check; the samples drawn in an interval at two in
        # a row (one rank peeking at a batch for a log draws once more, a rank skipping
        # batches draws more at every interval)
        meanings = {
            "data_sampler": ("reads with other sampler settings (seed, shuffle, epoch...)", 1),
            "data_drawn": ("draws another number of samples from its sampler", 2),
        }
        for name, (meaning, patience) in meanings.items():
            values = column[name]
            if len(set(values)) == 1:
                self.disagree[name] = 0
                continue
            self.disagree[name] = self.disagree.get(name, 0) + 1
            if self.disagree[name] < patience:
                continue
            odd = _odd(values)
            if odd is None:
                blamed = self._blame(list(range(len(values))), flagged)
                odd = [blamed] if blamed is not None else []
            details = {"field": name, "values": values}
            if not odd:
                text = f"ranks disagree: one {meaning}; cannot tell which rank is wrong"
                self._once(
                    (name,), Alert(self.ctx.at(), None, self.name, Severity.HIGH, text, details)
                )
            for rank in odd:
                self._once(
                    (name, rank),
                    Alert(
                        self.ctx.at(),
                        rank,
                        self.name,
                        Severity.HIGH,
                        f"rank {rank} {meaning}",
                        details,
                    ),
                )

    def _compare_digests(self, column: dict[str, list[int]], flagged: set[int]) -> None:
        for ranks in same_data(column["data_interval"]):
            blamed = self._blame(ranks, flagged)
            listed = ", ".join(map(str, ranks))
            text = f"ranks {listed} trained on the same data in this interval"
            text += (
                f"; rank {blamed}'s sampler was altered"
                if blamed is not None
                else "; cannot tell which rank is wrong"
            )
            alert = Alert(self.ctx.at(), blamed, self.name, Severity.HIGH, text, {"ranks": ranks})
            self._once(("same", *ranks), alert)
        repeats = column["data_repeats"]
        for rank in repeaters(repeats):
            text = (
                f"rank {rank} trained on the same batch again ({repeats[rank]} repeats this "
                "interval) where its peers did not"
            )
            details = {"repeats": repeats}
            self._once(
                ("repeat", rank),
                Alert(self.ctx.at(), rank, self.name, Severity.HIGH, text, details),
            )

    def _compare_losses(self, losses: list[float], flagged: set[int]) -> None:
        out, deviation = self.family.check(losses)
        if not out:
            return
        shown = ", ".join(f"{x:.4g}" for x in losses)
        details = {"losses": losses, "deviation": deviation, "threshold": self.family.threshold()}
        if len(losses) == 2:
            blamed = self._blame([0, 1], flagged)
            text = (
                f"the two ranks' losses part by a factor of {math.exp(abs(deviation[0])):.3g} "
                f"({shown})"
            )
            text += (
                f"; rank {blamed}'s data was altered"
                if blamed is not None
                else "; cannot tell which rank trains on altered data"
            )
            severity = Severity.HIGH if blamed is not None else Severity.MEDIUM
            self._once(
                ("loss", blamed), Alert(self.ctx.at(), blamed, self.name, severity, text, details)
            )
            return
        for rank in out:
            peers = losses[rank] / math.exp(deviation[rank])
            text = (
                f"rank {rank}'s loss is out of family: {losses[rank]:.4g} "
                f"{'above' if deviation[rank] > 0 else 'below'} its peers' {peers:.4g} "
                "(altered labels or data?)"
            )
            self._once(
                ("loss", rank), Alert(self.ctx.at(), rank, self.name, Severity.HIGH, text, details)
            )

    def reset(self) -> None:
        # a declared rollback may replay batches already read, on every rank alike
        self.recent.clear()
        self.family.streaks.clear()

    def close(self) -> None:
        self.sampler.restore()
        self._fold_pending()
        if self._batches:
            self.ctx.record(
                {
                    "step": self.ctx.at(),
                    "rank": self.ctx.rank,
                    "event": "data-commitments",
                    "detail": f"{self._batches} batches",
                    # the commitment at each check, for replay to recompute
                    "checks": [[step, f"{c:016x}"] for step, c in self.commitments],
                    "commitment": f"{self.commitment:016x}",
                }
            )
