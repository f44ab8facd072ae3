"""One rank of a small DDP job under the Guard, with an optional interference.

Run as ``python -m tests.runtime.worker SCENARIO RANK WORLD PORT RUN_DIR KEY``; the
tests start two of these as real processes with a real gloo process group.
"""

from __future__ import annotations

import os
import sys
import time
import types
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import trainguard

STEPS = 40
AT = 12  # the step the interference starts at
VICTIM = 1
LR = 1e-2
#: the first step after a check (checks every 5 steps: steps 4, 9, 14, ...)
AFTER_CHECK = 15
#: a check step after AT, at which halt-save saves a checkpoint
CHECK_BEFORE_SAVE = 14


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
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1)
    )
    if scenario in MODEL_STATE:
        # a BatchNorm whose running statistics differ per rank (DDP does not broadcast
        # them here) and a buffer the replicas hold equal
        net.insert(1, torch.nn.BatchNorm1d(32))
        net.register_buffer("table", torch.ones(32))
    model = DistributedDataParallel(net, broadcast_buffers=scenario not in MODEL_STATE)
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
        policy="halt" if scenario in ("halt", "halt-window", "halt-save") else "alert",
        # the one-off write must fall in a watched gap to be this rank's own evidence (at
        # the default, a keyed eighth of the gaps; otherwise "cannot tell" with two ranks)
        watch_rate=1.0 if scenario == "weights" else 1 / 8,
    )
    with open(os.path.join(run_dir, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    try:
        # a straggler 4x its peers is named after two checks covering 16 steps
        # (agreement.Straggler's fast tier): STEPS are enough
        for step in range(STEPS):
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
            if scenario == "halt-save" and step == CHECK_BEFORE_SAVE:
                # right after a check whose rows call for a halt: never signed
                guard.save_checkpoint(os.path.join(run_dir, f"after-check-{rank}.pt"))
    except BaseException as exc:
        with open(os.path.join(run_dir, f"stopped-{rank}"), "w") as f:
            f.write(f"{step} {type(exc).__name__}")
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
    elif scenario == "halt-window" and step == AFTER_CHECK:
        # between a check and the comparison of its rows (the next step's start): this
        # rank's own alert halts every rank at the next check, not this rank alone now
        foreign_reseed()
    elif scenario == "halt-save" and step == AT:
        with torch.no_grad():
            for p in model.parameters():
                p.data.add_(torch.randn_like(p) * 0.5)
    elif scenario == "rng" and step == AT:
        foreign_reseed()
    elif scenario == "straggler":
        time.sleep(0.15)
    elif scenario in MODEL_STATE and step == AT:
        interfere_with_model_state(scenario, model)


#: interference with the model's state beyond its parameters (issue 11), from step AT
MODEL_STATE = ("dropout", "eval", "buffer", "node-hook")


def foreign(source: str) -> types.ModuleType:
    """A module from outside the job (an insider's file in /tmp)."""
    import importlib.util
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "state_implant.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("state_implant", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interfere_with_model_state(scenario: str, model: torch.nn.Module) -> None:
    net: Any = model.module
    if scenario == "dropout":
        foreign("def attack(net):\n    net[3].p = 0.9\n").attack(net)
    elif scenario == "eval":
        foreign("def attack(net):\n    net.eval()\n").attack(net)
    elif scenario == "buffer":
        with torch.no_grad():
            net.table.mul_(2.0)  # in place: no setter, no hook, nothing patched
    elif scenario == "node-hook":
        # DDP's reducer keeps the AccumulateGrad nodes alive: the hook stays on them
        implant = foreign(
            "def attack(net):\n"
            "    p = net[0].weight\n"
            "    node = p.view_as(p).grad_fn.next_functions[0][0]\n"
            "    node.register_prehook(lambda grads: tuple(g * 10 for g in grads))\n"
        )
        implant.attack(net)


if __name__ == "__main__":
    main()
