"""One rank of a small guarded DDP job that a signal stops, run by torchrun.

Run as ``torchrun --nproc-per-node 2 -m tests.runtime.signal_worker SCENARIO RUN_DIR KEY``
(rank, world and rendezvous come from torchrun's environment). Scenarios:

- ``train``: trains until it is stopped; writes ``ready-RANK`` once training.
- ``handler``: the same, with the job's own SIGTERM handler, as a job that checkpoints on
  preemption has: it writes ``checkpoint-RANK`` and exits.
- ``startup``: pauses inside the Guard's constructor, which reads the configuration
  (``str()`` of its values) while it starts; writes ``starting-RANK`` there first.

Every rank writes ``pid-RANK`` first thing.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import trainguard

LR = 1e-2
READY_AT = 6  # past the first cross-rank check (every=5)
LIMIT_S = 90.0  # a job nobody stops ends by itself


class Pause:
    """A configuration value whose text takes long to make: the Guard is mid-start."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __str__(self) -> str:
        self.marker.touch()
        time.sleep(LIMIT_S)
        return "paused"


def main() -> None:
    # before any thread starts: the guard can then name each signal's sender
    trainguard.protect_signals()
    scenario, run_dir_s, key = sys.argv[1:4]
    run_dir = Path(run_dir_s)
    rank = int(os.environ["RANK"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"pid-{rank}").write_text(str(os.getpid()))
    if scenario == "handler":

        def checkpoint_and_exit(signum: int, frame: FrameType | None) -> None:
            (run_dir / f"checkpoint-{rank}").write_text(signal.Signals(signum).name)
            sys.exit(0)

        signal.signal(signal.SIGTERM, checkpoint_and_exit)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    config = {"pause": Pause(run_dir / f"starting-{rank}")} if scenario == "startup" else None
    data = torch.Generator().manual_seed(100 + rank)
    with trainguard.Guard(
        model,
        optimizer,
        run_dir=run_dir,
        every=5,
        policy="halt",
        owner_key=key,
        lr_schedule=lambda step: LR,
        seed=0,
        verify_env=False,
        config=config,
    ) as guard:
        started = time.monotonic()
        step = 0
        while time.monotonic() - started < LIMIT_S:
            x = torch.randn(16, 8, generator=data)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            guard.step(loss=loss)
            step += 1
            if step == READY_AT:
                (run_dir / f"ready-{rank}").touch()
            time.sleep(0.02)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
