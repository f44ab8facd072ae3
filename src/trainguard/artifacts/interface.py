"""Types shared by the model-file scanners: verdicts, reports, and the format handler protocol.

Adding a file format is adding one module that implements :class:`FormatHandler`
(recognise, analyse, load) and registering it in :mod:`trainguard.artifacts.formats`;
the names a scan gives formats are the :class:`Format` enum.
"""

from __future__ import annotations

import base64
import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from trainguard.errors import Finding, Severity

if TYPE_CHECKING:
    from trainguard.artifacts.budget import MemoryBudget

#: A finding at or above this severity makes a file UNSAFE.
UNSAFE_AT = Severity.MEDIUM


class Format(str, enum.Enum):
    """The formats a scan names. The values are what reports (text, JSON, SARIF) show."""

    PICKLE = "pickle"
    TORCH_LEGACY = "torch-legacy"
    JOBLIB = "joblib"
    #: a compressed joblib dump whose stream could not be inflated
    JOBLIB_COMPRESSED = "joblib-compressed"
    JOBLIB_ZLIB = "joblib (zlib)"
    JOBLIB_GZIP = "joblib (gzip)"
    JOBLIB_BZ2 = "joblib (bz2)"
    JOBLIB_XZ = "joblib (xz)"
    JOBLIB_LZMA = "joblib (lzma)"
    #: joblib < 0.10's zlib files
    JOBLIB_ZFILE = "joblib (zfile)"
    ZIP = "zip"
    TORCH_ZIP = "torch-zip"
    NPZ = "npz"
    KERAS = "keras"
    NPY = "npy"
    SAFETENSORS = "safetensors"
    TORCH_TAR = "torch-tar"
    TAR = "tar"
    HDF5 = "hdf5"
    GGUF = "gguf"
    TFLITE = "tflite"
    EMPTY = "empty"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


#: The formats of compressed joblib dumps that were inflated.
COMPRESSED_JOBLIB = frozenset(
    {
        Format.JOBLIB_ZLIB,
        Format.JOBLIB_GZIP,
        Format.JOBLIB_BZ2,
        Format.JOBLIB_XZ,
        Format.JOBLIB_LZMA,
        Format.JOBLIB_ZFILE,
    }
)


class Verdict(str, enum.Enum):
    """What a scan concluded about one file."""

    SAFE = "SAFE"
    UNSAFE = "UNSAFE"
    UNVERIFIABLE = "UNVERIFIABLE"
    UNSUPPORTED = "UNSUPPORTED"
    #: not a model file: no loader the scan stands in for reads these bytes (see
    #: :mod:`trainguard.artifacts.model_files`); it does not change the exit status
    SKIPPED = "SKIPPED"

    def __str__(self) -> str:
        return self.value


class NotLoadable(Exception):
    """Internal: a format that is scanned but that ``trainguard.load`` does not rebuild."""


class FormatError(Exception):
    """Internal: the bytes do not parse as the format they claim. Becomes UNVERIFIABLE."""

    def __init__(self, message: str, *, member: str | None = None, offset: int | None = None):
        super().__init__(message)
        self.member = member
        self.offset = offset


@dataclass
class Analysis:
    """What a format handler found in one file (mutable while the handler works)."""

    format: Format
    findings: list[Finding] = field(default_factory=list)
    #: set when part of the file could not be parsed: the file is then UNVERIFIABLE
    parse_error: str | None = None
    supported: bool = True
    #: what the analysis may still allocate (inflated members, decompressed streams)
    budget: MemoryBudget = field(default_factory=lambda: _default_budget())
    #: the handler that recognised the file: the one that loads it
    handler: FormatHandler | None = None

    def add(
        self,
        severity: Severity,
        detector: str,
        message: str,
        *,
        member: str | None = None,
        offset: int | None = None,
    ) -> None:
        location = member or ""
        if offset is not None:
            location = f"{location}@{offset}" if location else f"@{offset}"
        self.findings.append(Finding(severity, detector, location, message, member, offset))

    def fail(self, error: FormatError, detector: str = "parse") -> None:
        """Record that parsing stopped; the file becomes UNVERIFIABLE."""
        message = str(error)
        if self.parse_error is None:
            self.parse_error = message
        self.add(Severity.HIGH, detector, message, member=error.member, offset=error.offset)

    @property
    def verdict(self) -> Verdict:
        if any(f.severity >= UNSAFE_AT and f.detector != "parse" for f in self.findings):
            return Verdict.UNSAFE
        if not self.supported:
            return Verdict.UNSUPPORTED
        if self.parse_error is not None:
            return Verdict.UNVERIFIABLE
        return Verdict.SAFE


def _default_budget() -> MemoryBudget:
    from trainguard.artifacts.budget import MemoryBudget

    return MemoryBudget()


class FormatHandler(Protocol):
    """One container format: recognise it from its first bytes, analyse it, load it."""

    name: Format

    def sniff(self, head: bytes, size: int) -> bool:
        """True if ``head`` (the first bytes of a ``size``-byte file) is this format."""

    def analyse(self, buf: memoryview, analysis: Analysis) -> None:
        """Add findings to ``analysis``; raise :class:`FormatError` where parsing stops."""

    def load(self, data: bytearray, analysis: Analysis, map_location: Any) -> Any:
        """The object ``data`` (analysed as ``analysis``, found SAFE) rebuilds, without
        running code from it; raise :class:`NotLoadable` for a format only scanned."""


@dataclass(frozen=True)
class FileReport:
    """The scan of one file."""

    path: str
    format: Format
    verdict: Verdict
    findings: tuple[Finding, ...]
    size: int

    @property
    def reasons(self) -> list[str]:
        return [f.message for f in self.findings if f.severity >= Severity.LOW]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: every string valid Unicode (a name with bytes that are not UTF-8 is
        shown with ``\\xNN`` escapes, and its exact bytes are in ``path_base64``)."""
        doc: dict[str, object] = {
            "path": json_text(self.path),
            "format": str(self.format),
            "verdict": self.verdict.value,
            "size": self.size,
            "findings": [
                {k: json_text(v) if isinstance(v, str) else v for k, v in f.to_dict().items()}
                for f in self.findings
            ],
        }
        if json_text(self.path) != self.path:
            raw = os.fsencode(self.path)
            doc["path_base64"] = base64.b64encode(raw).decode("ascii")
        return doc


@dataclass(frozen=True)
class ScanReport:
    """The scan of everything asked for. ``errors`` are paths that could not be read;
    ``excluded`` counts the files in the folders that --include/--exclude left out."""

    files: tuple[FileReport, ...]
    errors: tuple[str, ...] = ()
    excluded: int = 0

    @property
    def safe(self) -> bool:
        return not self.errors and all(
            f.verdict in (Verdict.SAFE, Verdict.SKIPPED) for f in self.files
        )

    @property
    def verdict(self) -> Verdict:
        verdicts = {f.verdict for f in self.files}
        for v in (Verdict.UNSAFE, Verdict.UNVERIFIABLE, Verdict.UNSUPPORTED):
            if v in verdicts:
                return v
        if self.errors:
            return Verdict.UNVERIFIABLE
        # only skipped files: nothing was analysed, so the scan does not say SAFE
        return Verdict.SKIPPED if verdicts == {Verdict.SKIPPED} else Verdict.SAFE

    def counts(self) -> dict[str, int]:
        out = {v.value: 0 for v in Verdict}
        for f in self.files:
            out[f.verdict.value] += 1
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "verdict": self.verdict.value,
            "counts": self.counts(),
            "excluded": self.excluded,
            "files": [f.to_dict() for f in self.files],
            "errors": list(self.errors),
        }


def json_text(text: str) -> str:
    """``text`` as valid Unicode: the lone surrogates that stand for undecodable bytes in
    file and member names (which strict JSON parsers reject, and others turn into U+FFFD)
    become ``\\xNN`` escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


def worst(findings: Sequence[Finding]) -> Severity | None:
    return max((f.severity for f in findings), default=None)
