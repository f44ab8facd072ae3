"""Installed distributions and their RECORD: which files they own, and whether those
files still hash to what pip wrote down at install time.

RECORD covers the files a wheel installed. Beyond it this module finds files inside a
distribution's top-level folders that no distribution on the same site directory
records (a new ``.py`` dropped into ``torch/``), and hands every ``__pycache__`` file
to :mod:`trainguard.integrity.pycache`.

RECORD is only as trustworthy as the directory holding it: whoever can rewrite
``torch/`` can usually rewrite ``torch-*.dist-info/RECORD`` too. It catches careless
and partial tampering in seconds with no setup; a sealed, signed manifest
(:mod:`trainguard.integrity.manifest`) is the check that holds against a careful
attacker.
"""

from __future__ import annotations

import csv
import email.parser
import email.policy
import importlib.util
import io
import os
import re
import site
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from trainguard._io import MANIFEST_CAP, display, read_text_capped, reason
from trainguard.errors import InputError
from trainguard.integrity.hashing import RECORD_ALGORITHMS, Algorithm, hash_files
from trainguard.integrity.interface import (
    Drift,
    IntegrityError,
    ProgressCallback,
)
from trainguard.integrity.pycache import check_pycs


@dataclass(frozen=True)
class RecordEntry:
    path: str  # absolute, normalised
    digest: str | None  # "sha256=..." as in RECORD, or None when RECORD gives none
    size: int | None


@dataclass(frozen=True)
class Installed:
    """One installed distribution: where it lives and what its RECORD says it owns."""

    name: str  # canonical: lower case, runs of -_. as one -
    version: str
    site: str
    entries: tuple[RecordEntry, ...]
    folders: tuple[str, ...]  # top-level directories it installed into (absolute)

    def recorded(self) -> frozenset[str]:
        return frozenset(e.path for e in self.entries)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def default_site_dirs() -> list[str]:
    """The running interpreter's site-packages directories (and user site if enabled)."""
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return [os.path.realpath(d) for d in dirs if os.path.isdir(d)]


#: METADATA is read whole to find two headers; real ones are at most a few megabytes.
METADATA_CAP = 64 << 20
_DIGITS = re.compile(r"[0-9]{1,20}")


def installed(site_dirs: Sequence[str]) -> list[Installed]:
    """Every distribution with a RECORD in ``site_dirs``, first one found per name.

    The site directory is listed here rather than by ``importlib.metadata``, which treats a
    folder it cannot list, and a METADATA it cannot read, as absent (the distribution would
    drop out of ``--all-packages`` unseen) and opens a FIFO named PKG-INFO to wait forever.
    Only ``*.dist-info`` folders hold a RECORD; a folder that cannot be listed, a dist-info
    that is not a folder, a RECORD with no readable METADATA naming the distribution is an
    IntegrityError naming it.
    """
    found: dict[str, Installed] = {}
    for site_dir in site_dirs:
        real = os.path.realpath(site_dir)
        try:
            names = sorted(os.listdir(real))
        except OSError as exc:
            raise IntegrityError(
                f"{display(real)}: cannot list site directory: {reason(exc)}"
            ) from exc
        for entry in names:
            if not entry.endswith(".dist-info"):
                continue
            info = os.path.join(real, entry)
            try:
                is_dir = stat.S_ISDIR(os.stat(info).st_mode)
            except OSError as exc:
                raise IntegrityError(f"{display(info)}: cannot read: {reason(exc)}") from exc
            if not is_dir:
                raise IntegrityError(f"{display(info)}: is not a folder")
            text = _read_if_present(os.path.join(info, "RECORD"), "RECORD", MANIFEST_CAP)
            if text is None:
                continue
            name, version = _name_and_version(os.path.join(info, "METADATA"))
            key = canonical(name)
            if key in found:
                continue
            entries = tuple(_parse_record(text, real, os.path.join(info, "RECORD")))
            found[key] = Installed(key, version, real, entries, _folders(entries, real))
    return sorted(found.values(), key=lambda d: d.name)


def _name_and_version(path: str) -> tuple[str, str]:
    """The ``Name`` and ``Version`` headers of a dist-info's METADATA (read capped)."""
    text = _read_if_present(path, "METADATA", METADATA_CAP)
    if text is None:
        raise IntegrityError(f"{display(path)}: missing: the distribution's RECORD cannot be named")
    head = text.replace("\r\n", "\n").split("\n\n", 1)[0]
    message = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(head)
    name, version = message.get("Name"), message.get("Version")
    if not isinstance(name, str) or not name.strip():
        raise IntegrityError(f"{display(path)}: METADATA has no Name")
    return name.strip(), (version or "").strip()


def _read_if_present(path: str, what: str, cap: int) -> str | None:
    """A RECORD's or METADATA's text (capped, never from a FIFO), or None when there is none.

    Only a file that is not there is absent: one that cannot be looked at (a dist-info
    folder of mode 000) is an error, never taken for a missing one.
    """
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IntegrityError(f"{display(path)}: cannot read {what}: {reason(exc)}") from exc
    try:
        return read_text_capped(path, cap, what)
    except InputError as exc:
        raise IntegrityError(str(exc)) from exc


def select(dists: Sequence[Installed], names: Iterable[str] | None) -> list[Installed]:
    """The distributions called ``names`` (all when None); an unknown name is an error."""
    if names is None:
        return list(dists)
    by_name = {d.name: d for d in dists}
    chosen = []
    for raw in names:
        dist = by_name.get(canonical(raw))
        if dist is None:
            raise IntegrityError(f"distribution {raw!r} is not installed in the checked site dirs")
        chosen.append(dist)
    return chosen


def _parse_record(text: str, site_dir: str, where: str = "RECORD") -> Iterable[RecordEntry]:
    """RECORD rows as entries; a row no installer writes is an IntegrityError naming its line."""
    reader = csv.reader(io.StringIO(text))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise IntegrityError(f"{display(where)}: line {reader.line_num}: {exc}") from exc
        if not row or not row[0]:
            continue
        line = f"{display(where)}: line {reader.line_num}"
        rel = row[0]
        if "\0" in rel:
            raise IntegrityError(f"{line}: path holds a NUL byte")
        digest = row[1] if len(row) > 1 and row[1] else None
        size = None
        if len(row) > 2 and row[2]:
            if not _DIGITS.fullmatch(row[2]):
                raise IntegrityError(f"{line}: size {row[2][:40]!r} is not a byte count")
            size = int(row[2])
        yield RecordEntry(os.path.normpath(os.path.join(site_dir, rel)), digest, size)


def _folders(entries: Sequence[RecordEntry], site_dir: str) -> tuple[str, ...]:
    return top_folders((e.path for e in entries), site_dir)


def top_folders(paths: Iterable[str], site_dir: str) -> tuple[str, ...]:
    """The top-level directories of ``site_dir`` that ``paths`` lie in (no symlinks)."""
    prefix = site_dir.rstrip(os.sep) + os.sep
    firsts: set[str] = set()
    for path in paths:
        # String slicing, not relpath: this runs for every line of every RECORD.
        if not path.startswith(prefix):
            continue
        first, sep, _ = path[len(prefix) :].partition(os.sep)
        if sep and first != "__pycache__":
            firsts.add(first)
    tops = (os.path.join(site_dir, f) for f in firsts)
    return tuple(sorted(t for t in tops if os.path.isdir(t) and not os.path.islink(t)))


def walk(folder: str, unreadable: list[str] | None = None) -> Iterator[str]:
    """Every non-directory under ``folder``; symlinks (to directories too) are not followed.

    A folder that cannot be listed is never skipped in silence: it raises IntegrityError
    naming it, or, when ``unreadable`` is given, is appended to it for the caller to report.
    """

    def unlistable(exc: OSError) -> None:
        where = os.fsdecode(exc.filename) if exc.filename is not None else folder
        if unreadable is None:
            raise IntegrityError(f"{display(where)}: cannot list folder: {reason(exc)}") from exc
        unreadable.append(where)

    for here, dirs, files in os.walk(folder, followlinks=False, onerror=unlistable):
        for d in dirs:
            full = os.path.join(here, d)
            if os.path.islink(full):
                yield full
        for f in files:
            yield os.path.join(here, f)


def is_cache_file(path: str) -> bool:
    return path.endswith(".pyc") and os.path.basename(os.path.dirname(path)) == "__pycache__"


def owned_files(
    dist: Installed, everyone: frozenset[str], unreadable: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """(files on disk that belong to ``dist``'s folders, of those the ones no RECORD lists).

    Files recorded elsewhere on the same site dir (a shared namespace folder) are
    skipped: they belong to their own distribution. A folder that cannot be listed
    raises, or goes into ``unreadable`` (see :func:`walk`).
    """
    mine = dist.recorded()
    present: list[str] = [e.path for e in dist.entries if os.path.lexists(e.path)]
    unrecorded: list[str] = []
    for folder in dist.folders:
        for path in walk(folder, unreadable):
            if path in mine:
                continue
            if path in everyone:
                continue
            present.append(path)
            unrecorded.append(path)
    # Cache files of top-level single-file modules live in site-packages/__pycache__.
    for e in dist.entries:
        if e.path.endswith(".py") and os.path.dirname(e.path) == dist.site:
            for opt in ("", 1, 2):
                pyc = _cache_path(e.path, opt)
                if pyc and pyc not in mine and os.path.lexists(pyc):
                    present.append(pyc)
    return present, unrecorded


def _cache_path(source: str, opt: str | int) -> str | None:
    try:
        return importlib.util.cache_from_source(source, optimization=opt)
    except NotImplementedError:
        return None


def check_record(
    dists: Sequence[Installed],
    everyone: frozenset[str],
    *,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[list[Drift], int, int, list[str]]:
    """Verify ``dists`` against their RECORD. Returns (drift, files, bytes, notes)."""
    drift: list[Drift] = []
    notes: list[str] = []
    by_algo: dict[str, list[RecordEntry]] = {}
    owner: dict[str, str] = {}
    pycs: list[str] = []
    files = 0
    for dist in dists:
        unlisted: list[str] = []
        present, unrecorded = owned_files(dist, everyone, unlisted)
        drift.extend(
            Drift.at(
                "unreadable", path, dist.name, "folder cannot be listed: its files are unchecked"
            )
            for path in unlisted
        )
        files += len(set(present))
        for e in dist.entries:
            owner[e.path] = dist.name
            if e.digest is None:
                continue
            algo = e.digest.split("=", 1)[0]
            if algo not in RECORD_ALGORITHMS:
                # No installer writes another hash (PEP 376 wants sha256 or better): the file
                # cannot be checked, and a file not checked is never clean.
                gone = not os.path.lexists(e.path)
                drift.append(
                    Drift.at(
                        "removed" if gone else "unreadable",
                        e.path,
                        dist.name,
                        "recorded file is gone"
                        if gone
                        else f"RECORD gives hash {algo[:20]!r}, which cannot be checked",
                        size_before=e.size,
                    )
                )
                continue
            by_algo.setdefault(algo, []).append(e)
        for path in present:
            owner.setdefault(path, dist.name)
            if is_cache_file(path):
                pycs.append(path)
        drift.extend(
            Drift.at("added", path, dist.name, "file recorded by no distribution")
            for path in unrecorded
            if not is_cache_file(path)
        )
    hashed = 0
    for algo, entries in by_algo.items():
        sizes = [e.size or 0 for e in entries]
        result = hash_files(
            [e.path for e in entries],
            _algorithm(algo),
            sizes=sizes,
            workers=workers,
            progress=progress,
        )
        hashed += result.bytes_hashed
        for e in entries:
            got = result.digests.get(e.path)
            if got is None:
                if not os.path.lexists(e.path):
                    drift.append(
                        Drift.at(
                            "removed",
                            e.path,
                            owner[e.path],
                            "recorded file is gone",
                            size_before=e.size,
                        )
                    )
                else:
                    why = result.errors.get(e.path, "unreadable")
                    drift.append(
                        Drift.at("unreadable", e.path, owner[e.path], f"cannot be read: {why}")
                    )
            elif got[0] != e.digest or (e.size is not None and got[1] != e.size):
                drift.append(
                    Drift.at(
                        "modified",
                        e.path,
                        owner[e.path],
                        "content differs from RECORD",
                        size_before=e.size,
                    )
                )
    drift.extend(pyc_drift(sorted(set(pycs)), owner, workers=workers))
    return drift, files, hashed, notes


def _algorithm(name: str) -> Algorithm:
    if name == "sha256":
        return "sha256"
    if name == "sha384":
        return "sha384"
    return "sha512"


def pyc_drift(pycs: Sequence[str], owner: dict[str, str], *, workers: int | None) -> list[Drift]:
    """Drift entries for cache files whose code is not their source's, or that lack one."""
    out: list[Drift] = []
    for v in check_pycs(pycs, workers=workers):
        root = owner.get(v.pyc, "")
        if v.verdict == "mismatch":
            out.append(Drift.at("pyc-mismatch", v.pyc, root, f"{v.detail} ({v.source})"))
        elif v.verdict == "no-source":
            out.append(Drift.at("pyc-orphan", v.pyc, root, v.detail))
        elif v.verdict == "unverifiable":
            out.append(
                Drift.at(
                    "pyc-unverifiable",
                    v.pyc,
                    root,
                    f"{v.detail} ({sys.implementation.cache_tag}); check it with the "
                    "interpreter that wrote it, or delete it",
                )
            )
    return out
