"""Where the Guard's time goes: each detector call timed inside a training loop.

    OMP_NUM_THREADS=1 python -m benchmarks.guard_parts [--steps 400] [--every 50] [--preset cpu]

Trains the sabotage benchmark's reference model (``benchmarks/sabotage/model.py``) in one
process under a Guard at its defaults (with ``loader=`` and ``batch=``), times every call the
Guard makes to each detector (before and after ``optimizer.step``, at ``guard.step``, at the
check), and prints microseconds per training step for each, largest first, with the
Guard's share of the step time (its own clock, ``Guard.overhead_seconds``). Then times the
check's biggest parts alone. One process: collectives and cross-rank parts cost nothing here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import types
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import trainguard
from benchmarks.sabotage.model import GPT, PRESETS, ModelConfig
from trainguard.cli import main as cli
from trainguard.runtime.interface import BaseDetector


def _timed_each(spent: dict[tuple[str, str], float]) -> Callable[..., None]:
    def each(guard: Any, when: str, method: str, *args: Any, may_halt: bool = True) -> None:
        for detector in guard.detectors:
            if getattr(type(detector), method, None) is getattr(BaseDetector, method):
                continue
            started = time.perf_counter()
            result = getattr(detector, method)(*args)
            if method == "on_step":
                for alert in result:
                    guard._raise(alert)
            spent[(when, detector.name)] += time.perf_counter() - started

    return each


def _alone(label: str, call: Callable[[], object], repeat: int = 5) -> None:
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    print(f"{(time.perf_counter() - started) / repeat * 1e3:8.2f} ms  {label}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guard_parts", description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="guard-parts-")
    if cli(["keygen", "-o", f"{folder}/keys"]) != 0:
        return 2
    torch.manual_seed(0)
    model = GPT(ModelConfig(**PRESETS[args.preset]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    block = model.cfg.block_size
    data = torch.randint(0, model.cfg.vocab_size, (4096, block + 1))
    loader = DataLoader(
        TensorDataset(data[:, :-1], data[:, 1:]),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    guard = trainguard.Guard(
        model,
        optimizer,
        run_dir=f"{folder}/run",
        owner_key=f"{folder}/keys/trainguard.key",
        verify_env=False,
        every=args.every,
        loader=loader,
    )
    spent: dict[tuple[str, str], float] = defaultdict(float)
    guard._each = types.MethodType(_timed_each(spent), guard)
    steps = 0
    started = time.perf_counter()
    while steps < args.steps:
        for xb, yb in loader:
            _, loss = model(xb, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            guard.step(loss=loss, batch=(xb, yb))
            steps += 1
            if steps >= args.steps:
                break
    total = time.perf_counter() - started
    share = guard.overhead_seconds / total * 100
    print(f"{steps} steps of {total / steps * 1e3:.2f} ms; the Guard's share {share:.2f}%")
    for (when, name), seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        if seconds / steps >= 1e-6:
            print(f"{seconds / steps * 1e6:8.1f} us/step  {name} {when}")
    sensors = next(d for d in guard.detectors if d.name == "sensors")
    integrity = next(d for d in guard.detectors if d.name == "guard-integrity")
    print("at a check, alone:")
    _alone("the fingerprint row", guard._row)
    _alone("torch's patch watch", lambda: list(sensors.patches.changes()))
    _alone("trainguard's own patch watch", lambda: list(integrity.watch.changes()))
    guard.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
