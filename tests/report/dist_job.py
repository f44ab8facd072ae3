"""One rank of a two-rank gloo job under the Guard; rank 1's parameters are edited at
step ``AT`` by code outside the optimizer (an insider's hook). Checkpoints are saved
after steps 10 and 20.

Run as ``python -m tests.report.dist_job RANK WORLD PORT RUN_DIR KEY``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import trainguard

STEPS = 25
AT = 12
VICTIM = 1
SAVE_AFTER = (9, 19)


def main() -> None:
    rank, world, port, run_dir, key = sys.argv[1:6]
    rank, world = int(rank), int(world)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    model = DistributedDataParallel(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = trainguard.Guard(
        model,
        optimizer,
        run_dir=run_dir,
        every=5,
        owner_key=key,
        lr_schedule=lambda step: 1e-2,
        seed=0,
        verify_env=False,
        # every gap watched: the write is this rank's own evidence, so it can be named
        watch_rate=1.0,
    )
    data = torch.Generator().manual_seed(100 + rank)
    for step in range(STEPS):
        x = torch.randn(32, 16, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        if rank == VICTIM and step == AT:
            with torch.no_grad():
                for p in model.parameters():
                    p.data.add_(torch.randn_like(p) * 0.5)
        optimizer.step()
        guard.step(loss=loss)
        if step in SAVE_AFTER:
            guard.save_checkpoint(os.path.join(os.path.dirname(run_dir), f"ck{step + 1}.st"))
    guard.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
