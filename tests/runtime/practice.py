"""The practice matrix: ordinary ways real training code runs, each a real guarded job.

Run as ``python -m tests.runtime.practice ENTRY RANK WORLD PORT RUN_DIR KEY``; the tests
start WORLD of these as real processes with a real gloo process group, under
``policy="halt"``, and require every entry to reach its last step with zero alerts. Every
false alarm a user reports becomes an entry here (one function, one name in ``ENTRIES``).

Each rank writes ``RUN_DIR/result-rankN.json``: the steps it trained and its alerts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import trainguard

STEPS = 24
EVERY = 4
LR = 1e-2


@dataclass
class Job:
    """What an entry changes about the plain job."""

    workers: int = 0
    persistent: bool = False
    pin_memory: bool = False
    seed_workers: bool = False
    accumulate: int = 1
    no_sync: bool = False
    log_reduce: bool = False
    autocast: bool = False
    clip: bool = False
    hooks: bool = False
    scheduler: str | None = None
    evaluate: bool = False
    ema: bool = False
    weight_norm: bool = False
    wrapper: str | None = None  # "accelerate", "lightning", "zero"
    rollback: bool = False
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


ENTRIES: dict[str, Job] = {
    "plain": Job(),
    "dataloader-workers": Job(workers=2, seed_workers=True),
    "persistent-workers-pin-memory": Job(workers=2, persistent=True, pin_memory=True),
    "accumulation-no-sync": Job(accumulate=2, no_sync=True),
    "accumulation-without-no-sync": Job(accumulate=3),
    "logging-collectives": Job(log_reduce=True),
    "bf16-autocast": Job(autocast=True),
    "gradient-clipping": Job(clip=True),
    "own-hooks": Job(hooks=True),
    "lambda-lr": Job(scheduler="LambdaLR"),
    "one-cycle-lr": Job(scheduler="OneCycleLR"),
    "cosine-warm-restarts": Job(scheduler="CosineAnnealingWarmRestarts"),
    "sequential-lr": Job(scheduler="SequentialLR"),
    "reduce-on-plateau": Job(scheduler="ReduceLROnPlateau"),
    "eval-mid-run": Job(evaluate=True),
    "ema-and-swa": Job(ema=True),
    "weight-norm": Job(weight_norm=True),
    "accelerate-optimizer": Job(wrapper="accelerate"),
    "lightning-optimizer": Job(wrapper="lightning"),
    "zero-redundancy": Job(wrapper="zero"),
    "rollback": Job(rollback=True),
    "resume": Job(resume=True),
    # several practices at once, as real jobs combine them
    "workers-accumulation-scheduler": Job(
        workers=2, accumulate=2, no_sync=True, log_reduce=True, scheduler="OneCycleLR", clip=True
    ),
}


class Net(nn.Module):
    def __init__(self, weight_norm: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(32, 1)
        if weight_norm:
            self.out = nn.utils.parametrizations.weight_norm(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.inp(x))))


def seed_worker(worker_id: int) -> None:
    # the PyTorch documentation's recipe for reproducible workers
    seed = torch.initial_seed() % 2**32
    numpy.random.seed(seed)
    random.seed(seed)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer) -> Any:
    sched = torch.optim.lr_scheduler
    total = STEPS + 2
    if name == "LambdaLR":
        return sched.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5) * 0.5 ** (s // 10))
    if name == "OneCycleLR":
        return sched.OneCycleLR(optimizer, max_lr=LR * 3, total_steps=total)
    if name == "CosineAnnealingWarmRestarts":
        return sched.CosineAnnealingWarmRestarts(optimizer, T_0=5)
    if name == "SequentialLR":
        warm = sched.LinearLR(optimizer, start_factor=0.1, total_iters=5)
        decay = sched.ExponentialLR(optimizer, gamma=0.9)
        return sched.SequentialLR(optimizer, [warm, decay], milestones=[5])
    if name == "ReduceLROnPlateau":
        return sched.ReduceLROnPlateau(optimizer, factor=0.5, patience=1, threshold=10.0)
    raise ValueError(name)


def batches(loader: DataLoader[Any], sampler: DistributedSampler[Any]) -> Iterator[Any]:
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def main() -> None:
    trainguard.protect_signals()
    entry, rank_s, world_s, port, run_dir_s, key = sys.argv[1:7]
    job = ENTRIES[entry]
    rank, world = int(rank_s), int(world_s)
    run_dir = Path(run_dir_s)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        RANK=rank_s,
        LOCAL_RANK=rank_s,
        WORLD_SIZE=world_s,
        LOCAL_WORLD_SIZE=world_s,
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    phases = (
        [("first", 0, STEPS // 2), ("second", STEPS // 2, STEPS)]
        if job.resume
        else [("only", 0, STEPS)]
    )
    result: dict[str, Any] = {"steps": [], "alerts": [], "entry": entry}
    for phase, start, stop in phases:
        # a resume is a fresh Guard on the same run (in production, a fresh process)
        run(job, rank, world, run_dir, key, phase, start, stop, result)
    (run_dir / f"result-rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


def run(
    job: Job,
    rank: int,
    world: int,
    run_dir: Path,
    key: str,
    phase: str,
    start: int,
    stop: int,
    result: dict[str, Any],
) -> None:
    random.seed(rank)
    numpy.random.seed(rank)
    torch.manual_seed(0)
    net = Net(job.weight_norm)
    torch.manual_seed(100 + rank)  # dropout differs per rank, as in real jobs
    before: list[Any] = []
    if job.hooks:
        before.append(net.inp.register_forward_hook(lambda m, i, o: None))
    model = DistributedDataParallel(net)
    base: Any = torch.optim.AdamW
    if job.wrapper == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer: Any = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR
        )
    else:
        optimizer = base(model.parameters(), lr=LR, weight_decay=0.01)
    stepper: Any = optimizer
    watched: Any = optimizer
    if job.wrapper == "accelerate":
        from accelerate import Accelerator

        # the optimizer the Trainer hands its callbacks: accelerate's wrapper
        stepper = watched = Accelerator(cpu=True).prepare_optimizer(optimizer)
    elif job.wrapper == "lightning":
        from lightning.pytorch.core.optimizer import LightningOptimizer

        # what Lightning hands its callbacks; its strategy steps the optimizer inside
        watched = LightningOptimizer(optimizer)
    scheduler = make_scheduler(job.scheduler, optimizer) if job.scheduler else None
    data = torch.Generator().manual_seed(7)
    x = torch.randn(512, 16, generator=data)
    dataset = TensorDataset(x, x.sum(1, keepdim=True))
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=3)
    loader = DataLoader(
        dataset,
        batch_size=8,
        sampler=sampler,
        num_workers=job.workers,
        persistent_workers=job.persistent,
        pin_memory=job.pin_memory,
        worker_init_fn=seed_worker if job.seed_workers else None,
        generator=torch.Generator().manual_seed(5),
    )
    ema = (
        torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.99)
        )
        if job.ema
        else None
    )
    swa = torch.optim.swa_utils.AveragedModel(net) if job.ema else None
    guard = trainguard.Guard(
        model,
        watched,
        run_dir=run_dir,
        every=EVERY,
        owner_key=key,
        policy="halt",
        lr_schedule=scheduler if scheduler is not None else (lambda s: LR),
        seed=0,
        verify_env=False,
        loader=loader,
    )
    after = []
    if job.hooks:
        after.append(net.out.register_forward_pre_hook(lambda m, i: None))
        after.append(net.inp.weight.register_hook(lambda g: None))
    ckpt = run_dir / "ckpt" / "latest.safetensors"
    with guard:
        if phase == "second":
            guard.load_checkpoint(ckpt)
            if scheduler is not None:
                pass  # schedulers' own state would be restored by the job here
        feed = batches(loader, sampler)
        step = start
        while step < stop:
            train_step(job, model, net, optimizer, stepper, feed, world)
            if scheduler is not None:
                if job.scheduler == "CosineAnnealingWarmRestarts":
                    scheduler.step(step / 3)  # fractional epochs, as its docs show
                elif job.scheduler == "ReduceLROnPlateau":
                    scheduler.step(1.0)  # a metric that never improves
                else:
                    scheduler.step()
            if ema is not None and swa is not None:
                ema.update_parameters(net)
                if step % 4 == 0:
                    swa.update_parameters(net)
            if job.evaluate and step % 6 == 5:
                evaluate(model, dataset, rank, world)
            guard.step(loss=last_loss[0], batch=last_batch[0])
            result["steps"].append(step)
            step += 1
            if phase == "first" and step == stop or job.rollback and step == 8:
                guard.save_checkpoint(ckpt)
            if job.rollback and step == 14 and not result.get("rolled_back"):
                guard.load_checkpoint(ckpt, rollback=True)
                result["rolled_back"] = True
                step = 8
        result["alerts"] += [a.to_dict() for a in guard.alerts]
    for handle in before + after:
        handle.remove()


last_loss: list[Any] = [None]
#: the step's last micro-batch, as the job hands it to guard.step
last_batch: list[Any] = [None]


def train_step(
    job: Job,
    model: nn.Module,
    net: nn.Module,
    optimizer: Any,
    stepper: Any,
    feed: Iterator[Any],
    world: int,
) -> None:
    stepper.zero_grad(set_to_none=True)
    for micro in range(job.accumulate):
        xb, yb = next(feed)
        last_batch[0] = (xb, yb)
        last = micro == job.accumulate - 1
        sync = contextlib.nullcontext() if last or not job.no_sync else model.no_sync()
        with sync:
            ctx = (
                torch.autocast("cpu", dtype=torch.bfloat16)
                if job.autocast
                else contextlib.nullcontext()
            )
            with ctx:
                loss = nn.functional.mse_loss(model(xb).float(), yb) / job.accumulate
            loss.backward()
        if job.log_reduce:
            # logging in the middle of the step: a loss and a metric, all-reduced and gathered
            logged = loss.detach().clone()
            dist.all_reduce(logged)
            gathered = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(gathered, loss.detach().reshape(1))
    if job.clip:
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
    stepper.step()
    if job.log_reduce:
        dist.all_reduce(loss.detach().clone(), op=dist.ReduceOp.MAX)
    last_loss[0] = loss.detach()
    if not math.isfinite(float(loss)):
        raise RuntimeError("loss is not finite")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, rank: int, world: int) -> None:
    """model.eval() and no_grad on every rank, and rank 0 alone draws a validation loader
    from the global RNG (as jobs that evaluate or sample text on rank 0 do)."""
    model.eval()
    xb, yb = dataset[:64]
    total = nn.functional.mse_loss(model.module(xb), yb).reshape(1)
    if rank == 0:
        loader = DataLoader(dataset, batch_size=64, shuffle=True)
        for xb, yb in loader:
            total += nn.functional.mse_loss(model.module(xb), yb)
            break
    dist.all_reduce(total)
    model.train()


if __name__ == "__main__":
    main()
