"""One rank of a small DDP job with dropout under the Guard; rank 1 sets its CPU generator
back after every optimizer step (every step then draws the same dropout masks).

Run as ``python -m tests.runtime.rng_worker RANK WORLD PORT RUN_DIR KEY`` (two of these, a real
gloo group), by ``test_rng_check.test_only_the_rank_that_rewinds_its_generator_is_named``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import trainguard

STEPS = 40
AT = 6


def main() -> None:
    rank_s, world_s, port, run_dir, key = sys.argv[1:6]  # as start_ranks passes them
    rank = int(rank_s)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=int(world_s))
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
    )
    model = DistributedDataParallel(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)
    guard = trainguard.Guard(
        model, optimizer, run_dir=run_dir, every=5, owner_key=key, seed=0, verify_env=False
    )
    data = torch.Generator().manual_seed(7 + rank)
    saved = None
    for step in range(STEPS):
        x = torch.randn(32, 16, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 1 and step >= AT:
            # the insider's implant: the masks of step AT, again and again
            if saved is None:
                saved = torch.default_generator.get_state()
            torch.default_generator.set_state(saved)
        guard.step(loss=loss)
    guard.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
