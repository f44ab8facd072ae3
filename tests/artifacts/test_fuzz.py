"""Fuzzing scan and load over mutated benign and malicious checkpoints (hypothesis).

Whatever the bytes: no exception but trainguard.Error, no hang (a per-example deadline),
and the payload never runs.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trainguard
from trainguard.artifacts.loader import load_bytes
from trainguard.artifacts.scanner import scan_bytes

MARKER = Path(tempfile.gettempdir()) / "trainguard-fuzz-PAYLOAD-RAN"


class _Touch:
    def __reduce__(self):
        return (open, (str(MARKER), "w"))


def _torch_bytes(obj: object, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


SEEDS = [
    _torch_bytes({"w": torch.arange(8.0), "b": torch.ones(2, dtype=torch.bfloat16), "e": 1}),
    _torch_bytes({"w": torch.arange(8.0), "epoch": 3}, legacy=True),
    _torch_bytes({"x": _Touch()}),
    pickle.dumps({"a": [1, 2.0, "x"], "b": (None, True)}, protocol=2),
    pickle.dumps(_Touch(), protocol=4),
    _npy_bytes(np.arange(6, dtype=np.float32)),
    _npy_bytes(np.array([1, "x"], dtype=object)),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "dup"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, ord("."), ord("R"), ord("c")]))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "dup":
            width = draw(st.integers(1, 64))
            data[at:at] = data[at : at + width]
    return bytes(data)


@settings(
    max_examples=500,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(mutated())
def test_scan_and_load_never_crash_hang_or_execute(data: bytes) -> None:
    report = scan_bytes(data, "fuzz")
    assert report.verdict is not None
    with contextlib.suppress(trainguard.Error):
        load_bytes(bytearray(data), "fuzz")
    assert not MARKER.exists(), "a payload ran"


def test_seeds_are_meaningful():
    """The malicious seeds really are caught, so the fuzz test starts from both sides."""
    verdicts = [scan_bytes(seed).verdict.value for seed in SEEDS]
    assert verdicts.count("SAFE") == 5
    assert verdicts.count("UNSAFE") == 2
