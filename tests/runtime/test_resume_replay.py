"""A resumed multi-rank run is the run that never stopped, bit for bit (each rank gets its
own RNG states back from the checkpoint: ``runtime/checkpoints._every_rank_rng``), and
``trainguard replay`` stands on that: re-run from a signed checkpoint, it finds the first
step where the recorded run parts from an honest re-execution. Real gloo ranks, real DDP,
real signed checkpoints, the real command line and torchrun.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.test_guard_distributed import ROOT, finish, free_port, start_ranks
from trainguard.cli import EXIT_CLEAN, EXIT_FINDINGS

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, SAVE_AT, ATTACK_AT = 20, 10, 13


def job(run_dir: Path, key: Path, *options: str) -> dict[int, dict[str, float]]:
    procs = start_ranks(
        "tests.runtime.replay_worker", [], 2, [str(run_dir), str(key), str(STEPS), *options]
    )
    codes = finish(procs)
    errors = [p.stderr.read().decode()[-2000:] for p in procs if p.stderr]
    assert codes == [0, 0], errors
    return {r: json.loads((run_dir / f"losses-rank{r}.json").read_text()) for r in range(2)}


@pytest.fixture(scope="module")
def original(tmp_path_factory, owner_key):
    """A run that saves a checkpoint at step 10, and whose rank 1 edits its parameters
    after its optimizer step 13 (through ``p.data``)."""
    run_dir = tmp_path_factory.mktemp("original") / "run"
    losses = job(run_dir, owner_key, "--save-at", str(SAVE_AT), "--attack-at", str(ATTACK_AT))
    return run_dir, losses


def test_a_resumed_two_rank_run_draws_each_ranks_own_dropout(tmp_path, owner_key, original):
    run_dir, recorded = original
    assert recorded[0]["12"] != recorded[1]["12"], "the ranks train on different batches"
    resumed = job(tmp_path / "resumed", owner_key, "--resume", str(run_dir / "ckpt.pt"))
    for rank in range(2):
        assert sorted(resumed[rank], key=int) == [str(s) for s in range(SAVE_AT, STEPS)]
        for step in range(SAVE_AT, ATTACK_AT + 1):  # up to the edit: the same run
            assert resumed[rank][str(step)] == recorded[rank][str(step)], f"rank {rank} {step}"
    assert resumed[1][str(ATTACK_AT + 1)] != recorded[1][str(ATTACK_AT + 1)]


def replay(run_dir: Path, key: Path, out: Path, *options: str) -> tuple[int, dict]:
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
        *("--master-port", free_port(), "-m", "tests.runtime.replay_worker", "env", "env", "env"),
        *(str(out / "job"), str(key), str(STEPS), "--resume", str(run_dir / "ckpt.pt")),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "trainguard", "replay", str(run_dir), *options,
         "--from", str(run_dir / "ckpt.pt"), "--out", str(out / "replay"), "--format", "json",
         "--", *command],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.stdout, done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout)


def test_replay_finds_the_first_step_that_differs_and_the_rank(tmp_path, owner_key, original):
    run_dir, _ = original
    status, verdict = replay(run_dir, owner_key, tmp_path)
    assert status == EXIT_FINDINGS, verdict
    assert verdict["start"] == SAVE_AT
    assert verdict["reproduced_to"] == ATTACK_AT
    assert verdict["step"] == ATTACK_AT + 1, "the loss after the edit is the first to differ"
    assert verdict["ranks"] == [1], "only the edited rank's loss differs at first"
    assert "params" in verdict["fields"]
    assert f"the update of step {ATTACK_AT}" in verdict["cause"]


def test_replay_up_to_the_edit_reproduces_bit_for_bit(tmp_path, owner_key, original):
    run_dir, _ = original
    status, verdict = replay(run_dir, owner_key, tmp_path, "--to", str(ATTACK_AT + 1))
    assert status == EXIT_CLEAN, verdict
    assert verdict["last_step"] == ATTACK_AT
    assert not verdict["diverged"]
