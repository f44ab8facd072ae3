"""The Guard inside a job that ``trainguard replay`` re-executes (see trainguard/replay.py).

``trainguard replay`` writes a plan (JSON) and names it in ``TRAINGUARD_REPLAY`` for the
command it runs. A Guard that finds it:
- writes its run into the plan's folder, never into the run it replays (whatever
  ``run_dir`` the job passes);
- accepts the plan's checkpoint (the one the replayed run signed and recorded, matched by
  its manifest hash) as the start of a run of its own, as a declared fork would be;
- stops the job when its step count reaches the plan's ``stop``: the run is closed, one
  line says why, and the process exits with status 0.
Everything else is the job's ordinary guarded run: its checks, its per-step metrics file
(metrics_log.py) and its ledger are what the replay compares with the original's.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainguard import _io
from trainguard.errors import Error
from trainguard.runtime.interface import GuardError

if TYPE_CHECKING:
    from trainguard.runtime.guard import Guard

#: the environment variable naming the plan
ENV = "TRAINGUARD_REPLAY"


@dataclass(frozen=True)
class Plan:
    """What to replay, and where the replay's own run goes."""

    original: str  # the replayed run's folder
    run_id: str  # and its run id
    checkpoint: str  # the checkpoint the replay starts from
    manifest: str  # its manifest hash, as the replayed run recorded it
    start: int  # its step
    stop: int | None  # the step at which the job is stopped (None: its end)
    folder: str  # the replay's own run folder

    def describe(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_from_env() -> Plan | None:
    """The plan named by ``TRAINGUARD_REPLAY``; None outside a replay. A plan that cannot
    be read is a GuardError (one line): a job told to replay never trains unwatched."""
    where = os.environ.get(ENV)
    if not where:
        return None
    try:
        data = json.loads(_io.read_capped(Path(where), _io.CONFIG_CAP, "replay plan"))
        plan = Plan(**{name: data[name] for name in Plan.__dataclass_fields__})
    except (Error, OSError, ValueError, KeyError, TypeError) as exc:
        raise GuardError(f"{ENV}={where}: cannot read the replay plan: {exc}") from exc
    if not isinstance(plan.start, int) or not (plan.stop is None or isinstance(plan.stop, int)):
        raise GuardError(f"{ENV}={where}: the replay plan's steps are not integers")
    return plan


def is_start(guard: Guard, manifest_hash: str) -> bool:
    """Whether a checkpoint being loaded is the replay's start."""
    plan = guard.replay
    return plan is not None and manifest_hash == plan.manifest


def stop_if_due(guard: Guard) -> None:
    """At the end of a step: the job ends here once the plan's last step is done."""
    plan = guard.replay
    if plan is None or plan.stop is None or guard._step < plan.stop:
        return
    guard.close()
    sys.stderr.write(
        f"trainguard: replay of {plan.run_id} reached step {plan.stop}: stopping the job\n"
    )
    sys.stderr.flush()
    raise SystemExit(0)
