"""Command line of the sabotage benchmark: ``python -m benchmarks.sabotage run ...``.

``run [--guard on|off] [--attack NAME|all] [--base NAME|all] [--repeat N] [--steps S] --out
DIR`` runs the clean job ``N`` times (seeds S, S+1, ...) plus a same-seed rerun, then every
chosen attack scenario, on each chosen base (``job.BASES``: the plain loop or the loop with
an ordinary practice), writes ``DIR/results.json`` and prints a summary table. ``list`` prints the
scenarios. See benchmarks/sabotage/README.md for the fields and the Guard's contract.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.sabotage.job import BASES
from benchmarks.sabotage.scenarios import SCENARIOS, Scenario, select


def _options(cmd: argparse.ArgumentParser, matrix: bool) -> None:
    """The options of ``run``; ``matrix`` has the Guard on and short defaults."""
    cmd.add_argument("--out", type=Path, required=True, help="folder for results.json and the runs")
    if not matrix:
        cmd.add_argument("--guard", choices=["on", "off"], default="off")
    cmd.add_argument(
        "--attack",
        default="all",
        help="all, none (clean runs only), a name, names or numbers, comma-separated",
    )
    cmd.add_argument(
        "--base",
        default="plain",
        help="the training practice(s) the job runs on: all, or names, comma-separated "
        f"({', '.join(BASES)}; default plain)",
    )
    cmd.add_argument(
        "--repeat",
        type=int,
        default=1 if matrix else 3,
        help="clean runs with different seeds (besides the same-seed rerun)",
    )
    cmd.add_argument("--steps", type=int, default=60 if matrix else 300)
    cmd.add_argument("--seed", type=int, default=0)
    cmd.add_argument(
        "--preset",
        choices=["tiny", "cpu", "gpu"],
        default="tiny" if matrix else "cpu",
        help="model size",
    )
    cmd.add_argument("--nproc", type=int, default=2, help="ranks (1: one plain process)")
    cmd.add_argument(
        "--every",
        type=int,
        default=10 if matrix else 50,
        help="the Guard's check interval (its default: 50)",
    )
    cmd.add_argument(
        "--mode",
        choices=["auto", "batch", "isolate"],
        default="auto",
        help="jobs per launch: batch shares one process group, isolate launches each (auto: "
        "batch without the Guard, isolate with it)",
    )
    cmd.add_argument(
        "--forensics",
        choices=["on", "off"],
        default="on",
        help="with --guard on: score the incident report of every scenario run and replay "
        "the in-process attacks (benchmarks/sabotage/forensics.py); default on",
    )
    cmd.add_argument(
        "--guard-loader",
        choices=["on", "off"],
        default="on",
        help="pass the job's DataLoader to the Guard (loader=); default on",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sabotage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the scenarios")
    _options(sub.add_parser("run", help="run the benchmark"), matrix=False)
    _options(
        sub.add_parser(
            "matrix", help="run the scenarios with the Guard on and print the goal x means table"
        ),
        matrix=True,
    )
    args = parser.parse_args(argv)
    if args.command == "matrix":
        args.guard = "on"
    return args


def _assemble_base(bench: Any, base: str, scenarios: list[Scenario]) -> dict[str, Any]:
    """The clean runs, controls and scenario rows of one base."""
    from benchmarks.sabotage.evaluate import Run, detection, effect, l2, wrong_rank

    s = bench.s
    launch_of = {e["name"]: lch for lch in bench.launches for e in lch.entries}
    runs = {}
    for key, path in bench.runs.items():
        run_base, _, name = key.rpartition("/")  # see Bench.key
        if (run_base or "plain") == base:
            runs[name] = Run(path, s.nproc)

    def launch(name: str) -> Any:
        return launch_of.get(bench.key(base, name))

    ref = runs["clean"]
    cleans = [n for n in runs if n.startswith("clean") and n != "clean-unguarded"]
    clean_rows = []
    for name in cleans:
        run = runs[name]
        found = detection(None, run, launch(name), bench, {})
        clean_rows.append(
            {
                "name": name,
                "base": base,
                "seed": run.r0.get("seed"),
                "val_loss": run.r0.get("val_loss"),
                "final_loss": (run.r0.get("losses") or [None])[-1],
                "mean_step_time_s": run.mean_step_time(),
                "alarm": found["detected"] or bool(run.alerts),
                "status": found["status"],
                "alerts": len(run.alerts),
            }
        )
    rerun = runs["clean-rerun"]
    seed_losses = [
        r["val_loss"]
        for r in clean_rows
        if r["name"] != "clean-rerun" and r["val_loss"] is not None
    ]
    noise = {
        "same_seed": {
            "val_loss_delta": rerun.r0["val_loss"] - ref.r0["val_loss"],
            "weight_l2": l2(rerun.weights(0), ref.weights(0)),
        },
        "different_seeds": {
            "runs": len(seed_losses),
            "val_loss_std": statistics.stdev(seed_losses) if len(seed_losses) > 1 else None,
            "val_loss_max_abs_delta": (
                max(abs(v - ref.r0["val_loss"]) for v in seed_losses)
                if len(seed_losses) > 1
                else None
            ),
        },
    }
    reproducible = (
        rerun.r0["losses"] == ref.r0["losses"]
        and rerun.r0["val_loss"] == ref.r0["val_loss"]
        and noise["same_seed"]["weight_l2"] == 0.0
    )
    overhead = None
    if s.guard and "clean-unguarded" in runs:
        guarded = [runs[n].mean_step_time() for n in ("clean", "clean-rerun")]
        plain = runs["clean-unguarded"].mean_step_time()
        if plain and all(guarded):
            overhead = statistics.fmean(g for g in guarded if g) / plain
    # the same question answered inside the guarded runs themselves: the share of each
    # step spent in the Guard's code (immune to the machine's noise between runs)
    shares = [
        runs[n].r0["guard_seconds"] / sum(runs[n].r0["step_times"])
        for n in cleans
        if runs[n].r0.get("guard_seconds") is not None and runs[n].r0.get("step_times")
    ]
    overhead_inprocess = statistics.fmean(shares) if shares else None
    # the same less the time in the check's collective (waiting there for the last rank,
    # which the job would otherwise spend at its next all-reduce)
    working = [
        (runs[n].r0["guard_seconds"] - runs[n].r0["guard_collective_seconds"])
        / sum(runs[n].r0["step_times"])
        for n in cleans
        if runs[n].r0.get("guard_collective_seconds") is not None and runs[n].r0.get("step_times")
    ]
    overhead_working = statistics.fmean(working) if working else None
    controls = {}
    if "resume-clean" in runs:
        resumed = runs["resume-clean"]
        found = detection(None, resumed, launch("resume-clean"), bench, {})
        controls["resume-clean"] = {
            **effect(resumed, ref, s.nproc),
            "exact": resumed.r0.get("losses") == ref.r0["losses"][s.inject_step :]
            and resumed.r0.get("val_loss") == ref.r0["val_loss"],
            "alarm": found["detected"] or bool(resumed.alerts),
            "status": found["status"],
        }
    rows = []
    for sc in scenarios:
        run = runs[sc.name]
        evidence = dict(bench.evidence.get(bench.key(base, sc.name), {}))
        for key in ("implant_marker", "record"):
            if key in evidence:
                path = Path(evidence.pop(key))
                evidence[key.replace("_marker", "_ran")] = (
                    json.loads(path.read_text()) if path.exists() else None
                )
        if sc.kind == "overlay":
            evidence["imported"] = run.r0.get("code")
        if sc.name == "resume-pickle":
            evidence["payload_ran"] = Path(evidence["marker"]).exists()
        row: dict[str, Any] = {
            "attack": sc.name,
            "base": base,
            "number": sc.number,
            "kind": sc.kind,
            "summary": sc.summary,
        }
        row["goal"], row["means"] = sc.goal, sc.means
        if sc.rank_specific and not sc.before_start:
            row["injected"] = {"step": s.inject_step, "rank": s.attacked_rank}
        elif sc.timed:
            row["injected"] = {"step": s.inject_step, "rank": None}
        else:
            when = "before-start" if sc.before_start else "after-run"
            row["injected"] = {"step": when, "rank": s.attacked_rank if sc.rank_specific else None}
        row.update(detection(sc, run, launch(sc.name), bench, evidence))
        row["wrong_rank"] = wrong_rank(sc, run, bench.s)
        if sc.kind == "records":
            row["effect"] = {k: evidence[k] for k in ("records_changed", "bytes_changed", "files")}
        else:
            row["effect"] = effect(run, ref, s.nproc)
            if sc.kind == "kill":
                done = len(run.log_lines)
                row["effect"].update(steps_completed=done, steps_lost=s.steps - done)
            if sc.kind == "live":
                cut = evidence.get("record") or {}
                row["effect"].update(records_changed=cut.get("records_changed", 0))
            if sc.kind in ("resume", "config", "overlay"):
                row["effect"].update(
                    {
                        k: v
                        for k, v in evidence.items()
                        if k in ("bytes_changed", "fields_changed", "steps_redone")
                    }
                )
        row["evidence"] = evidence
        rows.append(row)
    return {
        "ref": ref.r0,
        "clean": {
            "val_loss": ref.r0.get("val_loss"),
            "final_train_loss": (ref.r0.get("losses") or [None])[-1],
            "reproducible": reproducible,
            "mean_step_time_s": ref.mean_step_time(),
            "runs": clean_rows,
            "noise": noise,
        },
        "false_alarms": sum(r["alarm"] for r in clean_rows),
        "clean_runs": len(clean_rows),
        "wrong_rank": sum(r["wrong_rank"] for r in rows),
        "detected": sum(bool(r["detected"]) for r in rows),
        "overhead": overhead,
        "overhead_inprocess": overhead_inprocess,
        "overhead_working": overhead_working,
        "controls": controls,
        "scenarios": rows,
    }


def assemble(bench: Any, scenarios: list[Scenario], started: float) -> dict[str, Any]:
    """results.json: the first base's clean runs and controls at the top, every base's
    clean runs and scenario rows in ``clean.runs`` and ``scenarios``, per base in ``by_base``."""
    s = bench.s
    per_base = {base: _assemble_base(bench, base, scenarios) for base in s.bases}
    top = per_base[s.bases[0]]
    first = top["ref"]
    by_base = {
        base: {k: v for k, v in part.items() if k not in ("ref", "scenarios")}
        for base, part in per_base.items()
    }
    for part in by_base.values():
        part["clean"] = {k: v for k, v in part["clean"].items() if k != "runs"}
    return {
        "benchmark": "sabotage",
        "command": " ".join(["python -m benchmarks.sabotage", *sys.argv[1:]]),
        "guard": "on" if s.guard else "off",
        "steps": s.steps,
        "seed": s.seed,
        "preset": s.preset,
        "parameters": first.get("parameters"),
        "world_size": s.nproc,
        "device": first.get("device"),
        "mode": s.mode,
        "every": s.every,
        "injection": {"step": s.inject_step, "rank": s.attacked_rank},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "torch": __import__("torch").__version__,
        "corpus_sha256": first.get("corpus_sha256"),
        "bases": list(s.bases),
        "clean": {
            **top["clean"],
            "runs": [row for part in per_base.values() for row in part["clean"]["runs"]],
        },
        "false_alarms": sum(part["false_alarms"] for part in per_base.values()),
        "clean_runs": sum(part["clean_runs"] for part in per_base.values()),
        "wrong_rank": sum(part["wrong_rank"] for part in per_base.values()),
        "overhead": top["overhead"],
        "overhead_inprocess": top["overhead_inprocess"],
        "overhead_working": top.get("overhead_working"),
        "controls": top["controls"],
        "by_base": by_base,
        "scenarios": [row for part in per_base.values() for row in part["scenarios"]],
        "timings": {
            "total_s": time.perf_counter() - started,
            "launches": {lch.name: round(lch.wall_s, 2) for lch in bench.launches},
        },
    }


def describe(effect: dict[str, Any], straggler: bool = False) -> str:
    """One line of the effect; step time only for the straggler, where it is the effect."""
    parts = []
    if "val_loss_delta" in effect:
        parts.append(f"dval {effect['val_loss_delta']:+.4f}")
    if effect.get("weight_l2") is not None:
        parts.append(f"w {effect['weight_l2']:.3g}")
    if effect.get("replica_l2"):
        parts.append(f"replicas {effect['replica_l2']:.3g}")
    if straggler and "step_time_ratio" in effect:
        parts.append(f"step time x{effect['step_time_ratio']:.2f}")
    if "steps_lost" in effect:
        parts.append(f"lost {effect['steps_lost']} steps")
    if "records_changed" in effect:
        parts.append(f"{effect['records_changed']} records")
    if "bytes_changed" in effect:
        parts.append(f"{effect['bytes_changed']} bytes")
    return ", ".join(parts)


def table(results: dict[str, Any]) -> str:
    many = len(results["bases"]) > 1
    lines = [
        f"guard {results['guard']}, {results['world_size']} rank(s) on {results['device']}, "
        f"{results['steps']} steps, preset {results['preset']}, seed {results['seed']}; "
        f"attacks at step {results['injection']['step']} on rank {results['injection']['rank']}",
    ]
    for base, part in results["by_base"].items():
        clean = part["clean"]
        noise = clean["noise"]["different_seeds"]
        std = f"{noise['val_loss_std']:.4f}" if noise["val_loss_std"] is not None else "n/a"
        overhead = f"{part['overhead']:.4f}" if part["overhead"] is not None else "n/a"
        if part.get("overhead_inprocess") is not None:
            share = part["overhead_inprocess"]
            overhead += f" (time in the Guard's code: {share:.2%} of step time"
            if part.get("overhead_working") is not None:
                working = part["overhead_working"]
                overhead += f", {working:.2%} less its wait in the check's collective"
            overhead += ")"
        lines += [
            (f"base {base}: " if many else "")
            + f"clean val loss {clean['val_loss']:.6f} (train {clean['final_train_loss']:.4f}); "
            f"same seed reproduces bit for bit: {clean['reproducible']}; seed-to-seed std {std}",
            ("  " if many else "") + f"false alarms {part['false_alarms']}/{part['clean_runs']}; "
            f"wrong rank {part['wrong_rank']}; overhead {overhead}",
        ]
    if many:
        lines.append(
            f"all bases: false alarms {results['false_alarms']}/{results['clean_runs']}; "
            f"wrong rank {results['wrong_rank']}"
        )
    base_col = f"{'base':<10}" if many else ""
    lines += [
        "",
        f"{'scenario':<21}{'#':>3}  {base_col}{'detected':<9}{'steps':>6}  {'detector':<14}"
        f"{'rank':>5}{'wrong':>6}  effect",
    ]
    for row in results["scenarios"]:
        steps = "-" if row["steps_to_detection"] is None else str(row["steps_to_detection"])
        rank = "-" if row["rank_named"] is None else str(row["rank_named"])
        detected = "yes" if row["detected"] else "no"
        detector = (row["detector"] or "-")[:13]
        base = f"{row['base']:<10}" if many else ""
        lines.append(
            f"{row['attack']:<21}{row['number']:>3}  {base}{detected:<9}{steps:>6}  "
            f"{detector:<14}{rank:>5}{row['wrong_rank']:>6}  "
            f"{describe(row['effect'], row['number'] == 8)}"
        )
    return "\n".join(lines)


def select_bases(names: str) -> tuple[str, ...]:
    """``all`` or comma-separated names of ``job.BASES``, in the order given."""
    if names == "all":
        return tuple(BASES)
    chosen = tuple(dict.fromkeys(part.strip() for part in names.split(",")))
    for name in chosen:
        if name not in BASES:
            raise KeyError(name)
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "list":
        for sc in SCENARIOS:
            print(
                f"{sc.number:>2}  {sc.name:<21} {sc.kind:<8} {sc.goal:<12} {sc.means:<16} "
                f"{sc.summary}"
            )
        print(f"\nbases: {', '.join(BASES)}")
        return 0
    try:
        bases = select_bases(args.base)
    except KeyError as exc:
        print(f"error: unknown base {exc}; choose from {', '.join(BASES)} or all", file=sys.stderr)
        return 2
    try:
        scenarios = select(args.attack)
    except KeyError as exc:
        print(
            f"error: unknown attack {exc}; see `python -m benchmarks.sabotage list`",
            file=sys.stderr,
        )
        return 2
    if args.guard == "on":
        from benchmarks.sabotage.guard_hook import guard_available

        missing = guard_available()
        if missing is not None:
            print(f"error: --guard on needs trainguard.Guard: {missing}", file=sys.stderr)
            return 2
    from benchmarks.sabotage.runner import Settings, run_all

    mode = args.mode if args.mode != "auto" else ("isolate" if args.guard == "on" else "batch")
    settings = Settings(
        out=args.out,
        steps=args.steps,
        seed=args.seed,
        preset=args.preset,
        nproc=args.nproc,
        guard=args.guard == "on",
        repeat=max(1, args.repeat),
        mode=mode,
        every=args.every,
        bases=bases,
        guard_loader=args.guard_loader == "on",
    )
    started = time.perf_counter()
    bench = run_all(settings, scenarios)
    results = assemble(bench, scenarios, started)
    if settings.guard and args.forensics == "on" and results["scenarios"]:
        from benchmarks.sabotage import forensics
        from benchmarks.sabotage.runner import REPO

        env = {k: v for k, v in os.environ.items() if not k.startswith("SABOTAGE_")}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **bench.guard_env)
        results["forensics"] = forensics.score(bench, results, env)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nwrote {args.out / 'results.json'} in {results['timings']['total_s']:.0f} s")
    if args.command == "matrix":
        from benchmarks.sabotage import matrix

        built = matrix.build(results)
        (args.out / "matrix.json").write_text(json.dumps(built, indent=1))
        text = matrix.markdown(built)
        (args.out / "matrix.md").write_text(text + "\n")
        print("\n" + text)
        print(f"\nwrote {args.out / 'matrix.md'} and matrix.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
