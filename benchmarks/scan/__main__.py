"""Scanner benchmark: trainguard next to picklescan, modelscan and fickling on one corpus.

``python -m benchmarks.scan --out DIR [--big-gb 1] [--tools a,b] [--repeat 3]`` builds the
generated corpus (benchmarks/scan/corpus.py: the regression corpus, the differential
samples and the real-world folders) in a temporary folder, runs every tool over it, and
measures four things on the same files in one run:

1. detection: per malicious or differential sample, did each tool flag it, fail closed,
   miss it (clean or skipped) or error; per benign or real-world file, did it raise a
   false alarm (flagged or failed closed) or pass it (clean, or skipped as no model file);
2. throughput: files per second for one process scanning the whole corpus folder;
3. folder throughput: the same on a real folder of a few hundred files, ``--folder-copies``
   copies of the real-world part (model folders, Trainer and Lightning output, text);
4. scan time against checkpoint size: a tiny, a ~10 MB and a ``--big-gb`` torch.save
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
import shutil
import statistics
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.scan.corpus import (
    Sample,
    build_benign,
    build_differential,
    build_malicious,
    build_real,
)
from benchmarks.scan.tables import markdown
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
    parser.add_argument(
        "--folder-copies",
        type=int,
        default=10,
        help="copies of the real-world part in the real folder timed for folder throughput",
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
    """The whole corpus under ``root`` (regression malicious and benign, differential,
    real-world folders); returns the samples and the marker every payload would create."""
    marker = root.parent / "MARKER-a-payload-ran"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice for quantized tensors
        samples = build_malicious(root / "malicious", marker) + build_benign(root / "benign")
        samples += build_differential(root / "differential", marker)
    samples += build_real(root / "real")
    return samples, marker


def build_folder(real: Path, folder: Path, copies: int) -> dict[str, Any]:
    """The real folder timed for folder throughput: ``copies`` copies of the real-world
    part (model folders, Trainer and Lightning output, checkpoints, repository text)."""
    for i in range(copies):
        shutil.copytree(real, folder / f"project-{i:02d}")
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "copies": copies,
    }


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


def _malicious_counts(samples: Sequence[Sample], by_name: dict[str, FileResult]) -> dict[str, Any]:
    """Caught (flagged or failed closed), missed and errors over malicious ``samples``."""
    bad = Counter(by_name[s.name].outcome for s in samples)

    def names(outcomes: set[str]) -> list[str]:
        return [s.name for s in samples if by_name[s.name].outcome in outcomes]

    return {
        "total": len(samples),
        "caught": bad["flagged"] + bad["failed_closed"],
        # samples whose payload a naive loader runs with the torch installed here
        "total_live": sum(1 for s in samples if s.live),
        "caught_live": sum(1 for s in samples if s.live and by_name[s.name].outcome in CAUGHT),
        "flagged": bad["flagged"],
        "failed_closed": bad["failed_closed"],
        "missed": bad["clean"] + bad["skipped"],
        "missed_skipped": bad["skipped"],
        "errors": bad["error"],
        "missed_samples": names({"clean", "skipped"}),
        "failed_closed_samples": names({"failed_closed"}),
        "error_samples": names({"error"}),
    }


def _benign_counts(samples: Sequence[Sample], by_name: dict[str, FileResult]) -> dict[str, Any]:
    """False alarms (flagged or failed closed), passes (skipped apart) and errors."""
    good = Counter(by_name[s.name].outcome for s in samples)

    def names(outcomes: set[str]) -> list[str]:
        return [s.name for s in samples if by_name[s.name].outcome in outcomes]

    out = {
        "total": len(samples),
        "false_alarms": good["flagged"] + good["failed_closed"],
        "false_alarms_failed_closed": good["failed_closed"],
        "errors": good["error"],
        "passed": good["clean"] + good["skipped"],
        "passed_skipped": good["skipped"],
        "false_alarm_samples": names({"flagged", "failed_closed"}),
        "error_samples": names({"error"}),
    }
    if any(s.expected for s in samples):  # the real-world part: what a user should see
        out["not_as_expected"] = [
            s.name for s in samples if s.expected and by_name[s.name].outcome != s.expected
        ]
    return out


def tally(samples: Sequence[Sample], verdicts: dict[str, dict[str, FileResult]]) -> dict[str, Any]:
    """The detection and false-alarm tables: per tool, outcomes on each part of the corpus.

    "malicious" and "benign" are the regression corpus, "differential" the polyglots and
    reader differentials (all malicious), "real" the real-world folders (all benign).
    """
    core = [s for s in samples if s.part == "core"]
    parts = {
        "malicious": [s for s in core if s.malicious],
        "benign": [s for s in core if not s.malicious],
        "differential": [s for s in samples if s.part == "differential"],
        "real": [s for s in samples if s.part == "real"],
    }
    table: dict[str, Any] = {}
    for tool, by_name in verdicts.items():
        table[tool] = {
            part: (_malicious_counts if part in ("malicious", "differential") else _benign_counts)(
                chosen, by_name
            )
            for part, chosen in parts.items()
        }
    return table


def read_verdicts(tool: Tool, target: Path, work: Path) -> dict[Path, FileResult]:
    """One verdict per file under ``target``: what the tool reported, else skipped (or,
    when the tool left no readable report, an error)."""
    run = tool.scan(target, work)
    missing = FileResult("skipped", "not reported", "the tool did not report this file")
    if run.failure:
        print(f"[scan] {tool.name} failed: {run.failure}", file=sys.stderr)
        missing = FileResult("error", "no report", run.failure)
    files = [p.resolve() for p in target.rglob("*") if p.is_file()]
    return {p: run.results.get(p, missing) for p in files}


def speed(
    tools: Sequence[Tool],
    target: Path,
    files: Sequence[Path],
    examined: dict[str, int],
    work: Path,
    rounds: int,
    startup_times: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Files per second for one process scanning ``target``, median of ``rounds``."""
    times = interleaved(tools, target, work, rounds)
    out: dict[str, Any] = {}
    for tool in tools:
        timing = times[tool.name]
        startup = startup_times[tool.name]["median_s"]
        net = timing["median_s"] - startup
        out[tool.name] = {
            "files": len(files),
            "examined": examined[tool.name],
            **timing,
            "files_per_s": round(len(files) / timing["median_s"], 1),
            "startup_s": startup,
            "startup_runs_s": startup_times[tool.name]["runs_s"],
            "files_per_s_after_startup": round(len(files) / net, 1) if net > 0 else None,
            "command": shown(tool.timing_argv(Path("FOLDER"), Path("REPORT"))),
            "startup_command": shown(tool.startup_argv()),
        }
    return out


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
        results = read_verdicts(tool, root, work)  # also warms the cache for the timed runs
        verdicts[tool.name] = {s.name: results[s.path.resolve()] for s in samples}
        examined[tool.name] = sum(1 for p in files if results[p.resolve()].outcome != "skipped")

    print(f"[time] corpus and start-up, {args.corpus_repeat} rounds", file=sys.stderr)
    startup_times = interleaved(tools, None, work, args.corpus_repeat)
    throughput = speed(tools, root, files, examined, work, args.corpus_repeat, startup_times)

    # folder throughput: a real folder of a few hundred files, every tool in turn
    folder = tmp / "folder"
    folder_info = build_folder(root / "real", folder, args.folder_copies)
    folder_files = sorted(p for p in folder.rglob("*") if p.is_file())
    folder_examined: dict[str, int] = {}
    outcomes: dict[str, dict[str, int]] = {}
    for tool in tools:
        print(f"[scan] {tool.name}: real folder of {len(folder_files)} files", file=sys.stderr)
        results = read_verdicts(tool, folder, work)
        seen = Counter(results[p.resolve()].outcome for p in folder_files)
        outcomes[tool.name] = dict(seen)
        folder_examined[tool.name] = len(folder_files) - seen["skipped"]
    print(f"[time] real folder, {args.corpus_repeat} rounds", file=sys.stderr)
    folder_speed = speed(
        tools, folder, folder_files, folder_examined, work, args.corpus_repeat, startup_times
    )
    for tool in tools:
        folder_speed[tool.name]["outcomes"] = outcomes[tool.name]

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
            "malicious": sum(s.malicious for s in samples if s.part == "core"),
            "benign": sum(not s.malicious for s in samples if s.part == "core"),
            "differential": sum(s.part == "differential" for s in samples),
            "real": sum(s.part == "real" for s in samples),
            "files_in_folder": len(files),
            "payload_ran": marker.exists(),
        },
        "detection": tally(samples, verdicts),
        "throughput": throughput,
        "folder": folder_info,
        "folder_throughput": folder_speed,
        "size_scaling": sizes,
        "samples": [
            {
                "name": s.name,
                "technique": s.technique,
                "reference": s.reference,
                "malicious": s.malicious,
                "format": s.format,
                "live": s.live,
                "part": s.part,
                "loader": s.loader,
                "expected": s.expected,
                "file": str(s.path.relative_to(root)),
                "verdicts": {t: vars(v[s.name]) for t, v in verdicts.items()},
            }
            for s in samples
        ],
    }


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
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="trainguard-bench-scan-") as tmp:
        measured = measure(args, tools, Path(tmp))
    # other work on the machine slows every tool; the timings say how much there was
    load = {"before": [round(x, 2) for x in load_before]}
    load["after"] = [round(x, 2) for x in os.getloadavg()]
    results = {
        "command": "python -m benchmarks.scan " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "machine": machine(),
        "load_average_1_5_15_min": load,
        "versions": versions(args.bench_venv, names),
        "tools": names,
        "big_gb": args.big_gb,
        "repeat": args.repeat,
        "corpus_repeat": args.corpus_repeat,
        "folder_copies": args.folder_copies,
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
