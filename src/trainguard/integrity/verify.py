"""The two things users call: ``seal`` an environment, ``verify_environment`` against it.

Both gather the distributions on the checked site directories once, run the
checks of the other modules, and apply the allowlist: an allowed difference moves
from ``drift`` to ``allowed`` in the report, where it stays visible.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from trainguard._io import CONFIG_CAP, check_output, display, read_text_capped
from trainguard.errors import InputError
from trainguard.integrity import manifest as _manifest
from trainguard.integrity import signing
from trainguard.integrity.interface import (
    Drift,
    EnvReport,
    IntegrityError,
    ProgressCallback,
    SignatureStatus,
)
from trainguard.integrity.record import (
    Installed,
    RecordEntry,
    check_record,
    default_site_dirs,
    installed,
    select,
)
from trainguard.integrity.startup import check_startup, interpreter

PathLike = str | os.PathLike[str]


#: A glob longer than this is refused: no path is that long, and each glob is matched
#: against every drift entry.
GLOB_CAP = 4096


def read_allow(patterns: Iterable[str]) -> list[str]:
    """Expand ``@FILE`` items (one glob per line, ``#`` comments) into globs."""
    out: list[str] = []
    for item in patterns:
        if item.startswith("@"):
            where = display(item[1:])
            try:
                lines = read_text_capped(item[1:], CONFIG_CAP, "allow file").splitlines()
            except InputError as exc:
                raise IntegrityError(str(exc)) from exc
            for number, line in enumerate(lines, 1):
                glob = line.strip()
                if glob and not glob.startswith("#"):
                    out.append(_glob(glob, f"{where}: line {number}"))
        else:
            out.append(_glob(item, "--allow"))
    return out


def _glob(pattern: str, where: str) -> str:
    if len(pattern) > GLOB_CAP:
        raise IntegrityError(f"{where}: glob of {len(pattern)} characters (at most {GLOB_CAP})")
    return pattern


def split_allowed(
    drift: Iterable[Drift], patterns: Sequence[str]
) -> tuple[list[Drift], list[Drift]]:
    """(still drift, allowed). A glob matches the absolute path or the bare file name."""
    kept: list[Drift] = []
    allowed: list[Drift] = []
    for d in drift:
        hit = next(
            (
                p
                for p in patterns
                if fnmatch.fnmatchcase(d.path, p)
                or fnmatch.fnmatchcase(os.path.basename(d.path), p)
            ),
            None,
        )
        if hit is None:
            kept.append(d)
        else:
            allowed.append(d.allow(hit))
    return kept, allowed


def _sites(site_packages: Sequence[PathLike] | None) -> list[str]:
    if site_packages is None:
        return default_site_dirs()
    sites = []
    for s in site_packages:
        if not os.path.isdir(s):
            raise IntegrityError(f"{s} is not a directory")
        sites.append(os.path.realpath(s))
    return sites


def _recorded(dists: Sequence[Installed]) -> dict[str, tuple[str, RecordEntry]]:
    return {e.path: (d.name, e) for d in dists for e in d.entries}


def verify_environment(
    manifest: PathLike | None = None,
    *,
    public_key: PathLike | None = None,
    packages: Sequence[str] | None = None,
    all_packages: bool = False,
    site_packages: Sequence[PathLike] | None = None,
    allow: Sequence[str] = (),
    fast: bool = False,
    workers: int | None = None,
    environ: Mapping[str, str] | None = None,
    progress: ProgressCallback | None = None,
) -> EnvReport:
    """Check the installed environment; return a typed report (``report.clean``).

    With ``manifest``: every sealed file against its BLAKE3 hash, size and mode, the
    manifest's signature against ``public_key`` (required). Without: ``packages``
    (or ``all_packages``) against their RECORD. Both modes check ``__pycache__``
    files against their sources and the start-up hooks. ``site_packages`` defaults
    to the running interpreter's; ``allow`` holds globs (or ``@FILE``) of known,
    benign differences; ``fast`` trusts an unchanged (device, inode, size, mtime,
    ctime) instead of re-hashing (manifest mode only; see docs/verify-env.md).
    """
    started = time.perf_counter()
    if packages is not None and not packages:
        # "--packages ''" names nothing: checking nothing must not read as clean
        raise IntegrityError("--packages names no distribution")
    sites = _sites(site_packages)
    env = os.environ if environ is None else environ
    search = sys.path if site_packages is None else []
    patterns = read_allow(allow)
    dists = installed(sites)
    recorded = _recorded(dists)
    everyone = frozenset(recorded)
    signature: SignatureStatus = "not-applicable"
    signer = None
    if manifest is not None:
        if public_key is None:
            raise IntegrityError("verifying a manifest needs --pubkey, the key it was sealed with")
        document = _manifest.read(manifest)
        signature, signer = _manifest.check_signature(document, public_key)
        drift, files, hashed, notes, names = _manifest.compare(
            document["body"],
            packages=packages,
            fast=fast,
            workers=workers,
            progress=progress,
            installed_versions={d.name: d.version for d in dists},
            recorded_by={path: owner for path, (owner, _) in recorded.items()},
        )
        sealed_hooks = any(r.get("kind") == "startup" for r in document["body"]["roots"])
        hook_drift, hook_notes = check_startup(
            sites, recorded, env, search_path=search, check_hooks=not sealed_hooks
        )
    else:
        if fast:
            raise IntegrityError("--fast needs a manifest: RECORD holds no stat to trust")
        if packages is None and not all_packages:
            raise IntegrityError("say which distributions: --packages NAME,... or --all-packages")
        chosen = select(dists, None if all_packages else packages)
        names = [d.name for d in chosen]
        drift, files, hashed, notes = check_record(
            chosen, everyone, workers=workers, progress=progress
        )
        hook_drift, hook_notes = check_startup(sites, recorded, env, search_path=search)
    drift.extend(hook_drift)
    notes.extend(hook_notes)
    kept, allowed = split_allowed(_dedupe(drift), patterns)
    return EnvReport(
        mode="manifest" if manifest is not None else "record",
        interpreter=interpreter(),
        distributions=tuple(names),
        files_checked=files,
        bytes_hashed=hashed,
        seconds=time.perf_counter() - started,
        drift=tuple(kept),
        allowed=tuple(allowed),
        signature=signature,
        signer=signer,
        manifest=None if manifest is None else os.fspath(manifest),
        notes=tuple(notes),
    )


def seal(
    paths: Sequence[PathLike],
    *,
    key: PathLike,
    output: PathLike,
    packages: Sequence[str] | None = None,
    all_packages: bool = False,
    site_packages: Sequence[PathLike] | None = None,
    allow: Sequence[str] = (),
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Write a signed manifest of ``paths`` and distributions; return its path.

    Distributions are first verified against their RECORD and their ``.pyc`` files
    against their sources, so a seal never approves code that already drifted (unless
    ``allow`` names it). Start-up hooks of the site directories are sealed as they are.
    """
    if not paths and not packages and not all_packages:
        raise IntegrityError("nothing to seal: give paths, --packages or --all-packages")
    # Everything that can be refused is refused before anything is hashed: the output
    # (a device or FIFO is never replaced; a regular file is overwritten, as always),
    # the key, the allow files.
    check_output(output, force=True, what="manifest")
    private = signing.load_private(key)
    sites = _sites(site_packages)
    patterns = read_allow(allow)
    dists = installed(sites)
    everyone = frozenset(_recorded(dists))
    chosen = select(dists, None if all_packages else packages) if (packages or all_packages) else []
    if chosen:
        drift, _, _, _ = check_record(chosen, everyone, workers=workers)
        kept, _ = split_allowed(drift, patterns)
        if kept:
            first = kept[0]
            raise IntegrityError(
                f"refusing to seal: {len(kept)} file(s) already differ from their RECORD, "
                f"first {first.path} ({first.kind}); see verify-env --packages, or --allow it"
            )
    body = _manifest.build_body(
        chosen,
        everyone,
        [os.fspath(p) for p in paths],
        sites if chosen else [],
        workers=workers,
        progress=progress,
    )
    return _manifest.write(output, body, private)


def _dedupe(drift: Iterable[Drift]) -> list[Drift]:
    seen: set[tuple[str, str]] = set()
    out = []
    for d in drift:
        if (d.kind, d.path) not in seen:
            seen.add((d.kind, d.path))
            out.append(d)
    return out
