"""The incident report and replay, scored against what the benchmark injected.

For every scenario run under the Guard, ``trainguard report`` (the library behind it) is
built from the run's ledger and compared with the ground truth the runner knows:
- the first deviation step it reports against the injected step: within one check
  interval counts as right; an attack before training (a tampered resume, an edited
  environment) is right when the report's first step is the run's start; an attack on the
  records after the run is right when the report says the ledger is not intact;
- the last clean checkpoint: guarded runs save one half an interval before the injection
  and one an interval and a half after it; the first is the right answer (none when the
  attack came before training; any before the first evidence when the attack changed
  nothing the job computed, a straggler say);
- the GPU-hours lost (1 GPU per rank) against the job's own clock: the ranks times the
  wall time of the steps it timed from that checkpoint on.

For the in-process attacks (the implants: the attack lives in the job's process, so an
honest re-execution is the job without it), ``trainguard replay`` re-runs the job from the
clean checkpoint. Its first step with a different loss is compared with the ground
truth: the first step at which the attacked run's own losses differ from the clean run's
(same seed, same checkpoint schedule; none for an attack that changed nothing computed,
whose right verdict is "reproduces"). ``python -m benchmarks.sabotage.forensics DIR``
scores a finished run's folder again without re-running anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.sabotage.runner import REPO, saves


def report_score(
    run_dir: Path, truth_step: int | str, every: int, nproc: int, changed: bool = True
) -> dict[str, Any]:
    """The report of one run, and how it compares with the injection (``truth_step``: the
    step, or "before-start" / "after-run"; ``changed``: whether the attack changed what
    the job computed, from its effect against the clean run)."""
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
        "last_clean": Path(clean.record.path).name if clean else None,
        "not_to_resume": [Path(c.record.path).name for c in damage.not_to_resume] if damage else [],
        "gpu_hours": damage.gpu_hours if damage else None,
    }
    out["truth"] = truth_step
    if truth_step == "after-run":  # the records themselves: the report says the ledger is
        out["first_right"] = not report.model.intact  # not intact, and no more
        out["off_by"] = None
        out["expected_clean"] = out["last_clean"]
    elif truth_step == "before-start":  # refused or caught at the start: nothing trained
        out["first_right"] = first is not None and first <= _start_step(run_dir)
        out["off_by"] = None
        out["expected_clean"] = None
    else:
        assert isinstance(truth_step, int)
        out["off_by"] = None if first is None else first - truth_step
        out["first_right"] = first is not None and abs(first - truth_step) <= every
        before = [f"step{k}.pt" for k in saves(truth_step, every, 10**9) if k <= truth_step]
        out["expected_clean"] = before[-1] if before else None
        if not changed and out["last_clean"] is not None:
            # the attack changed no value (time only): any checkpoint before the first
            # evidence is as clean as the one before the attack
            out["expected_clean"] = out["last_clean"]
    out["clean_right"] = out["last_clean"] == out["expected_clean"]
    truth = _lost_truth(run_dir, clean.record.path if clean else None, nproc)
    out["gpu_hours_truth"] = truth
    if truth and out["gpu_hours"] is not None:
        out["gpu_hours_ratio"] = out["gpu_hours"] / truth
    return out


def _start_step(run_dir: Path) -> int:
    result = run_dir / "result-rank0.json"
    if not result.exists():
        return 0
    return int(json.loads(result.read_text()).get("start_step") or 0)


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
    bench: Any,
    key: str,
    run_dir: Path,
    truth_step: int | None,
    env: dict[str, str],
    changed: bool,
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
    return _replay_row(key, checkpoint.name, done.returncode, verdict, truth_step, changed)


def _replay_row(
    key: str,
    start: str,
    status: int,
    verdict: dict[str, Any],
    truth_step: int | None,
    changed: bool,
) -> dict[str, Any]:
    """The replay's first differing loss against the first step whose loss the attack
    changed (the job's own record against the clean run's)."""
    found = verdict.get("loss_step")
    return {
        "from": start,
        "status": status,
        "step": verdict.get("step"),
        "loss_step": found,
        "cause_step": verdict.get("cause_step"),
        "ranks": verdict.get("ranks"),
        "cause": verdict.get("cause"),
        "truth_step": truth_step,
        "exact": found == truth_step if changed else not verdict.get("diverged"),
        "off_by": None if found is None or truth_step is None else found - truth_step,
    }


def rescore_replay(
    work: Path, original: Path, key: str, truth_step: int | None, changed: bool
) -> dict[str, Any]:
    """A replay already run (``work/replay``), compared again with the current code."""
    from trainguard import replay as replaying

    plan = json.loads((work / "replay" / "replay-plan.json").read_text())
    verdict = replaying.compare(
        replaying.read_record(original),
        replaying.read_record(work / "replay"),
        int(plan["start"]),
    )
    start = Path(plan["checkpoint"]).name
    status = 1 if verdict.diverged else 0
    return _replay_row(key, start, status, verdict.to_json(), truth_step, changed)


def first_difference(run_dir: Path, clean_dir: Path | None) -> int | None:
    """The first step at which some rank's loss (the job's own record) differs from the
    clean run's: the ground truth of where an attack first changed the computation
    (None: it changed no loss in the steps the run made)."""
    if clean_dir is None:
        return None
    first: int | None = None
    for result in sorted(run_dir.glob("result-rank*.json")):
        clean = clean_dir / result.name
        if not clean.exists():
            continue
        mine, ref = json.loads(result.read_text()), json.loads(clean.read_text())
        start = int(mine.get("start_step") or 0)
        base = int(ref.get("start_step") or 0)
        ref_losses = ref.get("losses") or []
        for i, loss in enumerate(mine.get("losses") or []):
            j = start + i - base
            if 0 <= j < len(ref_losses) and loss != ref_losses[j]:
                step = start + i
                first = step if first is None else min(first, step)
                break
    return first


def score(bench: Any, results: dict[str, Any], env: dict[str, str] | None) -> dict[str, Any]:
    """Adds ``report`` (and ``replay`` for the implants) to each scenario row; the totals.
    ``env`` None: the replays already run are compared again, not run (a rescore)."""
    s = bench.s
    totals = {"scenarios": 0, "first_right": 0, "clean_right": 0, "replayed": 0, "exact": 0}
    ratios: list[float] = []
    for row in results.get("scenarios", []):
        key = bench.key(row.get("base", "plain"), row["attack"])
        run_dir = bench.runs.get(key)
        if run_dir is None:
            continue
        implant = row.get("kind") == "implant"
        injected = (row.get("injected") or {}).get("step", s.inject_step)
        # where the attack first changed what the job computed (its losses against the
        # clean run's, same seed and schedule): None, it changed nothing it computed
        clean = bench.runs.get(bench.key(row.get("base", "plain"), "clean"))
        truth = first_difference(Path(run_dir), Path(clean) if clean else None)
        changed = truth is not None
        try:
            scored = report_score(Path(run_dir), injected, s.every, s.nproc, changed)
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
                if env is None:
                    work = bench.root / "replays" / bench.flat(key)
                    replayed = rescore_replay(work, Path(run_dir), key, truth, changed)
                else:
                    replayed = replay_score(bench, key, Path(run_dir), truth, env, changed)
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


class _Finished:
    """What ``score`` needs of a Bench, read back from a finished run's folder."""

    def __init__(self, out: Path, results: dict[str, Any]) -> None:
        from benchmarks.sabotage.runner import Bench, Settings

        self.root = out
        steps, every = int(results["steps"]), int(results["every"])
        self.s = Settings(out, steps=steps, every=every, nproc=int(results["world_size"]))
        self.key, self.flat = Bench.key, Bench.flat
        self.runs = {p.name: p for p in (out / "runs").iterdir() if p.is_dir()}
        for base in (out / "runs").iterdir():
            for p in base.iterdir() if base.is_dir() and base.name in results["bases"] else ():
                if p.is_dir():
                    self.runs[f"{base.name}/{p.name}"] = p
        self.evidence: dict[str, Any] = {}


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.sabotage.forensics DIR``: score a finished run's folder again
    (the reports rebuilt, the replays already run compared again; nothing re-executed)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.sabotage.forensics")
    parser.add_argument("out", type=Path, help="the --out folder of a guarded run or matrix")
    args = parser.parse_args(argv)
    path = args.out / "results.json"
    results = json.loads(path.read_text())
    results["forensics"] = score(_Finished(args.out, results), results, None)
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results["forensics"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
