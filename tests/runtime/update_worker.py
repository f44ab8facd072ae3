"""One rank of a small DDP job under the Guard; rank 1's torch Adam scales its update.

Run as ``python -m tests.runtime.update_worker RANK WORLD PORT RUN_DIR KEY`` (two of these, a
real gloo group), by ``test_update_check.test_only_the_patched_rank_is_named``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.optim.adam as adam
from torch.nn.parallel import DistributedDataParallel

import trainguard

STEPS = 20
AT = 6


def main() -> None:
    rank_s, world_s, port, run_dir, key = sys.argv[1:6]  # as start_ranks passes them
    rank = int(rank_s)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=int(world_s))
    torch.manual_seed(0)
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    guard = trainguard.Guard(
        model,
        optimizer,
        run_dir=run_dir,
        every=5,
        owner_key=key,
        seed=0,
        verify_env=False,
        update_rate=1.0,
    )
    data = torch.Generator().manual_seed(100 + rank)
    original = adam._single_tensor_adam

    def scaled(params: list[torch.Tensor], *args: Any, **kwargs: Any) -> None:
        before = [p.detach().clone() for p in params]
        original(params, *args, **kwargs)
        with torch.no_grad():
            for p, b in zip(params, before, strict=True):
                p.copy_(b + 2.0 * (p - b))

    for step in range(STEPS):
        if rank == 1 and step == AT:
            adam._single_tensor_adam = scaled
        x = torch.randn(32, 16, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        guard.step(loss=loss)
    guard.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
