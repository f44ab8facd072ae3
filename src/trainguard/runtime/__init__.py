"""The runtime guard: sensors in the training process, cross-rank checks, detectors."""

from trainguard.runtime.guard import Guard
from trainguard.runtime.interface import Alert, GuardError, GuardHalt
from trainguard.runtime.liveness import protect_signals

__all__ = ["Alert", "Guard", "GuardError", "GuardHalt", "protect_signals"]
