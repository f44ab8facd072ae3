"""Per-step cost of the update-integrity check (``runtime/update_check.py``).

    python -m benchmarks.update_cost [--steps 300] [--coordinates 64] [--rate 0.0625]
                                     [--drain 1]

Trains the sabotage benchmark's reference model (``cpu`` preset, AdamW) and times, per
optimizer step, the check's pre-step and post-step hooks and its comparison at the drain
(what the Guard runs), in microseconds: the mean over the steps after a warm-up (at a rate
below 1 most steps cost almost nothing and one in 1/rate the full check; the mean is what
a job pays). The records pending are compared all at once every ``--drain`` steps (the
Guard drains at its checks, every 50 steps by default); the compare time per record is
printed too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.sabotage.model import GPT, PRESETS, ModelConfig
from trainguard.runtime.interface import StepInfo
from trainguard.runtime.update_check import DEFAULT_RATE, UpdateCheck


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--coordinates", type=int, default=64)
    parser.add_argument("--foreach", action="store_true")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE)
    parser.add_argument("--drain", type=int, default=1, help="steps between comparisons")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ModelConfig(**PRESETS["cpu"])
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, foreach=args.foreach)
    check = UpdateCheck(
        model,
        opt,
        0,
        clock=lambda: 0,
        record=lambda e: None,
        coordinates=args.coordinates,
        rate=args.rate,
    )
    times: dict[str, list[float]] = {"pre": [], "post": [], "compare": [], "step": []}

    def pre(*_: object) -> None:
        t = time.perf_counter()
        check.before_step()
        times["pre"].append(time.perf_counter() - t)

    def post(*_: object) -> None:
        t = time.perf_counter()
        check.after_step()
        times["post"].append(time.perf_counter() - t)

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    x = torch.randint(0, config.vocab_size, (8, config.block_size))
    skip = args.steps // 5
    records = 0
    for n in range(args.steps):
        start = time.perf_counter()
        _, loss = model(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        alerts = []
        pending = len(check._pending)
        t = time.perf_counter()
        if (n + 1) % args.drain == 0:
            alerts = list(check.on_step(StepInfo(0, None, [], None)))
            records += pending if n >= skip else 0
        times["compare"].append(time.perf_counter() - t)
        times["step"].append(time.perf_counter() - start)
        assert not alerts, alerts
    us = {k: statistics.fmean(v[skip:]) * 1e6 for k, v in times.items()}
    total = us["pre"] + us["post"] + us["compare"]
    per_record = sum(times["compare"][skip:]) * 1e6 / max(records, 1)
    print(
        f"params {sum(p.numel() for p in model.parameters())}, tensors "
        f"{len(list(model.parameters()))}, coordinates {args.coordinates}: "
        f"pre {us['pre']:.1f} us, post {us['post']:.1f} us, compare {us['compare']:.1f} us, "
        f"total {total:.1f} us per step = {100 * total / us['step']:.2f}% of a "
        f"{us['step'] / 1e3:.1f} ms step; compare {per_record:.1f} us per record "
        f"({records} records, drained every {args.drain} steps)"
    )


if __name__ == "__main__":
    main()
