"""The demonstration behind ``make demo``: a guarded training job under attack.

It runs the sabotage benchmark's reference job (a small GPT, AdamW, DistributedDataParallel
on two gloo ranks) under trainguard's Guard with policy "halt", once clean and once with
an implant that raises the learning rate on rank 1 in the middle of the run, as in the
incident. The Guard names rank 1 and what differs, halts both ranks at the same check,
and the run's signed ledger still verifies. ``make demo-checkpoints`` shows checkpoint
scanning, safe loading and conversion instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ATTACK = "hparam-lr"
STEPS = 150


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def show(cmd: list[str]) -> int:
    shown = " ".join(cmd[2:] if cmd[:2] == [sys.executable, "-m"] else cmd)
    print(f"$ {shown}", flush=True)
    return subprocess.run(cmd, check=False).returncode


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="trainguard-demo-") as tmp:
        out = Path(tmp)
        step(f"1. Train the reference job on 2 ranks, guarded, clean and with attack {ATTACK!r}")
        print("   (the attack: an implant in the job's environment multiplies rank 1's")
        print(f"   learning rate from step {STEPS // 3} on; nothing in the loss log shows it)")
        status = show(
            [
                sys.executable,
                "-m",
                "benchmarks.sabotage",
                "run",
                "--guard",
                "on",
                "--attack",
                ATTACK,
                "--repeat",
                "1",
                "--steps",
                str(STEPS),
                "--out",
                str(out),
            ]
        )
        if status != 0:
            print(f"the benchmark runner failed (exit {status})")
            return 1
        run = out / "runs" / ATTACK
        step("2. What the Guard said (first alerts, as written to the ledger and stderr)")
        alerts = []
        for rank in (0, 1):
            path = run / f"alerts-rank{rank}.json"
            if path.exists():
                alerts += json.loads(path.read_text())
        # an alert every rank computed from the same check is in every rank's file: once
        unique = {(a["step"], a["rank"], a["detector"], a["message"]): a for a in alerts}
        alerts = list(unique.values())
        for alert in sorted(alerts, key=lambda a: (a["step"], str(a["rank"])))[:6]:
            who = f"rank {alert['rank']}" if alert["rank"] is not None else "all ranks"
            print(f"   step {alert['step']:>4}  {who:<9} [{alert['detector']}] {alert['message']}")
        result = json.loads((run / "result-rank0.json").read_text())
        print(f"   run status: {result.get('status')} after {result.get('steps_done')} steps")
        clean = json.loads((out / "runs" / "clean" / "result-rank0.json").read_text())
        print(
            f"   the clean run (same seed, guarded): {clean.get('status')}, no alerts: "
            f"{not json.loads((out / 'runs' / 'clean' / 'alerts-rank0.json').read_text())}"
        )
        step("3. The run's ledger: every event signed and chained, checked from outside")
        show([sys.executable, "-m", "trainguard", "ledger", "show", str(run), "--kind", "alert"])
        verified = show([sys.executable, "-m", "trainguard", "ledger", "verify", str(run)])
        print(f"   ledger verify exit status: {verified} (0 = intact)")
        return 0 if verified == 0 and result.get("status") == "halted" else 1


if __name__ == "__main__":
    sys.exit(main())
