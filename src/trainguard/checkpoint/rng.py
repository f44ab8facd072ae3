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


def check(state: Any, generators: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`CheckpointError` unless :func:`restore` can set every state.

    Each state is tried on a scratch generator of the same kind, so nothing the job uses
    changes: a refused checkpoint leaves every RNG as it was.
    """
    import numpy
    import torch

    if not isinstance(state, Mapping):
        raise CheckpointError("rng state is not a mapping")
    steps: list[tuple[str, Any]] = [
        ("python", lambda: random.Random().setstate(_tuples(state["python"]))),
        ("numpy", lambda: numpy.random.RandomState().set_state(state["numpy"])),
        ("torch", lambda: torch.Generator().set_state(_bytes(state["torch"]))),
    ]
    cuda = state.get("cuda") or []
    if not isinstance(cuda, (list, tuple)):
        raise CheckpointError("cuda rng state is not a list")
    for index, value in enumerate(cuda):
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            steps.append(
                (f"cuda:{index}", lambda i=index, v=value: _scratch(f"cuda:{i}").set_state(v))
            )
        else:
            steps.append((f"cuda:{index}", lambda v=value: _bytes(v)))
    saved = state.get("generators") or {}
    if not isinstance(saved, Mapping):
        raise CheckpointError("generator states are not a mapping")
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"checkpoint has no state for generator {name!r}")
        device = str(generator.device)
        value = saved[name]
        steps.append(
            (f"generator {name!r}", lambda d=device, v=value: _scratch(d).set_state(_bytes(v)))
        )
    what = ""
    try:
        for label, attempt in steps:
            what = label
            attempt()
    except Exception as exc:  # whatever a scratch generator refuses does not fit
        raise CheckpointError(f"{what} rng state does not fit: {_one_line(exc)}") from exc


def restore(state: Mapping[str, Any], generators: Mapping[str, Any] | None = None) -> list[str]:
    """Restore what :func:`capture` saved; return notes on what could not be restored.

    Checks everything first (:func:`check`): a refused state changes no generator.
    """
    import numpy
    import torch

    check(state, generators)
    notes: list[str] = []
    random.setstate(_tuples(state["python"]))
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].clone())
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
        generator.set_state(saved[name].clone())
    return notes


def _scratch(device: str) -> Any:
    import torch

    return torch.Generator(device=device)


def _bytes(value: Any) -> Any:
    import torch

    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise TypeError("not a byte tensor")
    return value.clone()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _tuples(value: Any) -> Any:
    # random.setstate wants tuples all the way down; JSON gave back lists in places
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value
