"""The run's measurements: per-step side files checked against their chains, the checks'
per-rank metrics, and the agreement of the fingerprint fields over the checks.

Each rank appends its per-step metrics to ``RUN_DIR/metrics/rank{R}.jsonl`` one chunk per
check; the check entry holds every rank's chain over those chunks
(``chain_k = blake2b(chain_{k-1} + chunk_k)``, 8 bytes, ``chain_0`` zeros) and the
rank's closing entry the chain and line count over the whole file. A file that does not
match its chains was changed after it was written: it is reported and none of its values
are used. Lines after the last chain a rank recorded (a rank that died) are not proven and
not used either.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from trainguard import _io
from trainguard.errors import InputError
from trainguard.report.model import RunModel

METRICS_DIR = "metrics"
#: side files larger than this are not read (reported as too large to check)
FILE_CAP = 1024 * 1024 * 1024
_ZERO = "0" * 16


@dataclass
class SideFile:
    """One rank's per-step metrics file and what its chain says about it."""

    rank: int
    #: verified; tampered, missing, unreadable (not as the ledger recorded it); unverifiable
    #: (no chain recorded, or too large to read); absent (none expected)
    status: str
    message: str
    points: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "status": self.status,
            "message": self.message,
            "steps": len(self.points),
        }


@dataclass
class Series:
    """A per-rank series for a plot: (step, value) points by rank."""

    name: str
    unit: str
    source: str
    by_rank: dict[int, list[tuple[int, float]]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "source": self.source,
            "by_rank": {str(r): [list(p) for p in pts] for r, pts in self.by_rank.items()},
        }


@dataclass
class Agreement:
    """For each compared fingerprint field, at each check: did every rank agree."""

    steps: list[int]
    fields: dict[str, list[bool]]

    def disagreements(self) -> list[tuple[str, int]]:
        return [
            (name, step)
            for name, agreed in self.fields.items()
            for step, ok in zip(self.steps, agreed, strict=True)
            if not ok
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "fields": self.fields}


def _chain(prev: str, chunk: bytes) -> str:
    return hashlib.blake2b(bytes.fromhex(prev) + chunk, digest_size=8).hexdigest()


def read_side_files(model: RunModel) -> dict[int, SideFile]:
    """Every rank's side file, checked against the chains its check and closing entries hold."""
    out: dict[int, SideFile] = {}
    for rank in range(model.world):
        out[rank] = _side_file(model, rank)
    return out


def _side_file(model: RunModel, rank: int) -> SideFile:
    path = model.run_dir / METRICS_DIR / f"rank{rank}.jsonl"
    chains = [c.chains[rank] for c in model.checks if len(c.chains) > rank]
    closing = model.closed_ranks.get(rank, {}).get("metrics")
    closing = closing if isinstance(closing, dict) else None
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if chains or closing:
            return SideFile(rank, "missing", f"{path.name} is gone: the ledger says it was written")
        return SideFile(rank, "absent", "no per-step metrics recorded")
    except OSError as exc:
        return SideFile(rank, "missing", f"{path.name}: cannot read: {exc.strerror}")
    if not chains and not closing:
        return SideFile(rank, "unverifiable", f"{path.name}: no chain in the ledger; not used")
    if stat.S_ISREG(info.st_mode) and info.st_size > FILE_CAP:
        return SideFile(rank, "unverifiable", f"{path.name}: above {FILE_CAP} bytes; not read")
    try:
        # a regular file only (a FIFO or device is refused unread)
        data = _io.read_capped(path, FILE_CAP, "metrics file")
    except InputError as exc:
        return SideFile(rank, "unreadable", f"{exc}; not used")
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" after the last newline
    lines = [line + b"\n" for line in lines]
    if tail:
        lines.append(tail)
    prev, pos = _ZERO, 0
    for k, target in enumerate(chains, 1):
        found = _match(prev, lines, pos, target)
        if found is None:
            return SideFile(
                rank,
                "tampered",
                f"{path.name} does not match the chain of check {k}: changed after it was "
                "written; its values are not used",
            )
        prev, pos = target, found
    proven = pos
    note = ""
    if closing is not None:
        count, target = closing.get("lines"), str(closing.get("chain", ""))
        rest = b"".join(lines[pos:])
        if count != len(lines) or target not in (_chain(prev, rest), *(() if rest else (prev,))):
            return SideFile(
                rank,
                "tampered",
                f"{path.name} does not match the chain of rank {rank}'s closing entry "
                f"({count} lines recorded, {len(lines)} found); its values are not used",
            )
        proven = len(lines)
    elif pos < len(lines):
        note = f"; {len(lines) - pos} lines after the last check are not proven, not used"
    points = []
    for line in lines[:proven]:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("step"), int):
            points.append(value)
    return SideFile(
        rank, "verified", f"{path.name}: {len(points)} steps match their chain{note}", points
    )


def _match(prev: str, lines: list[bytes], pos: int, target: str) -> int | None:
    """The line index after the chunk starting at ``pos`` whose chain is ``target``."""
    if target == prev:  # nothing written since the last link
        return pos
    running = hashlib.blake2b(bytes.fromhex(prev), digest_size=8)
    for index in range(pos, len(lines)):
        running.update(lines[index])
        if running.copy().hexdigest() == target:
            return index + 1
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None


def series(model: RunModel, files: dict[int, SideFile], key: str) -> Series | None:
    """Loss (``loss``) or step time (``busy_s``) per rank: per step from verified side
    files, else per check from the check entries' metrics; None when neither is recorded."""
    name, unit = {"loss": ("loss", ""), "busy_s": ("step time", "s")}[key]
    per_step = {
        rank: [(int(p["step"]), v) for p in f.points if (v := _number(p.get(key))) is not None]
        for rank, f in files.items()
        if f.status == "verified"
    }
    if any(per_step.values()):
        return Series(name, unit, "per step (verified side files)", per_step)
    metric = key if key == "loss" else "wall_s"
    per_check: dict[int, list[tuple[int, float]]] = {}
    for check in model.checks:
        values = check.metrics.get(metric) or []
        for rank, raw in enumerate(values):
            value = _number(raw)
            if value is not None:
                per_check.setdefault(rank, []).append((check.step, value))
    if not per_check:
        return None
    what = "mean loss" if key == "loss" else "mean wall time per step"
    return Series(name, unit, f"per check ({what} over the interval)", per_check)


def compared_fields() -> dict[str, str] | None:
    """The fields replicas must hold identical (None: unknown to this installation)."""
    try:
        from trainguard.runtime.fields import MUST_AGREE
    except ImportError:
        return None
    return dict(MUST_AGREE)


def agreement(model: RunModel) -> Agreement | None:
    """Which compared fields all ranks agreed on, at each recorded check."""
    if not model.checks:
        return None
    compared = compared_fields()
    steps: list[int] = []
    fields: dict[str, list[bool]] = {}
    for check in model.checks:
        steps.append(check.step)
        names = [n for n in check.fields if compared is None or n in compared]
        for name in names:
            fields.setdefault(name, [True] * (len(steps) - 1))
        for name, agreed in fields.items():
            if name not in check.fields:
                agreed.append(True)
                continue
            col = check.fields.index(name)
            values = {row[col] for row in check.rows if len(row) > col}
            agreed.append(len(values) <= 1)
    return Agreement(steps, fields)
