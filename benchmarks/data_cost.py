"""Per-step cost of the data check (``runtime/data_check.py``).

    python -m benchmarks.data_cost [--steps 20000] [--every 50]

Times what ``guard.step(batch=...)`` adds per step through the data detector's
``observe`` (the batch digest), and its share of the check's fold (``at_check`` divided by
the steps of an interval), in microseconds of the thread's CPU time (wall time on a
shared machine varies with its load), on one CPU thread, for a batch of 8x512 int64
token ids, the same as a dict with its attention mask (a tokenizer's ``BatchEncoding``),
and a float image batch of 64x3x32x32 with its labels.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from trainguard.runtime.data_check import DataCheck
from trainguard.runtime.interface import Context


def context() -> Context:
    return Context(
        model=None,
        optimizer=None,
        params=[],
        rank=0,
        world=1,
        group=None,
        device=torch.device("cpu"),
        at=lambda: 0,
        steps=lambda: 0,
        alert=lambda alert, flag: None,
        alert_once=lambda alert: None,
        record=lambda event: None,
        fault=lambda where, exc: None,
        event=lambda event, flag: None,
        attributed=lambda *args: None,
        flag=lambda bit: None,
        provenance=None,
        comm=None,
    )


def per_step(batch: Any, steps: int, every: int) -> tuple[float, float]:
    check = DataCheck(context())
    for _ in range(every * 4):  # warm-up
        check.observe(None, batch)
    check.at_check()
    observe = fold = 0.0
    for start in range(0, steps, every):
        begin = time.thread_time()
        for _ in range(min(every, steps - start)):
            check.observe(None, batch)
        middle = time.thread_time()
        check.at_check()
        observe += middle - begin
        fold += time.thread_time() - middle
    return observe / steps * 1e6, fold / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids = torch.randint(0, 50_000, (8, 512))
    batches = {
        "ids 8x512 int64": ids,
        "dict ids + attention mask": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        "float 64x3x32x32 + labels": (
            torch.randn(64, 3, 32, 32),
            torch.randint(0, 10, (64,)),
        ),
    }
    for name, batch in batches.items():
        observe, fold = per_step(batch, args.steps, args.every)
        print(f"{name:28s} observe {observe:6.1f} us/step  fold at check {fold:5.2f} us/step")


if __name__ == "__main__":
    main()
