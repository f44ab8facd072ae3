"""Sealed manifests: a signed list of every approved file, and drift against it.

The schema is documented in docs/manifest.md. In short::

    {"schema": "trainguard.manifest/1",
     "body": {"hash": "blake3", "sealed": {...}, "interpreter": {...},
              "roots": [{"kind": "distribution"|"path"|"startup", "name", "version",
                         "base", "files": [{"path", "size", "mode", "hash", "stat"}]}]},
     "signature": {"algorithm": "ed25519", "key_id", "public_key", "value"}}

The signature covers ``SCHEMA + "\\n" + canonical JSON of body`` (sorted keys, no
whitespace, UTF-8), so the schema version is signed too and reformatting the file
does not break it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import socket
import stat
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from trainguard.integrity import signing
from trainguard.integrity.hashing import hash_files
from trainguard.integrity.interface import (
    Drift,
    DriftKind,
    ManifestError,
    ProgressCallback,
    SignatureStatus,
    user_name,
)
from trainguard.integrity.pycache import check_pycs
from trainguard.integrity.record import (
    Installed,
    canonical,
    is_cache_file,
    owned_files,
    top_folders,
    walk,
)
from trainguard.integrity.startup import hook_files

SCHEMA = "trainguard.manifest/1"
# A file changed this recently may change again within the same coarse timestamp
# tick without its ctime moving, so --fast must not trust its stat (git's "racily
# clean" problem); such entries are sealed without one.
RACY_SECONDS = 2.0


def message(body: dict[str, Any]) -> bytes:
    """The exact bytes the signature covers."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return (SCHEMA + "\n" + canonical).encode("utf-8")


def build_body(
    dists: Sequence[Installed],
    everyone: frozenset[str],
    paths: Sequence[str],
    site_dirs: Sequence[str],
    *,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Hash everything to be sealed and return the manifest body (unsigned)."""
    plan: list[tuple[dict[str, str | None], str, list[str]]] = []
    for dist in dists:
        present, _ = owned_files(dist, everyone)
        meta: dict[str, str | None] = {
            "kind": "distribution",
            "name": dist.name,
            "version": dist.version,
        }
        plan.append((meta, dist.site, sorted(set(present))))
    for raw in paths:
        base = os.path.abspath(raw)
        if not os.path.lexists(base):
            raise ManifestError(f"{raw}: no such file or directory")
        files = sorted(walk(base)) if os.path.isdir(base) else [base]
        plan.append(({"kind": "path", "name": base, "version": None}, base, files))
    plan.extend(
        ({"kind": "startup", "name": site, "version": None}, site, hook_files(site))
        for site in site_dirs
    )
    every = [f for _, _, files in plan for f in files]
    result = hash_files(every, "blake3", sizes=_sizes(every), workers=workers, progress=progress)
    if result.errors:
        path, why = next(iter(result.errors.items()))
        raise ManifestError(f"cannot seal {path}: {why}")
    now = _dt.datetime.now(tz=_dt.timezone.utc)
    roots = []
    for meta, base, files in plan:
        entries = []
        for path in files:
            st = os.lstat(path)
            digest, size = result.digests[path]
            racy = now.timestamp() - st.st_ctime < RACY_SECONDS
            entries.append(
                {
                    "path": _rel(path, base),
                    "size": size,
                    "mode": f"{stat.S_IMODE(st.st_mode):04o}",
                    "hash": digest,
                    "stat": None if racy else _stat_key(st),
                }
            )
        roots.append({**meta, "base": base, "files": entries})
    return {
        "hash": "blake3",
        "sealed": {
            "user": user_name(os.getuid()),
            "host": socket.gethostname(),
            "time": now.isoformat(),
            "tool": "trainguard",
        },
        "interpreter": {
            "executable": sys.executable,
            "version": sys.version.split()[0],
            "implementation": sys.implementation.name,
            "cache_tag": sys.implementation.cache_tag,
        },
        "roots": roots,
    }


def write(path: str | os.PathLike[str], body: dict[str, Any], key_path: str) -> Path:
    """Sign ``body`` with the private key at ``key_path`` and write the manifest."""
    key = signing.load_private(key_path)
    public = key.public_key()

    document = {
        "schema": SCHEMA,
        "body": body,
        "signature": {
            "algorithm": "ed25519",
            "key_id": signing.key_id(public),
            "public_key": base64.b64encode(signing.raw_public(public)).decode("ascii"),
            "value": signing.sign(key, message(body)),
        },
    }
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", "utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        raise ManifestError(f"cannot write {out}: {exc.strerror}") from exc
    return out


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not JSON (line {exc.lineno}); is it a manifest?") from exc
    if not isinstance(document, dict) or not isinstance(document.get("body"), dict):
        raise ManifestError(f"{path} is not a trainguard manifest")
    if document.get("schema") != SCHEMA:
        raise ManifestError(
            f"{path} has schema {document.get('schema')!r}; this trainguard reads {SCHEMA}"
        )
    return document


def check_signature(
    document: dict[str, Any], public_key: str | os.PathLike[str]
) -> tuple[SignatureStatus, str | None]:
    """(status, key id of the trusted key) for a manifest checked against ``public_key``."""
    key = signing.load_public(public_key)
    ident = signing.key_id(key)
    sig = document.get("signature")
    if not isinstance(sig, dict) or not isinstance(sig.get("value"), str):
        return "missing", ident
    if sig.get("algorithm") != "ed25519":
        return "invalid", ident
    ok = signing.verify(key, message(document["body"]), sig["value"])
    return ("valid" if ok else "invalid"), ident


def compare(
    body: dict[str, Any],
    *,
    packages: Iterable[str] | None = None,
    fast: bool = False,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    installed_versions: dict[str, str] | None = None,
    recorded_by: dict[str, str] | None = None,
) -> tuple[list[Drift], int, int, list[str], list[str]]:
    """Drift of the disk against ``body``. Returns (drift, files, bytes, notes, dists).

    ``recorded_by`` maps paths to the installed distribution whose RECORD lists them:
    a file in a shared namespace folder (``nvidia/``) that another distribution owns
    is that distribution's business, not drift of this one.
    """
    try:
        roots = list(body["roots"])
    except (KeyError, TypeError) as exc:
        raise ManifestError("manifest body has no roots") from exc
    wanted = None if packages is None else {canonical(p) for p in packages}
    if wanted is not None:
        sealed = {r.get("name") for r in roots if r.get("kind") == "distribution"}
        unknown = wanted - sealed
        if unknown:
            raise ManifestError(f"not in the manifest: {', '.join(sorted(unknown))}")
        roots = [r for r in roots if r.get("kind") != "distribution" or r["name"] in wanted]
    drift: list[Drift] = []
    notes: list[str] = []
    to_hash: dict[str, tuple[dict[str, Any], str, str]] = {}  # path -> (entry, kind, root)
    modes: dict[str, str] = {}
    files = 0
    dists: list[str] = []
    for root in roots:
        kind, name, base = root["kind"], str(root["name"]), str(root["base"])
        sealed_files = {os.path.normpath(os.path.join(base, f["path"])): f for f in root["files"]}
        if kind == "distribution":
            dists.append(name)
            now_version = (installed_versions or {}).get(name)
            if now_version is not None and now_version != root.get("version"):
                drift.append(
                    Drift.at(
                        "version-changed",
                        base,
                        name,
                        f"sealed {root.get('version')}, installed {now_version}",
                    )
                )
            current = {
                p
                for p in _current_dist_files(sealed_files, base)
                if p in sealed_files or (recorded_by or {}).get(p, name) == name
            }
        elif kind == "startup":
            current = set(hook_files(base))
        else:
            current = set(walk(base)) if os.path.isdir(base) else {base}
        files += len(current | set(sealed_files))
        drift.extend(
            Drift.at(_kind("added", kind), path, name, "not in the manifest")
            for path in sorted(current - set(sealed_files))
        )
        for path, entry in sealed_files.items():
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                drift.append(
                    Drift.at(
                        _kind("removed", kind),
                        path,
                        name,
                        "sealed file is gone",
                        size_before=entry["size"],
                        mode_before=int(entry["mode"], 8),
                    )
                )
                continue
            if (
                fast
                and entry.get("stat") is not None
                and entry["stat"] == _stat_key(st)
                and st.st_size == entry["size"]
                and _mode(st) == entry["mode"]
            ):
                continue
            to_hash[path] = (entry, kind, name)
            modes[path] = _mode(st)
    paths = list(to_hash)
    result = hash_files(
        paths,
        "blake3",
        sizes=[to_hash[p][0]["size"] for p in paths],
        workers=workers,
        progress=progress,
    )
    pycs: list[tuple[str, str]] = []
    for path, (entry, kind, name) in to_hash.items():
        got = result.digests.get(path)
        mode_now = modes[path]
        if got is None:
            why = result.errors.get(path, "unreadable")
            drift.append(Drift.at(_kind("modified", kind), path, name, f"cannot be read: {why}"))
        elif got[0] != entry["hash"]:
            if is_cache_file(path) and kind != "startup":
                pycs.append((path, name))
                continue
            detail = "content differs from the manifest"
            if mode_now != entry["mode"]:
                detail += f"; mode {entry['mode']} -> {mode_now}"
            drift.append(
                Drift.at(
                    _kind("modified", kind),
                    path,
                    name,
                    detail,
                    size_before=entry["size"],
                    mode_before=int(entry["mode"], 8),
                )
            )
        elif mode_now != entry["mode"]:
            drift.append(
                Drift.at(
                    _kind("mode-changed", kind),
                    path,
                    name,
                    f"mode {entry['mode']} -> {mode_now}",
                    size_before=entry["size"],
                    mode_before=int(entry["mode"], 8),
                )
            )
    # Added cache files too: a new .pyc is harmless only if it is its source's code.
    for d in list(drift):
        if d.kind == "added" and is_cache_file(d.path):
            drift.remove(d)
            pycs.append((d.path, d.root))
    drift.extend(_pyc_changes(pycs, notes, workers))
    return drift, files, result.bytes_hashed, notes, dists


def _pyc_changes(pycs: list[tuple[str, str]], notes: list[str], workers: int | None) -> list[Drift]:
    """A changed cache file is drift only if its code is not its (sealed) source's."""
    out: list[Drift] = []
    roots = dict(pycs)
    for v in check_pycs([p for p, _ in pycs], workers=workers):
        root = roots[v.pyc]
        if v.verdict == "mismatch":
            out.append(Drift.at("pyc-mismatch", v.pyc, root, f"{v.detail} ({v.source})"))
        elif v.verdict == "no-source":
            out.append(Drift.at("pyc-orphan", v.pyc, root, v.detail))
        elif v.verdict == "unverifiable":
            out.append(Drift.at("pyc-unverifiable", v.pyc, root, v.detail))
        else:
            notes.append(f"{v.pyc} was rewritten but holds its source's code ({v.verdict})")
    return out


def _current_dist_files(sealed: dict[str, Any], base: str) -> set[str]:
    """Files now present where the distribution was sealed: its folders, walked afresh."""
    tops = top_folders(sealed, base)
    current: set[str] = set()
    for top in tops:
        current.update(walk(top))
    inside = tuple(t + os.sep for t in tops)
    current.update(p for p in sealed if not p.startswith(inside) and os.path.lexists(p))
    return current


def _kind(kind: DriftKind, root_kind: str) -> DriftKind:
    return "startup-hook" if root_kind == "startup" else kind


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _rel(path: str, base: str) -> str:
    if path == base:
        return "."
    return Path(os.path.relpath(path, base)).as_posix()


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def _sizes(paths: Sequence[str]) -> list[int]:
    return [_size(p) for p in paths]
