"""A small training job under the Guard, in this process, for the report's tests.

PYTEST_DONT_REWRITE: this file plays the job's own code (``code_roots``), and the Guard
checks that code objects are what their file compiles to.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

import trainguard

EVERY = 5
LR = 1e-2


def train_run(
    run_dir: Path,
    key: Path,
    *,
    steps: int = 30,
    lr_at: int | None = None,
    save_after: Iterable[int] = (),
    checkpoints: Path | None = None,
) -> list[trainguard.runtime.Alert]:
    """Train ``steps`` steps; at step ``lr_at`` someone sets the learning rate of group 0
    to 5x the schedule's (before that step's update); after the steps in ``save_after`` a
    signed checkpoint ``ck{guard step}.safetensors`` is saved into ``checkpoints``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    guard = trainguard.Guard(
        model,
        optimizer,
        run_dir=run_dir,
        every=EVERY,
        owner_key=key,
        verify_env=False,
        seed=0,
        code_roots=[__file__],
        lr_schedule=lambda step: LR,
    )
    saves = set(save_after)
    folder = checkpoints or run_dir.parent
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(16, 8, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
        optimizer.zero_grad()
        loss.backward()
        if step == lr_at:
            optimizer.param_groups[0]["lr"] = LR * 5
        optimizer.step()
        guard.step(loss=loss)
        if step in saves:
            guard.save_checkpoint(folder / f"ck{step + 1}.safetensors")
    guard.close()
    return list(guard.alerts)
