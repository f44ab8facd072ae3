"""trainguard: protects training jobs from sabotage by people with access to the cluster.

The public surface is small: :func:`scan` and :func:`load` for model files, and the
error types. Everything else lives in sub-packages a user rarely needs to import.
"""

from __future__ import annotations

from collections.abc import Iterable
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
    "Guard",
    "GuardHalt",
    "Finding",
    "InputError",
    "Severity",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UsageError",
    "__version__",
    "load",
    "protect_signals",
    "scan",
]

_RUNTIME = ("Guard", "GuardHalt", "protect_signals")


def __getattr__(name: str) -> Any:
    # the runtime imports torch: only when asked for, so the CLI starts fast
    if name in _RUNTIME:
        from trainguard import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'trainguard' has no attribute {name!r}")


def scan(path: str | Any, *, max_memory: int | None = None) -> ScanReport:
    """Statically check a model file or folder (recursively); never executes it.

    ``max_memory`` (bytes, default 1 GiB) bounds what the scan of each file allocates;
    a file whose declared sizes need more is UNVERIFIABLE.
    """
    from trainguard.artifacts.scanner import scan_paths

    return scan_paths([path], max_memory=max_memory)


def load(
    path: str | Any,
    map_location: Any = None,
    *,
    max_memory: int | None = None,
    allow: Iterable[str] | None = None,
) -> Any:
    """Load a checkpoint without running code from it.

    Raises :class:`UnsafeCheckpointError` naming what was refused. ``max_memory`` (bytes,
    default 1 GiB) bounds the private copy of the file and everything the load allocates
    beyond it; a file that needs more is refused (:class:`CheckpointError`). Objects of
    classes outside the allowlist that the file only rebuilds as data (a Trainer's
    arguments) come back as ``trainguard.artifacts.loader.InertObject`` records; classes
    named in ``allow`` (``"module.Name"`` or ``"module.*"``) are imported and rebuilt for
    real (docs/scan-policy.md).
    """
    from trainguard.artifacts.loader import load as _load

    return _load(path, map_location=map_location, max_memory=max_memory, allow=allow)
