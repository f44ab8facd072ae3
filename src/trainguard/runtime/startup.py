"""What the guard does before the first step: open the ledger, check the environment.

The ledger is created by rank 0 with the owner's key (``owner_key``, or the file named
by ``TRAINGUARD_OWNER_KEY``) unless a launcher already created it; the other ranks open
it once rank 0 is done. The environment is checked against a sealed manifest when one
is given (the configuration file and the code can be sealed with it), else the
``packages`` against their RECORD; drift is an alert that, under policy "halt", stops
the job before its first step.

The environment is checked once per host, not once per rank: the files are the host's,
and N ranks re-hashing torch side by side on the same cores took N times as long. The
first rank on each host verifies (with a line on stderr when that takes over a second);
the others wait for its result in a collective and use it. Then every rank writes one
line saying which run it guards and what was verified (:func:`startup_line`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainguard.errors import Error, Severity
from trainguard.runtime.interface import Alert, GuardError

OWNER_KEY_ENV = "TRAINGUARD_OWNER_KEY"


def open_ledger(run_dir: Path, rank: int, world: int, owner_key: Any) -> Any:
    from trainguard.ledger import Ledger

    key = owner_key or os.environ.get(OWNER_KEY_ENV)
    exists = (run_dir / "ledger.db").exists() or (run_dir / "ledger.json").exists()
    error: Exception | None = None
    ledger = None
    # a run closed earlier (its run key deleted) is resumed with a new certificate, signed
    # by the same owner, on the same chain
    closed = exists and not (run_dir / "run.key").exists()
    if rank == 0 and (closed or not exists):
        if not key:
            raise GuardError(
                f"the run in {run_dir} was closed; resuming it needs the owner key: pass "
                f"owner_key= or set {OWNER_KEY_ENV}"
                if closed
                else f"no ledger in {run_dir} and no owner key: pass owner_key= or set "
                f"{OWNER_KEY_ENV} (make one with `trainguard keygen -o DIR`)"
            )
        try:
            ledger = Ledger.create(run_dir, owner_key=key, rank=rank)
        except Error as exc:
            error = exc
    _barrier(world)
    if error is not None:
        raise GuardError(f"cannot create the run ledger: {error}") from error
    if ledger is None:
        try:
            ledger = Ledger.open(run_dir, rank=rank)
        except Error as exc:
            raise GuardError(f"cannot open the run ledger in {run_dir}: {exc}") from exc
    return ledger


def _barrier(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier()


def _code_digest() -> str:
    """The entry script's bytes, or argv when there is none."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main and os.path.isfile(main):
        with open(main, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=16).hexdigest()
    return hashlib.blake2b(" ".join(sys.argv).encode(), digest_size=16).hexdigest()


def _config_digest(config: Any) -> str | None:
    if config is None:
        return None
    if isinstance(config, (str, os.PathLike)) and os.path.isfile(config):
        with open(config, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=16).hexdigest()
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


PROGRESS_AFTER = 1.0
"""Seconds a verification runs before it says on stderr what it is doing (a quick check
against a manifest stays quiet; the RECORD of torch takes several seconds)."""


def verify_start(
    enabled: bool,
    manifest: Any,
    pubkey: Any,
    packages: Sequence[str],
    config: Any,
    run_dir: Path,
    config_sha256: str | None = None,
    *,
    rank: int | None = None,
    world: int | None = None,
    group: Any = None,
) -> tuple[list[Alert], dict[str, Any]]:
    """Alerts for a drifted environment, and the summary that goes into run.started.

    The environment is a property of the host, so it is verified once per host: by the
    first rank there (``LOCAL_RANK`` 0, else the lowest rank on the host name), whose
    result the others receive through a collective of ``group`` (never through a file
    someone else could write). Every rank receives every host's result, so a drift on
    one host halts every rank under policy "halt". Drift alerts carry rank ``None``: they
    are about a host's files, not about what any rank did; their details name the host
    and the verifying rank. The configuration and where each package was imported from
    are this process's own and are checked by every rank.
    """
    import torch

    if rank is None or world is None:
        rank, world = _rank(), _world()
    summary: dict[str, Any] = {
        "code": _code_digest(),
        "config": _config_digest(config),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "environment": None,
    }
    alerts = _config_alerts(config, config_sha256)
    if not enabled:
        return alerts, summary
    moved, sites = _import_locations(packages)
    alerts += moved
    target = _Target(manifest, pubkey, tuple(packages), tuple(sites))
    host = socket.gethostname()
    scope = target.scope(host)
    verifies = _elect(rank, world, group, scope)
    mine = _verify(target, host, rank, scope) if verifies else None
    results = _share(mine, world, group)
    own = next((r for r in results if r["scope"] == scope), None)
    if own is None:
        # no rank verified this host's environment as this process sees it (a group
        # without this host's local rank 0, another interpreter): check it here
        own = _verify(target, host, rank, scope)
        results.append(own)
    summary["environment"] = {k: v for k, v in own.items() if k not in ("alerts", "scope")}
    summary["code"] = f"{summary['code']}:{own['mode']}:{own['drift']}"
    for result in results:
        alerts += [_alert(a) for a in result["alerts"]]
    return alerts, summary


@dataclass(frozen=True)
class _Target:
    """What a host's verification checks: a sealed manifest, else packages' RECORD."""

    manifest: Any
    pubkey: Any
    packages: tuple[str, ...]
    sites: tuple[str, ...]

    def scope(self, host: str) -> str:
        """Ranks whose scopes are equal would verify the same files the same way."""
        manifest = None if self.manifest is None else os.path.abspath(os.fspath(self.manifest))
        pubkey = None if self.pubkey is None else os.path.abspath(os.fspath(self.pubkey))
        return json.dumps([host, sys.prefix, self.sites, manifest, pubkey, self.packages])

    def describe(self) -> str:
        if self.manifest is not None:
            return f"manifest {os.path.basename(os.fspath(self.manifest))}"
        names = ", ".join(self.packages)
        return f"the RECORD of {names}" if len(self.packages) == 1 else f"the RECORDs of {names}"

    def run(self) -> Any:
        from trainguard.integrity import verify_environment

        if self.manifest is not None:
            return verify_environment(self.manifest, public_key=self.pubkey, fast=True)
        return verify_environment(packages=list(self.packages), site_packages=self.sites or None)


class _Progress:
    """A line on stderr once a verification has run for ``PROGRESS_AFTER`` seconds, and
    one when it ends; nothing for a check quicker than that."""

    def __init__(self, doing: str) -> None:
        self._doing = doing
        self._lock = threading.Lock()
        self._said = False
        self._over = False
        self._timer = threading.Timer(PROGRESS_AFTER, self._say)
        self._timer.daemon = True

    def __enter__(self) -> _Progress:
        if PROGRESS_AFTER <= 0:
            self._say()
        else:
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._over = True

    def _say(self) -> None:
        with self._lock:
            if self._over:
                return
            self._said = True
            sys.stderr.write(f"trainguard: {self._doing}...\n")
            sys.stderr.flush()

    def done(self, text: str) -> None:
        """The closing line, written only when the opening one was."""
        if self._said:
            sys.stderr.write(f"trainguard: {text}\n")
            sys.stderr.flush()


def _verify(target: _Target, host: str, rank: int, scope: str) -> dict[str, Any]:
    """This host's verification, as a plain value that can travel to the other ranks."""
    against = target.describe()
    result: dict[str, Any] = {
        "scope": scope,
        "host": host,
        "verified_by": rank,
        "against": against,
        "mode": "manifest" if target.manifest is not None else "record",
        "clean": False,
        "files": 0,
        "drift": 0,
        "signature": "not-applicable",
        "seconds": 0.0,
        "alerts": [],
    }
    where = {"host": host, "verified_by": rank}
    progress = _Progress(f"verifying the environment against {against}")
    started = time.perf_counter()
    try:
        with progress:
            report = target.run()
    except Exception as exc:
        # an error, or a bug: either way the other ranks are waiting for this result,
        # and an environment that could not be checked is not a verified one
        result["seconds"] = round(time.perf_counter() - started, 3)
        result["mode"] = "error"
        progress.done(f"cannot verify the environment: {exc}")
        text = f"cannot verify the environment of host {host}: {exc}"
        result["alerts"] = [
            Alert(-1, None, "environment", Severity.CRITICAL, text, where).to_dict()
        ]
        return result
    result.update(
        clean=report.clean,
        files=report.files_checked,
        drift=len(report.drift),
        signature=report.signature,
        seconds=round(report.seconds, 3),
    )
    verdict = "clean" if report.clean else f"{len(report.drift):,} differ"
    if report.signature not in ("valid", "not-applicable"):
        verdict = f"manifest signature {report.signature}"
    progress.done(f"verified {report.files_checked:,} files in {report.seconds:.1f} s: {verdict}")
    result["alerts"] = [a.to_dict() for a in _drift_alerts(report, host, where)]
    return result


def _drift_alerts(report: Any, host: str, where: dict[str, Any]) -> list[Alert]:
    if report.clean:
        return []
    alerts: list[Alert] = []
    hooks = [d for d in report.drift if d.kind == "startup-hook"]
    files = [d for d in report.drift if d.kind != "startup-hook"]
    if files or report.signature not in ("valid", "not-applicable"):
        shown = [f"{d.kind} {d.path}" for d in files[:5]]
        if report.signature not in ("valid", "not-applicable"):
            shown.insert(0, f"manifest signature {report.signature}")
        alerts.append(
            Alert(
                -1,
                None,
                "environment",
                Severity.CRITICAL,
                f"environment drift on host {host} before start: {'; '.join(shown)}",
                {**where, "report": report.to_dict()},
            )
        )
    if hooks:
        # code that runs at interpreter start-up: suspicious, but also how some sites
        # configure Python; a warning, recorded, that does not halt by itself
        alerts.append(
            Alert(
                -1,
                None,
                "startup-hook",
                Severity.MEDIUM,
                f"start-up hooks run on host {host}: "
                + "; ".join(f"{d.path} ({d.detail})" for d in hooks[:3]),
                {**where, "hooks": [d.path for d in hooks]},
            )
        )
    return alerts


def _alert(data: dict[str, Any]) -> Alert:
    return Alert(
        int(data["step"]),
        data["rank"],
        str(data["detector"]),
        Severity[str(data["severity"])],
        str(data["message"]),
        dict(data["details"]),
    )


def _elect(rank: int, world: int, group: Any, scope: str) -> bool:
    """Whether this rank verifies its host's environment."""
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return True
    local = os.environ.get("LOCAL_RANK", "").strip()
    if local.isdigit():
        return int(local) == 0
    # no launcher said which rank is first here: the lowest rank with the same scope
    # (the host name is part of it) in one small gather
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, [scope, rank], group=group)
    return min(int(r) for s, r in out if s == scope) == rank


def _share(mine: dict[str, Any] | None, world: int, group: Any) -> list[dict[str, Any]]:
    """Every verifying rank's result, on every rank; the others wait here for them."""
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine] if mine is not None else []
    # a JSON string, not the objects: the value crossing the collective is plain data
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, json.dumps(mine, default=str), group=group)
    return [r for r in (json.loads(x) for x in out) if r is not None]


def startup_line(run_id: str, rank: int, world: int, summary: dict[str, Any], every: int) -> str:
    """The one line every rank writes once it is guarded: which run, what was verified."""
    env = summary.get("environment")
    if env is None:
        what = "environment not verified (verify_env=False)"
    elif env["mode"] == "error":
        what = "environment could not be verified (see the alert)"
    else:
        by = "" if env["verified_by"] == rank else f", by rank {env['verified_by']}"
        if env["clean"]:
            what = (
                f"environment verified against {env['against']} "
                f"({env['files']:,} files, {env['seconds']:.1f} s{by})"
            )
        elif env["signature"] not in ("valid", "not-applicable"):
            what = f"environment NOT verified: {env['against']} signature {env['signature']}"
        else:
            what = (
                f"environment differs from {env['against']} in {env['drift']:,} of "
                f"{env['files']:,} files{by} (see the alert)"
            )
    return (
        f"trainguard: guarding run {run_id}, rank {rank} of {world}: {what}, "
        f"checks every {every} steps"
    )


def _import_locations(packages: Sequence[str]) -> tuple[list[Alert], list[str]]:
    """Where each package was really imported from; a copy shadowing the installed one
    (an edited torch first on PYTHONPATH) is an alert by itself."""
    import importlib.util
    import sysconfig

    alerts: list[Alert] = []
    sites: list[str] = []
    installed = {os.path.realpath(p) for p in sysconfig.get_paths().values()}
    for name in packages:
        module = sys.modules.get(name)
        spec = importlib.util.find_spec(name) if module is None else module.__spec__
        origin = getattr(spec, "origin", None)
        if not origin:
            continue
        site = str(Path(origin).parent.parent)
        sites.append(site)
        if os.path.realpath(site) not in installed:
            alerts.append(
                Alert(
                    -1,
                    _rank(),
                    "environment",
                    Severity.CRITICAL,
                    f"{name} is imported from {site}, not from the environment's site-packages",
                    {"package": name, "location": site},
                )
            )
    return alerts, sorted(set(sites))


def _config_alerts(config: Any, expected: str | None) -> list[Alert]:
    """The configuration file against the sha256 recorded when the job was submitted."""
    if expected is None:
        return []
    if not (isinstance(config, (str, os.PathLike)) and os.path.isfile(config)):
        return [
            Alert(
                -1, _rank(), "config", Severity.CRITICAL, f"configuration {config!r} is missing", {}
            )
        ]
    with open(config, "rb") as f:
        actual = hashlib.sha256(f.read()).hexdigest()
    if actual == expected.lower():
        return []
    return [
        Alert(
            -1,
            _rank(),
            "config",
            Severity.CRITICAL,
            f"configuration {config} changed since submission "
            f"(sha256 {actual[:12]}..., submitted {expected[:12]}...)",
            {"sha256": actual, "submitted": expected},
        )
    ]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
