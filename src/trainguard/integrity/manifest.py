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

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trainguard._io import (
    MANIFEST_CAP,
    describe_mode,
    display,
    parse_json,
    read_capped,
    reason,
    write_atomic,
)
from trainguard.errors import InputError
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
    """The exact bytes the signature covers.

    A file name that is not UTF-8 reaches here as Python's surrogate escapes (one lone
    surrogate per undecodable byte); ``surrogatepass`` encodes any lone surrogate, so
    every body has exactly one message and names that are UTF-8 sign as they always did.
    """
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return (SCHEMA + "\n" + canonical).encode("utf-8", "surrogatepass")


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
            raise ManifestError(f"{display(raw)}: no such file or directory")
        is_dir = _sealable(raw, base)
        files = sorted(walk(base)) if is_dir else [base]
        plan.append(({"kind": "path", "name": base, "version": None}, base, files))
    plan.extend(
        ({"kind": "startup", "name": site, "version": None}, site, hook_files(site))
        for site in site_dirs
    )
    every = [f for _, _, files in plan for f in files]
    result = hash_files(every, "blake3", sizes=_sizes(every), workers=workers, progress=progress)
    if result.errors:
        path, why = next(iter(result.errors.items()))
        raise ManifestError(f"{display(path)}: cannot seal: {why[:1].lower() + why[1:]}")
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


def _sealable(raw: str, base: str) -> bool:
    """True for a folder, False for a file; ManifestError for what cannot be sealed.

    A FIFO, device or socket named as a PATH is refused (reading one may never end), and
    so is a symlink loop or a link to nothing.
    """
    try:
        info = os.stat(base)
    except OSError as exc:
        raise ManifestError(f"{display(raw)}: cannot seal: {reason(exc)}") from exc
    if stat.S_ISDIR(info.st_mode):
        return True
    if not stat.S_ISREG(info.st_mode):
        raise ManifestError(
            f"{display(raw)}: is {describe_mode(info.st_mode)}; refusing to seal it"
        )
    return False


def write(path: str | os.PathLike[str], body: dict[str, Any], key: Ed25519PrivateKey) -> Path:
    """Sign ``body`` with ``key`` and write the manifest (atomically, mode 0644).

    The file is UTF-8 JSON; a name that is not UTF-8 is written with its surrogate
    escapes as JSON ``\\udcXX`` escapes, which read back as the same name.
    """
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
    text = json.dumps(document, indent=1, ensure_ascii=False) + "\n"
    # Lone surrogates only occur inside JSON strings, where "\udcXX" is their JSON escape.
    data = text.encode("utf-8", "backslashreplace")
    return write_atomic(path, data, mode=0o644, what="manifest")


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A manifest document, refused unless it is a regular file under MANIFEST_CAP bytes,
    JSON nested at most JSON_DEPTH deep, in the documented schema."""
    name = display(os.fspath(path))
    try:
        data = read_capped(path, MANIFEST_CAP, "manifest")
        document = parse_json(data, f"{name}: manifest")
    except InputError as exc:
        raise ManifestError(str(exc)) from exc
    if not isinstance(document, dict) or not isinstance(document.get("body"), dict):
        raise ManifestError(f"{name} is not a trainguard manifest")
    if document.get("schema") != SCHEMA:
        found = str(document.get("schema"))[:80]
        raise ManifestError(f"{name} has schema {found!r}; this trainguard reads {SCHEMA}")
    _validate(document["body"], name)
    return document


_ROOT_KINDS = ("distribution", "path", "startup")


def _validate(body: dict[str, Any], name: str) -> None:
    """Refuse a body whose roots or entries do not have the documented fields and types."""
    if body.get("hash") != "blake3":
        found = str(body.get("hash"))[:40]
        raise ManifestError(f"{name}: hash {found!r}; {SCHEMA} hashes with blake3")
    roots = body.get("roots")
    if not isinstance(roots, list):
        raise ManifestError(f"{name}: manifest body has no list of roots")
    for i, root in enumerate(roots):
        where = f"{name}: roots[{i}]"
        if not isinstance(root, dict) or root.get("kind") not in _ROOT_KINDS:
            raise ManifestError(f"{where}: not a root of kind {', '.join(_ROOT_KINDS)}")
        for field in ("name", "base"):
            if not isinstance(root.get(field), str) or not root[field]:
                raise ManifestError(f"{where}: {field} is not a non-empty string")
        if not os.path.isabs(root["base"]) or not _file_name(root["base"]):
            raise ManifestError(f"{where}: base is not an absolute path")
        if root.get("version") is not None and not isinstance(root["version"], str):
            raise ManifestError(f"{where}: version is not a string")
        files = root.get("files")
        if not isinstance(files, list):
            raise ManifestError(f"{where}: files is not a list")
        for j, entry in enumerate(files):
            _validate_entry(entry, f"{where}.files[{j}]")


def _file_name(text: str) -> bool:
    """Whether ``text`` can name a file: no NUL, and every lone surrogate one that stands for
    an undecodable byte (U+DC80 to U+DCFF, as :func:`os.fsencode` writes back); a JSON
    ``\\ud800`` names no file, and would fail at the first ``lstat``."""
    if "\0" in text:
        return False
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return True


def _validate_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: not an object")
    path, size, mode, digest = (entry.get(k) for k in ("path", "size", "mode", "hash"))
    if not isinstance(path, str) or not path or not _file_name(path):
        raise ManifestError(f"{where}: path is not a non-empty string")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{where}: size is not a byte count")
    if not isinstance(mode, str) or not 0 < len(mode) <= 8 or mode.strip("01234567"):
        raise ManifestError(f"{where}: mode is not octal digits")
    if not isinstance(digest, str):
        raise ManifestError(f"{where}: hash is not a string")
    sealed_stat = entry.get("stat")
    if sealed_stat is not None and (
        not isinstance(sealed_stat, list)
        or len(sealed_stat) != 4
        or not all(isinstance(n, int) for n in sealed_stat)
    ):
        raise ManifestError(f"{where}: stat is not four integers")


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
        unlisted: list[str] = []
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
                for p in _current_dist_files(sealed_files, base, unlisted)
                if p in sealed_files or (recorded_by or {}).get(p, name) == name
            }
        elif kind == "startup":
            current = set(hook_files(base))
        else:
            current = set(walk(base, unlisted)) if os.path.isdir(base) else {base}
        files += len(current | set(sealed_files))
        drift.extend(
            Drift.at("unreadable", path, name, "cannot list this folder: nothing in it was checked")
            for path in sorted(set(unlisted))
        )
        drift.extend(
            Drift.at(_kind("added", kind), path, name, "not in the manifest")
            for path in sorted(current - set(sealed_files))
        )
        for path, entry in sealed_files.items():
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if any(path.startswith(folder + os.sep) for folder in unlisted):
                    continue  # inside a folder already reported as unreadable
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
            except OSError as exc:
                if not any(path.startswith(folder + os.sep) for folder in unlisted):
                    drift.append(
                        Drift.at("unreadable", path, name, f"cannot be read: {reason(exc)}")
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
            drift.append(Drift.at("unreadable", path, name, f"cannot be read: {why}"))
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


def _current_dist_files(sealed: dict[str, Any], base: str, unlisted: list[str]) -> set[str]:
    """Files now present where the distribution was sealed: its folders, walked afresh.

    Folders that cannot be listed go into ``unlisted``.
    """
    tops = top_folders(sealed, base)
    current: set[str] = set()
    for top in tops:
        current.update(walk(top, unlisted))
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
