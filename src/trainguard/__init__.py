"""trainguard: protects training jobs from sabotage by people with access to the cluster.

The public surface is small: :func:`scan` and :func:`load` for model files, and the
error types. Everything else lives in sub-packages a user rarely needs to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainguard.errors import (
    CheckpointError,
    Error,
    Finding,
    InputError,
    Severity,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    UsageError,
)

if TYPE_CHECKING:
    from trainguard.artifacts.interface import ScanReport

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Error",
    "Finding",
    "InputError",
    "Severity",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UsageError",
    "__version__",
    "load",
    "scan",
]


def scan(path: str | Any) -> ScanReport:
    """Statically check a model file or folder (recursively); never executes it."""
    from trainguard.artifacts.scanner import scan_paths

    return scan_paths([path])


def load(path: str | Any, map_location: Any = None) -> Any:
    """Load a checkpoint without running code from it.

    Raises :class:`UnsafeCheckpointError` naming what was refused.
    """
    from trainguard.artifacts.loader import load as _load

    return _load(path, map_location=map_location)
