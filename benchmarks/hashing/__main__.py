"""Runner: ``python -m benchmarks.hashing [--package torch] [--repeat 3] [--out FILE]``.

Times, over the same files (every file the distribution owns):

- ``sha256sum`` and ``b3sum`` (if installed), each as one ``xargs -0`` pipeline;
- ``trainguard verify-env --packages P`` (RECORD: SHA-256 plus every .pyc compiled
  and compared), and its hashing alone;
- ``trainguard verify-env MANIFEST`` (BLAKE3, full re-hash) and with ``--fast``;

warm (median of ``--repeat`` runs after one warm-up) and cold (page cache dropped
before each run through /proc/sys/vm/drop_caches, when that is permitted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from trainguard.integrity.hashing import hash_files
from trainguard.integrity.record import installed, owned_files, select

Runner = Callable[[], None]


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def timed(run: Runner, repeat: int, cold: bool) -> float:
    times = []
    if not cold:
        run()  # warm-up: fill the page cache
    for _ in range(repeat):
        if cold:
            drop_caches()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shell(args: list[str], stdin: bytes | None = None) -> Runner:
    def run() -> None:
        subprocess.run(args, input=stdin, stdout=subprocess.DEVNULL, check=True)

    return run


def trainguard(args: list[str], ok: tuple[int, ...] = (0,)) -> Runner:
    def run() -> None:
        done = subprocess.run(
            [sys.executable, "-m", "trainguard", *args, "--format", "json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        if done.returncode not in ok:
            raise SystemExit(f"trainguard {args} exited {done.returncode}: {done.stderr[-500:]!r}")

    return run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hashing")
    parser.add_argument("--package", default="torch")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-cold", action="store_true")
    opts = parser.parse_args()

    (dist,) = select(
        installed([p for p in sys.path if p.endswith("site-packages")]), [opts.package]
    )
    everyone = frozenset(e.path for d in installed([dist.site]) for e in d.entries)
    present, _ = owned_files(dist, everyone)
    files = sorted({p for p in present if os.path.isfile(p) and not os.path.islink(p)})
    total = sum(os.path.getsize(p) for p in files)
    nul = b"\0".join(os.fsencode(p) for p in files) + b"\0"
    print(f"{opts.package}: {len(files)} files, {total / 1e6:.1f} MB, {os.cpu_count()} cores")

    work = Path(tempfile.mkdtemp(prefix="tg-bench-"))
    keys = work / "keys"
    subprocess.run(
        [sys.executable, "-m", "trainguard", "keygen", "-o", str(keys)],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    manifest = work / "env.manifest"
    seal_start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "trainguard",
            "seal",
            "--packages",
            opts.package,
            "--key",
            str(keys / "trainguard.key"),
            "-o",
            str(manifest),
        ],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    seal_s = time.perf_counter() - seal_start

    cases: dict[str, Runner] = {
        "sha256sum": shell(["xargs", "-0", "sha256sum"], nul),
    }
    if shutil.which("b3sum"):
        cases["b3sum"] = shell(["xargs", "-0", "b3sum"], nul)
    cases["trainguard hash only, sha256 (in-process)"] = lambda: _check(hash_files(files, "sha256"))
    cases["trainguard hash only, blake3 (in-process)"] = lambda: _check(hash_files(files, "blake3"))
    cases["trainguard verify-env MANIFEST (blake3)"] = trainguard(
        ["verify-env", str(manifest), "--pubkey", str(keys / "trainguard.pub")]
    )
    cases["trainguard verify-env MANIFEST --fast"] = trainguard(
        ["verify-env", str(manifest), "--pubkey", str(keys / "trainguard.pub"), "--fast"]
    )
    cases["trainguard verify-env --packages (RECORD + pyc)"] = trainguard(
        ["verify-env", "--packages", opts.package]
    )

    cold_ok = not opts.no_cold and drop_caches()
    results = []
    for name, run in cases.items():
        row: dict[str, object] = {"case": name}
        for label, cold in (("warm", False), ("cold", True)):
            if cold and not cold_ok:
                row[label] = None
                continue
            secs = timed(run, opts.repeat, cold)
            row[label] = {
                "seconds": round(secs, 3),
                "files_per_s": round(len(files) / secs),
                "mb_per_s": round(total / 1e6 / secs, 1),
            }
        results.append(row)
        print(_line(row))
    if not cold_ok:
        print("cold cache: not measured (/proc/sys/vm/drop_caches not writable here)")
    print(f"seal (RECORD precheck + pyc check + blake3 + sign): {seal_s:.2f} s")
    doc = {
        "package": opts.package,
        "files": len(files),
        "bytes": total,
        "cores": os.cpu_count(),
        "cold_measured": cold_ok,
        "seal_seconds": round(seal_s, 3),
        "results": results,
    }
    if opts.out:
        opts.out.write_text(json.dumps(doc, indent=2) + "\n")
    shutil.rmtree(work)
    return 0


def _check(result: object) -> None:
    errors = getattr(result, "errors", {})
    if errors:
        raise SystemExit(f"hash errors: {list(errors)[:3]}")


def _line(row: dict[str, object]) -> str:
    def cell(v: object) -> str:
        if not isinstance(v, dict):
            return f"{'n/a':>28}"
        return f"{v['seconds']:7.2f} s {v['files_per_s']:7d} f/s {v['mb_per_s']:7.1f} MB/s"

    return f"{row['case']:50} warm {cell(row['warm'])}   cold {cell(row['cold'])}"


if __name__ == "__main__":
    raise SystemExit(main())
