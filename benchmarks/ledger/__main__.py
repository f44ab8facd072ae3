"""Ledger and signed-checkpoint benchmark: appends per second, checkpoint save/load speed.

    python -m benchmarks.ledger [--entries 4000] [--mb 256] [--repeat 3]
                                [--pg-dsn DSN] [--out DIR]

Appends: 1 process and 4 processes (each its own connection, as ranks are) into one
SQLite ledger, and into PostgreSQL when a DSN is given (or TRAINGUARD_TEST_PG_DSN is
set). Checkpoints: trainguard.checkpoint.save/load of a model + AdamW state against
torch.save/torch.load of the same state dicts, in the same run, median of --repeat.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.ledger.workers import append_worker


def appends(backend: str, processes: int, total: int, owner: Path, dsn: str | None) -> float:
    from trainguard.ledger import Ledger, verify

    with tempfile.TemporaryDirectory(prefix="tg-bench-ledger-") as tmp:
        run_dir = Path(tmp) / "run"
        Ledger.create(
            run_dir,
            owner_key=owner,
            backend="postgres" if backend == "postgres" else "sqlite",
            dsn=dsn,
            run_id=f"bench-{uuid.uuid4().hex[:8]}",
        ).close()
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        start_at = time.time() + 1.5  # after every worker has started and opened the ledger
        workers = [
            ctx.Process(
                target=append_worker,
                args=(str(run_dir), rank, total // processes, start_at, queue),
            )
            for rank in range(processes)
        ]
        for w in workers:
            w.start()
        spans = [queue.get(timeout=600) for _ in workers]
        for w in workers:
            w.join()
        seconds = max(end for _, end in spans) - min(begin for begin, _ in spans)
        report = verify(run_dir)
        assert not report.problems, report.problems[:3]
    return (total // processes) * processes / seconds


def _state(mb: int) -> tuple[Any, Any]:
    import torch

    width = 1024
    layers = max(1, mb * 2**20 // (3 * 4 * width * width))  # weights + exp_avg + exp_avg_sq
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def checkpoints(mb: int, repeat: int, owner: Path, public: Path) -> dict[str, Any]:
    import torch

    from trainguard import checkpoint

    model, optimizer = _state(mb)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(
        v.numel() * v.element_size()
        for s in optimizer.state_dict()["state"].values()
        for v in s.values()
    )
    times: dict[str, list[float]] = {
        k: [] for k in ("tg_save", "tg_load", "pt_save", "pt_save_fsync", "pt_load")
    }
    with tempfile.TemporaryDirectory(prefix="tg-bench-ckpt-") as tmp:
        ours, theirs = Path(tmp) / "ckpt.safetensors", Path(tmp) / "ckpt.pt"
        for _ in range(repeat):
            t = time.perf_counter()
            checkpoint.save(ours, model=model, optimizer=optimizer, step=1, key=owner)
            times["tg_save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, theirs)
            times["pt_save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, theirs)
            with open(theirs, "rb+") as handle:  # durable, as trainguard's save is
                os.fsync(handle.fileno())
            times["pt_save_fsync"].append(time.perf_counter() - t)
            t = time.perf_counter()
            checkpoint.load(ours, model=model, optimizer=optimizer, public_key=public)
            times["tg_load"].append(time.perf_counter() - t)
            t = time.perf_counter()
            state = torch.load(theirs, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            times["pt_load"].append(time.perf_counter() - t)
        sizes = {"tg_file": ours.stat().st_size, "pt_file": theirs.stat().st_size}
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "state_bytes": nbytes,
        **sizes,
        **{f"{k}_s": round(v, 4) for k, v in medians.items()},
        **{f"{k}_mb_s": round(nbytes / 2**20 / v, 1) for k, v in medians.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ledger")
    parser.add_argument("--entries", type=int, default=4000, help="appends per case")
    parser.add_argument("--mb", type=int, default=256, help="checkpoint state size, MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pg-dsn", default=os.environ.get("TRAINGUARD_TEST_PG_DSN"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/ledger/results"))
    args = parser.parse_args()

    from trainguard.integrity import keygen

    results: dict[str, Any] = {"appends_per_s": {}, "checkpoint": {}}
    with tempfile.TemporaryDirectory(prefix="tg-bench-keys-") as keys:
        owner, public = keygen(keys)
        backends = ["sqlite"] + (["postgres"] if args.pg_dsn else [])
        for backend in backends:
            for procs in (1, 4):
                rate = appends(backend, procs, args.entries, owner, args.pg_dsn)
                results["appends_per_s"][f"{backend}, {procs} process(es)"] = round(rate)
                print(f"{backend:<9} {procs} process(es): {rate:8.0f} appends/s")
        if not args.pg_dsn:
            print("postgres: skipped (no --pg-dsn / TRAINGUARD_TEST_PG_DSN)")
        ck = checkpoints(args.mb, args.repeat, owner, public)
        results["checkpoint"] = ck
    mb = ck["state_bytes"] / 2**20
    print(f"checkpoint state {mb:.0f} MiB (model + AdamW), median of {args.repeat}:")
    for label, key in (
        ("trainguard.checkpoint.save", "tg_save"),
        ("torch.save", "pt_save"),
        ("torch.save + fsync", "pt_save_fsync"),
        ("trainguard.checkpoint.load", "tg_load"),
        ("torch.load + load_state_dict", "pt_load"),
    ):
        print(f"  {label:<30} {ck[key + '_s']:7.3f} s  {ck[key + '_mb_s']:8.1f} MiB/s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
