"""Runs the reference job clean and under attack, and collects what happened.

The work is grouped into launches (one ``torchrun`` or one process each): the clean runs;
the in-process attacks (with the implant's sitecustomize first on PYTHONPATH); the resume
and configuration attacks (after the clean reference has written the checkpoint they start
from); the edited environment; each kill (with its attacker process); and the record
rewrites (on a copy of the clean run's folder, after it ended). In ``batch`` mode a launch
runs its jobs one after another in one process group, which saves the start-up cost; in
``isolate`` mode every job gets its own launch (the default with the Guard on, because a
Guard that halts one job must not take the others down with it).

Every job runs on each chosen base (``job.BASES``: the plain loop, or the loop with
DataLoader workers, gradient accumulation, an lr scheduler object, or all three); batch
launches hold the jobs of every base.

Everything is written under ``OUT``: ``runs/NAME/`` per job of the plain base and
``runs/BASE/NAME/`` per job of another (config, logs, checkpoints, results, final weights),
``work/`` for the attackers' material, ``launches/`` for the launchers' output;
``evaluate.py`` turns them into ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.sabotage import attackers, implant
from benchmarks.sabotage.job import BASES, JobConfig, write_config
from benchmarks.sabotage.scenarios import Scenario

REPO = Path(__file__).resolve().parents[2]


#: the checkpoints a guarded scenario run saves, relative to the injection, in check
#: intervals: one clean (before it), one the incident report must say not to resume
SAVE_OFFSETS = (-0.5, 1.5)


def saves(inject: int, every: int, steps: int) -> list[int]:
    """The completed-step counts a guarded scenario run checkpoints at."""
    found = [inject + int(offset * every) for offset in SAVE_OFFSETS]
    return [k for k in found if 0 < k < steps]


@dataclass
class Settings:
    out: Path
    steps: int = 300
    seed: int = 0
    preset: str = "cpu"
    nproc: int = 2
    guard: bool = False
    repeat: int = 3
    mode: str = "batch"
    every: int = 50
    timeout_s: float = 1800.0
    bases: tuple[str, ...] = ("plain",)
    guard_loader: bool = True  # pass the job's DataLoader to the Guard (loader=)

    @property
    def inject_step(self) -> int:
        return max(1, self.steps // 3)

    @property
    def attacked_rank(self) -> int:
        return self.nproc - 1


@dataclass
class Launch:
    """One launcher invocation and what came back."""

    name: str
    entries: list[dict[str, Any]]
    pythonpath: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    guard: bool = False
    attacker: list[str] | None = None  # a command run alongside (the killer)
    returncode: int | None = None
    wall_s: float = 0.0
    log: str = ""


class Bench:
    """Prepares run folders and launches; ``runs`` maps job names to their folders."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.root = settings.out
        self.runs: dict[str, Path] = {}
        self.launches: list[Launch] = []
        self.evidence: dict[str, dict[str, Any]] = {}
        for sub in ("runs", "work", "launches"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.guard_env: dict[str, str] = {}
        if settings.guard:
            # the job owner's signing key, kept outside the runs (the Guard signs its ledger
            # and checkpoints under it); made once per invocation
            keys = self.root / "work" / "owner-key"
            if not (keys / "trainguard.key").exists():
                cmd = [sys.executable, "-m", "trainguard", "keygen", "-o", str(keys)]
                subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
            self.guard_env["TRAINGUARD_OWNER_KEY"] = str(keys / "trainguard.key")
            self.guard_env["SABOTAGE_GUARD_LOADER"] = "1" if settings.guard_loader else "0"

    # --- jobs ------------------------------------------------------------------------

    def config(self, base: str, **overrides: Any) -> JobConfig:
        s = self.s
        cfg = JobConfig(steps=s.steps, seed=s.seed, preset=s.preset, guard_every=s.every)
        if s.guard:  # the checkpoints the incident report is scored on (forensics.py)
            cfg = dataclasses.replace(cfg, save_at=saves(s.inject_step, s.every, s.steps))
        return dataclasses.replace(cfg, **BASES[base], **overrides)

    @staticmethod
    def key(base: str, name: str) -> str:
        """A job's name in ``runs``: ``NAME`` on the plain base, ``BASE/NAME`` on another."""
        return name if base == "plain" else f"{base}/{name}"

    @staticmethod
    def flat(key: str) -> str:
        """``key`` as one file name (for the attackers' material and the launches)."""
        return key.replace("/", "-")

    def job(
        self, name: str, cfg: JobConfig, implant_spec: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A run folder with its config and submission record; returns the plan entry."""
        run_dir = self.root / "runs" / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        digest = write_config(cfg, run_dir / "config.json")
        submission = {"config": "config.json", "sha256": digest, "submitted_at": time.time()}
        (run_dir / "submission.json").write_text(json.dumps(submission, indent=1))
        self.runs[name] = run_dir
        return {
            "name": name,
            "config": str(run_dir / "config.json"),
            "run_dir": str(run_dir),
            "implant": implant_spec,
        }

    # --- launching -------------------------------------------------------------------

    def command(self, plan: Path, guard: bool) -> list[str]:
        job = [
            "-m",
            "benchmarks.sabotage.job",
            "--plan",
            str(plan),
            "--guard",
            "on" if guard else "off",
        ]
        if self.s.nproc == 1:
            return [sys.executable, *job]
        torchrun = [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(self.s.nproc),
        ]
        return [sys.executable, *torchrun, *job]

    def launch(self, launch: Launch) -> None:
        """Runs ``launch`` (split per job in isolate mode) and records how it ended."""
        if self.s.mode == "isolate" and len(launch.entries) > 1:
            for entry in launch.entries:
                name = self.flat(f"{launch.name}-{entry['name']}")
                single = dataclasses.replace(launch, name=name, entries=[entry])
                self.launch(single)
            return
        plan = self.root / "launches" / f"{launch.name}.plan.json"
        plan.write_text(json.dumps(launch.entries, indent=1))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SABOTAGE_")}
        paths = [*launch.pythonpath, str(REPO), *filter(None, [env.get("PYTHONPATH")])]
        env.update({"PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1", **launch.env})
        if launch.guard:
            env.update(self.guard_env)
        started = time.perf_counter()
        with open(self.root / "launches" / f"{launch.name}.log", "w+") as log:
            proc = subprocess.Popen(
                self.command(plan, launch.guard),
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            attacker = None
            if launch.attacker:
                attacker = subprocess.Popen(launch.attacker, cwd=REPO, env=env)
            try:
                launch.returncode = proc.wait(timeout=self.s.timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                launch.returncode = proc.wait()
            if attacker is not None:
                try:
                    attacker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    attacker.kill()
            log.seek(0)
            launch.log = log.read()
        launch.wall_s = time.perf_counter() - started
        for entry in launch.entries:
            entry["launch"] = launch.name
        self.launches.append(launch)

    # --- the phases --------------------------------------------------------------------

    def clean_runs(self, scenarios: Sequence[Scenario] = ()) -> list[str]:
        """Per base: the reference (seed S, checkpoint at K), its rerun, and repeat-1 seeds.

        ``resume-older`` needs the reference to checkpoint at K/2 as well, and
        ``resume-other-run`` another run (seed S+1, not a clean run of the table) that
        checkpoints at K: the donor.
        """
        s, k = self.s, self.s.inject_step
        modes = {sc.params.get("mode") for sc in scenarios if sc.kind == "resume"}
        saves = [k // 2, k] if "older" in modes and k // 2 > 0 else [k]
        if s.guard:  # the scenario runs' checkpoints too: the same schedule, the same run
            saves = sorted({*saves, *self.config("plain").save_at})
        entries = []
        for base in s.bases:
            entries += [
                self.job(self.key(base, "clean"), self.config(base, save_at=saves)),
                self.job(self.key(base, "clean-rerun"), self.config(base)),
            ]
            if "other-run" in modes:
                donor = self.config(base, seed=s.seed + 1, save_at=[k])
                entries.append(self.job(self.key(base, "donor-run"), donor))
            entries += [
                self.job(
                    self.key(base, f"clean-seed{s.seed + i}"), self.config(base, seed=s.seed + i)
                )
                for i in range(1, s.repeat)
            ]
        self.launch(Launch("clean", entries, guard=s.guard))
        if s.guard:  # the same job without the Guard, in the same invocation, for the overhead
            plain = [
                self.job(self.key(base, "clean-unguarded"), self.config(base)) for base in s.bases
            ]
            self.launch(Launch("unguarded", plain))
        return [e["name"] for e in entries]

    def implant_runs(self, scenarios: list[Scenario]) -> None:
        if not scenarios:
            return
        site = implant.sitecustomize_dir(self.root / "work" / "implant")
        entries = []
        for base in self.s.bases:
            for sc in scenarios:
                key = self.key(base, sc.name)
                marker = self.root / "work" / f"{self.flat(key)}.implant-ran.json"
                marker.unlink(missing_ok=True)
                spec = {
                    **sc.params,
                    "step": self.s.inject_step,
                    "rank": self.s.attacked_rank,
                    "every": self.s.every,  # the job's guard_every: which steps are checked
                    "marker": str(marker),
                }
                entries.append(self.job(key, self.config(base), spec))
                self.evidence[key] = {"implant": spec, "implant_marker": str(marker)}
        self.launch(Launch("implant", entries, pythonpath=[str(site)], guard=self.s.guard))

    def resume_runs(self, scenarios: list[Scenario]) -> None:
        """Resume-from-checkpoint and configuration attacks; needs each base's reference.

        A pickle payload's hook outlives its job: one ``resume-pickle`` job ends the launch
        of the others, each further one (on another base) gets a launch of its own.
        """
        if not scenarios:
            return
        entries, pickles, early = [], [], []
        for base in self.s.bases:
            for entry in self._resume_entries(base, scenarios):
                is_pickle = entry["name"] == self.key(base, "resume-pickle")
                if "early" in entry:
                    early.append(entry)
                else:
                    (pickles if is_pickle else entries).append(entry)
        self.launch(Launch("resume", entries + pickles[:1], guard=self.s.guard))
        for entry in pickles[1:]:
            self.launch(Launch(self.flat(entry["name"]), [entry], guard=self.s.guard))
        # a patch in place before the job's code runs: a launch of its own, with the implant
        # first on PYTHONPATH and the attack in SABOTAGE_EARLY
        site = implant.sitecustomize_dir(self.root / "work" / "implant")
        for entry in early:
            env = {"SABOTAGE_EARLY": json.dumps(entry.pop("early"))}
            self.launch(
                Launch(
                    self.flat(entry["name"]),
                    [entry],
                    pythonpath=[str(site)],
                    env=env,
                    guard=self.s.guard,
                )
            )

    def _resume_entries(self, base: str, scenarios: list[Scenario]) -> list[dict[str, Any]]:
        k = self.s.inject_step
        clean = self.runs[self.key(base, "clean")]
        source = clean / "ckpt" / f"step{k}.pt"
        if not source.exists():
            result = json.loads((clean / "result-rank0.json").read_text() or "{}")
            why = f"status {result.get('status')}: {result.get('reason')}"
            raise RuntimeError(
                f"the clean reference run of base {base} wrote no checkpoint at step {k} ({why})"
            )
        entries = []
        resumes = [sc for sc in scenarios if sc.kind == "resume"]
        if resumes:  # the control: the same resume from the untouched checkpoint
            key = self.key(base, "resume-clean")
            ckpt = self._copy_ckpt(source, key)
            entries.append(self.job(key, self.config(base, resume_from=str(ckpt))))
        for sc in scenarios:
            key = self.key(base, sc.name)
            if sc.kind == "config":
                entry = self.job(key, self.config(base))
                changes = {"lr": self.config(base).lr * 4}
                self.evidence[key] = attackers.tamper_config(Path(entry["config"]), changes)
            elif sc.params.get("mode") == "other-run":
                # another run's checkpoint of the same owner, resumed as if it were this
                # run's own (no fork declared)
                path = self._copy_ckpt(
                    self.runs[self.key(base, "donor-run")] / "ckpt" / source.name, key
                )
                self.evidence[key] = {"resumed_from": "donor-run", "declared": "none"}
                cfg = self.config(base, resume_from=str(path), resume_declare="none")
                entry = self.job(key, cfg)
            elif sc.params.get("mode") == "older":
                entry = self._older_entry(base, key, clean)
            elif sc.params.get("mode") == "load-patch":
                path = self._copy_ckpt(source, key)
                entry = self.job(key, self.config(base, resume_from=str(path)))
                marker = self.root / "work" / f"{self.flat(key)}.implant-ran.json"
                marker.unlink(missing_ok=True)
                entry["early"] = {
                    **sc.params["early"],
                    "rank": self.s.attacked_rank,
                    "marker": str(marker),
                }
                self.evidence[key] = {"implant": entry["early"], "implant_marker": str(marker)}
            elif sc.name == "resume-pickle":
                path = self._copy_ckpt(source, key)
                marker = self.root / "work" / f"{self.flat(key)}.payload-ran"
                marker.unlink(missing_ok=True)
                self.evidence[key] = attackers.poison_checkpoint(path, path, marker)
                entry = self.job(key, self.config(base, resume_from=str(path)))
            else:
                path = self._copy_ckpt(source, key)
                self.evidence[key] = attackers.tamper_checkpoint(
                    path, sc.params["mode"], self.s.seed
                )
                entry = self.job(key, self.config(base, resume_from=str(path)))
            entries.append(entry)
        return entries

    def _older_entry(self, base: str, key: str, clean: Path) -> dict[str, Any]:
        """The same run resumed from its older checkpoint (K/2) without declaring a
        rollback: the run's folder (its ledger and checkpoints) carried over, the job's
        own outputs left behind."""
        k = self.s.inject_step
        older = f"step{k // 2}.pt"
        cfg = self.config(base, resume_declare="none")
        entry = self.job(key, cfg)
        run_dir = Path(entry["run_dir"])
        own = ("config.json", "submission.json", "train.log", "result-", "weights-", "alerts-")
        for item in clean.iterdir():
            if item.name.startswith(own) or item.name == "pids":
                continue
            copy = shutil.copytree if item.is_dir() else shutil.copy2
            copy(item, run_dir / item.name)
        cfg = dataclasses.replace(cfg, resume_from=str(run_dir / "ckpt" / older))
        digest = write_config(cfg, run_dir / "config.json")
        submission = {"config": "config.json", "sha256": digest, "submitted_at": time.time()}
        (run_dir / "submission.json").write_text(json.dumps(submission, indent=1))
        self.evidence[key] = {
            "resumed_from": older,
            "latest": f"step{k}.pt",
            "declared": "none",
            "steps_redone": k - k // 2,  # the work the rollback throws away
        }
        return entry

    def _copy_ckpt(self, source: Path, key: str) -> Path:
        dest = self.root / "work" / "ckpt" / self.flat(key) / source.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        for file in source.parent.glob(source.name + "*"):  # the checkpoint and any sidecar
            copy = shutil.copytree if file.is_dir() else shutil.copy2
            copy(file, dest.parent / file.name)
        return dest

    def overlay_run(self, sc: Scenario) -> None:
        overlay = self.root / "work" / "overlay"
        if overlay.exists():
            shutil.rmtree(overlay)
        info = attackers.build_overlay(overlay)
        info["record_mismatches"] = attackers.record_mismatches(overlay)
        entries = []
        for base in self.s.bases:
            key = self.key(base, sc.name)
            self.evidence[key] = dict(info)
            entries.append(self.job(key, self.config(base)))
        env = {"PYTHONDONTWRITEBYTECODE": "1"}
        self.launch(
            Launch(sc.name, entries, pythonpath=[str(overlay)], env=env, guard=self.s.guard)
        )

    def kill_run(self, sc: Scenario, base: str) -> None:
        key = self.key(base, sc.name)
        entry = self.job(key, self.config(base))
        record = self.root / "work" / f"{self.flat(key)}.kill.json"
        record.unlink(missing_ok=True)
        attacker = [sys.executable, "-m", "benchmarks.sabotage.attackers"]
        where = ["--run-dir", entry["run_dir"], "--after-step", str(self.s.inject_step)]
        if sc.kind == "live":
            attacker += ["cut", *where, "--count", str(sc.params.get("count", 5))]
        else:
            attacker += ["kill", *where, "--rank", str(self.s.attacked_rank)]
            attacker += ["--signal", sc.params["signal"]]
            attacker += ["--pause", str(sc.params.get("pause_s", 5.0))]
        attacker += ["--out", str(record)]
        self.evidence[key] = {"record": str(record)}
        self.launch(Launch(self.flat(key), [entry], attacker=attacker, guard=self.s.guard))

    def records_run(self, sc: Scenario, base: str) -> None:
        """Rewrites a finished run's records: a copy of the base's clean reference's folder."""
        key = self.key(base, sc.name)
        run_dir = self.root / "runs" / key
        if run_dir.exists():
            shutil.rmtree(run_dir)
        shutil.copytree(
            self.runs[self.key(base, "clean")], run_dir, ignore=shutil.ignore_patterns("ckpt")
        )
        self.runs[key] = run_dir
        ledger = [sys.executable, "-m", "trainguard", "ledger"]
        head = self.root / "work" / f"{self.flat(key)}.head.json"
        if self.s.guard:
            # what the team keeps outside the run folder when the run ends: without it, a
            # ledger whose tail was cut reads as a run that is still open
            cmd = [*ledger, "head", str(run_dir), "--format", "json"]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
            head.write_text(proc.stdout)
        info = attackers.tamper_records(run_dir, sc.params["mode"], first=self.s.inject_step)
        if self.s.guard:
            verify = [*ledger, "verify", str(run_dir), "--format", "json"]
            if head.stat().st_size:
                verify += ["--head", str(head)]
            proc = subprocess.run(verify, cwd=REPO, capture_output=True, text=True, check=False)
            info["ledger_verify"] = {
                "command": verify[1:],
                "returncode": proc.returncode,
                "stdout": proc.stdout[-4000:],
                "stderr": proc.stderr[-2000:],
            }
        self.evidence[key] = info


def run_all(settings: Settings, scenarios: list[Scenario]) -> Bench:
    """All launches for ``scenarios`` on every base plus the clean runs, in dependency order."""
    bench = Bench(settings)
    bench.clean_runs(scenarios)
    bench.implant_runs([sc for sc in scenarios if sc.kind == "implant"])
    bench.resume_runs([sc for sc in scenarios if sc.kind in ("resume", "config")])
    for sc in scenarios:
        if sc.kind == "overlay":
            bench.overlay_run(sc)
        for base in settings.bases:
            if sc.kind in ("kill", "live"):
                bench.kill_run(sc, base)
            elif sc.kind == "records":
                bench.records_run(sc, base)
    return bench
