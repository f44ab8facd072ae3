"""A ``Context`` for a detector under test, without a Guard."""

from __future__ import annotations

from typing import Any

import torch

from trainguard.runtime.interface import Context


def nothing(*args: Any) -> None:
    return None


def detector_context(**given: Any) -> Context:
    """Rank 0 of 1 on the CPU at step 0, where nothing the detector reports goes anywhere
    unless ``given`` says where (``alert=``, ``record=``...); ``given`` sets any field."""
    values: dict[str, Any] = {
        "model": None,
        "optimizer": None,
        "params": [],
        "rank": 0,
        "world": 1,
        "group": None,
        "device": torch.device("cpu"),
        "at": lambda: 0,
        "steps": lambda: 0,
        "alert": nothing,
        "alert_once": nothing,
        "record": nothing,
        "fault": nothing,
        "event": nothing,
        "attributed": nothing,
        "flag": nothing,
        "provenance": None,
        "comm": None,
    }
    values.update(given)
    return Context(**values)
