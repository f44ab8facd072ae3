"""Training dynamics: NaN and Inf, loss and gradient-norm anomalies, the learning rate.

Anomalies are judged by robust statistics over a trailing window (median and median
absolute deviation), which follow the loss down through warm-up and ignore ordinary
batch-to-batch noise; an alert needs the deviation to persist for a few steps.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from trainguard.errors import Severity
from trainguard.runtime.interface import Alert, BaseDetector, StepInfo

LrSchedule = Callable[[int], "float | Sequence[float]"]


class NonFinite(BaseDetector):
    """The loss or the gradient norm is NaN or infinite."""

    name = "nonfinite"

    def __init__(self, rank: int | None) -> None:
        self.rank = rank

    def on_step(self, info: StepInfo) -> Iterable[Alert]:
        for what, value in (("loss", info.loss), ("gradient norm", info.grad_norm)):
            if value is not None and not math.isfinite(value):
                yield Alert(info.step, self.rank, self.name, Severity.HIGH, f"{what} is {value}")


def _median(ordered: list[float]) -> float:
    """statistics.median of an already sorted non-empty list."""
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class RobustAnomaly(BaseDetector):
    """A value far above its trailing median, for ``patience`` steps in a row."""

    def __init__(
        self,
        name: str,
        pick: Callable[[StepInfo], float | None],
        rank: int | None,
        *,
        window: int = 50,
        warmup: int = 20,
        threshold: float = 8.0,
        patience: int = 3,
    ) -> None:
        self.name = name
        self.pick = pick
        self.rank = rank
        self.history: deque[float] = deque(maxlen=window)
        self.warmup = warmup
        self.threshold = threshold
        self.patience = patience
        self.streak = 0
        self.fired = False

    def reset(self) -> None:
        """After a restore: the restored values are the new normal, a new history."""
        self.history.clear()
        self.streak = 0
        self.fired = False

    def score(self, value: float) -> float:
        ordered = sorted(self.history)
        median = _median(ordered)
        mad = _median(sorted([abs(v - median) for v in ordered]))
        scale = 1.4826 * mad + 1e-3 * abs(median) + 1e-12
        return (value - median) / scale

    def on_step(self, info: StepInfo) -> Iterable[Alert]:
        value = self.pick(info)
        if value is None or not math.isfinite(value):
            return
        if len(self.history) >= self.warmup:
            z = self.score(value)
            self.streak = self.streak + 1 if z > self.threshold else 0
            if self.streak >= self.patience and not self.fired:
                self.fired = True
                yield Alert(
                    info.step,
                    self.rank,
                    self.name,
                    Severity.MEDIUM,
                    f"{self.name.split('-')[0]} {value:.4g} is {z:.1f} robust deviations above "
                    f"its recent median {statistics.median(self.history):.4g}",
                    {"value": value, "z": z},
                )
            if self.streak:
                return  # keep anomalous values out of the baseline
            self.fired = False
        self.history.append(value)

    def drift(self) -> float:
        """Recent values over the earlier ones (1.0 = steady); used to break ties."""
        values = list(self.history)
        if len(values) < 8:
            return 1.0
        half = len(values) // 2
        before, after = statistics.median(values[:half]), statistics.median(values[half:])
        return after / before if before > 0 else 1.0


class LearningRate:
    """The optimizer's learning rate against the declared schedule, step by step."""

    name = "lr-schedule"

    def __init__(self, schedule: LrSchedule, rank: int | None, rel_tol: float = 1e-6) -> None:
        self.schedule = schedule
        self.rank = rank
        self.rel_tol = rel_tol
        self.fired = False

    def check(self, step: int, used: Sequence[float]) -> Alert | None:
        expected = self.schedule(step)
        wanted = (
            [float(expected)] * len(used) if isinstance(expected, (int, float)) else list(expected)
        )
        return self._compare(step, used, wanted, "the schedule says")

    def _compare(
        self, step: int, used: Sequence[float], wanted: Sequence[float], says: str
    ) -> Alert | None:
        """The first group whose rate differs, once per run."""
        for group, (got, want) in enumerate(zip(used, wanted, strict=False)):
            if not math.isclose(got, want, rel_tol=self.rel_tol, abs_tol=1e-15):
                if self.fired:
                    return None
                self.fired = True
                return Alert(
                    step,
                    self.rank,
                    self.name,
                    Severity.HIGH,
                    f"learning rate of group {group} is {got:.6g}, {says} {want:.6g}",
                    {"group": group, "lr": got, "expected": want},
                )
        return None

    def on_step(self, info: StepInfo) -> Iterable[Alert]:
        alert = self.check(info.step, info.lr)
        if alert is not None:
            yield alert


def is_scheduler(schedule: object) -> bool:
    """A torch learning-rate scheduler object (or anything that records the rates it set)."""
    return hasattr(schedule, "get_last_lr") and hasattr(schedule, "optimizer")


def scheduler_keys(scheduler: object) -> frozenset[str]:
    """Optimizer settings a scheduler changes itself: momentum cycled with the rate."""
    if getattr(scheduler, "cycle_momentum", False):
        return frozenset({"betas", "momentum"})
    children = getattr(scheduler, "_schedulers", None) or ()
    return frozenset().union(*(scheduler_keys(child) for child in children))


class SchedulerRate(LearningRate):
    """The learning rate the optimizer used against the one its scheduler last set.

    A scheduler writes each group's rate and keeps what it wrote (``get_last_lr``), so
    the comparison holds whenever the job calls ``scheduler.step()`` — before or after
    the guard's step, every step or every epoch, with or without a metric
    (ReduceLROnPlateau) — and after ``scheduler.load_state_dict`` on a resume: a rate
    that differs was written by something other than the scheduler.
    """

    def __init__(self, scheduler: object, rank: int | None, rel_tol: float = 1e-6) -> None:
        super().__init__(lambda step: [], rank, rel_tol)
        self.scheduler = scheduler

    def expected(self) -> list[float] | None:
        try:
            last = self.scheduler._last_lr  # type: ignore[attr-defined]
        except AttributeError:
            return None  # not stepped yet
        return [float(v) for v in last]

    def check_set(
        self, step: int, used: Sequence[float], wanted: Sequence[float] | None
    ) -> Alert | None:
        """The rates used against what the scheduler had set (None: not stepped yet)."""
        if wanted is None:
            return None
        return self._compare(
            step, used, wanted, f"its scheduler ({type(self.scheduler).__name__}) set"
        )
