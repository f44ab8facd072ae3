"""Start-up hooks: code Python runs before the job's first line.

``site`` executes every line of a ``.pth`` file that starts with ``import``, imports
``sitecustomize`` and ``usercustomize`` from anywhere on ``sys.path``, and puts each
other ``.pth`` line and every ``PYTHONPATH`` entry on ``sys.path``; the interactive
interpreter also runs ``PYTHONSTARTUP``. None of this is in any package's code, so a
RECORD or a package manifest alone would miss it.

A hook is drift when no distribution's RECORD vouches for it (with a matching hash),
or when it points into a place other users can write.
"""

from __future__ import annotations

import glob
import os
import stat
import sys
from collections.abc import Mapping, Sequence

from trainguard._io import CONFIG_CAP, read_capped, reason
from trainguard.errors import InputError
from trainguard.integrity.hashing import hash_file
from trainguard.integrity.interface import Drift
from trainguard.integrity.record import RecordEntry, _algorithm

HOOK_MODULES = ("sitecustomize", "usercustomize")


def hook_files(site_dir: str) -> list[str]:
    """Files in ``site_dir`` that ``site`` acts on at start-up."""
    found = sorted(glob.glob(os.path.join(glob.escape(site_dir), "*.pth")))
    for mod in HOOK_MODULES:
        for candidate in (f"{mod}.py", os.path.join(mod, "__init__.py")):
            path = os.path.join(site_dir, candidate)
            if os.path.lexists(path):
                found.append(path)
    return found


def read_hook(path: str) -> tuple[str | None, str]:
    """(text, "") of a start-up hook file, or (None, why) when it cannot be read.

    Read capped and only from a regular file: a FIFO named ``x.pth`` must not block the
    check (nor a device never end it). Undecodable bytes are replaced, as ``site`` would
    fail on them anyway.
    """
    try:
        return read_capped(path, CONFIG_CAP, "start-up hook").decode("utf-8", "replace"), ""
    except InputError as exc:
        return None, str(exc).rsplit(": ", 1)[-1]


def executable_lines(pth: str) -> list[str]:
    """The lines of a ``.pth`` file that ``site`` would execute."""
    text, _ = read_hook(pth)
    lines = [] if text is None else text.splitlines()
    return [line for line in lines if line.startswith(("import ", "import\t"))]


def path_lines(pth: str) -> list[str]:
    text, _ = read_hook(pth)
    keep = []
    for line in [] if text is None else text.splitlines():
        if not line.strip() or line.startswith(("#", "import ", "import\t")):
            continue
        keep.append(line.rstrip())
    return keep


def exposed(path: str) -> str | None:
    """Why ``path`` (or the place it would be created) can be written by someone else.

    Trusted owners are root and the current user. A directory anyone may write is
    fine as an ancestor only with the sticky bit (``/tmp``) and only if the entries
    below it are ours.
    """
    trusted = {0, os.getuid()}
    target = os.path.abspath(path)
    probe = target
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    missing = probe != target
    first = True
    while True:
        try:
            st = os.stat(probe)
        except OSError:
            return None
        if st.st_uid not in trusted:
            return f"{probe} is owned by uid {st.st_uid}"
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky = st.st_mode & stat.S_ISVTX
        if writable and (first or not sticky):
            what = f"{target} does not exist and {probe}" if missing else probe
            return f"{what} is writable by group or others"
        first = False
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent


def check_startup(
    site_dirs: Sequence[str],
    recorded: Mapping[str, tuple[str, RecordEntry]],
    environ: Mapping[str, str],
    *,
    search_path: Sequence[str] = (),
    check_hooks: bool = True,
) -> tuple[list[Drift], list[str]]:
    """Hooks in ``site_dirs`` and in the environment. Returns (drift, notes).

    ``recorded`` maps a path to (distribution, RECORD entry) for every distribution
    on those site dirs. ``search_path`` is ``sys.path`` when checking the running
    interpreter: a ``sitecustomize`` anywhere on it runs too. With ``check_hooks``
    false (a sealed manifest already covers the hook files) only the environment and
    the places hooks point into are checked.
    """
    drift: list[Drift] = []
    notes: list[str] = []
    for site_dir in site_dirs:
        for path in hook_files(site_dir):
            if check_hooks:
                _vouch(path, site_dir, recorded, drift, notes)
            if path.endswith(".pth"):
                for line in path_lines(path):
                    where = os.path.join(site_dir, line)
                    why = exposed(where)
                    if why:
                        drift.append(
                            Drift.at(
                                "startup-hook",
                                path,
                                site_dir,
                                f"adds {where} to sys.path, and {why}",
                            )
                        )
    sites = {os.path.realpath(s) for s in site_dirs}
    for entry in search_path:
        if not entry or os.path.realpath(entry) in sites:
            continue
        for mod in HOOK_MODULES:
            path = os.path.join(entry, f"{mod}.py")
            if os.path.lexists(path):
                why = exposed(path)
                if why:
                    drift.append(
                        Drift.at("startup-hook", path, entry, f"{mod} runs at start-up; {why}")
                    )
                else:
                    notes.append(f"start-up hook {path} (not writable by others)")
    startup = environ.get("PYTHONSTARTUP")
    if startup:
        why = exposed(startup)
        if why:
            drift.append(Drift.at("startup-hook", startup, "PYTHONSTARTUP", why))
        else:
            notes.append(f"PYTHONSTARTUP={startup} runs in interactive sessions")
    for entry in filter(None, environ.get("PYTHONPATH", "").split(os.pathsep)):
        why = exposed(entry)
        if why:
            drift.append(Drift.at("startup-hook", entry, "PYTHONPATH", f"on PYTHONPATH and {why}"))
    return drift, notes


def _vouch(
    path: str,
    site_dir: str,
    recorded: Mapping[str, tuple[str, RecordEntry]],
    drift: list[Drift],
    notes: list[str],
) -> None:
    is_pth = path.endswith(".pth")
    if is_pth:
        text, why = read_hook(path)
        if text is None:
            drift.append(Drift.at("startup-hook", path, site_dir, f"cannot be read: {why}"))
            return
    runs = executable_lines(path) if is_pth else ["module body"]
    if not runs:
        return
    owner = recorded.get(path)
    what = f"executes {runs[0]!r}" if is_pth else "is imported at every start-up"
    if owner is None or owner[1].digest is None:
        drift.append(
            Drift.at("startup-hook", path, site_dir, f"{what}; no distribution records it")
        )
        return
    dist, entry = owner
    algo = (entry.digest or "").split("=", 1)[0]
    try:
        digest, _ = hash_file(path, _algorithm(algo))
    except OSError as exc:
        drift.append(Drift.at("startup-hook", path, site_dir, f"cannot be read: {reason(exc)}"))
        return
    if digest != entry.digest:
        drift.append(Drift.at("startup-hook", path, dist, f"{what}; differs from {dist}'s RECORD"))
    else:
        notes.append(f"start-up hook {os.path.basename(path)} from {dist} ({what})")


def interpreter() -> str:
    return f"{sys.executable} ({sys.implementation.name} {sys.version.split()[0]})"
