"""Checks ``__pycache__/*.pyc`` files against the source they claim to come from.

Python runs a cached ``.pyc`` whenever its header matches the source's mtime and size
(or hash), without reading the source again. So the attack is a ``.pyc`` whose header
is copied from the genuine one and whose code is not: the ``.py`` is untouched and
RECORD cannot see it (pip records ``.pyc`` files without a hash).

The check: compile the source with the optimisation level named in the ``.pyc`` file
name and compare the code objects. Equality of code objects covers the bytecode,
constants (recursively, nested functions included), names, line and exception tables;
it ignores ``co_filename``, which legitimately differs when an environment is moved.

Compiling and un-marshalling run in worker processes started with ``-I -S`` (no
``site``, so no ``.pth`` file of the checked environment runs in them): ``marshal`` is
not meant for hostile input and a crash must not take the caller down, and
compilation holds the GIL so processes are what spreads it over the cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from trainguard.integrity.interface import IntegrityError

Verdict = Literal["ok", "stale", "mismatch", "unverifiable", "no-source"]

# Runs in a bare interpreter: reads [[pyc, source, optimize], ...] as JSON on stdin and
# writes one [verdict, detail] per task. A header that does not validate against the
# source means Python would recompile instead of loading the pyc: "stale", harmless.
_WORKER = r"""
import importlib.util, json, marshal, os, stat, sys
MAGIC = importlib.util.MAGIC_NUMBER
def read(path):
    # Only regular files: a FIFO would block the read forever, a device never end it.
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(0, "not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        os.set_blocking(fd, True)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks), st
            chunks.append(chunk)
    finally:
        os.close(fd)
def check(pyc, src, opt):
    try:
        data, _ = read(pyc)
    except OSError as e:
        return ["unverifiable", "cannot read: %s" % (e.strerror or e)]
    if len(data) < 16 or data[:4] != MAGIC:
        return ["unverifiable", "magic number is not this interpreter's"]
    flags = int.from_bytes(data[4:8], "little")
    try:
        source, st = read(src)
    except OSError as e:
        return ["no-source", "source unreadable: %s" % (e.strerror or e)]
    if flags & 1:
        checked = bool(flags & 2)
        want = importlib.util.source_hash(source)
        live = data[8:16] == want
        how = "hash-based" if checked else "unchecked-hash"
        if checked and not live:
            return ["stale", how]
    else:
        how = "timestamp"
        live = (int.from_bytes(data[8:12], "little") == (int(st.st_mtime) & 0xFFFFFFFF)
                and int.from_bytes(data[12:16], "little") == (st.st_size & 0xFFFFFFFF))
        if not live:
            return ["stale", how]
    try:
        code = compile(source, src, "exec", dont_inherit=True, optimize=opt)
    except (SyntaxError, ValueError, MemoryError, RecursionError, OverflowError) as e:
        # CPython's parser says MemoryError for 150 nested brackets, the compiler
        # RecursionError for a long chain of unary operators: Python cannot compile such a
        # source either, so whatever it runs comes from the pyc
        return ["mismatch", "source does not compile (%s) but a %s pyc is present" % (
            type(e).__name__, how)]
    body = data[16:]
    if marshal.dumps(code) == body:
        return ["ok", how]
    try:
        cached = marshal.loads(body)
    except Exception as e:
        return ["mismatch", "pyc body does not unmarshal: %s" % type(e).__name__]
    if type(cached) is type(code) and cached == code:
        return ["ok", how]
    return ["mismatch", "%s pyc header matches its source but its code does not" % how]
def guarded(pyc, src, opt):
    try:
        return check(pyc, src, opt)
    except Exception as e:  # one hostile file must not cost the verdicts of the others
        return ["unverifiable", "cannot be checked: %s" % type(e).__name__]
tasks = json.load(sys.stdin)
json.dump([guarded(*t) for t in tasks], sys.stdout)
"""


@dataclass(frozen=True)
class PycVerdict:
    pyc: str
    source: str | None
    verdict: Verdict
    detail: str


def source_for(pyc: str) -> tuple[str | None, int | None]:
    """The source a ``__pycache__`` file would be loaded for, and its optimisation level.

    Returns ``(None, None)`` when the tag is not this interpreter's: such a file is
    loaded only by another Python, and cannot be checked by this one.
    """
    name = os.path.basename(pyc)
    parts = name.split(".")
    tag = sys.implementation.cache_tag
    if len(parts) < 3 or parts[1] != tag:
        return None, None
    opt = 0
    if len(parts) == 4 and parts[2].startswith("opt-") and parts[2][4:].isdigit():
        opt = int(parts[2][4:])
    elif len(parts) != 3:
        return None, None
    try:
        return importlib.util.source_from_cache(pyc), opt
    except ValueError:
        return None, None


def check_pycs(pycs: Sequence[str], *, workers: int | None = None) -> list[PycVerdict]:
    """Check each ``__pycache__`` file against its source; one verdict per input."""
    verdicts: dict[str, PycVerdict] = {}
    tasks: list[tuple[str, str, int]] = []
    for pyc in pycs:
        source, opt = source_for(pyc)
        if source is None or opt is None:
            verdicts[pyc] = PycVerdict(
                pyc, None, "unverifiable", "not a cache file of this interpreter"
            )
        elif not os.path.exists(source):
            verdicts[pyc] = PycVerdict(pyc, None, "no-source", "no source file next to it")
        else:
            tasks.append((pyc, source, opt))
    for (pyc, source, _), (verdict, detail) in zip(tasks, _run(tasks, workers), strict=True):
        verdicts[pyc] = PycVerdict(pyc, source, verdict, detail)
    return [verdicts[p] for p in pycs]


def _run(tasks: list[tuple[str, str, int]], workers: int | None) -> list[tuple[Verdict, str]]:
    if not tasks:
        return []
    count = max(1, min(workers or (os.cpu_count() or 1), (len(tasks) + 199) // 200))
    # Interleave so each worker gets a similar mix of large and small modules.
    chunks = [tasks[i::count] for i in range(count)]
    with ThreadPoolExecutor(max_workers=count) as pool:
        answers = list(pool.map(_one_worker, chunks))
    merged: list[tuple[Verdict, str]] = [("unverifiable", "")] * len(tasks)
    for i, answer in enumerate(answers):
        for j, item in enumerate(answer):
            merged[i + j * count] = item
    return merged


def _one_worker(chunk: list[tuple[str, str, int]]) -> list[tuple[Verdict, str]]:
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-B", "-c", _WORKER],
        input=json.dumps(chunk),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise IntegrityError(f"pyc checker exited with status {done.returncode}: {last}")
    answer = json.loads(done.stdout)
    return [(v, d) for v, d in answer]
