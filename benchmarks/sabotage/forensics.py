"""The incident report and replay, scored against what the benchmark injected.

For every scenario run under the Guard, ``trainguard report`` (the library behind it) is
built from the run's ledger and compared with the ground truth the runner knows:
- the first deviation step it reports against the injected step (off by at most one
  check interval counts as right; a run whose attack acts before training, a tampered
  resume say, has its truth at the resume step);
- the last clean checkpoint: the runner saves one half an interval before the injection
  and one an interval and a half after it; the first is the right answer, the second must
  be listed not to be resumed (when the attack acts before training, neither is clean);
- the GPU-hours lost (1 GPU per rank) against the job's own clock: the ranks times the
  wall time of the steps it timed from that checkpoint on.

For the in-process attacks (the implants: the attack lives in the job's process, so an
honest re-execution is the job without it), ``trainguard replay`` re-runs the job from the
clean checkpoint and its verdict's step is compared with the step the implant first
acted at (its marker file says). The replay names the step whose action differs: for a
different learning rate or different data that step, for a different state entering a
step the update before it (``replay.Verdict.cause``), so the truth is the implant's first
optimizer step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.sabotage.runner import REPO, saves


def report_score(run_dir: Path, truth_step: int, every: int, nproc: int) -> dict[str, Any]:
    """The report of one run, and how it compares with the injection."""
    from trainguard.report import build_report

    try:
        report = build_report(run_dir, gpus_per_rank=1)
    except Exception as exc:  # a run with no ledger (refused before start): no report
        return {"error": f"{type(exc).__name__}: {exc}"}
    damage = report.damage
    first = damage.first_step if damage else None
    clean = damage.last_clean if damage else None
    out: dict[str, Any] = {
        "incidents": len(report.incidents),
        "first_step": first,
        "off_by": None if first is None else first - truth_step,
        "last_clean": Path(clean.record.path).name if clean else None,
        "not_to_resume": [Path(c.record.path).name for c in damage.not_to_resume] if damage else [],
        "gpu_hours": damage.gpu_hours if damage else None,
    }
    out["first_right"] = first is not None and abs(first - truth_step) <= every
    before = [f"step{k}.pt" for k in saves(truth_step, every, 10**9) if k <= truth_step]
    out["expected_clean"] = before[-1] if before else None
    out["clean_right"] = out["last_clean"] == out["expected_clean"]
    truth = _lost_truth(run_dir, clean.record.path if clean else None, nproc)
    out["gpu_hours_truth"] = truth
    if truth and out["gpu_hours"] is not None:
        out["gpu_hours_ratio"] = out["gpu_hours"] / truth
    return out


def _lost_truth(run_dir: Path, checkpoint: str | None, nproc: int) -> float | None:
    """Ranks x the job's own wall time of the steps after the checkpoint, in hours."""
    result = run_dir / "result-rank0.json"
    if not result.exists():
        return None
    data = json.loads(result.read_text())
    times, start = data.get("step_times") or [], int(data.get("start_step") or 0)
    after = 0
    if checkpoint is not None:
        name = Path(checkpoint).stem  # stepK
        after = int(name[4:]) if name.startswith("step") and name[4:].isdigit() else 0
    seconds = sum(times[max(0, after - start) :])
    return nproc * seconds / 3600 if seconds else None


def replay_score(
    bench: Any, key: str, run_dir: Path, truth_step: int, env: dict[str, str]
) -> dict[str, Any]:
    """``trainguard replay`` of one implant run from its clean checkpoint."""
    s = bench.s
    clean = [k for k in saves(s.inject_step, s.every, s.steps) if k <= s.inject_step]
    if not clean:
        return {"error": "no checkpoint before the injection"}
    checkpoint = run_dir / "ckpt" / f"step{clean[-1]}.pt"
    if not checkpoint.exists():
        return {"error": f"{checkpoint.name} was not saved (the run stopped before it)"}
    from benchmarks.sabotage.job import JobConfig, write_config

    config = json.loads((run_dir / "config.json").read_text())
    config = {**config, "resume_from": str(checkpoint), "resume_declare": "fork", "save_at": []}
    work = bench.root / "replays" / bench.flat(key)
    job_dir = work / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    write_config(JobConfig(**config), job_dir / "config.json")
    plan = work / "plan.json"
    entry = {"name": key, "config": str(job_dir / "config.json"), "run_dir": str(job_dir)}
    plan.write_text(json.dumps([{**entry, "implant": None}], indent=1))
    command = bench.command(plan, True)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "trainguard", "replay", str(run_dir)),
            *("--from", str(checkpoint), "--out", str(work / "replay"), "--format", "json"),
            *("--", *command),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=s.timeout_s,
        check=False,
    )
    try:
        verdict = json.loads(done.stdout)
    except ValueError:
        return {"error": (done.stderr.strip().splitlines() or ["no verdict"])[-1][:300]}
    found = verdict.get("cause_step")
    return {
        "from": checkpoint.name,
        "status": done.returncode,
        "step": verdict.get("step"),
        "cause_step": found,
        "ranks": verdict.get("ranks"),
        "cause": verdict.get("cause"),
        "truth_step": truth_step,
        "exact": found == truth_step,
    }


def implant_truth(evidence: dict[str, Any], default: int) -> int:
    """The optimizer step the implant first acted at (its marker), else the injection.

    The implant starts at the post-hook of its ``step``-th optimizer step, so the first
    step its action changes is the one with that index (0-based)."""
    marker = Path(str(evidence.get("implant_marker", "")))
    if marker.is_file():
        try:
            return int(json.loads(marker.read_text())["step"])
        except (ValueError, KeyError, TypeError):
            pass
    return default


def score(bench: Any, results: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Adds ``report`` (and ``replay`` for the implants) to each scenario row; the totals."""
    s = bench.s
    totals = {"scenarios": 0, "first_right": 0, "clean_right": 0, "replayed": 0, "exact": 0}
    ratios: list[float] = []
    for row in results.get("scenarios", []):
        key = bench.key(row.get("base", "plain"), row["attack"])
        run_dir = bench.runs.get(key)
        if run_dir is None:
            continue
        evidence = row.get("evidence") or bench.evidence.get(key, {})
        implant = row.get("kind") == "implant"
        truth = implant_truth(evidence, s.inject_step) if implant else s.inject_step
        try:
            scored = report_score(Path(run_dir), truth, s.every, s.nproc)
        except Exception as exc:  # one run's scoring failing keeps the others' results
            scored = {"error": f"{type(exc).__name__}: {exc}"}
        row["report"] = scored
        totals["scenarios"] += 1
        totals["first_right"] += bool(scored.get("first_right"))
        totals["clean_right"] += bool(scored.get("clean_right"))
        if scored.get("gpu_hours_ratio") is not None:
            ratios.append(scored["gpu_hours_ratio"])
        if implant:
            try:
                replayed = replay_score(bench, key, Path(run_dir), truth, env)
            except Exception as exc:
                replayed = {"error": f"{type(exc).__name__}: {exc}"}
            row["replay"] = replayed
            totals["replayed"] += 1
            totals["exact"] += bool(replayed.get("exact"))
    if ratios:
        ratios.sort()
        totals["gpu_hours_ratio_median"] = ratios[len(ratios) // 2]
        totals["gpu_hours_ratio_range"] = [ratios[0], ratios[-1]]
    return totals
