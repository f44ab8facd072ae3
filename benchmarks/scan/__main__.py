"""Scanner benchmark: trainguard next to picklescan, modelscan and fickling on one corpus.

``python -m benchmarks.scan --out DIR [--big-gb 1] [--tools a,b] [--repeat 3]`` builds the
generated corpus (benchmarks/scan/corpus.py) in a temporary folder, runs every tool over
it, and measures three things on the same files in one run:

1. detection: per malicious sample, did each tool flag it, fail closed, miss it (clean or
   skipped) or error; per benign sample, did it raise a false alarm;
2. throughput: files per second for one process scanning the whole corpus folder;
3. scan time against checkpoint size: a tiny, a ~10 MB and a ``--big-gb`` torch.save
   state dict with the same 16 tensors, median of ``--repeat`` warm runs.

Timed runs are always the tool's own command in a fresh process, tools taking turns.

It writes ``DIR/results.json`` (every number and per-sample verdict) and ``DIR/summary.md``
(the tables the READMEs quote) and prints the tables. The corpus and the checkpoints live
under /tmp and are deleted at the end. The competitors run from ``.venv-bench`` (see
``make bench-scan``); trainguard runs from this interpreter's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.scan.corpus import Sample, build_benign, build_malicious
from benchmarks.scan.tools import TOOLS, FileResult, Run, Tool, timed, versions

REPO = Path(__file__).resolve().parents[2]
TENSORS = 16  # the same count at every size, so only the tensor bytes change
CAUGHT = frozenset({"flagged", "failed_closed"})
READ_ALL = "import sys\nwith open(sys.argv[1], 'rb') as f:\n    while f.read(1 << 24): pass"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scan", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json")
    parser.add_argument("--big-gb", type=float, default=1.0, help="size of the big checkpoint")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per checkpoint size")
    parser.add_argument(
        "--corpus-repeat", type=int, default=7, help="timed runs over the corpus and of start-up"
    )
    parser.add_argument("--bench-venv", type=Path, default=REPO / ".venv-bench")
    return parser.parse_args(argv)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(memory_gb, 1),
        "platform": platform.platform(),
    }


def build_corpus(root: Path) -> tuple[list[Sample], Path]:
    """The malicious and benign corpus under ``root``; returns the samples and the marker."""
    marker = root.parent / "MARKER-a-payload-ran"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice for quantized tensors
        samples = build_malicious(root / "malicious", marker) + build_benign(root / "benign")
    return samples, marker


def write_checkpoint(path: Path, total_bytes: int) -> int:
    """A torch.save state dict of :data:`TENSORS` random float32 tensors; its file size."""
    import torch

    generator = torch.Generator().manual_seed(0)
    per_tensor = max(1, total_bytes // (4 * TENSORS))
    state = {
        f"layers.{i}.weight": torch.rand(per_tensor, generator=generator) for i in range(TENSORS)
    }
    torch.save(state, path)
    del state
    return path.stat().st_size


def shown(argv: Sequence[str]) -> str:
    """A command line as the README shows it: program names, not the venv paths."""
    words = ["<driver script>" if "\n" in a else a for a in argv]
    words[0] = Path(words[0]).name
    return " ".join(words)


def interleaved(
    tools: Sequence[Tool], target: Path | None, workdir: Path, rounds: int
) -> dict[str, dict[str, Any]]:
    """Median of ``rounds`` timed runs per tool (target None: start-up only), warm cache.

    The tools take turns within each round, so a burst of load from elsewhere on the
    machine slows all of them rather than one.
    """
    runs: dict[str, list[Run]] = {tool.name: [] for tool in tools}
    for _ in range(rounds):
        for tool in tools:
            runs[tool.name].append(tool.time_once(target, workdir))
    return {
        name: {
            "median_s": round(statistics.median(r.seconds for r in done), 4),
            "runs_s": [round(r.seconds, 4) for r in done],
            "exit_codes": sorted({r.exit_code for r in done}),
        }
        for name, done in runs.items()
    }


def tally(samples: Sequence[Sample], verdicts: dict[str, dict[str, FileResult]]) -> dict[str, Any]:
    """The detection table: per tool, outcomes on the malicious and the benign halves."""
    table: dict[str, Any] = {}
    for tool, by_name in verdicts.items():
        bad = Counter(by_name[s.name].outcome for s in samples if s.malicious)
        good = Counter(by_name[s.name].outcome for s in samples if not s.malicious)

        def names(malicious: bool, outcomes: set[str], tool: str = tool) -> list[str]:
            return [
                s.name
                for s in samples
                if s.malicious == malicious and verdicts[tool][s.name].outcome in outcomes
            ]

        table[tool] = {
            "malicious": {
                "total": sum(bad.values()),
                "caught": bad["flagged"] + bad["failed_closed"],
                # samples whose payload a naive loader runs with the torch installed here
                "total_live": sum(1 for s in samples if s.malicious and s.live),
                "caught_live": len(
                    [
                        s
                        for s in samples
                        if s.malicious and s.live and by_name[s.name].outcome in CAUGHT
                    ]
                ),
                "flagged": bad["flagged"],
                "failed_closed": bad["failed_closed"],
                "missed": bad["clean"] + bad["skipped"],
                "missed_skipped": bad["skipped"],
                "errors": bad["error"],
                "missed_samples": names(True, {"clean", "skipped"}),
                "failed_closed_samples": names(True, {"failed_closed"}),
                "error_samples": names(True, {"error"}),
            },
            "benign": {
                "total": sum(good.values()),
                "false_alarms": good["flagged"] + good["failed_closed"],
                "false_alarms_failed_closed": good["failed_closed"],
                "errors": good["error"],
                "passed": good["clean"] + good["skipped"],
                "passed_skipped": good["skipped"],
                "false_alarm_samples": names(False, {"flagged", "failed_closed"}),
                "error_samples": names(False, {"error"}),
            },
        }
    return table


def measure(args: argparse.Namespace, tools: list[Tool], tmp: Path) -> dict[str, Any]:
    """Everything but the metadata: detection, throughput and size scaling."""
    root = tmp / "corpus"
    samples, marker = build_corpus(root)
    if len({s.name for s in samples}) != len(samples):
        raise SystemExit("corpus sample names are not unique; verdicts are keyed by name")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    work = tmp / "work"
    work.mkdir()

    verdicts: dict[str, dict[str, FileResult]] = {}
    examined: dict[str, int] = {}
    for tool in tools:
        print(f"[scan] {tool.name}: corpus of {len(files)} files", file=sys.stderr)
        run = tool.scan(root, work)  # also warms the cache for the timed runs
        missing = FileResult("skipped", "not reported", "the tool did not report this file")
        if run.failure:
            print(f"[scan] {tool.name} failed: {run.failure}", file=sys.stderr)
            missing = FileResult("error", "no report", run.failure)
        verdicts[tool.name] = {s.name: run.results.get(s.path.resolve(), missing) for s in samples}
        examined[tool.name] = sum(
            1 for p in files if run.results.get(p.resolve(), missing).outcome != "skipped"
        )

    print(f"[time] corpus and start-up, {args.corpus_repeat} rounds", file=sys.stderr)
    corpus_times = interleaved(tools, root, work, args.corpus_repeat)
    startup_times = interleaved(tools, None, work, args.corpus_repeat)
    throughput: dict[str, Any] = {}
    for tool in tools:
        timing = corpus_times[tool.name]
        startup = startup_times[tool.name]["median_s"]
        net = timing["median_s"] - startup
        throughput[tool.name] = {
            "files": len(files),
            "examined": examined[tool.name],
            **timing,
            "files_per_s": round(len(files) / timing["median_s"], 1),
            "startup_s": startup,
            "startup_runs_s": startup_times[tool.name]["runs_s"],
            "files_per_s_after_startup": round(len(files) / net, 1) if net > 0 else None,
            "command": shown(tool.timing_argv(Path("CORPUS"), Path("REPORT"))),
            "startup_command": shown(tool.startup_argv()),
        }

    sizes: dict[str, Any] = {}
    for label, nbytes in (
        ("tiny", 1024),
        ("10MB", 10 * 2**20),
        (f"{args.big_gb:g}GB", int(args.big_gb * 2**30)),
    ):
        path = tmp / f"checkpoint-{label}.pt"
        size = write_checkpoint(path, nbytes)
        print(f"[size] {label}: {size / 2**20:.1f} MiB", file=sys.stderr)
        outcomes = {}
        for tool in tools:  # the verdict run also warms the cache
            result = tool.scan(path, work).results.get(path.resolve())
            outcomes[tool.name] = result.outcome if result else "skipped"
        timings = interleaved(tools, path, work, args.repeat)
        entry: dict[str, Any] = {
            "bytes": size,
            "tools": {t.name: {"outcome": outcomes[t.name], **timings[t.name]} for t in tools},
        }
        # what growing with tensor bytes would look like: one process reading every byte
        reads = [timed([sys.executable, "-c", READ_ALL, str(path)], work)[0] for _ in range(3)]
        entry["read_all_s"] = round(statistics.median(reads), 4)
        path.unlink()
        sizes[label] = entry

    return {
        "corpus": {
            "malicious": sum(s.malicious for s in samples),
            "benign": sum(not s.malicious for s in samples),
            "files_in_folder": len(files),
            "payload_ran": marker.exists(),
        },
        "detection": tally(samples, verdicts),
        "throughput": throughput,
        "size_scaling": sizes,
        "samples": [
            {
                "name": s.name,
                "technique": s.technique,
                "reference": s.reference,
                "malicious": s.malicious,
                "format": s.format,
                "live": s.live,
                "file": str(s.path.relative_to(root)),
                "verdicts": {t: vars(v[s.name]) for t, v in verdicts.items()},
            }
            for s in samples
        ],
    }


def _detection_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| tool | malicious caught | live ones caught | of which fail-closed "
        "| missed (of which skipped) | errors | benign false alarms (of which fail-closed) "
        "| benign errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in results["tools"]:
        m, b = results["detection"][t]["malicious"], results["detection"][t]["benign"]
        lines.append(
            f"| {t} | {m['caught']}/{m['total']} | {m['caught_live']}/{m['total_live']} "
            f"| {m['failed_closed']} "
            f"| {m['missed']} ({m['missed_skipped']}) | {m['errors']} "
            f"| {b['false_alarms']}/{b['total']} ({b['false_alarms_failed_closed']}) "
            f"| {b['errors']} |"
        )
    return lines


#: how a cell of the per-sample tables reads, on malicious and on benign samples
_ON_MALICIOUS = {"flagged": "caught", "failed_closed": "fail-closed", "clean": "**missed**"}
_ON_MALICIOUS |= {"skipped": "**missed** (skipped)", "error": "error"}
_ON_BENIGN = {"flagged": "**false alarm**", "failed_closed": "**false alarm** (fail-closed)"}
_ON_BENIGN |= {"clean": "ok", "skipped": "ok (skipped)", "error": "error"}


def _sample_table(results: dict[str, Any], malicious: bool) -> list[str]:
    """Samples on which at least one tool was not right, one column per tool."""
    tools = results["tools"]
    marks, right = (_ON_MALICIOUS, {"flagged", "failed_closed"})
    if not malicious:
        marks, right = (_ON_BENIGN, {"clean", "skipped"})
    lines = ["| sample | format | " + " | ".join(tools) + " |", "|---|---|" + "---|" * len(tools)]
    for s in results["samples"]:
        cells = [s["verdicts"][t]["outcome"] for t in tools]
        if s["malicious"] != malicious or all(c in right for c in cells):
            continue
        live = "" if s["live"] else " (not live)"
        row = " | ".join(marks[c] for c in cells)
        lines.append(f"| `{s['name']}`{live} | {s['format']} | {row} |")
    return lines


def _speed_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| tool | files/s | wall s, whole corpus | start-up s | files/s after start-up "
        "| time ÷ trainguard | files examined | exit status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    speed = results["throughput"]
    base = speed.get("trainguard")
    for t in results["tools"]:
        e = speed[t]
        ratio = f"{e['median_s'] / base['median_s']:.2f}x" if base else "-"
        net = e["files_per_s_after_startup"] or "-"
        lines.append(
            f"| {t} | {e['files_per_s']} | {e['median_s']:.3f} | {e['startup_s']:.3f} | {net} "
            f"| {ratio} | {e['examined']}/{e['files']} | {e['exit_codes']} |"
        )
    return lines


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def _size_table(results: dict[str, Any]) -> list[str]:
    sizes = results["size_scaling"]
    labels = list(sizes)
    heads = [f"{label} ({_size(sizes[label]['bytes'])})" for label in labels]
    lines = ["| tool | " + " | ".join(heads) + f" | {labels[-1]} / {labels[1]} |"]
    lines.append("|---|" + "---|" * (len(labels) + 1))
    for t in results["tools"]:
        cells = [sizes[label]["tools"][t] for label in labels]
        text = [f"{c['median_s']:.3f} s ({c['outcome']})" for c in cells]
        growth = cells[-1]["median_s"] / cells[1]["median_s"]
        lines.append(f"| {t} | " + " | ".join(text) + f" | {growth:.2f}x |")
    reads = [sizes[label]["read_all_s"] for label in labels]
    text = [f"{r:.3f} s" for r in reads]
    lines.append(
        "| *reference: read every byte* | " + " | ".join(text) + f" | {reads[-1] / reads[1]:.2f}x |"
    )
    return lines


def markdown(results: dict[str, Any]) -> str:
    """``summary.md``: detection, the samples some tool got wrong, speed, size scaling."""
    parts = [
        ["## Detection", ""] + _detection_table(results),
        ["## Malicious samples some tool did not catch", ""] + _sample_table(results, True),
        ["## Benign samples some tool alarmed or failed on", ""] + _sample_table(results, False),
        ["## Throughput (one process, whole corpus folder)", ""] + _speed_table(results),
        ["## Scan time vs checkpoint size (median, warm cache)", ""] + _size_table(results),
    ]
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        print(f"unknown tool(s) {unknown}; choose from {list(TOOLS)}", file=sys.stderr)
        return 2
    tools = [TOOLS[n](args.bench_venv) for n in names]
    for tool in tools:
        reason = tool.unavailable()
        if reason:
            print(f"{tool.name}: {reason}", file=sys.stderr)
            return 2

    started = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory(prefix="trainguard-bench-scan-") as tmp:
        measured = measure(args, tools, Path(tmp))
    results = {
        "command": "python -m benchmarks.scan " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "machine": machine(),
        "versions": versions(args.bench_venv, names),
        "tools": names,
        "big_gb": args.big_gb,
        "repeat": args.repeat,
        "corpus_repeat": args.corpus_repeat,
        **measured,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = markdown(results)
    (args.out / "summary.md").write_text(summary)
    print(summary)
    if results["corpus"]["payload_ran"]:
        print("WARNING: a corpus payload ran during the benchmark (marker exists)", file=sys.stderr)
        return 1
    print(f"wrote {args.out / 'results.json'} in {results['duration_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
