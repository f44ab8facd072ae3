"""Types shared by the integrity checks: drift entries, the report, the errors.

A check (RECORD, ``__pycache__``, start-up hooks, a sealed manifest) produces
:class:`Drift` values; :func:`trainguard.integrity.verify_environment` collects them
into one :class:`EnvReport`. Failures to do the work at all (an unreadable manifest,
a bad key file) are :class:`IntegrityError` subclasses.
"""

from __future__ import annotations

import datetime as _dt
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from trainguard.errors import Error, Finding, Severity

DriftKind = Literal[
    "modified",  # content differs from the recorded hash or size
    "added",  # present, but recorded nowhere (a new module dropped into a package)
    "removed",  # recorded, but gone
    "mode-changed",  # same content, different permission bits
    "version-changed",  # a sealed distribution is now installed at another version
    "pyc-mismatch",  # a cached .pyc Python would load runs code its source does not contain
    "pyc-orphan",  # a cached .pyc with no source next to it
    "pyc-unverifiable",  # a cached .pyc this interpreter cannot check (other magic or tag)
    "startup-hook",  # .pth import line, sitecustomize, PYTHONPATH into a writable place
    "unreadable",  # a file or folder that cannot be read: whatever it holds is unverified
]

SignatureStatus = Literal["valid", "invalid", "missing", "not-applicable"]

# Why some kinds are worse than others: code that runs (source, pyc, hooks) is HIGH or
# above; metadata-only differences are lower.
_SEVERITY: dict[str, Severity] = {
    "modified": Severity.HIGH,
    "added": Severity.HIGH,
    "removed": Severity.MEDIUM,
    "mode-changed": Severity.MEDIUM,
    "version-changed": Severity.HIGH,
    "pyc-mismatch": Severity.CRITICAL,
    "pyc-orphan": Severity.MEDIUM,
    "pyc-unverifiable": Severity.LOW,
    "startup-hook": Severity.HIGH,
    "unreadable": Severity.HIGH,
}

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done_bytes, total_bytes)`` while files are hashed."""


class IntegrityError(Error):
    """The integrity check could not be carried out."""


class ManifestError(IntegrityError):
    """A manifest file cannot be read or does not follow the schema."""


class KeyFileError(IntegrityError):
    """A key file is missing, malformed, exposed, or would be overwritten."""


@dataclass(frozen=True)
class FileFacts:
    """Who last touched a file and when, read from ``lstat`` at check time."""

    owner: str | None
    mtime: str | None
    ctime: str | None
    size: int | None
    mode: int | None

    @staticmethod
    def of(path: str) -> FileFacts:
        try:
            st = os.lstat(path)
        except OSError:
            return FileFacts(None, None, None, None, None)
        return FileFacts(
            owner=user_name(st.st_uid),
            mtime=iso_time(st.st_mtime),
            ctime=iso_time(st.st_ctime),
            size=st.st_size,
            mode=stat.S_IMODE(st.st_mode),
        )


@dataclass(frozen=True)
class Drift:
    """One difference between what is installed and what was approved."""

    kind: DriftKind
    path: str
    root: str
    detail: str
    owner: str | None = None
    mtime: str | None = None
    ctime: str | None = None
    size_before: int | None = None
    size_after: int | None = None
    mode_before: int | None = None
    mode_after: int | None = None
    allowed_by: str | None = None

    @property
    def severity(self) -> Severity:
        return _SEVERITY[self.kind]

    @staticmethod
    def at(
        kind: DriftKind,
        path: str,
        root: str,
        detail: str,
        *,
        size_before: int | None = None,
        mode_before: int | None = None,
    ) -> Drift:
        """A drift entry for ``path`` with its current owner, times, size and mode."""
        facts = FileFacts.of(path)
        return Drift(
            kind=kind,
            path=path,
            root=root,
            detail=detail,
            owner=facts.owner,
            mtime=facts.mtime,
            ctime=facts.ctime,
            size_before=size_before,
            size_after=facts.size,
            mode_before=mode_before,
            mode_after=facts.mode,
        )

    def allow(self, pattern: str) -> Drift:
        return replace(self, allowed_by=pattern)

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "severity": self.severity.name,
            "path": self.path,
            "root": self.root,
            "detail": self.detail,
            "owner": self.owner,
            "mtime": self.mtime,
            "ctime": self.ctime,
            "size_before": self.size_before,
            "size_after": self.size_after,
            "mode_before": _octal(self.mode_before),
            "mode_after": _octal(self.mode_after),
            "allowed_by": self.allowed_by,
        }

    def to_finding(self) -> Finding:
        return Finding(
            severity=self.severity,
            detector=f"integrity.{self.kind}",
            location=self.path,
            message=self.detail,
        )


@dataclass(frozen=True)
class EnvReport:
    """What ``verify-env`` found.

    ``clean`` is true when there is no drift outside the allowlist and, for a
    manifest, its signature is valid.
    """

    mode: Literal["record", "manifest"]
    interpreter: str
    distributions: tuple[str, ...]
    files_checked: int
    bytes_hashed: int
    seconds: float
    drift: tuple[Drift, ...]
    allowed: tuple[Drift, ...] = ()
    signature: SignatureStatus = "not-applicable"
    signer: str | None = None
    manifest: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def clean(self) -> bool:
        return not self.drift and self.signature in ("valid", "not-applicable")

    def findings(self) -> list[Finding]:
        found = [d.to_finding() for d in self.drift]
        if self.signature in ("invalid", "missing"):
            found.insert(
                0,
                Finding(
                    severity=Severity.CRITICAL,
                    detector="integrity.signature",
                    location=self.manifest or "",
                    message=f"manifest signature is {self.signature}",
                ),
            )
        return found

    def to_dict(self) -> dict[str, object]:
        return {
            "clean": self.clean,
            "mode": self.mode,
            "manifest": self.manifest,
            "signature": self.signature,
            "signer": self.signer,
            "interpreter": self.interpreter,
            "distributions": list(self.distributions),
            "files_checked": self.files_checked,
            "bytes_hashed": self.bytes_hashed,
            "seconds": round(self.seconds, 3),
            "drift": [d.to_dict() for d in self.drift],
            "allowed": [d.to_dict() for d in self.allowed],
            "notes": list(self.notes),
        }


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def iso_time(seconds: float) -> str:
    return _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc).isoformat()


def _octal(mode: int | None) -> str | None:
    return None if mode is None else f"{mode:04o}"
