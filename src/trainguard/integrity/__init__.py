"""Environment and code integrity: is the code a job will run the code its owner approved?

``verify_environment`` checks installed distributions against their RECORD, or every
file against a sealed, signed manifest, plus ``__pycache__`` files and start-up
hooks; ``seal`` writes such a manifest; ``keygen`` makes the ed25519 key pair that
signs it. See docs/verify-env.md and docs/manifest.md.
"""

from __future__ import annotations

from trainguard.integrity.interface import (
    Drift,
    DriftKind,
    EnvReport,
    IntegrityError,
    KeyFileError,
    ManifestError,
)
from trainguard.integrity.signing import keygen
from trainguard.integrity.verify import seal, verify_environment

__all__ = [
    "Drift",
    "DriftKind",
    "EnvReport",
    "IntegrityError",
    "KeyFileError",
    "ManifestError",
    "keygen",
    "seal",
    "verify_environment",
]
