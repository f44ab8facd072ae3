"""The incident and damage report of one run: built from its ledger, rendered as text or
JSON here (HTML in :mod:`trainguard.report.html`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from trainguard.report import metrics as _metrics
from trainguard.report import replays as _replays
from trainguard.report.damage import Damage, assess
from trainguard.report.incidents import TEXT_ALERTS, Incident, group, shown
from trainguard.report.model import RunModel, read_run

FORMAT = "trainguard-report"
VERSION = 1


@dataclass
class Report:
    """One run's report: what its verified ledger says, grouped and assessed. ``clean``
    is the exit-0 condition; ``to_dict`` the JSON document."""

    model: RunModel
    incidents: list[Incident]
    damage: Damage | None
    side_files: dict[int, _metrics.SideFile]
    loss: _metrics.Series | None
    step_time: _metrics.Series | None
    agreement: _metrics.Agreement | None
    notes: list[str] = field(default_factory=list)
    #: the replays of this run that ``trainguard replay`` left beside it (replays.py)
    replays: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ledger_status(self) -> str:
        return self.model.verification.verdict

    @property
    def files_tampered(self) -> list[_metrics.SideFile]:
        return [
            f for f in self.side_files.values() if f.status in ("tampered", "missing", "unreadable")
        ]

    @property
    def clean(self) -> bool:
        """No incident, the ledger intact and closed, the side files as recorded."""
        return not self.incidents and self.model.intact and not self.files_tampered

    def headline(self) -> list[str]:
        """What the top of the report says about the ledger itself."""
        v = self.model.verification
        lines = []
        if v.tampered:
            problem = v.first_problem
            what = f" ({problem.damage}: {problem.message})" if problem is not None else ""
            used = (
                f"uses entries 1 to {self.model.trusted_upto} only"
                if self.model.trusted_upto is not None
                else "can use no entry"
            )
            lines.append(
                f"LEDGER NOT INTACT: entry {v.first_bad_seq} is damaged{what}. This report "
                f"{used}; {self.model.untrusted} entries from there on are not trusted and "
                "not used."
            )
            if v.problems[1:] or v.problems_omitted:
                lines.append(
                    f"  {len(v.problems) + v.problems_omitted} problems in all: run "
                    "`trainguard ledger verify` for each"
                )
        elif not v.closed:
            lines.append(
                "LEDGER NOT CLOSED: no closing entry (the run is still running, crashed, or "
                "its end was cut); the report covers what was written."
            )
        else:
            lines.append(
                f"ledger intact: {v.entries} entries, chain and signatures check out, run closed"
            )
        lines.extend(f"note: {n}" for n in v.notes)
        lines.extend(
            f"METRICS FILE NOT AS RECORDED: rank {f.rank}: {f.message}" for f in self.files_tampered
        )
        return lines

    def to_dict(self) -> dict[str, Any]:
        m = self.model
        return {
            "format": FORMAT,
            "version": VERSION,
            "run_id": m.run_id,
            "run_dir": str(m.run_dir),
            "clean": self.clean,
            "ledger": {
                **m.verification.to_dict(),
                "trusted_upto": m.trusted_upto,
                "untrusted_entries": m.untrusted,
            },
            "headline": self.headline(),
            "run": {
                "world": m.world,
                "every": m.every,
                "policy": m.policy,
                "started": m.started,
                "ended": m.ended,
                "end": m.end_kind,
                "halted_by": _halt(m),
                "checks_recorded": len(m.checks),
                "tail_records": m.tail_records,
            },
            "incidents": [i.to_dict() for i in self.incidents],
            "damage": self.damage.to_dict() if self.damage else None,
            "checkpoints": [
                {
                    "action": c.action,
                    "path": c.path,
                    "step": c.step,
                    "seq": c.seq,
                    "time": c.time,
                    "manifest_blake3": c.manifest,
                    "by": c.writer.to_dict(),
                    "reasons": list(c.reasons),
                }
                for c in m.checkpoints
            ],
            "metrics_files": [f.to_dict() for f in self.side_files.values()],
            "loss": self.loss.to_dict() if self.loss else None,
            "step_time": self.step_time.to_dict() if self.step_time else None,
            "agreement": self.agreement.to_dict() if self.agreement else None,
            "replays": self.replays,
            "notes": list(self.notes),
        }


def _halt(model: RunModel) -> dict[str, Any] | None:
    h = model.halted
    if h is None:
        return None
    return {"step": h.step, "detector": h.detector, "message": h.message, "time": h.time}


def build_report(
    run_dir: str | os.PathLike[str],
    *,
    heads: tuple[str, ...] = (),
    owner_public_key: str | None = None,
    gpus_per_rank: int = 1,
    cost_per_gpu_hour: float | None = None,
    replays: tuple[str, ...] = (),
) -> Report:
    """Verify ``run_dir``'s ledger and report its incidents and their damage."""
    model = read_run(run_dir, heads=heads, owner_public_key=owner_public_key)
    incidents = group(model)
    damage = assess(
        model, incidents, gpus_per_rank=gpus_per_rank, cost_per_gpu_hour=cost_per_gpu_hour
    )
    files = _metrics.read_side_files(model)
    notes = []
    if not model.checks:
        notes.append(
            "the ledger holds no check records (a run older than them"
            + (f": {model.tail_records} tail records" if model.tail_records else "")
            + "): fingerprint agreement, per-rank loss and step time cannot be told"
        )
    found, replay_notes = _replays.find(model.run_dir, replays)
    return Report(
        model,
        incidents,
        damage,
        files,
        _metrics.series(model, files, "loss"),
        _metrics.series(model, files, "busy_s"),
        _metrics.agreement(model),
        notes + replay_notes,
        found,
    )


def render_text(report: Report) -> str:
    """The report as plain text (the same facts as the JSON and the HTML)."""
    m = report.model
    out = [f"trainguard report: run {m.run_id or '?'} ({m.run_dir})"]
    out += report.headline()
    out.append(
        f"run: {m.world} rank{'s' if m.world != 1 else ''}, checks every {m.every or '?'} "
        f"steps, policy {m.policy or '?'}; started {m.started or '?'}, "
        f"{m.end_kind} {m.ended or '?'}"
    )
    if m.halted is not None:
        h = m.halted
        out.append(
            f"halted by the [{h.detector}] alert of step {h.step} (entry {h.seq}, {h.time}): "
            f"{shown(h.message)}"
        )
    out.append("")
    if not report.incidents:
        out.append("incidents: none")
    for inc in report.incidents:
        count = len(inc.alerts)
        out.append(
            f"incident {inc.number}: {inc.severity} first seen at step "
            f"{inc.first_step if inc.first_step is not None else '?'} (entry {inc.first_seq}, "
            f"{inc.first_time}); rank: {inc.rank_text()}; {count} alert"
            f"{'s' if count != 1 else ''} from {', '.join(inc.detectors)}"
            + (
                f", steps {inc.first_step}-{inc.last_step}"
                if inc.last_step != inc.first_step
                else ""
            )
        )
        if not inc.alerts:
            out.append(f"  [{inc.detector}] {inc.message}")
        for a in inc.alerts[:TEXT_ALERTS]:
            where = f"rank {a.rank}" if a.rank is not None else "rank cannot tell"
            out.append(f"  step {a.step}, {where} [{a.detector}] {a.severity}: {shown(a.message)}")
            out.extend(
                f"      {key}: {shown(value)}"
                for key, value in a.details.items()
                if key not in ("step", "rank", "sender", "sender_pid", "sender_uid")
            )
        if count > TEXT_ALERTS:
            out.append(f"  ... and {count - TEXT_ALERTS} more alerts (all in --format json)")
        for sender in inc.senders():
            out.append(
                f"  signal {sender['signal']} sent by pid {sender['pid']} (uid {sender['uid']}): "
                f"{shown(sender['command'])}"
            )
        for writer in inc.writers():
            out.append(f"  recorded by {shown(writer.describe())}")
    d = report.damage
    if d is not None:
        out.append("")
        out.append(
            "damage: first deviation at step "
            + (str(d.first_step) if d.first_step is not None else "? (cannot tell)")
            + f" (earliest evidence: entry {d.first_seq})"
        )
        bound = d.clean_bound if d.clean_bound is not None else "? (cannot tell)"
        out.append(f"  clean up to step {bound} ({d.bound_from})")
        if d.last_clean is not None:
            c = d.last_clean
            out.append(
                f"  last clean checkpoint: {c.record.path} (step {c.record.step}, entry "
                f"{c.record.seq}, {c.record.time}; file {c.file}: {c.reason})"
            )
        else:
            out.append("  last clean checkpoint: none")
        for v in d.not_to_resume:
            out.append(
                f"  do not resume: {v.record.path} (step {v.record.step}, entry {v.record.seq})"
                + (f": {v.file}, {v.reason}" if v.reason else "")
            )
        if d.gpu_hours is not None and d.wall_s is not None:
            cost = f", cost {d.cost:.2f}" if d.cost is not None else ""
            out.append(
                f"  GPU-hours lost: {d.gpu_hours:.6g} = {d.ranks} rank"
                f"{'s' if d.ranks != 1 else ''} x {d.gpus_per_rank} GPU"
                f"{'s' if d.gpus_per_rank != 1 else ''} per rank "
                f"x {d.wall_s:.3f} s ({d.lost_from} to {d.end_kind} {d.lost_to}){cost}"
            )
        out.extend(f"  note: {n}" for n in d.notes)
    if m.checkpoints:
        out.append("")
        out.append("checkpoints in the ledger:")
    for ck in m.checkpoints:
        why = f": {shown('; '.join(ck.reasons))}" if ck.reasons else ""
        out.append(
            f"  {ck.action} step {ck.step if ck.step is not None else '?'} {shown(ck.path)} (entry "
            f"{ck.seq}, {ck.time}, by pid {ck.writer.pid} on {ck.writer.host}){why}"
        )
    out.append("")
    if report.replays:
        out.extend(_replays.lines(report.replays))
        out.append("")
    out.extend(_measurements(report))
    out.extend(f"note: {n}" for n in report.notes)
    out.append(_verdict(report))
    return "\n".join(out) + "\n"


def _measurements(report: Report) -> list[str]:
    out = []
    for series in (report.loss, report.step_time):
        if series is None:
            continue
        parts = []
        for rank, pts in sorted(series.by_rank.items()):
            if pts:
                parts.append(f"rank {rank} {pts[0][1]:.4g} -> {pts[-1][1]:.4g} ({len(pts)} points)")
        out.append(f"{series.name} {series.source}: " + "; ".join(parts))
    if report.agreement is not None:
        bad = report.agreement.disagreements()
        steps = report.agreement.steps
        out.append(
            f"fingerprint agreement over {len(steps)} checks: "
            + (
                "every compared field agreed"
                if not bad
                else "; ".join(f"{name} differs at step {step}" for name, step in bad[:20])
                + (f" (and {len(bad) - 20} more)" if len(bad) > 20 else "")
            )
        )
    out.extend(
        f"metrics rank {f.rank}: {f.status}: {f.message}"
        for f in report.side_files.values()
        if f.status != "absent"
    )
    return out


def _verdict(report: Report) -> str:
    if report.clean:
        return "CLEAN: no incidents, ledger intact"
    parts = []
    if report.incidents:
        parts.append(f"{len(report.incidents)} incident{'s' if len(report.incidents) != 1 else ''}")
    if not report.model.intact:
        parts.append(f"ledger {report.ledger_status}")
    if report.files_tampered:
        parts.append("metrics files not as recorded")
    return "NOT CLEAN: " + ", ".join(parts)
