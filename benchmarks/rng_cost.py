"""Cost of the RNG check (``runtime/rng_check.py``).

    python -m benchmarks.rng_cost [--steps 400] [--every 50]

Trains the sabotage benchmark's reference model (``cpu`` preset, dropout on, so the CPU
generator moves every step, by more than the budget: the worst case; ``--no-dropout``
for a job whose generator barely moves) and times, in microseconds, the check's per-step hooks
(``after_step``, ``observe``: the mean over all steps, sampled ones included) and its
``at_check`` (the mean and the largest over the checks). Also prints the time of one
twist and the budget's worst case (a generator that outruns the budget at every check).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks.sabotage.model import GPT, PRESETS, ModelConfig
from trainguard.runtime import _mt19937 as mt
from trainguard.runtime.interface import Context
from trainguard.runtime.rng_check import DEFAULT_BUDGET, RngCheck


def _context(clock: list[int]) -> Context:
    def ignore(*args: Any) -> None:
        return None

    return Context(
        model=None,
        optimizer=None,
        params=[],
        rank=0,
        world=1,
        group=None,
        device=torch.device("cpu"),
        at=lambda: clock[0],
        steps=lambda: clock[0],
        alert=ignore,
        alert_once=ignore,
        record=ignore,
        fault=ignore,
        event=ignore,
        attributed=ignore,
        flag=ignore,
        provenance=None,
        comm=None,
        shared_key=b"k" * 32,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument(
        "--no-dropout", action="store_true", help="dropout off: the generator barely moves"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ModelConfig(**PRESETS["cpu"])
    model = GPT(config)
    model.train(not args.no_dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    clock = [0]
    check = RngCheck(_context(clock))
    per_step: list[float] = []
    checks: list[float] = []
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        idx = torch.randint(0, config.vocab_size, (8, config.block_size), generator=gen)
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        start = time.perf_counter()
        check.after_step()
        check.observe(loss, None)
        per_step.append(time.perf_counter() - start)
        if (step + 1) % args.every == 0:
            start = time.perf_counter()
            check.at_check()
            checks.append(time.perf_counter() - start)
        clock[0] += 1
    words = mt.init_genrand(0)
    start = time.perf_counter()
    for _ in range(1000):
        words = mt.twist(words)
    twist = (time.perf_counter() - start) / 1000
    per_step.sort()
    print(
        f"per step (after_step + observe): {statistics.mean(per_step) * 1e6:.2f} us mean, "
        f"{statistics.median(per_step) * 1e6:.2f} us median, "
        f"{per_step[int(len(per_step) * 0.9)] * 1e6:.2f} us p90"
    )
    print(
        f"at_check: {statistics.mean(checks) * 1e6:.0f} us mean, {max(checks) * 1e6:.0f} us max "
        f"over {len(checks)} checks"
    )
    print(
        f"one twist: {twist * 1e6:.1f} us; budget {DEFAULT_BUDGET} twists: "
        f"{twist * DEFAULT_BUDGET * 1e3:.2f} ms per generator that outruns it"
    )


if __name__ == "__main__":
    main()
