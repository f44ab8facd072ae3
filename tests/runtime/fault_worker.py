"""One rank of a small job under the Guard, with a fault injected into the Guard's world.

Run as ``python -m tests.runtime.fault_worker SCENARIO POLICY RANK WORLD PORT RUN_DIR KEY``.
The last line on stdout is a JSON summary: the steps done, whether the Guard halted the
job, the alerts' detectors, the close problems and the lines of the alerts file.

Scenarios (from step ``AT`` on, on rank ``VICTIM`` unless said otherwise):

* ``readonly``: rank 0 makes the run folder read-only (the child runs without the
  capabilities that let root ignore permission bits);
* ``full``: the disk is "full": no file may grow (``RLIMIT_FSIZE``, with SIGXFSZ ignored),
  then the job re-seeds itself, which the Guard records in the ledger;
* ``delete-ledger``: rank 0 deletes the run's ledger;
* ``raise-sensor``: ``torch.cat``, which the Guard's sensors use, is replaced by an object
  that raises.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys

import torch
import torch.distributed as dist

import trainguard
from trainguard.runtime import GuardHalt

STEPS = 20
AT = 7
VICTIM = 1


class Raising:
    """A stand-in for a torch function that raises whatever is done with it."""

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("injected fault")


def inject(scenario: str, rank: int, world: int, run_dir: str) -> None:
    victim = VICTIM if world > 1 else 0
    if scenario == "readonly" and rank == 0:
        os.chmod(run_dir, 0o555)
    elif scenario == "full":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        largest = max(os.path.getsize(os.path.join(run_dir, name)) for name in os.listdir(run_dir))
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest, largest))
    elif scenario == "delete-ledger" and rank == 0:
        for suffix in ("", "-wal", "-shm"):
            path = os.path.join(run_dir, "ledger.db" + suffix)
            if os.path.exists(path):
                os.unlink(path)
    elif scenario == "raise-sensor" and rank == victim:
        torch.cat = Raising()  # type: ignore[assignment]


def main() -> None:
    scenario, policy, rank_, world_, port, run_dir, key = sys.argv[1:8]
    rank, world = int(rank_), int(world_)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model: torch.nn.Module = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)
    guard = trainguard.Guard(
        model,
        optimizer,
        run_dir=run_dir,
        every=5,
        owner_key=key,
        seed=0,
        verify_env=False,
        policy=policy,  # type: ignore[arg-type]
    )
    done, halted = 0, False
    try:
        for step in range(STEPS):
            if step == AT:
                inject(scenario, rank, world, run_dir)
            if scenario == "full" and step == AT + 1:
                torch.manual_seed(1234)  # the job's own: recorded in the ledger
            x = torch.randn(16, 8, generator=data)
            loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
            optimizer.zero_grad()
            loss.backward()
            if world > 1:
                # gradients averaged by hand through dist.all_reduce, which the Guard
                # observes (DDP would import torch._dynamo: seconds per process)
                for p in params:
                    assert p.grad is not None
                    dist.all_reduce(p.grad)
                    p.grad /= world
            optimizer.step()
            guard.step(loss=loss)
            done += 1
    except GuardHalt:
        halted = True
    finally:
        guard.close()
    stream = os.path.join(run_dir, f"alerts-rank{rank}.jsonl")
    lines = []
    if os.path.exists(stream):
        with open(stream) as f:
            lines = [json.loads(line) for line in f]
    summary = {
        "steps": done,
        "halted": halted,
        "detectors": sorted({a.detector for a in guard.alerts}),
        "close_problems": guard.close_problems,
        "stream": sorted({a["detector"] for a in lines}),
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
