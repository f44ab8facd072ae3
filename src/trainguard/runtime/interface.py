"""Types of the runtime guard: alerts, policies, and the detector protocol.

A detector watches one thing inside the training process (the optimizer, the RNG,
step times...). Adding one is adding a module that implements :class:`Detector`.
Detectors are sensors: code in the process can lie, which is why every rank's view
is also compared with its peers' (``agreement``) and recorded outside the process
(the ledger).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NewType, Protocol

from trainguard.errors import Error, Severity

Rank = NewType("Rank", int)
Policy = Literal["alert", "halt"]


@dataclass(frozen=True)
class Alert:
    """Something a detector saw: at which step, on (or about) which rank, and what."""

    step: int
    rank: int | None
    detector: str
    severity: Severity
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "rank": self.rank,
            "detector": self.detector,
            "severity": self.severity.name,
            "message": self.message,
            "details": dict(self.details),
        }

    def line(self) -> str:
        where = f"rank {self.rank}" if self.rank is not None else "all ranks"
        return (
            f"trainguard: {self.severity.name} step {self.step} {where} [{self.detector}]: "
            f"{self.message}"
        )


class GuardError(Error):
    """The guard could not do what it was asked (bad arguments, no ledger...)."""


class GuardHalt(Error):
    """Raised into the training loop when policy is "halt" and an alert fired."""

    def __init__(self, alert: Alert) -> None:
        self.alert = alert
        super().__init__(f"training halted by trainguard: {alert.line()}")


@dataclass
class StepInfo:
    """What the guard knows about the step just finished."""

    step: int
    loss: float | None
    lr: list[float]
    grad_norm: float | None


class Detector(Protocol):
    """A local detector: called after every step; returns the alerts it raises."""

    name: str

    def on_step(self, info: StepInfo) -> Iterable[Alert]:
        """Alerts for the step just finished (usually none)."""
