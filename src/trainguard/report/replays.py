"""The replays of a run the report can find: the verdicts ``trainguard replay`` wrote.

A replay writes its run into its own folder (``RUN_DIR.replay-TIME`` beside the run, or
``--out``) and its verdict there as ``replay-verdict.json``, with the plan naming the run
it replayed. The report lists every such folder beside the run whose plan names this run,
and any given with ``--replay``; a verdict that cannot be read is noted, never guessed at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainguard import _io

VERDICT = "replay-verdict.json"


def find(run_dir: Path, extra: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], list[str]]:
    """The replays of ``run_dir`` (each its verdict with ``folder``), and notes."""
    here = run_dir.resolve()
    folders = sorted(here.parent.glob(f"{here.name}.replay-*")) + [Path(e) for e in extra]
    found: list[dict[str, Any]] = []
    notes: list[str] = []
    for folder in folders:
        path = folder / VERDICT
        if not path.is_file():
            if folder in map(Path, extra):
                notes.append(f"{folder}: no {VERDICT} (the replay did not finish)")
            continue
        try:
            verdict = json.loads(_io.read_capped(path, _io.CONFIG_CAP, "replay verdict"))
            original = Path(verdict["plan"]["original"]).resolve()
        except Exception as exc:  # noqa: BLE001 - any unreadable verdict is a note
            notes.append(f"{path}: cannot be read ({type(exc).__name__}); not used")
            continue
        if original != here:
            continue
        found.append({"folder": str(folder), **verdict})
    return found, notes


def lines(replays: list[dict[str, Any]]) -> list[str]:
    """The text report's replay section."""
    out: list[str] = []
    for r in replays:
        plan = r.get("plan") or {}
        start = Path(str(plan.get("checkpoint", "?"))).name
        out.append(f"replay from {start} (step {plan.get('start')}), run in {r['folder']}:")
        out.extend(f"  {line}" for line in str(r.get("text", "")).splitlines())
    return out
