"""``trainguard replay``: re-execute a guarded job from one of its signed checkpoints and
find the first step where the recorded run and an honest re-execution part.

The run's ledger holds, per check, every rank's fingerprint row (``check`` entries), and
per step each rank's loss, gradient norm and learning rate (the metrics files, chained
into the ledger: runtime/metrics_log.py). The replay runs the job's own command with a
plan (runtime/replay_mode.py): the Guard inside starts a run of its own from the
checkpoint, whose restore sets the model, the optimizer, every rank's RNG states and the
step count (the job restores its data position from that step), and stops the job at
``--to``. Then every step's values are compared with the record, rank by rank, and every
check's rows on the fields a faithful re-execution reproduces.

The per-step record makes bisection unnecessary: the first step whose values differ is
read off directly, in one re-execution. Where the record cannot be trusted (a metrics
file that no longer matches its chain) only the checks are compared, and the verdict
names the interval between the last agreeing and the first disagreeing check.

On the CPU a faithful replay is bitwise; on a GPU only under deterministic algorithms,
else ``--tolerance`` (relative) says how far values may differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainguard import _io
from trainguard.errors import Error, InputError
from trainguard.report.metrics import FILE_CAP
from trainguard.runtime.core import state_fresh
from trainguard.runtime.metrics_log import CHAIN0
from trainguard.runtime.replay_mode import ENV, Plan

#: the row fields a faithful re-execution reproduces (time, pids, tails and code differ;
#: the data commitment folds every batch since the Guard started, so a run resumed
#: elsewhere holds another: the interval's digest is compared instead)
REPRODUCED = (
    "params",
    "buffers",
    "modes",
    "hyperparameters",
    "lr",
    "lr0",
    "rng_torch",
    "rng_cuda",
    "optimizer_state",
)
# Python's and NumPy's generators are left out: a job restores its own copies of them
# around a resume, and its code may draw from them in places a resume moves (what they
# change in the computation shows in the per-step values)
#: fields over the interval since the last check: compared only where the replay ran the
#: whole interval
INTERVAL = ("data_interval", "data_loss", "grad_norm_mean")
_STEP_VALUES = ("loss", "grad_norm", "lr")


@dataclass
class Record:
    """What a run's ledger and metrics files say, as far as they can be trusted."""

    checks: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> payload
    #: the check entries in ledger order (a rollback repeats steps)
    sequence: list[dict[str, Any]] = field(default_factory=list)
    steps: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)  # rank -> step
    every: int = 1
    notes: list[str] = field(default_factory=list)


def read_record(run_dir: Path) -> Record:
    """The check entries and the per-step lines of ``run_dir``; lines from the first chunk
    that does not match its chain on are left out, with a note."""
    from trainguard.ledger.verify import read_entries

    entries, _ = read_entries(run_dir)
    record = Record()
    closing: dict[int, dict[str, Any]] = {}
    for entry in entries:
        payload = entry.payload if isinstance(entry.payload, dict) else {}
        if entry.kind == "check" and isinstance(payload.get("step"), int):
            record.checks[payload["step"]] = payload
            record.sequence.append(payload)
        elif entry.kind == "run.started" and isinstance(payload.get("every"), int):
            record.every = payload["every"]
        elif entry.kind == "rank.closed" and entry.actor.rank is not None:
            closing[entry.actor.rank] = payload.get("metrics") or {}
    folder = run_dir / "metrics"
    for path in sorted(folder.glob("rank*.jsonl")) if folder.is_dir() else ():
        try:
            rank = int(path.stem[4:])
        except ValueError:
            continue
        record.steps[rank] = _trusted_lines(path, rank, record, closing.get(rank, {}))
    return record


def _trusted_lines(
    path: Path, rank: int, record: Record, closing: dict[str, Any]
) -> dict[int, dict[str, Any]]:
    """The lines of one rank's file that hash to the chains the ledger holds, in the order
    the checks (then the closing entry) recorded them. Each chain is matched by hashing
    the lines that follow, one more at a time: where each chunk ends needs no step
    numbers, so restores and rollbacks (steps out of order) read like any run."""
    try:
        raw = _io.read_capped(path, FILE_CAP, "metrics file").splitlines(keepends=True)
        values = [json.loads(line) for line in raw]
        steps = [int(value["step"]) for value in values]
    except (Error, OSError, ValueError, KeyError, TypeError) as exc:
        record.notes.append(f"{path}: cannot be read as step records ({exc}); not used")
        return {}
    expected = [c.get("metrics_chain") for c in record.sequence]
    chains = [c[rank] for c in expected if isinstance(c, list) and rank < len(c)]
    if closing.get("chain"):
        chains.append(closing["chain"])
    lines: dict[int, dict[str, Any]] = {}
    link, at = CHAIN0, 0
    for wanted in chains:
        if wanted == link.hex():
            continue  # nothing written since the last one
        hasher = hashlib.blake2b(link, digest_size=8)
        end = None
        for index in range(at, len(raw)):
            hasher.update(raw[index])
            if hasher.copy().hexdigest() == wanted:
                end = index + 1
                break
        if end is None:
            record.notes.append(
                f"{path}: the lines after step {steps[at - 1] if at else 'start'} do not "
                "match the chain the ledger holds (edited, cut or reordered after they were "
                "written); not used from there on"
            )
            return lines
        lines.update(zip(steps[at:end], values[at:end], strict=True))
        link, at = bytes.fromhex(wanted), end
    if at < len(raw) and closing.get("chain"):
        record.notes.append(f"{path}: {len(raw) - at} line(s) after the last chain; not used")
    return lines


@dataclass
class Verdict:
    start: int
    last_step: int | None  # the last step the replay ran
    reproduced_to: int | None  # steps start .. reproduced_to agree, every rank
    step: int | None = None  # the first step whose values differ
    ranks: list[int] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    check: int | None = None  # the first check whose rows differ
    fields: dict[str, list[int]] = field(default_factory=dict)
    cause: str = ""
    #: the first step whose loss differs on some rank
    loss_step: int | None = None
    #: the batches differ in the first interval the replay ran whole after ``step``
    data: bool = False
    #: the step whose action the divergence is put down to: the step itself for another
    #: learning rate or other data, the step before for another state entering it
    cause_step: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return self.step is not None or self.check is not None

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "diverged": self.diverged}


def _differs(a: Any, b: Any, tolerance: float) -> bool:
    if a is None or b is None:
        return a is not b
    if tolerance <= 0:
        return bool(a != b)
    return not math.isclose(float(a), float(b), rel_tol=tolerance, abs_tol=0.0)


def compare(original: Record, replay: Record, start: int, tolerance: float = 0.0) -> Verdict:
    """The first step and the first check at which the replay parts from the record."""
    replayed = sorted({s for lines in replay.steps.values() for s in lines if s >= start})
    verdict = Verdict(start, replayed[-1] if replayed else None, None)
    verdict.notes = [*original.notes, *replay.notes]
    for step in replayed:
        ranks, values = [], {}
        for rank, lines in sorted(replay.steps.items()):
            mine, theirs = lines.get(step), original.steps.get(rank, {}).get(step)
            if mine is None or theirs is None:
                continue
            changed = {
                name: [theirs.get(name), mine.get(name)]
                for name in _STEP_VALUES
                if _differs(theirs.get(name), mine.get(name), tolerance)
            }
            if changed:
                ranks.append(rank)
                values[str(rank)] = changed
        if ranks and verdict.step is None:
            verdict.step, verdict.ranks, verdict.values = step, ranks, values
        if any("loss" in v for v in values.values()):
            verdict.loss_step = step
            break
        if verdict.step is None:
            verdict.reproduced_to = step
    _compare_checks(original, replay, start, verdict)
    if verdict.step is not None:
        verdict.data = _data_differs(original, replay, start, verdict.step)
    verdict.cause = _cause(verdict)
    verdict.cause_step = _cause_step(verdict)
    return verdict


def _cause_step(v: Verdict) -> int | None:
    if v.step is None:
        return None
    what = {name for values in v.values.values() for name in values}
    return v.step if "lr" in what or v.data else v.step - 1


def _data_differs(original: Record, replay: Record, start: int, after: int) -> bool:
    """Whether the batches differ in the first interval the replay ran whole that holds a
    step at or after ``after`` (the interval's data digest, per rank)."""
    for step in sorted(s for s in replay.checks if s > after and s in original.checks):
        if step - original.every < start:
            continue
        mine, theirs = replay.checks[step], original.checks[step]
        if "data_interval" not in mine["fields"] or "data_interval" not in theirs["fields"]:
            return False
        a, b = mine["fields"].index("data_interval"), theirs["fields"].index("data_interval")
        return any(r[a] != o[b] for r, o in zip(mine["rows"], theirs["rows"], strict=False))
    return False


def _compare_checks(original: Record, replay: Record, start: int, verdict: Verdict) -> None:
    for step in sorted(s for s in replay.checks if s > start and s in original.checks):
        mine, theirs = replay.checks[step], original.checks[step]
        whole = step - original.every >= start  # the replay ran the interval's every step
        wanted = REPRODUCED + (INTERVAL if whole else ())
        names = [n for n in wanted if n in mine["fields"] and n in theirs["fields"]]
        if not state_fresh(step, original.every):
            names = [n for n in names if n != "optimizer_state"]  # a stale hash either way
        found: dict[str, list[int]] = {}
        for name in names:
            a, b = mine["fields"].index(name), theirs["fields"].index(name)
            for rank, (row, old) in enumerate(zip(mine["rows"], theirs["rows"], strict=False)):
                if row[a] != old[b]:
                    found.setdefault(name, []).append(rank)
        if found:
            verdict.check, verdict.fields = step, found
            return


def _cause(v: Verdict) -> str:
    if not v.diverged:
        return "the replay reproduces the record"
    parts = []
    if v.step is not None:
        what = sorted({name for values in v.values.values() for name in values})
        ranks = ", ".join(str(r) for r in v.ranks)
        if "lr" in what:
            parts.append(f"step {v.step} ran with another learning rate on rank(s) {ranks}")
        else:
            data = v.data
            source = (
                "the data it read"
                if data
                else f"the state it started from (the update of step {v.step - 1} or a "
                "write after it)"
            )
            parts.append(f"step {v.step}'s {', '.join(what)} differ on rank(s) {ranks}: {source}")
    if v.check is not None:
        listed = "; ".join(f"{n} on rank(s) {', '.join(map(str, r))}" for n, r in v.fields.items())
        parts.append(f"at the check at step {v.check}: {listed}")
    return "; ".join(parts)


def text(verdict: Verdict) -> str:
    v = verdict
    lines = []
    if v.last_step is None:
        lines.append(f"the replay ran no step from {v.start}: nothing to compare")
    elif not v.diverged:
        lines.append(f"steps {v.start}-{v.last_step} reproduce bit for bit on every rank")
    else:
        if v.reproduced_to is not None:
            lines.append(f"steps {v.start}-{v.reproduced_to} reproduce bit for bit")
        if v.step is not None:
            ranks = ", ".join(map(str, v.ranks))
            lines.append(f"first divergence at step {v.step} on rank(s) {ranks}: {v.cause}")
            for rank, values in v.values.items():
                for name, (was, now) in values.items():
                    lines.append(f"  rank {rank} {name}: recorded {was}, replayed {now}")
        else:
            lines.append(f"first divergence: {v.cause}")
    lines += [f"note: {n}" for n in v.notes]
    return "\n".join(lines)


# --- running it ---------------------------------------------------------------------------


def prepare(run_dir: Path, checkpoint: Path, stop: int | None, out: Path | None) -> Plan:
    """Check the checkpoint is one the run signed and recorded; write the plan."""
    from trainguard.checkpoint.signed_file import read
    from trainguard.errors import CheckpointError
    from trainguard.ledger.verify import read_entries

    entries, _ = read_entries(run_dir)
    certificate = next((e for e in entries if e.kind == "run.certificate"), None)
    if certificate is None:
        raise InputError(f"{run_dir}: the ledger holds no run certificate")
    owner = certificate.payload.get("owner_key_id")
    run_id = certificate.payload.get("run_id") or run_dir.name
    try:
        verified = read(checkpoint, {owner})
    except CheckpointError as exc:
        raise InputError(f"{checkpoint}: {exc}") from exc
    saved = [
        e.payload
        for e in entries
        if e.kind == "checkpoint.saved"
        and e.payload.get("manifest_blake3") == verified.manifest_hash
    ]
    if not saved:
        raise InputError(f"{checkpoint}: not a checkpoint the run {run_id} recorded as saved")
    start = verified.manifest.get("step")
    if not isinstance(start, int):
        raise InputError(f"{checkpoint}: the checkpoint holds no step")
    if stop is not None and stop <= start:
        raise InputError(f"--to {stop} is not after the checkpoint's step {start}")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder = out if out is not None else run_dir.parent / f"{run_dir.name}.replay-{stamp}"
    if folder.exists() and any(folder.iterdir()):
        raise InputError(f"{folder}: exists and is not empty")
    folder.mkdir(parents=True, exist_ok=True)
    return Plan(
        str(run_dir.resolve()),
        str(run_id),
        str(checkpoint.resolve()),
        verified.manifest_hash,
        start,
        stop,
        str(folder.resolve()),
    )


def run(plan: Plan, command: Sequence[str]) -> int:
    """Run the job's command under the plan; its exit status."""
    path = Path(plan.folder) / "replay-plan.json"
    path.write_text(json.dumps(plan.describe(), indent=1))
    env = {**os.environ, ENV: str(path)}
    try:
        return subprocess.run(list(command), env=env, check=False).returncode
    except OSError as exc:
        raise InputError(f"cannot run {command[0]}: {exc.strerror or exc}") from exc


def replay(
    run_dir: Path,
    checkpoint: Path,
    command: Sequence[str],
    *,
    stop: int | None = None,
    out: Path | None = None,
    tolerance: float = 0.0,
) -> tuple[Verdict, int, Plan]:
    """Prepare, run and compare; the verdict, the command's exit status and the plan."""
    plan = prepare(run_dir, checkpoint, stop, out)
    status = run(plan, command)
    verdict = compare(read_record(run_dir), read_record(Path(plan.folder)), plan.start, tolerance)
    if status != 0:
        verdict.notes.append(f"the command exited with status {status}")
    # beside the replay's run, for the incident report (report/replays.py)
    document = {"plan": plan.describe(), "text": text(verdict), **verdict.to_json()}
    (Path(plan.folder) / "replay-verdict.json").write_text(json.dumps(document, indent=1))
    return verdict, status, plan
