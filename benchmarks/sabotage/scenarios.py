"""The attack scenarios: a stable name, the incident's number, where and how each acts.

Numbers follow issue 5's list (1 = torch source edited ... 13 = records rewritten). Kinds
say how the runner injects a scenario:

- ``implant``: code inside the job's processes (implant.py), at step K on one rank;
- ``overlay``: the job's environment edited before start (attackers.build_overlay);
- ``resume``: the job resumes from a checkpoint the attacker prepared (pickle payload, or a
  checkpoint altered between save and resume);
- ``config``: the submitted configuration file rewritten before the job starts;
- ``kill``: another process signals one rank after step K;
- ``records``: the run's records rewritten after it ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["implant", "overlay", "resume", "config", "kill", "records"]


@dataclass(frozen=True)
class Scenario:
    name: str
    number: int
    kind: Kind
    summary: str
    incident: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def rank_specific(self) -> bool:
        """Acts on one chosen rank (the runner picks the last rank)."""
        return self.kind in ("implant", "kill")

    def acts_on(self, world_size: int, attacked_rank: int) -> set[int]:
        """The ranks the attacker acted on: an alert naming another rank names the wrong one.

        Implants and kills act in the attacked rank's process only, even when the damage
        spreads to the others through the all-reduce (``patch-allreduce-ws``, ``grad-*-pre``).
        The edited environment, the config and the checkpoints are read by every rank; the
        records are rewritten after the run, when no rank runs.
        """
        if self.rank_specific:
            return {attacked_rank}
        return set(range(world_size))

    @property
    def before_start(self) -> bool:
        """Acts before the first training step: the Guard must stop the job there."""
        return self.kind in ("overlay", "resume", "config")


ENV = "edited PyTorch source files in the shared Python environment"
PICKLE = "injected code through checkpoint loading (pickle deserialization)"
OPT = "changed optimizer behaviour in other teams' jobs"
SEED = "changed random seeds"
DATA = "changed data loading"
SLEEP = "added random sleeps to multi-node processes"
KILL = "killed multi-node processes"
WEIGHTS = "changed model weights and inputs so results stopped reproducing"
CKPT = "weeks of checkpoints damaged; which ones were good was disputed"
CONFIG = "changed jobs' parameters between submission and run"
RECORDS = "adapted the attack to colleagues' debugging; sat in the troubleshooting meetings"

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "source-edit",
        1,
        "overlay",
        "torch/optim/adam.py edited: every AdamW update uses 3x the lr",
        ENV,
    ),
    Scenario(
        "patch-optimizer-step",
        2,
        "implant",
        "AdamW.step monkeypatched: each update applied 3x",
        OPT,
        {"action": "patch-optimizer-step", "factor": 3.0},
    ),
    Scenario(
        "patch-functional",
        2,
        "implant",
        "torch.nn.functional.gelu monkeypatched: output x0.7",
        OPT,
        {"action": "patch-functional"},
    ),
    Scenario(
        "patch-allreduce-ws",
        2,
        "implant",
        "dist.all_reduce monkeypatched: this rank's tensors x4, only when world size > 1",
        OPT,
        {"action": "patch-allreduce", "factor": 4.0, "world_size_above": 1},
    ),
    Scenario(
        "resume-pickle",
        3,
        "resume",
        "resume from a checkpoint whose pickle runs a payload: marker file, lr x10 in every rank",
        PICKLE,
    ),
    Scenario(
        "hparam-lr",
        4,
        "implant",
        "learning rate x5 on one rank, every step",
        OPT,
        {"action": "set-lr", "factor": 5.0},
    ),
    Scenario(
        "hparam-betas",
        4,
        "implant",
        "AdamW betas (0.9, 0.95) -> (0.5, 0.9) on one rank",
        OPT,
        {"action": "set-hparam", "betas": [0.5, 0.9]},
    ),
    Scenario(
        "hparam-wd",
        4,
        "implant",
        "weight decay 0.1 -> 2.0 on one rank",
        OPT,
        {"action": "set-hparam", "weight_decay": 2.0},
    ),
    Scenario(
        "reseed",
        5,
        "implant",
        "torch.manual_seed(12345) on one rank mid-run",
        SEED,
        {"action": "reseed", "seed": 12345},
    ),
    Scenario(
        "grad-scale-pre",
        6,
        "implant",
        "gradients x8 on one rank before the all-reduce",
        OPT,
        {"action": "grad-hook", "mode": "scale", "factor": 8.0},
    ),
    Scenario(
        "grad-flip-pre",
        6,
        "implant",
        "gradients sign-flipped on one rank before the all-reduce",
        OPT,
        {"action": "grad-hook", "mode": "flip"},
    ),
    Scenario(
        "grad-flip-post",
        6,
        "implant",
        "gradients sign-flipped on one rank after the all-reduce",
        OPT,
        {"action": "grad-after", "mode": "flip"},
    ),
    Scenario(
        "grad-noise-post",
        6,
        "implant",
        "Gaussian noise (1 std) added to one rank's reduced gradients",
        OPT,
        {"action": "grad-after", "mode": "noise"},
    ),
    Scenario(
        "data-reshuffle",
        7,
        "implant",
        "one rank's batches drawn from another shuffle",
        DATA,
        {"action": "loader", "mode": "reshuffle"},
    ),
    Scenario(
        "data-repeat",
        7,
        "implant",
        "one rank trains on the same batch over and over",
        DATA,
        {"action": "loader", "mode": "repeat"},
    ),
    Scenario(
        "data-skip",
        7,
        "implant",
        "one rank skips every other batch",
        DATA,
        {"action": "loader", "mode": "skip"},
    ),
    Scenario(
        "data-labels",
        7,
        "implant",
        "half of one rank's target characters replaced at random",
        DATA,
        {"action": "loader", "mode": "labels"},
    ),
    Scenario(
        "straggler",
        8,
        "implant",
        "one rank sleeps 20-200 ms at random before each step",
        SLEEP,
        {"action": "sleep", "min_s": 0.02, "max_s": 0.2},
    ),
    Scenario(
        "kill-sigterm",
        9,
        "kill",
        "another process sends SIGTERM to one rank",
        KILL,
        {"signal": "TERM"},
    ),
    Scenario(
        "kill-sigkill",
        9,
        "kill",
        "another process sends SIGKILL to one rank",
        KILL,
        {"signal": "KILL"},
    ),
    Scenario(
        "weights-perturb",
        10,
        "implant",
        "Gaussian noise (5% of each tensor's std) added to one rank's weights",
        WEIGHTS,
        {"action": "perturb-weights", "scale": 0.05},
    ),
    Scenario(
        "ckpt-bitflip",
        11,
        "resume",
        "bit 23 of 1% of the float32 words in the checkpoint file flipped",
        CKPT,
        {"mode": "bitflip"},
    ),
    Scenario(
        "ckpt-edit",
        11,
        "resume",
        "one MLP weight matrix in the checkpoint multiplied by 3",
        CKPT,
        {"mode": "edit"},
    ),
    Scenario("config-change", 12, "config", "config.json's lr raised 4x after submission", CONFIG),
    Scenario(
        "records-edit",
        13,
        "records",
        "losses of 10 steps rewritten in the run's records",
        RECORDS,
        {"mode": "edit"},
    ),
    Scenario(
        "records-delete",
        13,
        "records",
        "records of 10 steps deleted from the run's records",
        RECORDS,
        {"mode": "delete"},
    ),
)

BY_NAME = {s.name: s for s in SCENARIOS}


def select(names: str) -> list[Scenario]:
    """``all``, ``none`` (the clean runs only), one name, a comma-separated list, or attack
    numbers (``4`` = all of 4)."""
    if names == "all":
        return list(SCENARIOS)
    if names == "none":
        return []
    chosen: list[Scenario] = []
    for part in names.split(","):
        part = part.strip()
        if part.isdigit():
            chosen += [s for s in SCENARIOS if s.number == int(part)]
        elif part in BY_NAME:
            chosen.append(BY_NAME[part])
        else:
            raise KeyError(part)
    return chosen
