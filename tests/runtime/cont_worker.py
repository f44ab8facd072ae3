"""A small guarded single-process job that another process may stop and continue.

Run as ``python -m tests.runtime.cont_worker RUN_DIR KEY [unprotected]``. It calls
``protect_signals`` first (so the guard learns each signal's sender) unless told
``unprotected`` (the guard then catches signals with handlers), writes ``pid`` and,
once training, ``ready``; it trains until the file ``finish`` appears (or a time limit),
then writes the Guard's alerts to ``alerts.json`` and ``steps`` (how many it trained).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import trainguard

LIMIT_S = 60.0  # a job nobody finishes ends by itself


def main() -> None:
    if sys.argv[3:] != ["unprotected"]:
        trainguard.protect_signals()  # before any thread starts
    import os

    import torch

    run_dir, key = Path(sys.argv[1]), sys.argv[2]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pid").write_text(str(os.getpid()))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    step = 0
    with trainguard.Guard(
        model,
        optimizer,
        run_dir=run_dir / "run",
        every=5,
        policy="halt",
        owner_key=key,
        lr_schedule=lambda s: 1e-2,
        seed=0,
        verify_env=False,
    ) as guard:
        started = time.monotonic()
        while time.monotonic() - started < LIMIT_S and not (run_dir / "finish").exists():
            x = torch.randn(16, 8, generator=data)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            guard.step(loss=loss)
            step += 1
            if step == 3:
                (run_dir / "ready").touch()
            time.sleep(0.01)
        alerts = [a.to_dict() for a in guard.alerts]
    (run_dir / "alerts.json").write_text(json.dumps(alerts, default=str))
    (run_dir / "steps").write_text(str(step))


if __name__ == "__main__":
    main()
