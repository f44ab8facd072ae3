"""Gradient integrity across ranks: what each rank sent into the gradient all-reduce, and
what came out of it.

At steps drawn under the guard's shared key (every check step and, at the default rate,
one other step in 16: the same steps on every rank, unknown to the job's code, so an edit
kept to unsampled steps cannot be planned) the all-reduce sensor (``comm.py``) measures
each gradient all-reduce before and after. Three invariants of data-parallel training are
compared at the check, none of them one attack's signature:

* **the result is the same everywhere**: every rank steps with the same reduced gradients
  (a digest of the results and of the gradients the optimizer reads). A rank that differs
  is named by a majority (three ranks or more), or by its own sensor's evidence
  (``GRADS_ALTERED``), else the alert says it cannot tell;
* **the result is the sum of the parts**: the ranks' contributions, summed, are the
  result: in total and, on the sampled coordinates, in the dot product with the result
  (the sum of ``part . result`` over ranks is ``result . result``). A contribution changed
  inside the collective breaks it; which one cannot be told from the sums;
* **no rank is out of family**: with three ranks or more, a rank is named when, at
  :data:`PERSIST` sampled steps in a row, its contribution's norm is beyond
  :data:`NORM_FLOOR` times the median (or its inverse) on the same side each time and
  beyond :data:`NORM_FACTOR` on the whole (geometric mean), or its contribution points
  against the sum of the others' (cosine at most ``-COS``) while the others point
  together (their median cosine at least ``COS``). Ranks read different data, so their
  norms differ by tens of percent in ordinary training, and a gradient made of noise has
  small cosines of either sign: the factors leave a wide margin. With two ranks the
  larger norm cannot be told from the smaller one being wrong: the alert says so, naming
  no rank.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trainguard.errors import Severity
from trainguard.runtime import fields
from trainguard.runtime.comm import StepGrads
from trainguard.runtime.fingerprint import bits_float, float_bits
from trainguard.runtime.interface import Alert, BaseDetector, Coins, Context

NAME = "gradients"
#: the share of steps sampled besides the check steps. A sampled step costs one pass over
#: the gradients (their moments, as a gradient norm does) and one device sync; at 1/16 an
#: edit made on a share f of the steps goes unsampled for 16/f steps on average, at well
#: under 1% of the step time (the same rate as the update check's)
DEFAULT_RATE = 1 / 32
#: sampled steps whose per-rank values travel in each fingerprint (a keyed reservoir of
#: the interval's sampled steps when there are more)
SLOTS = 4
#: a rank's norm against the median (geometric mean over the streak) beyond which it is
#: out of family; at each step of the streak it must be beyond NORM_FLOOR on the same side
NORM_FACTOR = 4.0
NORM_FLOOR = 2.0
COS = 0.2
#: out of family at this many sampled steps in a row before a rank is named
PERSIST = 2
#: relative slack of the sum invariants: float rounding of a world sum (bf16 included) is
#: orders of magnitude smaller, a changed contribution orders of magnitude larger
TOL = 1e-3


def _draw(key: bytes, what: bytes, n: int) -> int:
    """A keyed 64-bit draw (BLAKE2b as a MAC under the shared key)."""
    data = what + n.to_bytes(8, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(data, key=key[:64], digest_size=8).digest(), "little")


def _quantized(values: list[float]) -> bytes:
    """Values to 32 significant bits: ranks that sum the same gradients with another
    thread count differ in the last bits of a float64 sum, never in these."""
    out = []
    for value in values:
        if not math.isfinite(value):
            out.append(struct.pack("<qi", 0, 0) + repr(value).encode())
            continue
        mantissa, exponent = math.frexp(value)
        out.append(struct.pack("<qi", round(mantissa * 2**32), exponent))
    return b"".join(out)


def _int64(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "little", signed=True)


@dataclass
class _Interval:
    """What this rank measured over the sampled steps since the last check."""

    count: int = 0
    digest: bytes = b""
    before_sum: float = 0.0
    before_abs: float = 0.0
    reduced_sum: float = 0.0
    dot: float = 0.0
    self_dot: float = 0.0
    result_dot: float = 0.0
    measured: int = 0  # sampled steps whose contributions were measured
    slots: list[tuple[int, float, float]] = field(default_factory=list)


class GradCheck(BaseDetector):
    """See the module docstring."""

    name = NAME

    def __init__(self, ctx: Context, rate: float = DEFAULT_RATE) -> None:
        self.ctx = ctx
        self._coins = Coins(b"grads", rate)
        self._interval = _Interval()
        self.history = History()
        comm = ctx.comm
        self.active = bool(comm is not None and comm.active and ctx.world > 1)
        if not self.active:
            return
        at_checks = comm.sample_now
        comm.sample_now = lambda: at_checks() or self._chosen(ctx.steps())
        comm.offset = self._offset

    @property
    def rate(self) -> float:
        """The share of steps sampled besides the check steps."""
        return self._coins.threshold / 65536

    @rate.setter
    def rate(self, value: float) -> None:
        self._coins = Coins(b"grads", value)

    def _chosen(self, n: int) -> bool:
        """Whether the gradients of step ``n`` are sampled: a keyed draw, the same on every
        rank (the key is shared), unpredictable to the job's code."""
        return self._coins(self.ctx.shared_key, n)

    def _offset(self, numel: int, stride: int) -> int:
        what = b"offset" + numel.to_bytes(8, "little")
        return _draw(self.ctx.shared_key, what, self.ctx.steps()) % stride

    def observe(self, loss: Any, batch: Any) -> None:
        if self.active:
            # the next step's draw, made here rather than in the middle of its backward
            self._chosen(self.ctx.steps() + 1)

    def before_step(self) -> None:
        if not self.active:
            return
        sampled: StepGrads | None = self.ctx.comm.take_sampled()
        if sampled is not None:
            self._add(self.ctx.steps(), sampled)

    def _add(self, step: int, grads: StepGrads) -> None:
        import torch

        parts = [grads.reduced]
        if grads.before is not None and grads.dots is not None:
            parts += [grads.before, grads.dots]
        if grads.used is not None:
            parts.append(grads.used)
        values = torch.cat([p.reshape(-1).to(grads.reduced.device) for p in parts]).tolist()
        reduced = values[:3]
        if not all(math.isfinite(v) for v in reduced):
            return  # an overflowed step (skipped by a loss scaler): nothing to compare
        interval = self._interval
        interval.count += 1
        agreed = reduced + (values[-3:] if grads.used is not None else [])
        interval.digest = hashlib.blake2b(
            interval.digest + step.to_bytes(8, "little") + _quantized(agreed), digest_size=8
        ).digest()
        if grads.before is None:
            return
        (b_sum, b_abs, b_sq), (dot, pp, rr) = values[3:6], values[6:9]
        interval.before_sum += b_sum
        interval.before_abs += b_abs
        interval.reduced_sum += reduced[0]
        interval.dot += dot
        interval.self_dot += pp
        interval.result_dot += rr
        # the cosine of this rank's part with the sum of the others' parts (result - part)
        rest = max(rr - 2 * dot + pp, 0.0)
        cos = (dot - pp) / math.sqrt(pp * rest) if pp > 0 and rest > 0 else 0.0
        slot = (step, math.sqrt(max(b_sq, 0.0)), cos)
        seen = interval.measured
        interval.measured += 1
        if seen < SLOTS:
            interval.slots.append(slot)
        else:
            j = _draw(self.ctx.shared_key, b"slot", step) % (seen + 1)
            if j < SLOTS:
                interval.slots[j] = slot

    def row(self) -> Mapping[str, Any]:
        interval, self._interval = self._interval, _Interval()
        slots = sorted(interval.slots)
        values: dict[str, int] = {
            "grad_count": interval.count,
            "grad_digest": _int64(interval.digest) if interval.digest else 0,
            "grad_before_sum": float_bits(interval.before_sum),
            "grad_before_abs": float_bits(interval.before_abs),
            "grad_reduced_sum": float_bits(interval.reduced_sum),
            "grad_dot": float_bits(interval.dot),
            "grad_self": float_bits(interval.self_dot),
            "grad_result": float_bits(interval.result_dot),
            "grad_slots": _int64(
                hashlib.blake2b(repr([s[0] for s in slots]).encode(), digest_size=8).digest()
            ),
        }
        for i in range(SLOTS):
            step, norm, cos = slots[i] if i < len(slots) else (0, 0.0, 0.0)
            values[f"grad_norm_{i}"] = float_bits(norm)
            values[f"grad_cos_{i}"] = float_bits(cos)
        values["grad_measured"] = min(interval.measured, SLOTS)
        return values

    def compare(self, rows: list[list[int]]) -> None:
        for verdict in self.history.judge(rows):
            self.ctx.alert_once(
                Alert(
                    self.ctx.at(),
                    verdict.rank,
                    NAME,
                    Severity.HIGH,
                    verdict.message,
                    verdict.details,
                )
            )

    def reset(self) -> None:
        self._interval = _Interval()
        self.history = History()
        if self.active:
            self.ctx.comm.discard()


@dataclass(frozen=True)
class Verdict:
    rank: int | None
    message: str
    details: dict[str, Any]


def _f(row: list[int], name: str) -> float:
    return bits_float(row[fields.INDEX[name]])


def _v(row: list[int], name: str) -> int:
    return row[fields.INDEX[name]]


class History:
    """The cross-rank decision. Every rank holds the same rows, so every rank's History
    is the same and reaches the same verdicts (reported once, by rank 0)."""

    def __init__(self) -> None:
        #: (kind, rank) -> the out-of-family sampled steps in a row so far, with values
        self.streaks: dict[tuple[str, int | None, int], _Streak] = {}
        #: invariants reported and not yet seen holding again (one alert per episode)
        self.open: set[str] = set()

    def judge(self, rows: list[list[int]]) -> list[Verdict]:
        known = [r for r, row in enumerate(rows) if not _v(row, "flags") & fields.GUARD_FAILED]
        counts = {_v(rows[r], "grad_count") for r in known}
        if len(known) < 2 or counts == {0}:
            return []
        out: list[Verdict] = []
        # the digest covers which steps were sampled: a rank that measured other steps
        # (or none) differs there
        out += self._episode("same", self._same_result(rows, known))
        if len(counts) == 1:
            whole = len(known) == len(rows)
            out += self._episode("sum", self._sum_of_parts(rows) if whole else None)
            out += self._family(rows, known)
        return out

    def _episode(self, kind: str, verdicts: list[Verdict] | None) -> list[Verdict]:
        if not verdicts:
            self.open.discard(kind)
            return []
        if kind in self.open:
            return []
        self.open.add(kind)
        return verdicts

    @staticmethod
    def _same_result(rows: list[list[int]], known: list[int]) -> list[Verdict] | None:
        digests = [_v(rows[r], "grad_digest") for r in known]
        if len(set(digests)) == 1:
            return None
        odd: list[int] = []
        how = "majority"
        if len(known) >= 3:
            top, n = max(((d, digests.count(d)) for d in set(digests)), key=lambda x: x[1])
            if n * 2 > len(known):
                odd = [r for r, d in zip(known, digests, strict=True) if d != top]
        if not odd:
            how = "its own sensor"
            odd = [r for r in known if _v(rows[r], "flags") & fields.GRADS_ALTERED]
        details: dict[str, Any] = {
            "invariant": "same-result",
            "digests": {r: f"{d & 0xFFFFFFFF:08x}" for r, d in zip(known, digests, strict=True)},
        }
        if not odd:
            return [
                Verdict(
                    None,
                    "ranks step with different all-reduced gradients at sampled steps; "
                    "cannot tell which rank is wrong",
                    details,
                )
            ]
        return [
            Verdict(
                r,
                f"rank {r} steps with other gradients than the all-reduce gave the others "
                f"(named by {how})",
                {**details, "named_by": how},
            )
            for r in odd
        ]

    @staticmethod
    def _sum_of_parts(rows: list[list[int]]) -> list[Verdict] | None:
        parts = sum(_f(row, "grad_before_sum") for row in rows)
        scale = sum(_f(row, "grad_before_abs") for row in rows)
        result = statistics.median(_f(row, "grad_reduced_sum") for row in rows)
        dots = sum(_f(row, "grad_dot") for row in rows)
        selves = sum(_f(row, "grad_self") for row in rows)
        square = statistics.median(_f(row, "grad_result") for row in rows)
        values = (parts, scale, result, dots, selves, square)
        if not all(math.isfinite(v) for v in values):
            return None
        off_sum = abs(parts - result) > TOL * scale
        off_dot = abs(dots - square) > TOL * (selves + square)
        if not off_sum and not off_dot:
            return None
        what = "sum" if off_sum else "projection on the result"
        return [
            Verdict(
                None,
                f"the all-reduced gradients are not the sum of what the ranks sent (their "
                f"{what}: parts {dots if off_dot else parts:.6g}, result "
                f"{square if off_dot else result:.6g}): a contribution was changed inside "
                "the collective; cannot tell which rank's",
                {
                    "invariant": "sum-of-parts",
                    "parts_sum": parts,
                    "result_sum": result,
                    "parts_dot_result": dots,
                    "result_dot_result": square,
                },
            )
        ]

    def _family(self, rows: list[list[int]], known: list[int]) -> list[Verdict]:
        if len({_v(rows[r], "grad_slots") for r in known}) != 1:
            return []
        measured = {_v(rows[r], "grad_measured") for r in known}
        if len(measured) != 1:
            return []
        out: list[Verdict] = []
        for i in range(measured.pop()):
            norms = {r: _f(rows[r], f"grad_norm_{i}") for r in known}
            coss = {r: _f(rows[r], f"grad_cos_{i}") for r in known}
            out += self._slot(norms, coss)
        return out

    def _slot(self, norms: dict[int, float], coss: dict[int, float]) -> list[Verdict]:
        """One sampled step: which ranks are out of family there, and which of them have
        been at :data:`PERSIST` sampled steps in a row (then named, once per streak)."""
        if not all(math.isfinite(n) and n >= 0 for n in norms.values()):
            return []
        shown = ", ".join(f"rank {r} {n:.4g}" for r, n in norms.items())
        # key -> (how far out: a log-ratio or a cosine, what to show)
        odd: dict[tuple[str, int | None, int], tuple[float, str]] = {}
        if len(norms) >= 3:
            middle = statistics.median(norms.values())
            for r, n in norms.items():
                far = _log_ratio(n, middle)
                if abs(far) > math.log(NORM_FLOOR):
                    text = f"norm {n:.4g} against a median of {middle:.4g} ({shown})"
                    odd[("norm", r, 1 if far > 0 else -1)] = (abs(far), text)
            for r, c in coss.items():
                others = [o for q, o in coss.items() if q != r]
                if c <= -COS and statistics.median(others) >= COS:
                    text = f"cosine {c:.3f} with the others' sum, theirs " + ", ".join(
                        f"{o:.3f}" for o in others
                    )
                    odd[("cosine", r, -1)] = (-c, text)
        else:
            (_, first), (_, second) = sorted(norms.items())
            far = _log_ratio(second, first)
            if abs(far) > math.log(NORM_FLOOR):
                odd[("norm", None, 1 if far > 0 else -1)] = (abs(far), f"norms {shown}")
        for key in list(self.streaks):
            if key not in odd:
                del self.streaks[key]
        out = []
        for key, seen in odd.items():
            streak = self.streaks.setdefault(key, _Streak())
            streak.seen.append(seen)
            last = streak.seen[-PERSIST:]
            if streak.named or len(last) < PERSIST:
                continue
            kind, rank, _ = key
            if kind == "norm" and sum(f for f, _ in last) / PERSIST <= math.log(NORM_FACTOR):
                continue  # beyond the floor each time, not far enough on the whole
            streak.named = True
            texts = [t for _, t in last]
            details = {"invariant": f"family-{kind}", "seen": texts}
            if rank is None:
                message = (
                    f"the two ranks' gradient norms differ by more than {NORM_FACTOR:g}x at "
                    f"{PERSIST} sampled steps in a row ({'; '.join(texts)}); with two ranks "
                    "cannot tell which one is wrong"
                )
            else:
                what = "norm" if kind == "norm" else "direction"
                message = (
                    f"rank {rank}'s gradients before the all-reduce are out of family "
                    f"({what}) at {PERSIST} sampled steps in a row: " + "; ".join(texts)
                )
            out.append(Verdict(rank, message, details))
        return out


@dataclass
class _Streak:
    """A rank out of family at consecutive sampled steps, on one side."""

    seen: list[tuple[float, str]] = field(default_factory=list)
    named: bool = False


def _log_ratio(value: float, reference: float) -> float:
    if reference <= 0:
        return 0.0  # nothing to compare with (every contribution zero)
    if value <= 0:
        return -math.inf
    return math.log(value / reference)
