"""Per-step cost of the gradient-integrity check (``runtime/grad_check.py`` and the
all-reduce sensor in ``runtime/comm.py``).

    python -m benchmarks.grad_cost [--steps 200] [--rate 0.0625]

Trains the sabotage benchmark's reference model (``cpu`` preset, AdamW) under DDP on a
one-rank gloo group, with the all-reduce sensor and the detector installed as the Guard
installs them, and times what they add, in microseconds per optimizer step: on unsampled
steps (the keyed draw and the detector's pre-step hook) and on sampled steps (the draw,
the moments and coordinate sample taken before each gradient all-reduce, the result's
moments and dot products, the comparison before ``optimizer.step``, and the detector
resolving them: one sync). "result" and "compare" also hold what the sensor did before
this check existed (the result's moments, on check steps).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from benchmarks.sabotage.model import GPT, PRESETS, ModelConfig
from trainguard.runtime.comm import CommTimer
from trainguard.runtime.grad_check import DEFAULT_RATE, GradCheck


def timed(spent: list[float], call: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    config = ModelConfig(**PRESETS["cpu"])
    model = DistributedDataParallel(GPT(config))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    params = list(model.parameters())
    step = [0]
    comm = CommTimer(model, lambda: False)  # check steps aside: only the keyed draw
    comm.params = params
    ctx: Any = SimpleNamespace(
        comm=comm, world=2, shared_key=os.urandom(32), steps=lambda: step[0], rank=0
    )  # world 2: the detector runs as on a real job; the group has one rank
    check = GradCheck(ctx, rate=args.rate)
    parts = ("draw", "before", "result", "compare", "detector")
    spent = {name: [0.0] for name in parts}
    comm.sample_now = timed(spent["draw"], comm.sample_now)
    comm._before = timed(spent["before"], comm._before)  # type: ignore[method-assign]
    comm._done = timed(spent["result"], comm._done)  # type: ignore[method-assign]
    compare = timed(spent["compare"], lambda *_: comm.grads_changed(params))
    opt.register_step_pre_hook(compare)
    opt.register_step_pre_hook(timed(spent["detector"], lambda *_: check.before_step()))
    x = torch.randint(0, config.vocab_size, (8, config.block_size))
    costs: dict[bool, dict[str, list[float]]] = {
        chosen: {name: [] for name in parts} for chosen in (True, False)
    }
    walls: list[float] = []
    for n in range(args.steps):
        step[0] = n
        comm.in_backward = True
        started = time.perf_counter()
        _, loss = model(x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        comm.in_backward = False
        opt.step()
        comm.discard()
        observed = time.perf_counter()
        check.observe(None, None)  # guard.step: the next step's draw
        spent["detector"][0] += time.perf_counter() - observed
        walls.append(time.perf_counter() - started)
        if n >= 10:
            for name in parts:
                costs[check._chosen(n)][name].append(spent[name][0])
        for cell in spent.values():
            cell[0] = 0.0
    # the unsampled path alone, away from the job's backward: what the code itself costs
    # (inside a step the figures above also hold pauses of a loaded machine)
    check.rate = 0.0
    step[0] = args.steps
    started = time.perf_counter()
    for _ in range(10_000):
        comm.sample_now()
        check.before_step()
    alone = (time.perf_counter() - started) / 10_000
    started = time.perf_counter()
    for n in range(10_000):
        step[0] = n
        check.observe(None, None)
    drawn = (time.perf_counter() - started) / 10_000
    comm.close()
    dist.destroy_process_group()
    print(
        f"params {sum(p.numel() for p in params)}, median step {statistics.median(walls) * 1e3:.1f}"
        f" ms, {len(costs[True]['draw'])} of {len(walls) - 10} steps sampled (us per step):"
    )
    for chosen, label in ((False, "unsampled"), (True, "sampled")):
        if not costs[chosen]["draw"]:
            continue
        for how, stat in (("median", statistics.median), ("mean", statistics.fmean)):
            values = {name: stat(cost) * 1e6 for name, cost in costs[chosen].items()}
            shown = ", ".join(f"{name} {value:.1f}" for name, value in values.items())
            print(f"{label} ({how}): {shown}; total {sum(values.values()):.1f}")
    totals = [sum(v[i] for v in c.values()) for c in costs.values() for i in range(len(c["draw"]))]
    print(f"mean over all steps: {statistics.fmean(totals) * 1e6:.1f} us")
    print(
        f"alone: an all-reduce's draw and the pre-step hook {alone * 1e6:.2f} us, "
        f"the next step's draw {drawn * 1e6:.2f} us"
    )
    # a mean of wall times inside a step also holds the interpreter's pauses (garbage
    # collection, a thread switch in the middle of backward) that fall there by chance
    print("(the result's moments and the comparison ran on check steps before this check)")


if __name__ == "__main__":
    main()
