"""One rank of a small data-parallel job under the Guard whose gradients a victim rank
interferes with, for ``test_grad_check``.

Run as ``python -m tests.runtime.grad_worker SCENARIO VICTIM RANK WORLD PORT RUN_DIR KEY``.
Each rank reads its own data (a generator seeded by rank). Scenarios:

* ``clean``: DDP, no interference; ``loop-clean``: the same with a hand-written loop of
  ``dist.all_reduce`` over the gradients instead of DDP;
* ``hook-x8``: from step AT a tensor hook on every parameter multiplies the victim's
  gradients by 8 before the reduction; ``loop-x8``: the same under the hand-written loop;
* ``node-x8``: the same through a pre-hook on the loss's autograd node;
* ``flip-allreduce``: from step AT the victim replaces ``dist.all_reduce`` with a function
  that negates its own tensor before reducing it;
* ``inside-x8``: before the guard starts, the victim's ``dist.all_reduce`` is replaced by
  one that multiplies its tensor by 8 inside the call the guard observes;
* ``after-edit``: from step AT, on steps that are not check steps only, the victim flips
  the sign of one layer's gradients after the reduction, before ``optimizer.step``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import trainguard

STEPS = 20
AT = 5
EVERY = 5
LR = 1e-2


def main() -> None:
    scenario, victim_s, rank_s, world_s, port, run_dir, key = sys.argv[1:8]
    victim, rank, world = int(victim_s), int(rank_s), int(world_s)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    by_hand = scenario.startswith("loop-")
    model: Any = net if by_hand else DistributedDataParallel(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    bad = rank == victim
    if scenario == "inside-x8" and bad:
        inner = dist.all_reduce

        def scaled(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if tensor.is_floating_point() and tensor.numel() > 1:
                tensor.mul_(8.0)
            return inner(tensor, *args, **kwargs)

        dist.all_reduce = scaled
    guard = trainguard.Guard(
        model,
        optimizer,
        run_dir=run_dir,
        every=EVERY,
        owner_key=key,
        lr_schedule=lambda step: LR,
        seed=0,
        verify_env=False,
    )
    if scenario == "after-edit":
        # sample half the steps: the test asks for a catch within two check intervals
        # whatever the key draws (at the default 1/32 it takes 32 steps on average)
        next(d for d in guard.detectors if d.name == "gradients").rate = 0.5
    data = torch.Generator().manual_seed(100 + rank)
    for step in range(STEPS):
        if bad and step == AT:
            start(scenario, model)
        x = torch.randn(32, 16, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        if bad and step >= AT and scenario == "node-x8":
            assert loss.grad_fn is not None
            loss.grad_fn.register_prehook(lambda grads: tuple(g * 8.0 for g in grads))
        optimizer.zero_grad()
        loss.backward()
        if by_hand:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        checked = (step + 1) % EVERY == 0
        if bad and step >= AT and scenario == "after-edit" and not checked:
            with torch.no_grad():
                net[2].weight.grad.neg_()
        optimizer.step()
        guard.step(loss=loss)
    guard.close()
    dist.destroy_process_group()


def start(scenario: str, model: torch.nn.Module) -> None:
    if scenario in ("hook-x8", "loop-x8"):
        for p in model.parameters():
            p.register_hook(lambda g: g * 8.0)
    elif scenario == "flip-allreduce":
        inner = dist.all_reduce

        def flipped(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if tensor.is_floating_point() and tensor.numel() > 1:
                tensor.neg_()
            return inner(tensor, *args, **kwargs)

        dist.all_reduce = flipped


if __name__ == "__main__":
    main()
