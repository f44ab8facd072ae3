"""The detectors every Guard runs through the :class:`~trainguard.runtime.interface.Detector`
protocol, in the order they are called. Adding a detector is adding its module and one
line here (and its fingerprint fields to ``fields.py``)."""

from __future__ import annotations

from trainguard.runtime.data_check import DataCheck
from trainguard.runtime.grad_check import GradCheck
from trainguard.runtime.interface import Context, Detector
from trainguard.runtime.rng_check import RngCheck


def build(ctx: Context) -> list[Detector]:
    """A fresh set of detectors for one Guard."""
    detectors: list[Detector] = []
    detectors.append(DataCheck(ctx))
    detectors.append(GradCheck(ctx))
    detectors.append(RngCheck(ctx))
    return detectors
