"""One rank of a small job that starts the Guard with its environment check switched on.

Run as ``python -m tests.runtime.startup_worker RANK WORLD PORT RUN_DIR KEY``; the options
of the check come as JSON in ``STARTUP_WORKER`` (``manifest``, ``pubkey``, ``packages``,
``policy``). The worker leaves evidence in RUN_DIR for the tests: ``verified-rank{r}``
when this process ran the verification itself, ``stepped-rank{r}`` once its first step
is done.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import trainguard
import trainguard.integrity
from trainguard.runtime import startup

STEPS = 6


def main() -> None:
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    port, run_dir, key = sys.argv[3], Path(sys.argv[4]), sys.argv[5]
    options = json.loads(os.environ.get("STARTUP_WORKER", "{}"))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    run_dir.mkdir(parents=True, exist_ok=True)
    # the test's checks take well under a second: say the progress lines anyway
    startup.PROGRESS_AFTER = 0.0
    genuine = trainguard.integrity.verify_environment

    def counted(*args: Any, **kwargs: Any) -> Any:
        (run_dir / f"verified-rank{rank}").touch()
        return genuine(*args, **kwargs)

    trainguard.integrity.verify_environment = counted  # type: ignore[assignment]
    # the same seed and data on both ranks keep them in agreement without a DDP wrapper
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with trainguard.Guard(
        model,
        optimizer,
        run_dir=run_dir,
        every=3,
        owner_key=key,
        seed=0,
        manifest=options.get("manifest"),
        pubkey=options.get("pubkey"),
        packages=tuple(options.get("packages", ["torch"])),
        policy=options.get("policy", "alert"),
    ) as guard:
        for step in range(STEPS):
            x = torch.randn(8, 4)
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            guard.step(loss=loss)
            if step == 0:
                (run_dir / f"stepped-rank{rank}").touch()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
