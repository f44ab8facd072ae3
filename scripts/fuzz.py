"""Run trainguard's fuzz targets for as long as asked; write a reproducer for every crash.

    python scripts/fuzz.py --target all --seconds 300 --out fuzz-out
    python scripts/fuzz.py --target ledger_rows --seconds 60 --engine atheris
    python scripts/fuzz.py --target scan --replay fuzz-out/scan/crash-0123abcd.bin

The targets are those of ``tests/fuzz/targets.py`` (``make test`` runs each briefly under
hypothesis). Each target runs in its own worker process with its address space limited
(``--memory-mb`` above what the worker holds once started) and a per-input alarm; the
parent restarts a worker that dies or stops making progress and keeps the input it was
on. ``--engine atheris`` (coverage-guided, when ``atheris`` is importable) or ``random``
(mutations of the seeds: byte flips, cuts, splices, length fields, JSON edits). Each
distinct crash (exception type and the line it came from) is written once to
``OUT/TARGET/crash-HASH.bin`` with its traceback in ``crash-HASH.txt``; ``OUT/TARGET/
stats.json`` counts inputs and crashes. See docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HANG_SECONDS = 30.0


class _Alarm(BaseException):
    """Raised by SIGALRM: one input ran past its time."""


def _signature(exc: BaseException) -> str:
    """Exception type and the innermost trainguard (or target) line: one per distinct crash."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/trainguard/" in f.filename or "/tests/fuzz/" in f.filename]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    place = f"{Path(where.filename).name}:{where.lineno}" if where else "?"
    kind = type(exc).__name__
    if kind == "ContractViolation":  # the message says which promise broke
        kind += ":" + str(exc).split(":")[1].split("(")[0].strip()[:40]
    return f"{kind}@{place}"


class Worker:
    """One target in this process: runs inputs, records distinct crashes."""

    def __init__(self, name: str, out: Path, seconds_per_input: float) -> None:
        from tests.fuzz import targets

        self.targets = targets
        self.name = name
        self.out = out
        self.limit = seconds_per_input
        self.out.mkdir(parents=True, exist_ok=True)
        self.current = out / "current.bin"
        self.stats: dict[str, Any] = {"target": name, "inputs": 0, "crashes": 0, "distinct": {}}
        old = out / "stats.json"
        if old.exists():  # a restarted worker goes on counting
            self.stats = json.loads(old.read_text())
        self.last_write = 0.0
        targets.workspace()

    def one(self, data: bytes) -> None:
        self.current.write_bytes(data)
        signal.setitimer(signal.ITIMER_REAL, self.limit)
        try:
            self.targets.run(self.name, data)
        except BaseException as exc:  # noqa: BLE001 - everything but a clean return is a finding
            signal.setitimer(signal.ITIMER_REAL, 0)
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.record(data, exc)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        self.stats["inputs"] += 1
        now = time.monotonic()
        if now - self.last_write > 2.0:
            self.flush()
            self.last_write = now

    def record(self, data: bytes, exc: BaseException) -> None:
        sig = "Hang (per-input alarm)" if isinstance(exc, _Alarm) else _signature(exc)
        self.stats["crashes"] += 1
        seen = self.stats["distinct"]
        if sig in seen:
            seen[sig]["count"] += 1
            return
        digest = hashlib.sha256(sig.encode()).hexdigest()[:8]
        path = self.out / f"crash-{digest}.bin"
        path.write_bytes(data)
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        (self.out / f"crash-{digest}.txt").write_text(f"{sig}\n\n{text}")
        seen[sig] = {"count": 1, "reproducer": str(path)}
        self.flush()

    def flush(self) -> None:
        tmp = self.out / "stats.json.tmp"
        tmp.write_text(json.dumps(self.stats, indent=1) + "\n")
        os.replace(tmp, self.out / "stats.json")


def _limit_memory(mb: int) -> None:
    """Cap the address space at what the process holds now plus ``mb``."""
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    cap = vm * 1024 + (mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _alarm(signum: int, frame: Any) -> None:
    raise _Alarm()


def work(args: argparse.Namespace) -> int:
    """The worker: ``--worker NAME``; runs until its deadline."""
    sys.path.insert(0, str(ROOT))
    signal.signal(signal.SIGALRM, _alarm)
    if args.engine == "atheris":
        import atheris  # type: ignore[import-not-found]

        with atheris.instrument_imports(include=["trainguard", "tests.fuzz"]):
            worker = Worker(args.worker, args.out / args.worker, args.per_input)
    else:
        worker = Worker(args.worker, args.out / args.worker, args.per_input)
    _limit_memory(args.memory_mb)
    targets = worker.targets
    seeds = targets.seeds(args.worker)
    deadline = time.monotonic() + args.seconds
    rng = random.Random(args.seed)
    if args.engine == "atheris":
        corpus = args.out / args.worker / "corpus"
        corpus.mkdir(exist_ok=True)
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i}").write_bytes(seed)

        def mutator(data: bytes, max_size: int, seed: int) -> bytes:
            local = random.Random(seed)
            if not data or local.random() < 0.5:
                base = data or seeds[local.randrange(len(seeds))]
                return targets.mutate(args.worker, base, local.randrange)[:max_size]
            return bytes(atheris.Mutate(data, max_size))

        atheris.Setup(
            [
                sys.argv[0],
                f"-max_total_time={int(args.seconds)}",
                f"-seed={args.seed}",
                "-max_len=65536",
                "-rss_limit_mb=0",  # the address-space cap above does this job
                str(corpus),
            ],
            worker.one,
            custom_mutator=mutator,
        )
        try:
            atheris.Fuzz()
        finally:
            worker.flush()
        return 0
    try:
        while time.monotonic() < deadline:
            seed = seeds[rng.randrange(len(seeds))]
            worker.one(targets.mutate(args.worker, seed, rng.randrange))
    finally:
        worker.flush()
    return 0


def supervise(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one target's worker until the time is up, restarting it after a hard crash."""
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stats.json").unlink(missing_ok=True)
    deadline = time.monotonic() + args.seconds
    hard: list[str] = []
    attempt = 0
    while (left := deadline - time.monotonic()) > 1:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
        command += ["--seconds", f"{left:.0f}", "--out", str(args.out), "--engine", args.engine]
        command += ["--seed", str(args.seed + attempt), "--memory-mb", str(args.memory_mb)]
        command += ["--per-input", str(args.per_input)]
        attempt += 1
        log = open(folder / "worker.log", "ab")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
        current = folder / "current.bin"
        while proc.poll() is None:
            time.sleep(0.5)
            stale = current.exists() and time.time() - current.stat().st_mtime > HANG_SECONDS
            if stale or time.monotonic() > deadline + HANG_SECONDS + 60:
                proc.kill()
                proc.wait()
                break
        log.close()
        if proc.returncode != 0 and current.exists():
            data = current.read_bytes()
            digest = hashlib.sha256(data).hexdigest()[:8]
            kept = folder / f"hard-crash-{digest}.bin"
            kept.write_bytes(data)
            hard.append(f"{kept} (worker exit {proc.returncode})")
    stats_file = folder / "stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {"inputs": 0}
    stats["hard_crashes"] = hard
    stats_file.write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def replay(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.fuzz import targets

    data = Path(args.replay).read_bytes()
    try:
        targets.run(args.target, data)
    except BaseException:  # noqa: BLE001 - show whatever it is
        traceback.print_exc()
        return 1
    print(f"{args.replay}: target {args.target} keeps its contract")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="all", help="a target name or 'all'")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target")
    parser.add_argument("--out", type=Path, default=Path("fuzz-out"))
    parser.add_argument("--engine", choices=["random", "atheris"], default=None)
    parser.add_argument("--seed", type=int, default=None, help="random by default")
    parser.add_argument("--memory-mb", type=int, default=2048, help="address space per input")
    parser.add_argument("--per-input", type=float, default=10.0, help="seconds per input")
    parser.add_argument("--jobs", type=int, default=1, help="targets run at once")
    parser.add_argument("--replay", help="run one saved input through --target and show it")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    if args.engine is None:
        try:
            import atheris  # type: ignore[import-not-found]  # noqa: F401

            args.engine = "atheris"
        except ImportError:
            args.engine = "random"
    if args.worker:
        return work(args)
    if args.replay:
        return replay(args)
    sys.path.insert(0, str(ROOT))
    from tests.fuzz.targets import TARGETS

    names = sorted(TARGETS) if args.target == "all" else [args.target]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target {unknown[0]}; one of: {', '.join(sorted(TARGETS))}, all")
    print(
        f"engine {args.engine}, seed {args.seed}, {args.seconds:.0f} s per target", file=sys.stderr
    )
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = dict(zip(names, pool.map(lambda n: supervise(n, args), names), strict=True))
    failed = False
    for name, stats in results.items():
        distinct = stats.get("distinct", {})
        line = f"{name}: {stats.get('inputs', 0)} inputs, {len(distinct)} distinct crash(es)"
        print(line + (f", {len(stats['hard_crashes'])} hard" if stats["hard_crashes"] else ""))
        for sig, info in distinct.items():
            print(f"  {sig} x{info['count']}: {info['reproducer']}")
        for hard in stats["hard_crashes"]:
            print(f"  hard crash: {hard}")
        failed = failed or bool(distinct or stats["hard_crashes"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
