"""Turns the runner's run folders into results.json: detection, effect, noise, overhead.

Detection without the Guard is what a team sees today: the loss's NaN/Inf check firing
(``nan-check``) or the job visibly crashing (``crash``). With the Guard it is what the Guard
reported: alerts from ``alerts-rank{r}.json`` (dumped by the job at close) and
``alerts-rank{r}.jsonl`` (appended by the Guard as it raises, for processes that never
reach close), the job refusing to start or resume, or ``trainguard ledger verify`` failing
on the run folder. The effect of an attack is measured against the clean run with the same
seed: validation-loss difference and L2 distance of the final weights, plus whatever fits
the attack (step time, steps lost, bytes or records altered).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.sabotage.runner import Bench, Launch, Settings
from benchmarks.sabotage.scenarios import Scenario


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


class Run:
    """What one job left in its folder."""

    def __init__(self, run_dir: Path, nproc: int) -> None:
        self.dir = run_dir
        self.results = [_json(run_dir / f"result-rank{r}.json") for r in range(nproc)]
        self.weight_files = [run_dir / f"weights-rank{r}.pt" for r in range(nproc)]
        log = run_dir / "train.log"
        self.log_lines = log.read_text().splitlines() if log.exists() else []
        self.alerts: list[dict[str, Any]] = []
        seen: set[tuple[Any, ...]] = set()
        for r in range(nproc):
            found = _json(run_dir / f"alerts-rank{r}.json") or []
            lines = run_dir / f"alerts-rank{r}.jsonl"
            if lines.exists():
                found += [json.loads(x) for x in lines.read_text().splitlines() if x.strip()]
            # an alert is in both files, and one seen by every rank is one incident
            for alert in found:
                key = tuple(str(alert.get(k)) for k in ("step", "rank", "detector", "message"))
                if key not in seen:
                    seen.add(key)
                    self.alerts.append(alert)

    @property
    def complete(self) -> bool:
        return all(r is not None for r in self.results)

    @property
    def r0(self) -> dict[str, Any]:
        return self.results[0] or {}

    def weights(self, rank: int) -> dict[str, torch.Tensor] | None:
        path = self.weight_files[rank]
        try:
            return torch.load(path, weights_only=True) if path.exists() else None
        except (OSError, RuntimeError, EOFError):  # a rank ended while writing them
            return None

    def mean_step_time(self) -> float | None:
        times = [r["step_times"] for r in self.results if r and r["step_times"]]
        if not times:
            return None
        # the slowest rank sets the pace; the first tenth of steps is warm-up
        return max(statistics.fmean(t[len(t) // 10 :] or t) for t in times)


def l2(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> float | None:
    if a is None or b is None:
        return None
    total = sum(
        float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a if a[k].is_floating_point()
    )
    return math.sqrt(total)


def _torchrun_rank(log: str) -> int | None:
    """The rank torchrun's error summary names as the root cause, if any."""
    tail = log.split("Root Cause", 1)[-1] if "Root Cause" in log else ""
    found = re.search(r"rank\s*:\s*(\d+)", tail)
    return int(found.group(1)) if found else None


def effect(run: Run, ref: Run, nproc: int) -> dict[str, Any]:
    out: dict[str, Any] = {"steps_done": run.r0.get("steps_done", len(run.log_lines))}
    if run.r0.get("val_loss") is not None:
        out["val_loss"] = run.r0["val_loss"]
        out["val_loss_delta"] = run.r0["val_loss"] - ref.r0["val_loss"]
    if run.r0.get("losses") and ref.r0.get("losses"):
        out["final_loss_delta"] = run.r0["losses"][-1] - ref.r0["losses"][-1]
    ref_w = ref.weights(0)
    distances = [l2(run.weights(r), ref_w) for r in range(nproc)]
    if all(d is not None for d in distances):
        out["weight_l2"] = max(d for d in distances if d is not None)
    if nproc > 1:
        out["replica_l2"] = l2(run.weights(0), run.weights(nproc - 1))
    mine, theirs = run.mean_step_time(), ref.mean_step_time()
    if mine and theirs:
        out["step_time_ratio"] = mine / theirs
    return out


def _from_attacker(alert: dict[str, Any]) -> bool:
    """Whether a signal alert's sender is the attacker's process (or not known)."""
    details = alert.get("details") or {}
    if isinstance(details, str):  # the job's own alerts file keeps details as text
        known = "'sender_pid': None" not in details
        return not known or "benchmarks.sabotage.attackers" in details
    known = bool(details.get("sender_pid"))
    return not known or "benchmarks.sabotage.attackers" in str(details.get("sender") or "")


def wrong_rank(sc: Scenario, run: Run, s: Settings) -> int:
    """Alerts at or after the attack that name a rank the attack did not act on.

    For attacks at step K on one rank, alerts before K are not about the attack (they are
    counted by ``alerts``, like false alarms). An alert with no rank names nobody.
    """
    acted = sc.acts_on(s.nproc, s.attacked_rank)
    since = s.inject_step if sc.timed else 0
    wrong = 0
    for alert in run.alerts:
        named = alert.get("rank")
        if (alert.get("step") or 0) < since or named is None:
            continue
        if alert.get("detector") == "signal" and not _from_attacker(alert):
            # the rank that received a signal from someone else (the launcher stopping the
            # survivors after the attacked rank died): a fact about that rank, not blame
            continue
        ranks = named if isinstance(named, list) else [named]
        wrong += any(int(r) not in acted for r in ranks)
    return wrong


def detection(
    sc: Scenario | None, run: Run, launch: Launch | None, bench: Bench, evidence: dict[str, Any]
) -> dict[str, Any]:
    """detected, steps_to_detection, detector, rank_named, stopped_before_training."""
    s, k = bench.s, bench.s.inject_step
    found: dict[str, Any] = {"detected": False, "steps_to_detection": None, "detector": None}
    found.update({"rank_named": None, "stopped_before_training": False, "alerts": len(run.alerts)})
    statuses = [r["status"] for r in run.results if r]
    # in batch mode a launch that failed later still leaves this job's results complete
    crashed = launch is not None and not run.complete
    found["status"] = "crashed" if crashed else (statuses[0] if statuses else "missing")
    if s.guard:
        refused = [r for r in run.results if r and r["status"] == "refused"]
        first = sc is not None and sc.timed
        alerts = sorted(
            (a for a in run.alerts if not first or (a.get("step") or 0) >= k),
            key=lambda a: a.get("step") or 0,
        )
        if refused:
            found.update(
                detected=True,
                steps_to_detection=0,
                detector=(alerts[0]["detector"] if alerts else "refused"),
            )
            found["stopped_before_training"] = all(
                r["steps_done"] == r["start_step"] for r in refused
            )
            found["rank_named"] = alerts[0].get("rank") if alerts else refused[0]["rank"]
            found["reason"] = refused[0]["reason"]
        elif alerts:
            a = alerts[0]
            start = k if first else run.r0.get("start_step", 0)
            found.update(
                detected=True,
                steps_to_detection=(a.get("step") or 0) - start,
                detector=a.get("detector"),
            )
            found["rank_named"] = a.get("rank")
            found["message"] = a.get("message")
        elif sc is not None and sc.kind == "records":
            verify = evidence.get("ledger_verify", {})
            if verify.get("returncode") == 1:
                found.update(detected=True, detector="ledger verify")
        if found["detected"] and found["steps_to_detection"] is not None:
            found["within_2_intervals"] = found["steps_to_detection"] <= 2 * s.every
        return found
    nan = [r for r in run.results if r and r["status"] == "nan"]
    if nan:
        step = nan[0]["steps_done"] - 1
        start = k if sc is not None and sc.timed else nan[0]["start_step"]
        found.update(detected=True, steps_to_detection=step - start, detector="nan-check")
    elif crashed:
        found.update(
            detected=True, detector="crash", rank_named=_torchrun_rank(launch.log if launch else "")
        )
        done = len(run.log_lines)
        found["steps_to_detection"] = (
            max(0, done - k) if sc is not None and sc.kind == "kill" else 0
        )
    return found
