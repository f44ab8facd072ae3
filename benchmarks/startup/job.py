"""One rank of the start-up benchmark's job, started by torchrun.

``python -m benchmarks.startup.job OUT MODE [--key K] [--manifest M --pubkey P]
[--package NAME]``: imports torch, joins the gloo group, builds a small DDP model,
starts the Guard (unless MODE is ``unguarded``) and trains a few steps. It writes
``OUT/times-rank{r}.json``: wall-clock times (``time.time()``) of each phase, read by
the runner against the moment it started the launcher. Only what the job itself needs
is imported: the unguarded job never imports trainguard.
"""

from __future__ import annotations

import time

BEGUN = time.time()  # before any import: interpreter start-up is the runner's to measure

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

STEPS = 3


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup.job")
    parser.add_argument("out", type=Path)
    parser.add_argument("mode", choices=("unguarded", "manifest", "record"))
    parser.add_argument("--key")
    parser.add_argument("--manifest")
    parser.add_argument("--pubkey")
    parser.add_argument("--package", default="torch")
    opts = parser.parse_args()
    times = {"begun": BEGUN}

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    times["imported"] = time.time()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    times["initialized"] = time.time()
    torch.manual_seed(0)
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = None
    if opts.mode != "unguarded":
        import trainguard

        guard = trainguard.Guard(
            model,
            optimizer,
            run_dir=opts.out / "run",
            owner_key=opts.key,
            manifest=opts.manifest if opts.mode == "manifest" else None,
            pubkey=opts.pubkey if opts.mode == "manifest" else None,
            packages=(opts.package,),
        )
    times["guarded"] = time.time()
    data = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        x = torch.randn(16, 32, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if guard is not None:
            guard.step(loss=loss)
        if step == 0:
            times["first_step"] = time.time()
    if guard is not None:
        guard.close()
    # both ranks done before the group goes: gloo aborts a rank whose peer left first
    dist.barrier()
    dist.destroy_process_group()
    (opts.out / f"times-rank{rank}.json").write_text(json.dumps(times) + "\n")


if __name__ == "__main__":
    main()
