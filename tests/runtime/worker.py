"""One rank of a small DDP job under the Guard, with an optional interference.

Run as ``python -m tests.runtime.worker SCENARIO RANK WORLD PORT RUN_DIR KEY``; the
tests start two of these as real processes with a real gloo process group.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import trainguard

STEPS = 40
AT = 12  # the step the interference starts at
VICTIM = 1
LR = 1e-2


def main() -> None:
    # before any thread starts: lets the guard name a signal's sender. Not at import: the
    # tests import this module for its constants, and a blocked SIGTERM would be inherited
    # by every process they start
    trainguard.protect_signals()
    scenario, rank, world, port, run_dir, key = sys.argv[1:7]
    rank, world = int(rank), int(world)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(
        torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1)
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    data = torch.Generator().manual_seed(100 + rank)
    guard = trainguard.Guard(
        model,
        optimizer,
        run_dir=run_dir,
        every=5,
        owner_key=key,
        lr_schedule=lambda step: LR,
        seed=0,
        verify_env=False,
        hang_timeout=3.0 if scenario == "hang" else 600.0,
        policy="halt" if scenario == "halt" else "alert",
    )
    with open(os.path.join(run_dir, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    try:
        # "steadily slower" needs 50 slow steps of evidence (agreement.Straggler)
        steps = 80 if scenario == "straggler" else STEPS
        for step in range(steps):
            x = torch.randn(32, 16, generator=data)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
            optimizer.zero_grad()
            loss.backward()
            if rank == VICTIM and step >= AT:
                interfere(scenario, step, model, optimizer)
            optimizer.step()
            guard.step(loss=loss)
            if scenario == "crash" and step == AT:
                raise RuntimeError("a bug in the job (every rank)")
            if scenario in ("sigterm", "hang") and step == AT:
                (open(os.path.join(run_dir, f"ready-{rank}"), "w")).close()
                if rank == VICTIM:
                    time.sleep(30)  # killed (sigterm) or stuck (hang) here
    except BaseException as exc:
        guard.close(exc)
        raise
    guard.close()
    dist.destroy_process_group()


def foreign_reseed() -> None:
    """Re-seed from code outside the job (an insider's file in /tmp): the job's own code
    re-seeding itself is its business and is only recorded."""
    import importlib.util
    import tempfile

    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "implant.py")
    with open(path, "w") as f:
        f.write("import torch\ndef reseed():\n    torch.manual_seed(1234)\n")
    spec = importlib.util.spec_from_file_location("implant", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.reseed()


def interfere(scenario: str, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    if scenario == "weights" and step == AT:
        with torch.no_grad():
            for p in model.parameters():
                p.data.add_(torch.randn_like(p) * 0.5)
    elif scenario in ("lr", "halt"):
        for group in opt.param_groups:
            group["lr"] = LR * 10
    elif scenario == "rng" and step == AT:
        foreign_reseed()
    elif scenario == "straggler":
        time.sleep(0.15)


if __name__ == "__main__":
    main()
