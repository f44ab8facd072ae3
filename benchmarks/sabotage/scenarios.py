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

Kind = Literal["implant", "overlay", "resume", "config", "kill", "live", "records"]

#: what the attacker wants to damage (issue 11's first axis)
Goal = Literal[
    "optimizer", "gradients", "data", "seeds", "weights", "checkpoints", "liveness", "records"
]
GOALS: tuple[Goal, ...] = (
    "optimizer",
    "gradients",
    "data",
    "seeds",
    "weights",
    "checkpoints",
    "liveness",
    "records",
)

#: how (the second axis): ``monkeypatch`` replaces a function or method attribute;
#: ``in-place`` changes live state (tensors, settings, attributes, RNG state) and replaces
#: no function; ``closure/source`` changes code without replacing a watched attribute (an
#: edited source file, a function another one looks up swapped, code attached as a hook, a
#: payload run by unpickling); ``data-level`` changes data or files (batches, the dataset,
#: checkpoints, the config, the records); ``guard-tamper`` replaces or empties the Guard's
#: own code or state first; ``non-check-steps`` interferes only on steps without a check;
#: ``signal`` acts from another process through signals
Means = Literal[
    "monkeypatch",
    "in-place",
    "closure/source",
    "data-level",
    "guard-tamper",
    "non-check-steps",
    "signal",
]
MEANS: tuple[Means, ...] = (
    "monkeypatch",
    "in-place",
    "closure/source",
    "data-level",
    "guard-tamper",
    "non-check-steps",
    "signal",
)


@dataclass(frozen=True)
class Scenario:
    name: str
    number: int
    kind: Kind
    summary: str
    incident: str
    params: dict[str, Any] = field(default_factory=dict)
    goal: Goal = field(kw_only=True)
    means: Means = field(kw_only=True)

    @property
    def rank_specific(self) -> bool:
        """Acts on one chosen rank (the runner picks the last rank): an implant, a signal, or
        a patch put into that rank's process before it resumes."""
        return self.kind in ("implant", "kill") or "early" in self.params

    @property
    def timed(self) -> bool:
        """Starts at step K of a running job (steps to detection count from K)."""
        return self.kind in ("implant", "kill", "live")

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
        goal="optimizer",
        means="closure/source",
    ),
    Scenario(
        "patch-optimizer-step",
        2,
        "implant",
        "AdamW.step monkeypatched: each update applied 3x",
        OPT,
        {"action": "patch-optimizer-step", "factor": 3.0},
        goal="optimizer",
        means="monkeypatch",
    ),
    Scenario(
        "patch-functional",
        2,
        "implant",
        "torch.nn.functional.gelu monkeypatched: output x0.7",
        OPT,
        {"action": "patch-functional"},
        goal="weights",
        means="monkeypatch",
    ),
    Scenario(
        "patch-allreduce-ws",
        2,
        "implant",
        "dist.all_reduce monkeypatched: this rank's tensors x4, only when world size > 1",
        OPT,
        {"action": "patch-allreduce", "factor": 4.0, "world_size_above": 1},
        goal="gradients",
        means="monkeypatch",
    ),
    Scenario(
        "resume-pickle",
        3,
        "resume",
        "resume from a checkpoint whose pickle runs a payload: marker file, lr x10 in every rank",
        PICKLE,
        goal="checkpoints",
        means="closure/source",
    ),
    Scenario(
        "hparam-lr",
        4,
        "implant",
        "learning rate x5 on one rank, every step",
        OPT,
        {"action": "set-lr", "factor": 5.0},
        goal="optimizer",
        means="in-place",
    ),
    Scenario(
        "hparam-betas",
        4,
        "implant",
        "AdamW betas (0.9, 0.95) -> (0.5, 0.9) on one rank",
        OPT,
        {"action": "set-hparam", "betas": [0.5, 0.9]},
        goal="optimizer",
        means="in-place",
    ),
    Scenario(
        "hparam-wd",
        4,
        "implant",
        "weight decay 0.1 -> 2.0 on one rank",
        OPT,
        {"action": "set-hparam", "weight_decay": 2.0},
        goal="optimizer",
        means="in-place",
    ),
    Scenario(
        "reseed",
        5,
        "implant",
        "torch.manual_seed(12345) on one rank mid-run",
        SEED,
        {"action": "reseed", "seed": 12345},
        goal="seeds",
        means="in-place",
    ),
    Scenario(
        "grad-scale-pre",
        6,
        "implant",
        "gradients x8 on one rank before the all-reduce",
        OPT,
        {"action": "grad-hook", "mode": "scale", "factor": 8.0},
        goal="gradients",
        means="closure/source",
    ),
    Scenario(
        "grad-flip-pre",
        6,
        "implant",
        "gradients sign-flipped on one rank before the all-reduce",
        OPT,
        {"action": "grad-hook", "mode": "flip"},
        goal="gradients",
        means="closure/source",
    ),
    Scenario(
        "grad-flip-post",
        6,
        "implant",
        "gradients sign-flipped on one rank after the all-reduce",
        OPT,
        {"action": "grad-after", "mode": "flip"},
        goal="gradients",
        means="in-place",
    ),
    Scenario(
        "grad-noise-post",
        6,
        "implant",
        "Gaussian noise (1 std) added to one rank's reduced gradients",
        OPT,
        {"action": "grad-after", "mode": "noise"},
        goal="gradients",
        means="in-place",
    ),
    Scenario(
        "data-reshuffle",
        7,
        "implant",
        "one rank's batches drawn from another shuffle",
        DATA,
        {"action": "loader", "mode": "reshuffle"},
        goal="data",
        means="monkeypatch",
    ),
    Scenario(
        "data-repeat",
        7,
        "implant",
        "one rank trains on the same batch over and over",
        DATA,
        {"action": "loader", "mode": "repeat"},
        goal="data",
        means="monkeypatch",
    ),
    Scenario(
        "data-skip",
        7,
        "implant",
        "one rank skips every other batch",
        DATA,
        {"action": "loader", "mode": "skip"},
        goal="data",
        means="monkeypatch",
    ),
    Scenario(
        "data-labels",
        7,
        "implant",
        "half of one rank's target characters replaced at random",
        DATA,
        {"action": "loader", "mode": "labels"},
        goal="data",
        means="monkeypatch",
    ),
    Scenario(
        "straggler",
        8,
        "implant",
        "one rank sleeps 20-200 ms at random before each step",
        SLEEP,
        {"action": "sleep", "min_s": 0.02, "max_s": 0.2},
        goal="liveness",
        means="closure/source",
    ),
    Scenario(
        "kill-sigterm",
        9,
        "kill",
        "another process sends SIGTERM to one rank",
        KILL,
        {"signal": "TERM"},
        goal="liveness",
        means="signal",
    ),
    Scenario(
        "kill-sigkill",
        9,
        "kill",
        "another process sends SIGKILL to one rank",
        KILL,
        {"signal": "KILL"},
        goal="liveness",
        means="signal",
    ),
    Scenario(
        "weights-perturb",
        10,
        "implant",
        "Gaussian noise (5% of each tensor's std) added to one rank's weights",
        WEIGHTS,
        {"action": "perturb-weights", "scale": 0.05},
        goal="weights",
        means="in-place",
    ),
    Scenario(
        "ckpt-bitflip",
        11,
        "resume",
        "bit 23 of 1% of the float32 words in the checkpoint file flipped",
        CKPT,
        {"mode": "bitflip"},
        goal="checkpoints",
        means="data-level",
    ),
    Scenario(
        "ckpt-edit",
        11,
        "resume",
        "one MLP weight matrix in the checkpoint multiplied by 3",
        CKPT,
        {"mode": "edit"},
        goal="checkpoints",
        means="data-level",
    ),
    Scenario(
        "config-change",
        12,
        "config",
        "config.json's lr raised 4x after submission",
        CONFIG,
        goal="optimizer",
        means="data-level",
    ),
    Scenario(
        "records-edit",
        13,
        "records",
        "losses of 10 steps rewritten in the run's records",
        RECORDS,
        {"mode": "edit"},
        goal="records",
        means="data-level",
    ),
    Scenario(
        "records-delete",
        13,
        "records",
        "records of 10 steps deleted from the run's records",
        RECORDS,
        {"mode": "delete"},
        goal="records",
        means="data-level",
    ),
    # --- issue 11: every goal through at least three means ----------------------------
    Scenario(
        "opt-state-inplace",
        4,
        "implant",
        "AdamW's exp_avg_sq halved in place before every update on one rank (nothing patched)",
        OPT,
        {"action": "optimizer-state", "factor": 0.5},
        goal="optimizer",
        means="in-place",
    ),
    Scenario(
        "adam-function-swap",
        2,
        "implant",
        "torch.optim.adam's _single/_multi_tensor_adam swapped (lr x3); AdamW.step untouched",
        OPT,
        {"action": "swap-adam-function", "factor": 3.0},
        goal="optimizer",
        means="closure/source",
    ),
    Scenario(
        "lr-off-check",
        4,
        "implant",
        "learning rate x5 on one rank, only on steps without a check",
        OPT,
        {"action": "set-lr-off-check", "factor": 5.0},
        goal="optimizer",
        means="non-check-steps",
    ),
    Scenario(
        "guard-compare-lr",
        4,
        "implant",
        "agreement.compare made to return [] in the attacked process, then lr x5",
        OPT,
        {"action": "guard-tamper", "tamper": ["compare"], "then": "set-lr", "factor": 5.0},
        goal="optimizer",
        means="guard-tamper",
    ),
    Scenario(
        "grad-node-hook",
        6,
        "implant",
        "a pre-hook on the loss's autograd node scales one rank's gradients x8",
        OPT,
        {"action": "grad-node-hook", "factor": 8.0},
        goal="gradients",
        means="closure/source",
    ),
    Scenario(
        "grad-flip-off-check",
        6,
        "implant",
        "reduced gradients sign-flipped on one rank, only on steps without a check",
        OPT,
        {"action": "grad-after-off-check", "mode": "flip"},
        goal="gradients",
        means="non-check-steps",
    ),
    Scenario(
        "data-other-shard",
        7,
        "implant",
        "the sampler's rank set to another rank's and the loader's index stream re-pointed",
        DATA,
        {"action": "sampler-other-rank"},
        goal="data",
        means="in-place",
    ),
    Scenario(
        "data-labels-hook",
        7,
        "implant",
        "a forward pre-hook shifts one rank's targets by a character",
        DATA,
        {"action": "labels-hook"},
        goal="data",
        means="closure/source",
    ),
    Scenario(
        "data-labels-off-check",
        7,
        "implant",
        "half of one rank's targets replaced, only in batches of steps without a check",
        DATA,
        {"action": "labels-off-check"},
        goal="data",
        means="non-check-steps",
    ),
    Scenario(
        "data-corpus-edit",
        7,
        "implant",
        "30% of the training set's characters overwritten in one rank's memory",
        DATA,
        {"action": "corrupt-dataset"},
        goal="data",
        means="data-level",
    ),
    Scenario(
        "rng-rewind",
        5,
        "implant",
        "torch's default generator set back to its step-K state before every update",
        SEED,
        {"action": "rng-rewind"},
        goal="seeds",
        means="in-place",
    ),
    Scenario(
        "dropout-rng-patch",
        5,
        "implant",
        "F.dropout replaced by one drawing its masks from the attacker's generator",
        SEED,
        {"action": "dropout-generator", "seed": 4242},
        goal="seeds",
        means="monkeypatch",
    ),
    Scenario(
        "rng-rewind-off-check",
        5,
        "implant",
        "the generator rewound to its step-K state, only on steps without a check",
        SEED,
        {"action": "rng-rewind", "only_off_check": True},
        goal="seeds",
        means="non-check-steps",
    ),
    Scenario(
        "guard-rng-rewind",
        5,
        "implant",
        "the Guard's rng_hashes frozen in the attacked process, then the generator rewound",
        SEED,
        {"action": "guard-tamper", "tamper": ["rng_hashes"], "then": "rng-rewind"},
        goal="seeds",
        means="guard-tamper",
    ),
    Scenario(
        "dropout-p",
        10,
        "implant",
        "every Dropout's p 0.1 -> 0.5 on one rank",
        WEIGHTS,
        {"action": "dropout-p", "p": 0.5},
        goal="weights",
        means="in-place",
    ),
    Scenario(
        "module-eval",
        10,
        "implant",
        "one transformer block put in eval mode on one rank (its dropout off)",
        WEIGHTS,
        {"action": "module-eval"},
        goal="weights",
        means="in-place",
    ),
    Scenario(
        "param-data-replace",
        10,
        "implant",
        "one MLP weight's .data rebound to a new tensor x1.5 on one rank",
        WEIGHTS,
        {"action": "replace-data", "factor": 1.5},
        goal="weights",
        means="in-place",
    ),
    Scenario(
        "forward-hook",
        10,
        "implant",
        "forward hooks halve every MLP layer's output on one rank",
        WEIGHTS,
        {"action": "forward-hook"},
        goal="weights",
        means="closure/source",
    ),
    Scenario(
        "weights-off-check",
        10,
        "implant",
        "weight noise (5% std) during the forward/backward of steps without a check only",
        WEIGHTS,
        {"action": "weights-off-check", "scale": 0.05},
        goal="weights",
        means="non-check-steps",
    ),
    Scenario(
        "guard-hash-perturb",
        10,
        "implant",
        "the Guard's params_hash frozen in the attacked process, then weights perturbed",
        WEIGHTS,
        {
            "action": "guard-tamper",
            "tamper": ["params_hash"],
            "then": "perturb-weights",
            "scale": 0.05,
        },
        goal="weights",
        means="guard-tamper",
    ),
    Scenario(
        "resume-other-run",
        11,
        "resume",
        "resume from another run's checkpoint (another seed) of the same owner, no fork declared",
        CKPT,
        {"mode": "other-run"},
        goal="checkpoints",
        means="data-level",
    ),
    Scenario(
        "resume-older",
        11,
        "resume",
        "resume in the same run from its older checkpoint (step K/2), no rollback declared",
        CKPT,
        {"mode": "older"},
        goal="checkpoints",
        means="data-level",
    ),
    Scenario(
        "ckpt-load-patch",
        11,
        "resume",
        "Module.load_state_dict patched at start on one rank: an MLP matrix x3 once restored",
        CKPT,
        {"mode": "load-patch", "early": {"action": "load-patch", "factor": 3.0}},
        goal="checkpoints",
        means="monkeypatch",
    ),
    Scenario(
        "pause-sigstop",
        8,
        "kill",
        "another process stops one rank (SIGSTOP) for 8 s, then continues it (SIGCONT)",
        SLEEP,
        {"signal": "STOP", "pause_s": 8.0},
        goal="liveness",
        means="signal",
    ),
    Scenario(
        "stall-loader",
        8,
        "implant",
        "the DataLoader iterator patched to sleep 20-200 ms before each of one rank's batches",
        SLEEP,
        {"action": "stall-loader", "min_s": 0.02, "max_s": 0.2},
        goal="liveness",
        means="monkeypatch",
    ),
    Scenario(
        "straggler-off-check",
        8,
        "implant",
        "one rank sleeps 20-200 ms before each step without a check",
        SLEEP,
        {"action": "sleep-off-check", "min_s": 0.02, "max_s": 0.2},
        goal="liveness",
        means="non-check-steps",
    ),
    Scenario(
        "ledger-cut-live",
        13,
        "live",
        "while the job runs, another process deletes the last 5 rows of its ledger and log",
        RECORDS,
        {"count": 5},
        goal="records",
        means="data-level",
    ),
    Scenario(
        "ledger-mute",
        13,
        "implant",
        "the ledger's append/try_append made no-ops in the attacked process, then lr x5",
        RECORDS,
        {
            "action": "guard-tamper",
            "tamper": ["ledger", "try_append"],
            "then": "set-lr",
            "factor": 5.0,
        },
        goal="records",
        means="guard-tamper",
    ),
    Scenario(
        "alerts-clear",
        13,
        "implant",
        "the Guard's list of alerts emptied in place before every step, while lr x5",
        RECORDS,
        {"action": "clear-alerts", "factor": 5.0},
        goal="records",
        means="in-place",
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
