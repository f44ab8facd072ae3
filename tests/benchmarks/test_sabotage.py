"""The sabotage benchmark (benchmarks/sabotage) in short: every scenario, real ranks, real files.

One run of the real runner as a subprocess, with the smallest model and 30 steps, on two
gloo ranks: the clean job twice and with another seed, then every attack scenario
(in-process implants, edited torch overlay, poisoned, altered, foreign and older
checkpoints, changed config, SIGTERM, SIGKILL and SIGSTOP from another process, records
cut while the job runs or rewritten after it), with ``--guard off``.
It checks that every scenario ran and really changed the run or its files, so the
benchmark the Guard will be judged on cannot rot. Separate short tests pin the job's
determinism in one process and the guard-on plumbing with a stand-in guard.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from benchmarks.sabotage.scenarios import SCENARIOS

REPO = Path(__file__).resolve().parents[2]
ENV_ONE_THREAD = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

#: rank-specific attacks after which the two replicas no longer hold the same weights
DESYNC = {
    "patch-optimizer-step",
    "hparam-lr",
    "hparam-betas",
    "hparam-wd",
    "grad-flip-post",
    "grad-noise-post",
    "weights-perturb",
    # issue 11's means
    "opt-state-inplace",
    "adam-function-swap",
    "lr-off-check",
    "guard-compare-lr",
    "grad-flip-off-check",
    "weights-off-check",
    "guard-hash-perturb",
    "ckpt-load-patch",
    "ledger-mute",
    "alerts-clear",
}

#: attacks on liveness that change no number, only the time (step time ratio)
SLOWERS = {"straggler", "stall-loader", "straggler-off-check", "pause-sigstop"}


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ENV_ONE_THREAD}
    return subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("sabotage")
    args = ["run", "--out", str(out), "--preset", "tiny", "--steps", "30", "--repeat", "2"]
    # every scenario of both axes; about 2 minutes on 2 idle cores, more on a busy machine
    proc = _run([sys.executable, "-m", "benchmarks.sabotage", *args], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "scenario" in proc.stdout
    assert "kill-sigkill" in proc.stdout
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    return data


def _by_name(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["attack"]: row for row in results["scenarios"]}


@pytest.mark.slow
@pytest.mark.distributed
def test_clean_job_learns_and_reproduces_bit_for_bit(results: dict[str, Any]) -> None:
    clean = results["clean"]
    assert results["world_size"] == 2
    assert results["device"] == "cpu"
    assert clean["reproducible"] is True
    assert clean["noise"]["same_seed"] == {"val_loss_delta": 0.0, "weight_l2": 0.0}
    # untrained, the loss is about ln(vocabulary) ~ 4.1; 30 tiny steps bring it well below
    assert 0 < clean["val_loss"] < 3.6
    assert clean["noise"]["different_seeds"]["val_loss_max_abs_delta"] > 0
    assert results["false_alarms"] == 0
    assert results["clean_runs"] == 3
    assert results["overhead"] is None
    assert results["controls"]["resume-clean"]["exact"] is True


@pytest.mark.slow
@pytest.mark.distributed
def test_every_scenario_ran_with_the_result_fields(results: dict[str, Any]) -> None:
    rows = _by_name(results)
    assert sorted(rows) == sorted(s.name for s in SCENARIOS)
    fields = {"attack", "number", "detected", "steps_to_detection", "detector", "rank_named"}
    for sc in SCENARIOS:
        row = rows[sc.name]
        assert fields <= set(row), sc.name
        assert row["number"] == sc.number
        assert (row["goal"], row["means"]) == (sc.goal, sc.means)
        if "implant" in row["evidence"]:  # the implant's own marker: it really acted, on rank 1
            assert row["evidence"]["implant_ran"] is not None, sc.name
        if sc.kind == "implant":
            assert row["injected"] == {"step": 10, "rank": 1}


@pytest.mark.slow
@pytest.mark.distributed
def test_each_attack_measurably_damages_the_run_or_its_files(results: dict[str, Any]) -> None:
    rows = _by_name(results)
    for sc in SCENARIOS:
        effect = rows[sc.name]["effect"]
        if sc.kind == "records":
            assert effect["records_changed"] >= 10, sc.name
            assert effect["bytes_changed"] > 0, sc.name
        elif sc.kind == "live":  # the last records deleted while the job ran
            assert effect["records_changed"] >= 5, sc.name
        elif sc.name in SLOWERS:
            assert effect["step_time_ratio"] > 1.5, sc.name
            # sleeping changes no number: also proves runs in different launches are identical
            assert effect["weight_l2"] == 0.0, sc.name
            assert effect["val_loss_delta"] == 0.0, sc.name
            assert effect.get("steps_lost", 0) == 0, sc.name
        elif sc.kind == "kill":
            assert 0 < effect["steps_lost"] < results["steps"], sc.name
        elif sc.name == "resume-older":
            # a rollback replays the run exactly: the damage is the work thrown away
            assert effect["steps_redone"] == 5
        else:
            assert effect["weight_l2"] > 0, sc.name
            assert effect["val_loss_delta"] != 0, sc.name
        if sc.name in DESYNC:
            assert effect["replica_l2"] > 0, sc.name
    assert rows["source-edit"]["evidence"]["record_mismatches"] == ["torch/optim/adam.py"]
    assert rows["resume-pickle"]["evidence"]["payload_ran"] is True
    assert rows["ckpt-bitflip"]["effect"]["bytes_changed"] > 0
    assert rows["config-change"]["effect"]["fields_changed"] == {"lr": [0.01, 0.04]}


@pytest.mark.slow
@pytest.mark.distributed
def test_without_the_guard_a_team_only_sees_the_kills(results: dict[str, Any]) -> None:
    rows = _by_name(results)
    for name, row in rows.items():
        if name.startswith("kill-"):
            assert row["detected"]
            assert row["detector"] == "crash"
            # torchrun names whichever rank it saw fail first: the killed one, or the
            # survivor it then stopped; either way nobody learns who sent the kill
            assert row["rank_named"] in (0, 1)
        else:
            assert not row["detected"], name
            assert row["steps_to_detection"] is None
            assert row["rank_named"] is None


GUARD_DOUBLE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from benchmarks.sabotage.job import JobConfig, train, write_config

    class StandIn:
        # a stand-in for trainguard.Guard (not built yet): alerts at step 4, refuses resumes
        def __init__(self, ctx):
            if ctx.config_path.read_bytes().count(b'"lr": 0.5'):
                raise RuntimeError("config differs from the submitted one")
            self.ctx, self.n, self.alerts = ctx, 0, []
        def step(self, loss, batch):
            if self.n == 4:
                self.alerts.append({"step": self.n, "rank": self.ctx.rank, "detector": "stand-in",
                                    "severity": "high", "message": "x"})
            self.n += 1
        def save_checkpoint(self, path):
            Path(path).write_bytes(b"guard checkpoint")
        def load_checkpoint(self, path, *, rollback=False, fork=False):
            raise RuntimeError("unsafe checkpoint")
        def close(self):
            self.closed = True

    out = Path(sys.argv[1])
    for name, extra in [("ok", {}), ("bad-config", {"lr": 0.5}), ("resume", {"resume_from": "x"})]:
        write_config(JobConfig(steps=8, preset="tiny", save_at=[6], **extra), out / f"{name}.json")
        train(out / f"{name}.json", out / name, lambda ctx: StandIn(ctx))
    """
)


@pytest.mark.slow
def test_guard_plumbing_reads_alerts_and_refusals(tmp_path: Path) -> None:
    proc = _run([sys.executable, "-c", GUARD_DOUBLE, str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok = json.loads((tmp_path / "ok" / "result-rank0.json").read_text())
    assert ok["status"] == "ok"
    assert ok["steps_done"] == 8
    alerts = json.loads((tmp_path / "ok" / "alerts-rank0.json").read_text())
    assert alerts == [
        {"step": 4, "rank": 0, "detector": "stand-in", "severity": "high", "message": "x"}
    ]
    assert (tmp_path / "ok" / "ckpt" / "step6.pt").read_bytes() == b"guard checkpoint"
    assert json.loads((tmp_path / "ok" / "ckpt" / "step6.pt.job.json").read_text())["step"] == 6
    for name, stage in [("bad-config", "start"), ("resume", "resume")]:
        result = json.loads((tmp_path / name / "result-rank0.json").read_text())
        assert result["status"] == "refused"
        assert result["stopped_at"] == stage
        assert result["steps_done"] == 0
        assert "RuntimeError" in result["reason"]


@pytest.mark.slow
def test_single_process_job_is_deterministic_from_its_seed(tmp_path: Path) -> None:
    from benchmarks.sabotage.job import JobConfig, write_config

    losses = {}
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        write_config(JobConfig(steps=15, preset="tiny", seed=seed), tmp_path / f"{name}.json")
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.sabotage.job",
            "--config",
            str(tmp_path / f"{name}.json"),
        ]
        proc = _run([*cmd, "--run-dir", str(tmp_path / name)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads((tmp_path / name / "result-rank0.json").read_text())
        assert result["world_size"] == 1
        assert math.isfinite(result["val_loss"])
        losses[name] = (result["losses"], result["val_loss"])
    assert losses["a"] == losses["b"]
    assert losses["a"] != losses["c"]


def test_guard_on_without_a_guard_is_one_clear_line(tmp_path: Path) -> None:
    from benchmarks.sabotage.guard_hook import guard_available

    if guard_available() is None:
        pytest.skip("trainguard.Guard exists: the guarded benchmark is exercised instead")
    proc = _run(
        [
            sys.executable,
            "-m",
            "benchmarks.sabotage",
            "run",
            "--guard",
            "on",
            "--out",
            str(tmp_path),
        ]
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "trainguard.Guard" in proc.stderr
    assert not (tmp_path / "results.json").exists()


# --- the bases: the same job with the practices of real training code --------------------

#: every base but plain (which the fixture above runs), and attacks that act on what the
#: bases change: the optimizer's step (wrapped by an lr scheduler), the lr (rewritten by the
#: scheduler), the data loader (worker processes) and a resume (the scheduler's state in the
#: checkpoint); the clean job once and its same-seed rerun
OTHER_BASES = ["workers", "accum", "sched", "practice"]
BASE_ATTACKS = ["patch-optimizer-step", "hparam-lr", "data-reshuffle", "ckpt-edit"]


@pytest.fixture(scope="module")
def base_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("sabotage-bases")
    args = ["run", "--out", str(out), "--preset", "tiny", "--steps", "15", "--repeat", "1"]
    args += ["--base", ",".join(OTHER_BASES), "--attack", ",".join(BASE_ATTACKS)]
    proc = _run([sys.executable, "-m", "benchmarks.sabotage", *args])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    return data, out


@pytest.mark.slow
@pytest.mark.distributed
def test_each_base_runs_its_practice_reproducibly_and_resumes_exactly(
    base_results: tuple[dict[str, Any], Path],
) -> None:
    from benchmarks.sabotage.job import BASES

    results, out = base_results
    assert results["bases"] == OTHER_BASES
    assert results["false_alarms"] == 0
    assert results["clean_runs"] == 2 * len(OTHER_BASES)
    assert results["wrong_rank"] == 0
    assert sorted({r["base"] for r in results["clean"]["runs"]}) == sorted(OTHER_BASES)
    for base in OTHER_BASES:
        part = results["by_base"][base]
        assert part["clean"]["reproducible"] is True, base
        assert part["clean"]["noise"]["same_seed"] == {"val_loss_delta": 0.0, "weight_l2": 0.0}
        assert part["controls"]["resume-clean"]["exact"] is True, base
        for rank in (0, 1):  # each rank really ran the base's loop
            path = out / "runs" / base / "clean" / f"result-rank{rank}.json"
            result = json.loads(path.read_text())
            assert BASES[base].items() <= result["config"].items(), base
            assert result["steps_done"] == 15


@pytest.mark.slow
@pytest.mark.distributed
def test_every_attack_still_acts_on_every_base(base_results: tuple[dict[str, Any], Path]) -> None:
    results, _ = base_results
    rows = {(row["attack"], row["base"]): row for row in results["scenarios"]}
    assert sorted(rows) == sorted((a, b) for a in BASE_ATTACKS for b in OTHER_BASES)
    for (attack, base), row in rows.items():
        effect = row["effect"]
        assert effect["weight_l2"] > 0, (attack, base)
        assert effect["val_loss_delta"] != 0, (attack, base)
        if attack in DESYNC:
            assert effect["replica_l2"] > 0, (attack, base)
        if row["kind"] == "implant":
            assert row["evidence"]["implant_ran"] is not None, (attack, base)
        else:
            assert effect["bytes_changed"] > 0, (attack, base)
        assert not row["detected"], (attack, base)
        assert row["wrong_rank"] == 0


@pytest.mark.slow
@pytest.mark.distributed
def test_guard_on_practice_no_false_alarm_and_the_right_rank(tmp_path: Path) -> None:
    """The Guard on the practice base: workers, accumulation and an lr scheduler object.

    Issue 9: clean runs of ordinary training code raise no alert, and a rank-specific attack
    (weight decay changed on rank 1, the one the loss-drift tie-break once blamed on rank 0)
    is detected with the right rank named, and no alert names another.
    """
    from benchmarks.sabotage.guard_hook import guard_available

    missing = guard_available()
    if missing is not None:
        pytest.skip(missing)
    args = ["run", "--guard", "on", "--base", "practice", "--preset", "tiny", "--steps", "30"]
    args += ["--every", "5", "--repeat", "1", "--attack", "hparam-wd", "--out", str(tmp_path)]
    args += ["--forensics", "off"]  # the report and replay are scored by the matrix runs
    proc = _run([sys.executable, "-m", "benchmarks.sabotage", *args], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    alerts = {}  # what to fix, when a clean run alarms
    for row in results["clean"]["runs"]:
        for rank in (0, 1):
            path = tmp_path / "runs" / "practice" / row["name"] / f"alerts-rank{rank}.json"
            found = json.loads(path.read_text()) if path.exists() else []
            alerts[(row["name"], rank)] = [
                (a.get("step"), a.get("rank"), a.get("detector"), a.get("message")) for a in found
            ]
    assert results["clean_runs"] == 2
    assert results["false_alarms"] == 0, alerts
    assert results["wrong_rank"] == 0, results["scenarios"]
    (row,) = results["scenarios"]
    assert row["attack"] == "hparam-wd"
    assert row["detected"], row
    assert row["rank_named"] == 1, row
