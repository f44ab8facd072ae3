"""One rank of a small DDP job under the Guard, for the two-rank "generator stopped" rule.

Run as ``python -m tests.runtime.rewind_worker MODE RANK WORLD PORT RUN_DIR KEY`` (two of
these, a real gloo group), by ``test_selfcheck_rewind.py``. MODE:

- ``rewind``: rank 1 sets torch's CPU generator back to its step-AT state before every
  update (a global optimizer pre-hook, as an implant would), so every step draws the same
  dropout masks;
- ``clean``: the same job with dropout, nothing done;
- ``lopsided``: no dropout; both ranks draw from the generator at each epoch (every 7
  steps) and rank 0 alone draws at every step (sampling text to log): the CPU generator
  stops on rank 1 while rank 0's moves, legitimately.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_pre_hook

import trainguard

STEPS = 30
AT = 6
EVERY = 5


def main() -> None:
    mode, rank_s, world_s, port, run_dir, key = sys.argv[1:7]  # as start_ranks passes them
    rank = int(rank_s)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=int(world_s))
    torch.manual_seed(0)
    drop = 0.0 if mode == "lopsided" else 0.2
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(drop), torch.nn.Linear(32, 1)
    )
    model = DistributedDataParallel(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)
    guard = trainguard.Guard(
        model, optimizer, run_dir=run_dir, every=EVERY, owner_key=key, seed=0, verify_env=False
    )
    data = torch.Generator().manual_seed(7 + rank)
    saved: list[torch.Tensor] = []
    done = [0]

    def rewind(opt: object, args: object, kwargs: object) -> None:
        if done[0] >= AT:
            if not saved:
                saved.append(torch.default_generator.get_state())
            torch.default_generator.set_state(saved[0])

    if mode == "rewind" and rank == 1:
        register_optimizer_step_pre_hook(rewind)
    for step in range(STEPS):
        if mode == "lopsided":
            if step % 7 == 0:
                torch.randperm(8)  # an epoch's shuffle, on every rank
            if rank == 0:
                torch.rand(1)  # rank 0 alone samples something to log
        x = torch.randn(32, 16, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done[0] += 1
        guard.step(loss=loss)
    guard.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
