"""Types of the runtime guard: alerts, policies, and the detector protocol.

A detector watches one thing inside the training process (the optimizer, the RNG,
step times...). Adding one is adding a module that implements :class:`Detector`.
Detectors are sensors: code in the process can lie, which is why every rank's view
is also compared with its peers' (``agreement``) and recorded outside the process
(the ledger).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping
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


class Coins:
    """Keyed coin flips, one per step: the same on every rank (the key is shared) and
    unpredictable to the job's code, so interference kept to unwatched steps cannot be
    planned. One BLAKE2b call draws 32 steps (16-bit coins): a flip costs a lookup."""

    def __init__(self, what: bytes, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"a coin's rate must be in [0, 1], not {rate}")
        self.what = what
        self.threshold = round(rate * 65536)
        self._block = -1
        self._key = b""
        self._coins: tuple[int, ...] = ()

    def __call__(self, key: bytes, n: int) -> bool:
        if self.threshold >= 65536:
            return True
        block, at = divmod(n, 32)
        if block != self._block or key is not self._key:
            data = self.what + block.to_bytes(8, "little", signed=True)
            digest = hashlib.blake2b(data, key=key[:64], digest_size=64).digest()
            self._coins = struct.unpack("<32H", digest)
            self._block, self._key = block, key
        return self._coins[at] < self.threshold


@dataclass
class StepInfo:
    """What the guard knows about the step just finished."""

    step: int
    loss: float | None
    lr: list[float]
    grad_norm: float | None
    #: the learning rates a declared scheduler says the step should have used
    wanted: list[float] | None = None


@dataclass
class Context:
    """What a detector may use of the Guard that runs it. Built once per Guard; the
    callables never raise into the detector (a failure of theirs is the guard's own).

    ``shared_key`` is the same on every rank and unknown to the job's code before start
    (rank 0 draws it and sends it to the others as the guard starts): draws keyed by it,
    such as which steps are sampled, fall on the same steps on every rank.
    """

    model: Any
    optimizer: Any
    params: list[Any]
    rank: int
    world: int
    group: Any
    device: Any
    #: the step an alert is about (see ``Guard.at``)
    at: Callable[[], int]
    #: optimizer steps taken so far in this process
    steps: Callable[[], int]
    #: an alert about this rank, to every sink; ``flag`` is an evidence bit (fields.py) set
    #: in this rank's next row
    alert: Callable[[Alert, int], None]
    #: an alert every rank computes alike from the gathered rows: reported once (rank 0)
    alert_once: Callable[[Alert], None]
    #: a sensor event that is not an alert: to the ledger, once per kind and place
    record: Callable[[dict[str, Any]], None]
    #: a failure of the detector's own code where it runs for the job (never raised)
    fault: Callable[[str, BaseException], None]
    #: a sensor event: recorded when trusted code caused it (``by``), else an alert with
    #: the evidence bit
    event: Callable[[dict[str, Any], int], None]
    #: a change seen at a check (a hook, a patch) and the code it is attributed to:
    #: recorded when that code is trusted, else an alert (detector, change, attribution)
    attributed: Callable[[str, str, Any], None]
    #: set an evidence bit in this rank's next row without an alert
    flag: Callable[[int], None]
    provenance: Any
    comm: Any
    shared_key: bytes = b""
    #: the sensor events of this rank so far (``Guard.events``: re-seeding calls among
    #: them); None where they cannot be known
    events: Callable[[], list[dict[str, Any]] | None] = lambda: None
    #: the Guard's keyword arguments meant for detectors (``loader``...)
    options: dict[str, Any] = field(default_factory=dict)


class Detector(Protocol):
    """One thing the guard watches. The Guard calls, in this order within a step:
    ``before_step`` and ``after_step`` around ``optimizer.step`` (inside the job's call:
    cheap, no device sync), ``observe`` from ``guard.step``; at a check ``on_step`` for each
    step since the last check (values resolved, one sync for all), ``at_check`` (local
    checks), ``row`` (this rank's values of the fields it owns, see ``fields.py``), and after
    the collective ``compare`` with every rank's row. ``reset`` after a declared rollback
    (the restored values are the new normal), ``close`` once. Subclass
    :class:`BaseDetector` for no-op defaults."""

    name: str

    def before_step(self) -> None: ...
    def after_step(self) -> None: ...
    def observe(self, loss: Any, batch: Any) -> None: ...
    def on_step(self, info: StepInfo) -> Iterable[Alert]: ...
    def at_check(self) -> None: ...
    def row(self) -> Mapping[str, Any]: ...
    def compare(self, rows: list[list[int]]) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


class BaseDetector:
    """No-op defaults for every :class:`Detector` method."""

    name = "detector"

    def before_step(self) -> None:
        return None

    def after_step(self) -> None:
        return None

    def observe(self, loss: Any, batch: Any) -> None:
        return None

    def on_step(self, info: StepInfo) -> Iterable[Alert]:
        return ()

    def at_check(self) -> None:
        return None

    def row(self) -> Mapping[str, Any]:
        return {}

    def compare(self, rows: list[list[int]]) -> None:
        return None

    def reset(self) -> None:
        return None

    def close(self) -> None:
        return None
