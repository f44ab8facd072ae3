"""The one place where the reference job meets trainguard's runtime Guard.

``make_guard(ctx)`` is the guard factory the job calls with ``--guard on``: it builds
``trainguard.Guard`` from what the job knows (see ``job.GuardContext``). The Guard's author
adapts the keyword arguments here, and only here, when the Guard's signature settles.
``guard_available()`` lets the runner refuse ``--guard on`` with one clear line while the
Guard does not exist yet.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.sabotage.job import GuardContext


def guard_available() -> str | None:
    """None when ``trainguard.Guard`` can be imported, else why not (one line)."""
    try:
        module = importlib.import_module("trainguard")
    except ImportError as exc:
        return f"cannot import trainguard: {exc}"
    if not hasattr(module, "Guard"):
        return "trainguard.Guard does not exist yet (the runtime Guard, issue 6, is not built)"
    return None


def before_start() -> None:
    """What the Guard asks for first thing in ``main``: ``protect_signals()`` (before any
    thread starts), so that a signal's sender is known."""
    import trainguard

    protect = getattr(trainguard, "protect_signals", None)
    if protect is not None:
        protect()


def make_guard(ctx: GuardContext) -> Any:
    """``trainguard.Guard`` for one rank of the reference job."""
    import inspect
    import json

    from trainguard import Guard  # type: ignore[attr-defined]

    kwargs: dict[str, Any] = {
        "run_dir": ctx.run_dir,
        "every": ctx.every,
        "policy": ctx.policy,
        "lr_schedule": ctx.lr_schedule,
        "config": ctx.config_path,
        "seed": ctx.seed,
    }
    if os.environ.get("SABOTAGE_GUARD_LOADER", "1") != "0":  # the runner's --guard-loader
        kwargs["loader"] = ctx.loader
    if ctx.submission_path.exists():  # the config's sha256 when the job was submitted
        kwargs["config_sha256"] = json.loads(ctx.submission_path.read_text())["sha256"]
    accepted = inspect.signature(Guard).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    # the DDP wrapper, so the guard can time the gradient all-reduce (stragglers)
    return Guard(ctx.ddp, ctx.optimizer, **kwargs)
