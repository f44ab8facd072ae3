"""One rank of a small DDP job that reads its data through a DistributedSampler, under the
Guard with ``loader=`` and ``batch=``, with an optional interference with its data.

Run as ``python -m tests.runtime.data_worker SCENARIO RANK WORLD PORT RUN_DIR KEY``. The
victim is the last rank; the interference starts at step ``AT``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import trainguard

STEPS = 40
EVERY = 5
AT = 20
LR = 2e-2


def feed(loader: DataLoader[Any], sampler: DistributedSampler[Any]) -> Iterator[Any]:
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def main() -> None:
    scenario, rank_s, world_s, port, run_dir, key = sys.argv[1:7]
    rank, world = int(rank_s), int(world_s)
    victim = world - 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    model = DistributedDataParallel(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    data = torch.Generator().manual_seed(7)
    x = torch.randn(1024, 16, generator=data)
    y = x @ torch.randn(16, 1, generator=data) / 4
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=3)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler)
    guard = trainguard.Guard(
        model,
        optimizer,
        run_dir=run_dir,
        every=EVERY,
        owner_key=key,
        lr_schedule=lambda step: LR,
        seed=0,
        verify_env=False,
        loader=loader,
    )
    batches = feed(loader, sampler)
    held: Any = None
    with guard:
        for step in range(STEPS):
            attacked = rank == victim and step >= AT
            if attacked and step == AT:
                # the sampler's attributes changed under the job: they take effect when
                # the next epoch starts
                if scenario == "shard":
                    sampler.rank = (rank + 1) % world
                elif scenario == "seed":
                    sampler.seed += 1
            xb, yb = next(batches)
            if attacked and scenario == "skip":
                xb, yb = next(batches)  # every other batch dropped
            if attacked and scenario == "repeat":
                held = held if held is not None else (xb, yb)
                xb, yb = held
            if attacked and scenario == "labels":
                yb = yb[torch.randperm(len(yb), generator=torch.Generator().manual_seed(step))]
            if attacked and scenario == "half-labels":
                # half the labels replaced at random, with the labels' own spread
                yb = yb.clone()
                yb[::2] = torch.randn(yb[::2].shape, generator=torch.Generator().manual_seed(step))
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            guard.step(loss=loss, batch=(xb, yb))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
