"""The reference training job the sabotage benchmark attacks: a plain PyTorch loop.

A GPT-style character model (benchmarks/sabotage/model.py) trained from scratch on the
generated corpus (corpus.py) with AdamW, linear warm-up then cosine learning rate, dropout,
gradient clipping, a ``DistributedSampler`` DataLoader and DistributedDataParallel. Run it
as one process or under torchrun (gloo on CPU, NCCL with CUDA)::

    python -m benchmarks.sabotage.job --config CFG.json --run-dir DIR
    torchrun --nproc-per-node 2 -m benchmarks.sabotage.job --config CFG.json --run-dir DIR

The job runs on one of several bases (``BASES``): the plain loop, or the same loop with an
ordinary practice that real jobs use (DataLoader worker processes, gradient accumulation,
a ``torch.optim.lr_scheduler`` object, or all three), chosen by fields of its config, so
every attack can be run on every base. On CPU the same seed and base give the same losses
and weights bit for bit. Without a guard the job has what a team has today: a NaN/Inf
check on the loss and a plain log of the loss per step (``DIR/train.log``); checkpoints
are ``torch.save`` dicts read back with ``torch.load(weights_only=False)``. With a guard
factory (``train(..., guard_factory=f)``) the loop calls the Guard at the five points of
the contract in README.md and nothing else changes. The job knows nothing about attacks.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from benchmarks.sabotage import corpus
from benchmarks.sabotage.model import GPT, PRESETS, ModelConfig


@dataclass
class JobConfig:
    """Everything the job reads from its JSON configuration file."""

    seed: int = 0
    steps: int = 300
    preset: str = "cpu"
    batch_size: int = 16  # per rank
    lr: float = 1e-2
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dropout: float = 0.1
    corpus_bytes: int = 300_000
    eval_batches: int = 8
    save_at: list[int] = field(default_factory=list)  # completed-step counts to checkpoint at
    resume_from: str | None = None
    # what a guarded resume declares: "fork" (a run of its own from another run's checkpoint,
    # as the benchmark's resumes are), "rollback", or "none" (continuing the same lineage)
    resume_declare: str = "fork"
    guard_every: int = 50
    guard_policy: str = "halt"
    pg_timeout_s: int = 120
    # the training practice the loop follows; BASES names the combinations the benchmark runs
    loader_workers: int = 0  # > 0: DataLoader workers (persistent, pin_memory, seeded)
    accum_steps: int = 1  # micro-batches of batch_size / accum_steps per optimizer step
    log_reduce: str = "after-step"  # where the logged loss is all-reduced: or "before-step"
    lr_scheduler: str = "manual"  # "manual": group["lr"] written each step; "lambda": LambdaLR


#: the bases: ordinary ways of writing the same training loop, as JobConfig fields
BASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "workers": {"loader_workers": 2},
    "accum": {"accum_steps": 2, "log_reduce": "before-step"},
    "sched": {"lr_scheduler": "lambda"},
    "practice": {
        "loader_workers": 2,
        "accum_steps": 2,
        "log_reduce": "before-step",
        "lr_scheduler": "lambda",
    },
}


def load_config(path: Path) -> JobConfig:
    raw = json.loads(path.read_text())
    if "betas" in raw:
        raw["betas"] = tuple(raw["betas"])
    return JobConfig(**raw)


def write_config(cfg: JobConfig, path: Path) -> str:
    """Writes ``cfg`` as JSON and returns the sha256 of the bytes written."""
    data = json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True).encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def lr_schedule(cfg: JobConfig) -> Callable[[int], float]:
    """Learning rate for a 0-based step: linear warm-up, then cosine down to min_lr_ratio."""

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        span = max(1, cfg.steps - cfg.warmup)
        progress = min(1.0, (step - cfg.warmup) / span)
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))

    return lr_at


def seed_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn`` as PyTorch's reproducibility notes write it."""
    import numpy

    worker_seed = torch.initial_seed() % 2**32
    numpy.random.seed(worker_seed)
    random.seed(worker_seed)
    torch.manual_seed(worker_seed)


class Chunks(Dataset[tuple[Tensor, Tensor]]):
    """Non-overlapping windows of ``block + 1`` characters: input and next-character target."""

    def __init__(self, data: Tensor, block: int) -> None:
        self.data, self.block = data, block

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        chunk = self.data[i * self.block : i * self.block + self.block + 1].long()
        return chunk[:-1], chunk[1:]


@dataclass
class GuardContext:
    """What a guard factory receives; see README.md, "Plugging in the Guard"."""

    model: nn.Module  # the bare model (``ddp.module`` when distributed)
    ddp: nn.Module  # what the loop calls: the DDP wrapper, or the model in one process
    optimizer: torch.optim.Optimizer
    run_dir: Path
    rank: int
    world_size: int
    every: int
    policy: str
    # step -> lr (the declared schedule), or the job's torch lr scheduler object when it has one
    lr_schedule: Callable[[int], float] | LRScheduler
    config_path: Path
    submission_path: Path  # written by whoever submitted the run; may be missing
    seed: int
    loader: Any = None  # the training DataLoader (for the Guard's data digests)


GuardFactory = Callable[[GuardContext], Any]


def _rng_state() -> dict[str, str]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in state.items()}


def _set_rng_state(state: dict[str, str]) -> None:
    def tensor(key: str) -> Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(state[key])), dtype=torch.uint8)

    torch.set_rng_state(tensor("torch"))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor("cuda"))


def _alert_dict(alert: Any) -> dict[str, Any]:
    """An alert of any shape (dataclass, dict, object) as a JSON-able dict."""
    if dataclasses.is_dataclass(alert) and not isinstance(alert, type):
        raw = dataclasses.asdict(alert)
    elif isinstance(alert, dict):
        raw = dict(alert)
    else:
        keys = ("step", "rank", "detector", "severity", "message")
        raw = {k: getattr(alert, k, None) for k in keys}
    return {
        k: v if isinstance(v, int | float | str | bool | None) else str(v) for k, v in raw.items()
    }


def _setup_distributed(timeout_s: int) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank() if world > 1 else 0
    return rank, world, device


def _batches(
    loader: DataLoader[Any], sampler: DistributedSampler[Any], start: int
) -> Iterator[Any]:
    """Endless batches from global step ``start`` on: epochs re-shuffled by ``set_epoch``."""
    per_epoch = len(loader)
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


def train(
    config_path: Path, run_dir: Path, guard_factory: GuardFactory | None = None
) -> dict[str, Any]:
    """Runs one training job; returns and writes ``run_dir/result-rank{r}.json``."""
    cfg_bytes = config_path.read_bytes()
    cfg = load_config(config_path)
    rank, world, device = _setup_distributed(cfg.pg_timeout_s)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pids").mkdir(exist_ok=True)
    (run_dir / "pids" / f"rank{rank}.pid").write_text(str(os.getpid()))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank, as in real jobs

    text = corpus.generate(cfg.corpus_bytes)
    vocab = corpus.vocabulary(text)
    data = torch.tensor([vocab.index(c) for c in text], dtype=torch.uint8)
    split = int(len(data) * 0.9)
    mcfg = ModelConfig(vocab_size=len(vocab), dropout=cfg.dropout, **PRESETS[cfg.preset])
    train_set = Chunks(data[:split], mcfg.block_size)
    val_set = Chunks(data[split:], mcfg.block_size)
    sampler = DistributedSampler(
        train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    if cfg.batch_size % cfg.accum_steps:
        raise ValueError("batch_size must be a multiple of accum_steps")
    workers: dict[str, Any] = {}
    if cfg.loader_workers:
        workers = {
            "num_workers": cfg.loader_workers,
            "persistent_workers": True,
            "pin_memory": True,
            "worker_init_fn": seed_worker,
        }
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size // cfg.accum_steps,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG for dropout
        **workers,
    )

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = GPT(mcfg).to(device)
    torch.manual_seed(cfg.seed + 1000 * (rank + 1))
    ddp: nn.Module = model
    if world > 1:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        # PyTorch's stock all-reduce hook: gradients are averaged through dist.all_reduce,
        # the Python function a hook of gradient compression would also call
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)  # type: ignore[operator]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    lr_at = lr_schedule(cfg)
    scheduler: LRScheduler | None = None
    if cfg.lr_scheduler == "lambda":
        scheduler = LambdaLR(optimizer, lambda step: lr_at(step) / cfg.lr)
    elif cfg.lr_scheduler != "manual":
        raise ValueError(f"unknown lr_scheduler {cfg.lr_scheduler!r}")

    result: dict[str, Any] = {
        "rank": rank,
        "world_size": world,
        "device": str(device),
        "seed": cfg.seed,
        "config_sha256": hashlib.sha256(cfg_bytes).hexdigest(),
        "config": dataclasses.asdict(cfg),
        "corpus_sha256": corpus.digest(text),
        "parameters": sum(p.numel() for p in model.parameters()),
        "code": {"torch": torch.__file__, "adam": sys.modules["torch.optim.adam"].__file__},
        "status": "ok",
        "reason": None,
        "steps_done": 0,
        "start_step": 0,
        "losses": [],
        "step_times": [],
        "pid": os.getpid(),
    }
    guard: Any = None
    stage = "start"
    try:
        if guard_factory is not None:
            ctx = GuardContext(
                model,
                ddp,
                optimizer,
                run_dir,
                rank,
                world,
                cfg.guard_every,
                cfg.guard_policy,
                scheduler if scheduler is not None else lr_at,
                config_path,
                run_dir / "submission.json",
                cfg.seed,
                loader,
            )
            guard = guard_factory(ctx)
        if cfg.resume_from:
            stage = "resume"
            result["start_step"] = _resume(
                Path(cfg.resume_from), model, optimizer, scheduler, guard, rank, cfg.resume_declare
            )
        stage = "train"
        train_state = TrainState(model, optimizer, scheduler, lr_at)
        _loop(cfg, ddp, train_state, loader, sampler, guard, run_dir, result)
    except Exception as exc:
        # a guard that refuses or halts raises; the team's own checks only ever log
        if guard_factory is None:
            raise
        result["status"] = "refused" if stage in ("start", "resume") else "halted"
        result["stopped_at"] = stage
        result["reason"] = f"{type(exc).__name__}: {exc}"
    finally:
        if guard is not None:
            try:
                guard.close()
            finally:
                result["guard_seconds"] = getattr(guard, "overhead_seconds", None)
                result["guard_collective_seconds"] = getattr(guard, "collective_seconds", None)
                alerts = [_alert_dict(a) for a in getattr(guard, "alerts", [])]
                (run_dir / f"alerts-rank{rank}.json").write_text(json.dumps(alerts, indent=1))
    result["val_loss"] = _evaluate(model, val_set, cfg, device)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # written whole or not at all: torchrun may end this rank mid-write (a peer died)
    partial = run_dir / f"weights-rank{rank}.pt.partial"
    torch.save(state, partial)
    os.replace(partial, run_dir / f"weights-rank{rank}.pt")
    (run_dir / f"result-rank{rank}.json").write_text(json.dumps(result, indent=1))
    return result


@dataclass
class TrainState:
    """What the loop steps and checkpoints."""

    model: nn.Module  # bare
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None
    lr_at: Callable[[int], float]


def _resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    guard: Any,
    rank: int,
    declare: str = "fork",
) -> int:
    if guard is not None:
        # each resume starts a run of its own from the clean run's checkpoint: a declared
        # fork (a tampered or poisoned checkpoint is refused whatever is declared)
        if declare not in ("fork", "rollback", "none"):
            raise ValueError(f"unknown resume_declare {declare!r}")
        guard.load_checkpoint(path, **({} if declare == "none" else {declare: True}))
        meta = json.loads(path.with_name(path.name + ".job.json").read_text())
    else:
        # what teams do: the whole training state in one pickle
        meta = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(meta["model"])
        optimizer.load_state_dict(meta["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    _set_rng_state(meta["rng"][rank])
    return int(meta["step"])


def _save(path: Path, step: int, ts: TrainState, guard: Any) -> None:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rngs: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    path.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"step": step, "rng": rngs}
    if ts.scheduler is not None:
        meta["scheduler"] = ts.scheduler.state_dict()
    if guard is not None:
        guard.save_checkpoint(path)
        if rank == 0:
            path.with_name(path.name + ".job.json").write_text(json.dumps(meta))
    elif rank == 0:
        state = {"model": ts.model.state_dict(), "optimizer": ts.optimizer.state_dict()}
        torch.save({**state, **meta}, path)
    if world > 1:
        dist.barrier()


def _loop(
    cfg: JobConfig,
    ddp: nn.Module,
    ts: TrainState,
    loader: DataLoader[Any],
    sampler: DistributedSampler[Any],
    guard: Any,
    run_dir: Path,
    result: dict[str, Any],
) -> None:
    rank, world = result["rank"], result["world_size"]
    model, optimizer, scheduler = ts.model, ts.optimizer, ts.scheduler
    device = next(model.parameters()).device
    log = open(run_dir / "train.log", "a") if rank == 0 else None  # noqa: SIM115
    params = list(model.parameters())
    start = result["start_step"]
    accum = cfg.accum_steps
    if cfg.log_reduce not in ("after-step", "before-step"):
        raise ValueError(f"unknown log_reduce {cfg.log_reduce!r}")
    reduce_early = cfg.log_reduce == "before-step"
    batches = _batches(loader, sampler, start * accum)

    def logged_mean(loss: Tensor) -> float:
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        return float(mean)

    ddp.train()
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            if scheduler is None:
                lr = ts.lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            else:
                lr = scheduler.get_last_lr()[0]
            optimizer.zero_grad(set_to_none=True)
            total: Tensor | None = None
            for i, (x, y) in enumerate(micro):
                x, y = x.to(device), y.to(device)
                micro[i] = (x, y)
                # DDP averages gradients across ranks only on the last micro-batch
                sync = i == accum - 1 or not hasattr(ddp, "no_sync")
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    _, loss = ddp(x, y)
                    (loss if accum == 1 else loss / accum).backward()
                part = loss.detach() if accum == 1 else loss.detach() / accum
                total = part if total is None else total + part
            assert total is not None
            if reduce_early:  # between backward() and optimizer.step(), as many jobs log
                value = logged_mean(total)
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if not reduce_early:
                value = logged_mean(total)
            if guard is not None:
                if accum == 1:
                    batch = micro[0]
                else:
                    batch = (torch.cat([b[0] for b in micro]), torch.cat([b[1] for b in micro]))
                guard.step(loss=total, batch=batch)
            result["step_times"].append(time.perf_counter() - t0)
            result["losses"].append(value)
            result["steps_done"] = step + 1
            if log is not None:
                log.write(f"step {step} loss {value:.6f} lr {lr:.6g} grad_norm {gnorm:.4f}\n")
                log.flush()
            if not math.isfinite(value):
                # the baseline check every team has: stop on a NaN or Inf loss
                result["status"] = "nan"
                result["reason"] = f"non-finite loss {value} at step {step}"
                return
            if step + 1 in cfg.save_at:
                _save(run_dir / "ckpt" / f"step{step + 1}.pt", step + 1, ts, guard)
    finally:
        if log is not None:
            log.close()
        batches.close()  # ends the loader's epoch; persistent workers end with the loader


@torch.no_grad()
def _evaluate(model: nn.Module, val_set: Chunks, cfg: JobConfig, device: torch.device) -> float:
    """Mean loss on the first ``eval_batches`` held-out batches, dropout off: the run's score."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):
        rows = [val_set[(i * cfg.batch_size + j) % len(val_set)] for j in range(cfg.batch_size)]
        x = torch.stack([r[0] for r in rows]).to(device)
        y = torch.stack([r[1] for r in rows]).to(device)
        losses.append(float(model(x, y)[1]))
    model.train(was_training)
    return sum(losses) / len(losses)


def run_plan(plan_path: Path, guard_factory: GuardFactory | None = None) -> int:
    """Runs a plan's entries one after another in this process group (see runner.py).

    Each entry is ``{"config": PATH, "run_dir": PATH, "implant": SPEC or null}``; the
    implant spec goes to the environment, where an implant loaded into the interpreter (the
    attack, not the job) reads it. Returns 0, or 1 when an entry failed.
    """
    entries = json.loads(plan_path.read_text())
    for entry in entries:
        os.environ["SABOTAGE_IMPLANT"] = json.dumps(entry.get("implant") or {})
        train(Path(entry["config"]), Path(entry["run_dir"]), guard_factory)
        if dist.is_initialized():
            dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sabotage.job", description=__doc__)
    parser.add_argument("--config", type=Path, help="job configuration (JSON)")
    parser.add_argument("--run-dir", type=Path, help="where logs, checkpoints and results go")
    parser.add_argument("--plan", type=Path, help="run a runner's plan instead (internal)")
    parser.add_argument("--guard", choices=["on", "off"], default="off")
    args = parser.parse_args(argv)
    factory = None
    if args.guard == "on":
        from benchmarks.sabotage.guard_hook import before_start, make_guard

        before_start()
        factory = make_guard
    if args.plan:
        return run_plan(args.plan, factory)
    if args.config is None or args.run_dir is None:
        parser.error("--config and --run-dir are required without --plan")
    result = train(args.config, args.run_dir, factory)
    if dist.is_initialized():
        dist.destroy_process_group()
    if result["rank"] == 0:
        print(f"{result['status']}: steps {result['steps_done']} val_loss {result['val_loss']:.6f}")
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
