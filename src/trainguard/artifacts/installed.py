"""Is a module the file of an installed distribution? Answered without importing it.

A pickle that rebuilds an object of a class outside the allowlist makes ``pickle.load``
import the class's module, running its import-time code (and every parent package's
``__init__``). The scan accepts that only for modules the environment vouches for: each
file the import would run is listed in an installed distribution's RECORD, with the hash
RECORD gives. A module dropped on ``sys.path`` (or a shadowing copy earlier on it, or an
edited file) is not. The files are found the way the import system's path finder finds
them, by looking, and read only to hash them: nothing is imported or executed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.machinery
import os
import sys

#: RECORD entries: normalised path -> (hash algorithm, urlsafe base64 digest), "" if none
_Index = dict[str, tuple[str, str]]


def _index(folder: str) -> _Index:
    """The RECORD entries of the distributions installed in ``folder`` (a sys.path entry)."""
    import glob

    records = []
    for record in sorted(glob.glob(os.path.join(glob.escape(folder), "*.dist-info", "RECORD"))):
        try:
            info = os.stat(record)
        except OSError:
            continue
        records.append((record, info.st_size, info.st_mtime_ns))
    return _read_records(folder, tuple(records))


@functools.lru_cache(maxsize=64)
def _read_records(folder: str, records: tuple[tuple[str, int, int], ...]) -> _Index:
    import csv

    index: _Index = {}
    for record, _size, _mtime in records:
        try:
            with open(record, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        for row in rows:
            if not row or not row[0]:
                continue
            mode, _, value = (row[1] if len(row) > 1 else "").partition("=")
            index[os.path.normpath(os.path.join(folder, row[0]))] = (mode, value)
    return index


def _find(name: str, dirs: list[str]) -> tuple[str | None, list[str]]:
    """The file the path finder would run for ``name`` in ``dirs``, and the folders its
    submodules are searched in (none for a plain module)."""
    portions: list[str] = []
    # the path finder's order: a package (its __init__ with any suffix, an extension
    # first) before a module, each suffix in the order of its loaders
    suffixes = (*importlib.machinery.EXTENSION_SUFFIXES, ".py", ".pyc")
    for folder in dirs:
        base = os.path.join(os.path.abspath(folder or os.curdir), name)
        for suffix in suffixes:
            init = os.path.join(base, "__init__" + suffix)
            if os.path.isfile(init):
                return init, [base]
        for suffix in suffixes:
            if os.path.isfile(base + suffix):
                return base + suffix, []
        if os.path.isdir(base):
            portions.append(base)  # a namespace package: no code of its own
    return None, portions


def _digest(path: str, mode: str) -> str:
    info = os.stat(path)
    return _digest_of(path, mode, info.st_size, info.st_mtime_ns, info.st_ino)


@functools.lru_cache(maxsize=1024)
def _digest_of(path: str, mode: str, size: int, mtime: int, inode: int) -> str:
    h = hashlib.new(mode)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode("ascii")


def _resolve(module: str, path: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(why the module is not vouched for, or None; the file that defines it, if any)."""
    dirs = list(path)
    parts = module.split(".")
    site = ""
    found: str | None = None
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        found, dirs = _find(parts[depth - 1], dirs)
        if found is None and not dirs:
            return f"module {name} is not installed here", None
        if depth == 1:  # distributions record their files next to their dist-info
            site = os.path.dirname(found if found is not None else dirs[0])
            if found is not None and os.path.basename(found).startswith("__init__."):
                site = os.path.dirname(site)
        if found is None:
            continue
        shown = os.path.normpath(found)
        entry = _index(site).get(shown)
        if entry is None:
            return f"{shown} (module {name}) is not a file of an installed distribution", None
        mode, value = entry
        try:
            if mode and mode in hashlib.algorithms_available and _digest(found, mode) != value:
                return f"{shown} (module {name}) differs from its distribution's RECORD", None
        except OSError as exc:
            return f"{shown} (module {name}) cannot be read: {exc.strerror or exc}", None
    return None, found


def findable(module: str) -> bool:
    """True if ``import module`` could find it here, as far as lookups tell: a built-in or
    loaded module, or files the path finder finds for its parts. The import system does
    not require identifiers: ``_sysconfigdata__linux_x86_64-linux-gnu`` is a stdlib file."""
    if module in sys.builtin_module_names or module in sys.modules:
        return True
    dirs = list(sys.path)
    parts = module.split(".")
    for depth, part in enumerate(parts, 1):
        if not part or "/" in part or "\0" in part or os.sep in part or part in (".", ".."):
            return False  # the path finder looks names up in a folder's listing
        found, dirs = _find(part, dirs)
        if found is None and not dirs:
            return False
        if not dirs and depth < len(parts):
            return True  # a plain module whose import could still make it a package
    return True


def unvouched(module: str) -> str | None:
    """None if every file importing ``module`` runs belongs to an installed distribution
    and matches its RECORD hash; otherwise why not, as one line."""
    return _resolve(module, tuple(sys.path))[0]


def vouched_source(module: str) -> tuple[str | None, str | None]:
    """(why not vouched for, or None; the file defining ``module``: None for a namespace
    package)."""
    return _resolve(module, tuple(sys.path))
