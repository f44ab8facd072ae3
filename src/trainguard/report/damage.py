"""What the incidents damaged: since when, which checkpoints, and the GPU time lost.

- **First deviation**: the earliest evidence in the ledger, the lowest step of any
  incident (an alert's step, or a check whose comparison found a deviation). Steps
  are the Guard's: step ``s`` is the update ``s`` (0-based), and a checkpoint of step
  ``s`` holds the state before that update.
- **Clean bound**: with check records, the last check at or before the first deviation
  whose comparison found nothing (a deviation first seen at a check may have begun
  anywhere in the interval before it); without them, the first deviation's step itself,
  with a note that evidence from a check may lag by up to one interval.
- **Last clean checkpoint**: the latest ``checkpoint.saved`` entry in the verified
  ledger with a step at or below the clean bound, written before the first evidence;
  its file, when present, must verify (signature, hashes) and carry the manifest the
  ledger recorded. Every other checkpoint saved after it is not to be resumed.
- **GPU-hours lost**: ranks x GPUs per rank x the recorded wall time from that
  checkpoint's entry (or the run's start when there is none) to the halt or the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainguard.report.incidents import Incident
from trainguard.report.model import CheckpointRecord, RunModel, parse_when


@dataclass
class CheckpointVerdict:
    record: CheckpointRecord
    #: verified, missing (file gone; the ledger entry is signed), altered, not checked
    file: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        r = self.record
        return {
            "path": r.path,
            "step": r.step,
            "seq": r.seq,
            "time": r.time,
            "manifest_blake3": r.manifest,
            "file": self.file,
            "reason": self.reason,
        }


@dataclass
class Damage:
    first_step: int | None
    first_seq: int | None
    clean_bound: int | None
    bound_from: str
    last_clean: CheckpointVerdict | None
    not_to_resume: list[CheckpointVerdict] = field(default_factory=list)
    lost_from: str | None = None
    lost_to: str | None = None
    end_kind: str = "last entry"
    wall_s: float | None = None
    ranks: int = 1
    gpus_per_rank: int = 1
    gpu_hours: float | None = None
    cost: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "first_step": self.first_step,
            "first_seq": self.first_seq,
            "clean_bound": self.clean_bound,
            "clean_bound_from": self.bound_from,
            "last_clean_checkpoint": self.last_clean.to_dict() if self.last_clean else None,
            "not_to_resume": [c.to_dict() for c in self.not_to_resume],
            "lost_from": self.lost_from,
            "lost_to": self.lost_to,
            "end": self.end_kind,
            "wall_s": self.wall_s,
            "ranks": self.ranks,
            "gpus_per_rank": self.gpus_per_rank,
            "gpu_hours": self.gpu_hours,
            "cost": self.cost,
            "notes": list(self.notes),
        }


def verify_file(model: RunModel, record: CheckpointRecord) -> CheckpointVerdict:
    """Check the checkpoint file the entry names, against the run's owner key."""
    path = Path(record.path)
    if not path.exists():
        return CheckpointVerdict(record, "missing", "the file is not there to check")
    if model.owner_key_id is None:
        return CheckpointVerdict(record, "not checked", "the run's owner key is not known")
    from trainguard.checkpoint.signed_file import read
    from trainguard.errors import Error

    try:
        verified = read(path, {model.owner_key_id})
    except Error as exc:
        return CheckpointVerdict(record, "altered", str(exc))
    except OSError as exc:
        return CheckpointVerdict(record, "not checked", f"cannot read: {exc.strerror}")
    if record.manifest is not None and verified.manifest_hash != record.manifest:
        return CheckpointVerdict(
            record, "altered", "signed, but not the checkpoint the ledger recorded here"
        )
    return CheckpointVerdict(record, "verified", "signature and hashes check out")


def assess(
    model: RunModel,
    incidents: list[Incident],
    *,
    gpus_per_rank: int = 1,
    cost_per_gpu_hour: float | None = None,
) -> Damage | None:
    """The damage of the run's incidents; None for a run without any."""
    stepped = [i for i in incidents if i.first_step is not None]
    if not incidents:
        return None
    first = min(stepped, key=lambda i: (i.first_step, i.first_seq)) if stepped else None
    first_step = first.first_step if first is not None else None
    first_seq = min(i.first_seq for i in incidents)
    notes: list[str] = []
    bound: int | None
    if first_step is None:
        bound, source = None, "no incident names a step"
    elif model.checks:
        quiet = [c.step for c in model.checks if c.severity == 0 and c.step <= first_step]
        bound = max(quiet) if quiet else None
        source = "the last check that found nothing, at or before the first deviation"
        if len(model.checks) and not quiet:
            source = "no check found the run clean before the first deviation"
    else:
        bound, source = first_step, "the first deviation's step (no check records)"
        if model.every:
            notes.append(
                "the ledger holds no check records: a deviation first seen at a check may "
                f"have begun up to one interval ({model.every} steps) before it"
            )
    saved = [c for c in model.checkpoints if c.action == "saved"]
    eligible = [
        c
        for c in saved
        if bound is not None and c.step is not None and c.step <= bound and c.seq < first_seq
    ]
    last_clean: CheckpointVerdict | None = None
    rejected: list[CheckpointVerdict] = []
    for record in sorted(eligible, key=lambda c: c.seq, reverse=True):
        verdict = verify_file(model, record)
        if verdict.file == "altered":
            rejected.append(verdict)
            continue
        last_clean = verdict
        break
    after = [c for c in saved if c not in eligible]
    not_to_resume = rejected + [CheckpointVerdict(c, "not checked") for c in after]
    not_to_resume.sort(key=lambda v: v.record.seq)
    damage = Damage(
        first_step,
        first_seq,
        bound,
        source,
        last_clean,
        not_to_resume,
        ranks=model.world,
        gpus_per_rank=gpus_per_rank,
        notes=notes,
    )
    damage.lost_from = last_clean.record.time if last_clean is not None else model.started
    damage.lost_to, damage.end_kind = model.ended, model.end_kind
    start, end = parse_when(damage.lost_from), parse_when(damage.lost_to)
    if start is not None and end is not None:
        damage.wall_s = max(0.0, (end - start).total_seconds())
        damage.gpu_hours = model.world * gpus_per_rank * damage.wall_s / 3600
        if cost_per_gpu_hour is not None:
            damage.cost = damage.gpu_hours * cost_per_gpu_hour
    if last_clean is None:
        notes.append("no clean checkpoint: the time lost is counted from the run's start")
    return damage
