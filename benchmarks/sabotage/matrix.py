"""The goal x means table (issue 11): every attack goal through several means, as detected.

``python -m benchmarks.sabotage matrix --out DIR`` runs the chosen scenarios with the Guard
on (``run --guard on`` with short defaults: preset ``tiny``, 60 steps, a check every 10,
the attack at step 20, which is not a check step) and turns ``results.json`` into one table:
a row per goal, a column per means, in each cell the scenarios with whether the Guard
caught them within two check intervals, after how many steps, and whether the rank the
first alert names is right, "cannot tell" (no rank named) or WRONG. The verdicts use
``evaluate.detection`` and ``evaluate.wrong_rank`` as ``run`` does: an alert naming a rank
the attacker did not act on is wrong, whichever alert it is.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from benchmarks.sabotage.scenarios import BY_NAME, GOALS, MEANS


def verdict(row: dict[str, Any], world_size: int, attacked_rank: int) -> dict[str, Any]:
    """One scenario's row of results.json as the table's cell entry."""
    sc = BY_NAME[row["attack"]]
    steps = row["steps_to_detection"]
    detected = bool(row["detected"])
    if not detected:
        when = "missed"
    elif steps is None:
        when = "after the run"  # records rewritten after the run: `ledger verify`
    elif sc.before_start and row.get("stopped_before_training"):
        when = "before start"
    else:
        when = f"{steps} steps"
    # within two check intervals; a refusal before training and a ledger verify of the
    # finished run count (nothing trained on the damage, or the damage is the records)
    within = detected and (steps is None or bool(row.get("within_2_intervals", steps == 0)))
    named = row["rank_named"]
    acted = sc.acts_on(world_size, attacked_rank)
    if not detected:
        rank = "-"
    elif named is None:
        rank = "cannot tell"
    else:
        ranks = named if isinstance(named, list) else [named]
        rank = "right" if all(int(r) in acted for r in ranks) else "WRONG"
    return {
        "attack": sc.name,
        "base": row.get("base", "plain"),
        "goal": sc.goal,
        "means": sc.means,
        "detected": detected,
        "within_2_intervals": within,
        "when": when,
        "steps_to_detection": steps,
        "detector": row["detector"],
        "rank_named": named,
        "rank": rank,
        "wrong_rank": row["wrong_rank"],
        "status": row["status"],
    }


def build(results: dict[str, Any]) -> dict[str, Any]:
    """The table as data: cells by goal and means, and the totals."""
    world, attacked = results["world_size"], results["injection"]["rank"]
    entries = [verdict(row, world, attacked) for row in results["scenarios"]]
    cells: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for e in entries:
        cells[e["goal"]][e["means"]].append(e)
    total = len(entries)
    caught = sum(e["within_2_intervals"] for e in entries)
    return {
        "world_size": world,
        "attacked_rank": attacked,
        "steps": results["steps"],
        "every": results["every"],
        "inject_step": results["injection"]["step"],
        "bases": results["bases"],
        "entries": entries,
        "cells": {g: dict(m) for g, m in cells.items()},
        "totals": {
            "scenarios": total,
            "detected_within_2_intervals": caught,
            "detection_rate": caught / total if total else None,
            "detected_at_all": sum(e["detected"] for e in entries),
            "wrong_names": sum(e["wrong_rank"] for e in entries),
            "first_alert_wrong": sum(e["rank"] == "WRONG" for e in entries),
            "cannot_tell": sum(e["rank"] == "cannot tell" for e in entries),
            "false_alarms": results["false_alarms"],
            "clean_runs": results["clean_runs"],
        },
    }


def _cell(e: dict[str, Any], many_bases: bool) -> str:
    mark = "y" if e["within_2_intervals"] else "n"
    base = f" [{e['base']}]" if many_bases else ""
    rank = "" if e["rank"] == "-" else f", {e['rank']}"
    wrong = f", {e['wrong_rank']} wrong" if e["wrong_rank"] and e["rank"] != "WRONG" else ""
    detector = f" ({e['detector']})" if e["detector"] else ""
    return f"`{e['attack']}`{base}: {mark}, {e['when']}{detector}{rank}{wrong}"


def markdown(matrix: dict[str, Any]) -> str:
    """The goal x means table in Markdown, then the totals and the misses."""
    used = [m for m in MEANS if any(m in matrix["cells"].get(g, {}) for g in GOALS)]
    many = len(matrix["bases"]) > 1
    lines = [
        "| goal | " + " | ".join(used) + " |",
        "|---|" + "---|" * len(used),
    ]
    for goal in GOALS:
        row = matrix["cells"].get(goal, {})
        if not row:
            continue
        cells = ["<br>".join(_cell(e, many) for e in row.get(m, [])) or "" for m in used]
        lines.append(f"| {goal} | " + " | ".join(cells) + " |")
    t = matrix["totals"]
    rate = f"{t['detection_rate']:.0%}" if t["detection_rate"] is not None else "n/a"
    lines += [
        "",
        f"{matrix['world_size']} ranks (rank {matrix['attacked_rank']} attacked), "
        f"{matrix['steps']} steps, a check every {matrix['every']}, attacks at step "
        f"{matrix['inject_step']}; bases {', '.join(matrix['bases'])}.",
        f"Detected within 2 check intervals: **{t['detected_within_2_intervals']} of "
        f"{t['scenarios']} ({rate})** (detected at all: {t['detected_at_all']}); rank of the "
        f"first alert: right or all ranks acted on {t['scenarios'] - t['first_alert_wrong']}"
        f" - cannot tell {t['cannot_tell']} - WRONG {t['first_alert_wrong']}; alerts naming "
        f"a wrong rank (evaluate.wrong_rank): **{t['wrong_names']}**; false alarms "
        f"{t['false_alarms']} of {t['clean_runs']} clean runs.",
    ]
    missed = [e for e in matrix["entries"] if not e["within_2_intervals"]]
    if missed:
        lines.append("")
        lines.append(
            "Not detected within 2 intervals: "
            + ", ".join(f"`{e['attack']}` ({e['when']}, status {e['status']})" for e in missed)
            + "."
        )
    return "\n".join(lines)
