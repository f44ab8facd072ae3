"""A small guarded DDP job whose ranks draw different dropout masks, run from the start or
resumed from a checkpoint; each rank writes its per-step losses.

``python -m tests.runtime.replay_worker RANK WORLD PORT RUN_DIR KEY STEPS [--save-at K]
[--resume CKPT] [--attack-at S]`` (``env env env ...`` under torchrun). Batches are a
pure function of (step, rank), so a resumed run sees the batches the uninterrupted one
saw; dropout comes from the global generator, seeded per rank, which only the
checkpoint's per-rank RNG states carry over.
``--attack-at S`` scales rank 1's parameters by 1.001 after its optimizer step S (through
``p.data``, an in-process edit). Writes ``losses-rank{R}.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path


def main() -> None:
    import torch
    import torch.distributed as dist

    import trainguard

    if sys.argv[1] == "env":  # launched by torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        port = os.environ["MASTER_PORT"]
    else:
        rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    run_dir, key, steps = Path(sys.argv[4]), sys.argv[5], int(sys.argv[6])
    options = sys.argv[7:]
    save_at = int(options[options.index("--save-at") + 1]) if "--save-at" in options else None
    resume = options[options.index("--resume") + 1] if "--resume" in options else None
    attack_at = int(options[options.index("--attack-at") + 1]) if "--attack-at" in options else -1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
    )
    torch.manual_seed(100 + rank)  # dropout differs per rank
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    guard = trainguard.Guard(
        ddp, optimizer, run_dir=run_dir, every=5, owner_key=key, verify_env=False, seed=0
    )
    start = 0
    if resume is not None:
        start = int(guard.load_checkpoint(resume, fork=True).step)
    losses = {}
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(16, 8, generator=gen)
        loss = torch.nn.functional.mse_loss(ddp(x), x[:, :1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == attack_at and rank == 1:
            for p in model.parameters():
                p.data.mul_(1.001)
        guard.step(loss=loss)
        losses[step] = loss.item()
        if save_at is not None and step + 1 == save_at:
            guard.save_checkpoint(run_dir / "ckpt.pt")
    guard.close()
    (run_dir / f"losses-rank{rank}.json").write_text(json.dumps(losses))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
