"""Random number generator states: captured into a checkpoint, restored exactly on resume.

Covers Python's ``random``, NumPy's global generator, torch's CPU generator, every
CUDA device's generator when CUDA is available, and any named ``torch.Generator`` the
caller passes (a DataLoader's, for instance). Restoring them all is what makes a resumed
run draw the same dropout masks and the same batches as one that never stopped.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from trainguard.errors import CheckpointError


def capture(generators: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The current RNG states as a tensor tree (see ``encode_tree``)."""
    import numpy
    import torch

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore(state: Mapping[str, Any], generators: Mapping[str, Any] | None = None) -> list[str]:
    """Restore what :func:`capture` saved; return notes on what could not be restored."""
    import numpy
    import torch

    notes: list[str] = []
    try:
        random.setstate(_tuples(state["python"]))
        numpy.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"].clone())
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot restore rng state: {exc}") from exc
    cuda = list(state.get("cuda") or [])
    if cuda:
        if torch.cuda.is_available():
            count = min(len(cuda), torch.cuda.device_count())
            for index in range(count):
                torch.cuda.set_rng_state(cuda[index].clone(), device=index)
            if count < len(cuda):
                notes.append(f"cuda rng restored on {count} of {len(cuda)} devices")
        else:
            notes.append(f"checkpoint holds {len(cuda)} cuda rng states; no cuda device here")
    saved = state.get("generators") or {}
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"checkpoint has no state for generator {name!r}")
        generator.set_state(saved[name].clone())
    return notes


def _tuples(value: Any) -> Any:
    # random.setstate wants tuples all the way down; JSON gave back lists in places
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value
