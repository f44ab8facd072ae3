"""What the guard does before the first step: open the ledger, check the environment.

The ledger is created by rank 0 with the owner's key (``owner_key``, or the file named
by ``TRAINGUARD_OWNER_KEY``) unless a launcher already created it; the other ranks open
it once rank 0 is done. The environment is checked against a sealed manifest when one
is given (the configuration file and the code can be sealed with it), else the
``packages`` against their RECORD; drift is an alert that, under policy "halt", stops
the job before its first step.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
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
    if rank == 0 and not exists:
        if not key:
            raise GuardError(
                f"no ledger in {run_dir} and no owner key: pass owner_key= or set "
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


def verify_start(
    enabled: bool,
    manifest: Any,
    pubkey: Any,
    packages: Sequence[str],
    config: Any,
    run_dir: Path,
    config_sha256: str | None = None,
) -> tuple[list[Alert], dict[str, Any]]:
    """Alerts for a drifted environment, and the summary that goes into run.started."""
    import torch

    summary: dict[str, Any] = {
        "code": _code_digest(),
        "config": _config_digest(config),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "environment": None,
    }
    if not enabled:
        return _config_alerts(config, config_sha256), summary
    from trainguard.integrity import verify_environment

    alerts = _config_alerts(config, config_sha256)
    moved, sites = _import_locations(packages)
    alerts += moved
    try:
        if manifest is not None:
            report = verify_environment(manifest, public_key=pubkey, fast=True)
        else:
            report = verify_environment(packages=list(packages), site_packages=sites or None)
    except Error as exc:
        alert = Alert(-1, None, "environment", Severity.CRITICAL, f"cannot verify: {exc}", {})
        return [alert], summary
    summary["environment"] = {
        "mode": report.mode,
        "clean": report.clean,
        "files": report.files_checked,
        "drift": len(report.drift),
        "signature": report.signature,
    }
    summary["code"] = f"{summary['code']}:{report.mode}:{len(report.drift)}"
    if report.clean:
        return alerts, summary
    hooks = [d for d in report.drift if d.kind == "startup-hook"]
    files = [d for d in report.drift if d.kind != "startup-hook"]
    if files or report.signature not in ("valid", "not-applicable"):
        shown = [f"{d.kind} {d.path}" for d in files[:5]]
        if report.signature not in ("valid", "not-applicable"):
            shown.insert(0, f"manifest signature {report.signature}")
        alerts.append(
            Alert(
                -1,
                _rank(),
                "environment",
                Severity.CRITICAL,
                f"environment drift before start: {'; '.join(shown)}",
                {"report": report.to_dict()},
            )
        )
    if hooks:
        # code that runs at interpreter start-up: suspicious, but also how some sites
        # configure Python; a warning, recorded, that does not halt by itself
        alerts.append(
            Alert(
                -1,
                _rank(),
                "startup-hook",
                Severity.MEDIUM,
                "start-up hooks run in this process: "
                + "; ".join(f"{d.path} ({d.detail})" for d in hooks[:3]),
                {"hooks": [d.path for d in hooks]},
            )
        )
    return alerts, summary


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
