"""The one error hierarchy, and the value types every scanner and sensor produces.

Findings are values (a scan that finds a malicious global returns one); failures are
exceptions, all subclasses of :class:`Error`, whose message is one lower-case line a
user can act on.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Severity(enum.IntEnum):
    """How bad a finding is; ordered, so policies can say "HIGH or above"."""

    INFO = 10
    LOW = 20
    MEDIUM = 30
    HIGH = 40
    CRITICAL = 50

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Finding:
    """One thing a scanner or sensor saw.

    ``location`` is human-readable (``archive/data.pkl@57``); ``member`` and ``offset``
    carry the same place for machines when it is known.
    """

    severity: Severity
    detector: str
    location: str
    message: str
    member: str | None = None
    offset: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "severity": self.severity.name,
            "detector": self.detector,
            "location": self.location,
            "message": self.message,
            "member": self.member,
            "offset": self.offset,
        }


class Error(Exception):
    """Base of every failure trainguard raises on purpose."""


class InputError(Error):
    """A path cannot be read: missing, unreadable, not a regular file."""


class UsageError(Error):
    """The caller asked for something that does not make sense."""


class CheckpointError(Error):
    """A model file could not be loaded or written."""


class UnsafeCheckpointError(CheckpointError):
    """The safe loader refused a file; ``findings`` says what it refused."""

    def __init__(self, path: str, findings: Iterable[Finding]) -> None:
        self.path = path
        self.findings = tuple(findings)
        worst = max(self.findings, key=lambda f: f.severity, default=None)
        reason = worst.message if worst else "unsafe content"
        more = f" (and {len(self.findings) - 1} more)" if len(self.findings) > 1 else ""
        super().__init__(f"{path}: refused to load: {reason}{more}")


class UnsupportedFormatError(CheckpointError):
    """The file is in a format the safe loader does not handle."""
