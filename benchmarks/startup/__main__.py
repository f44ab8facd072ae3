"""Runner: ``python -m benchmarks.startup [--repeat N] [--package torch] --out DIR``.

Launches the same small 2-rank gloo job (``benchmarks/startup/job.py``) with
``python -m torch.distributed.run --standalone --nproc-per-node 2`` three ways:

- ``unguarded``: no trainguard at all;
- ``manifest``: under the Guard, the environment checked against a manifest of the
  package sealed (``trainguard keygen`` + ``trainguard seal --packages``) in this run;
- ``record``: under the Guard, the package checked against its RECORD (and its ``.pyc``
  files recompiled and compared).

The three are interleaved, ``--repeat`` rounds of each, so that the load of a shared
machine falls on all of them alike. The figure is the time from starting the launcher to
the first training step done on every rank (the job writes wall-clock timestamps);
``DIR/results.json`` holds every run, the medians, the seconds each guarded mode adds to
the unguarded median and the ratio, against the budgets of DESIGN.md (2 s with a
manifest, 10 s with RECORD).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MODES = ("unguarded", "manifest", "record")
BUDGET_S = {"manifest": 2.0, "record": 10.0}
PHASES = ("imported", "initialized", "guarded", "first_step")


def trainguard(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trainguard", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"trainguard {args[0]} exited {done.returncode}: {done.stderr[-800:]}")


def launch(mode: str, work: Path, nproc: int, package: str, keys: Path, manifest: Path) -> dict:
    """One run of the job; the seconds from launch to each phase (the slowest rank's)."""
    out = work / f"{mode}-{time.time_ns()}"
    out.mkdir()
    args = [str(out), mode, "--package", package]
    if mode != "unguarded":
        args += ["--key", str(keys / "trainguard.key")]
    if mode == "manifest":
        args += ["--manifest", str(manifest), "--pubkey", str(keys / "trainguard.pub")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "benchmarks.startup.job",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the launcher, the ranks and their helpers (all waited for): what the
    # start costs whatever else the machine runs, where wall time depends on that load
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if done.returncode != 0:
        raise SystemExit(f"the {mode} job exited {done.returncode}:\n{done.stderr[-3000:]}")
    ranks = [json.loads((out / f"times-rank{r}.json").read_text()) for r in range(nproc)]
    phases = {p: round(max(t[p] for t in ranks) - started, 3) for p in PHASES}
    lines = [line for line in done.stderr.splitlines() if line.startswith("trainguard: ")]
    shutil.rmtree(out)
    return {
        "seconds": phases["first_step"],
        "cpu_s": round(cpu, 3),
        "phases": phases,
        "trainguard_lines": lines,
    }


def summarise(runs: dict[str, list[dict]]) -> dict[str, Any]:
    modes: dict[str, Any] = {}
    base = statistics.median(r["seconds"] for r in runs["unguarded"])
    base_cpu = statistics.median(r["cpu_s"] for r in runs["unguarded"])
    for mode, found in runs.items():
        median = statistics.median(r["seconds"] for r in found)
        entry: dict[str, Any] = {
            "median_s": round(median, 3),
            "runs_s": [r["seconds"] for r in found],
            "cpu_median_s": round(statistics.median(r["cpu_s"] for r in found), 3),
            "phases_median_s": {
                p: round(statistics.median(r["phases"][p] for r in found), 3) for p in PHASES
            },
            "trainguard_lines": found[0]["trainguard_lines"],
        }
        if mode in BUDGET_S:
            added = median - base
            entry.update(
                added_s=round(added, 3),
                added_cpu_s=round(statistics.median(r["cpu_s"] for r in found) - base_cpu, 3),
                ratio=round(median / base, 3),
                budget_s=BUDGET_S[mode],
                within_budget=added <= BUDGET_S[mode],
            )
        modes[mode] = entry
    return modes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each mode (median)")
    parser.add_argument("--package", default="torch", help="the distribution verified")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the job")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json")
    opts = parser.parse_args(argv)
    if opts.repeat < 1 or opts.nproc < 1:
        parser.error("--repeat and --nproc must be at least 1")
    opts.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="tg-startup-"))
    try:
        keys = work / "keys"
        trainguard("keygen", "-o", str(keys))
        manifest = work / "env.manifest"
        sealing = time.perf_counter()
        trainguard(
            "seal", "--packages", opts.package, "--key", str(keys / "trainguard.key"),
            "-o", str(manifest),
        )  # fmt: skip
        seal_s = time.perf_counter() - sealing
        roots = json.loads(manifest.read_text())["body"]["roots"]
        files = sum(len(root["files"]) for root in roots)
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for round_ in range(opts.repeat):
            for mode in MODES:
                run = launch(mode, work, opts.nproc, opts.package, keys, manifest)
                runs[mode].append(run)
                sys.stderr.write(
                    f"round {round_ + 1}/{opts.repeat} {mode:9}: first step after "
                    f"{run['seconds']:.2f} s\n"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch

    doc = {
        "command": " ".join(["python -m benchmarks.startup", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        # other jobs on a shared machine: the 1, 5 and 15 minute load before and after
        "load_avg": {"before": load_before, "after": os.getloadavg()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "package": opts.package,
        "sealed_files": files,
        "seal_s": round(seal_s, 3),
        "nproc": opts.nproc,
        "repeat": opts.repeat,
        "measure": "seconds from starting torchrun to the first step done on every rank",
        "modes": summarise(runs),
    }
    (opts.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    for mode, entry in doc["modes"].items():
        extra = ""
        if "added_s" in entry:
            verdict = "within" if entry["within_budget"] else "OVER"
            extra = (
                f"  +{entry['added_s']:.2f} s ({entry['ratio']:.2f}x), {verdict} the "
                f"{entry['budget_s']:.0f} s budget"
            )
        cpu = entry["cpu_median_s"]
        sys.stderr.write(f"{mode:9} median {entry['median_s']:.2f} s (cpu {cpu:.1f} s){extra}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
