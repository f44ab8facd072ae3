"""Streamed, parallel file hashing: BLAKE3 for our manifests, SHA-256 for RECORD.

Files are read in 1 MiB chunks into one reused buffer per thread (never whole into
memory). Files of a chunk or more are hashed on a thread pool, since ``hashlib`` and
``blake3`` release the GIL while they hash; the many small files go through the
calling thread at the same time (see ``hash_files`` for why not the pool). Very
large files are BLAKE3-hashed through a memory map with the hash's own threads.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import mmap
import os
import stat
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import blake3

from trainguard.integrity.interface import IntegrityError, ProgressCallback

Algorithm = Literal["blake3", "sha256", "sha384", "sha512"]
RECORD_ALGORITHMS: frozenset[str] = frozenset({"sha256", "sha384", "sha512"})

CHUNK = 1 << 20
# Above this, BLAKE3 hashes through mmap with its own worker threads; below it, the
# per-file thread pool already keeps the cores busy.
MMAP_THRESHOLD = 16 << 20


def default_workers() -> int:
    # Twice the cores: hashing is CPU-bound warm but I/O-bound cold, and a few extra
    # outstanding reads are what a cold disk needs.
    return max(2, min(32, 2 * (os.cpu_count() or 1)))


def hash_file(path: str, algorithm: Algorithm) -> tuple[str, int]:
    """Return (digest, size) of one file, read in chunks.

    BLAKE3 is hex; the SHA-2 digests are in RECORD's own spelling: ``sha256=`` and
    urlsafe base64 without padding. A FIFO, device or socket is never opened (opening a
    device can act on it, reading one may never end): its digest is ``special:`` and its
    kind, see :func:`special_digest`. A symlink raises ELOOP (``O_NOFOLLOW``).
    """
    kind = _special(os.lstat(path).st_mode)
    if kind is not None:
        return kind, 0
    flags = (
        os.O_RDONLY
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_NONBLOCK", 0)
    )
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        kind = _special(info.st_mode)  # swapped for a FIFO since the lstat
        if kind is not None:
            return kind, 0
        os.set_blocking(fd, True)
        size = info.st_size
        if algorithm == "blake3":
            b3 = blake3.blake3(max_threads=blake3.blake3.AUTO if size >= MMAP_THRESHOLD else 1)
            if size >= MMAP_THRESHOLD:
                # Map the descriptor we checked, not the path again (which could be a FIFO
                # by now).
                try:
                    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
                        b3.update(mapped)
                        return b3.hexdigest(), len(mapped)
                except ValueError:  # emptied since the fstat: nothing to map
                    b3 = blake3.blake3()
            total = _stream(fd, b3.update, size)
            return b3.hexdigest(), total
        sha = hashlib.new(algorithm)
        total = _stream(fd, sha.update, size)
        return f"{algorithm}=" + base64.urlsafe_b64encode(sha.digest()).rstrip(b"=").decode(), total
    finally:
        os.close(fd)


_SPECIAL = {
    stat.S_IFIFO: "special:fifo",
    stat.S_IFCHR: "special:char-device",
    stat.S_IFBLK: "special:block-device",
    stat.S_IFSOCK: "special:socket",
    stat.S_IFDIR: "special:directory",
}


def _special(mode: int) -> str | None:
    """The digest recorded for a file that is not read: FIFO, device, socket, folder."""
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return None
    return _SPECIAL.get(stat.S_IFMT(mode), "special:unknown")


def special_digest(path: str) -> str | None:
    """``special:fifo`` (and so on) when ``path`` is not a regular file or a symlink."""
    return _special(os.lstat(path).st_mode)


def _stream(fd: int, update: object, size: int) -> int:
    feed = update  # a bound hash .update
    if size < CHUNK:
        # One read of exactly what is there (+1 to see growth): no big buffer to
        # allocate and zero for each of thousands of small files.
        data = os.read(fd, size + 1)
        total = len(data)
        feed(data)  # type: ignore[operator]
        if total <= size:
            return total
    else:
        total = 0
    buf = _buffer()
    view = memoryview(buf)
    while True:
        n = os.readv(fd, [buf])
        if n == 0:
            return total
        feed(view[:n])  # type: ignore[operator]
        total += n


_local = threading.local()


def _buffer() -> bytearray:
    """One reusable read buffer per thread."""
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(CHUNK)
    return buf


def hash_symlink(path: str, algorithm: Algorithm) -> tuple[str, int]:
    """A symlink is recorded by its target text, never followed."""
    target = os.fsencode(os.readlink(path))
    if algorithm == "blake3":
        return "link:" + blake3.blake3(target).hexdigest(), len(target)
    return "link:" + hashlib.sha256(target).hexdigest(), len(target)


class HashResult:
    """Digests of many files: ``digests[path]`` or ``errors[path]`` (an OSError text)."""

    def __init__(self) -> None:
        self.digests: dict[str, tuple[str, int]] = {}
        self.errors: dict[str, str] = {}
        self.bytes_hashed = 0


def hash_files(
    paths: Iterable[str],
    algorithm: Algorithm,
    *,
    sizes: Sequence[int] | None = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> HashResult:
    """Hash ``paths`` in parallel. Missing or unreadable files land in ``errors``.

    ``sizes`` (same order as ``paths``), when known, saves a ``stat`` per file; they
    drive scheduling and the progress total only, never the result.
    """
    todo = list(paths)
    total = sum(sizes) if sizes is not None else 0
    result = HashResult()
    lock = threading.Lock()
    done = [0]

    def one(path: str) -> None:
        try:
            try:
                digest, size = hash_file(path, algorithm)
            except OSError as exc:
                # O_NOFOLLOW refused a symlink: record the link itself.
                if exc.errno != errno.ELOOP:
                    raise
                digest, size = hash_symlink(path, algorithm)
        except OSError as exc:
            with lock:
                result.errors[path] = exc.strerror or str(exc)
            return
        with lock:
            result.digests[path] = (digest, size)
            result.bytes_hashed += size
            done[0] += size
            if progress is not None:
                progress(done[0], max(total, done[0]))

    if not todo:
        return result
    known = list(sizes) if sizes is not None else [_lsize(p) for p in todo]
    # Small files cost Python time (open, read, close), large ones cost hash time
    # with the GIL released. Threads fighting over the GIL for thousands of tiny
    # files are slower than one thread (each hand-off waits for the switch
    # interval), so small files go through the calling thread while the pool
    # hashes the large ones in C alongside it.
    small = [p for p, n in zip(todo, known, strict=True) if n < CHUNK]
    large = [p for _, p in sorted(zip(known, todo, strict=True), reverse=True) if _ >= CHUNK]
    count = min(workers or default_workers(), len(large))
    try:
        if count == 0:
            for path in small:
                one(path)
        else:
            with ThreadPoolExecutor(max_workers=count, thread_name_prefix="tg-hash") as pool:
                pending = [pool.submit(one, path) for path in large]
                for path in small:
                    one(path)
                for future in pending:
                    future.result()
    except MemoryError as exc:  # pragma: no cover - defensive
        raise IntegrityError("out of memory while hashing; lower --workers") from exc
    return result


def _lsize(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0
