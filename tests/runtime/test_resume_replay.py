"""``trainguard replay``: re-run from a signed checkpoint, a job finds the first step where
the recorded run parts from an honest re-execution. It stands on a resumed multi-rank run
being the run that never stopped, bit for bit (each rank gets its own RNG states back
from the checkpoint: ``runtime/checkpoints._every_rank_rng``). Real gloo ranks, real DDP,
real signed checkpoints, the real command line and torchrun.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.test_guard_distributed import ROOT, finish, free_port, start_ranks
from trainguard.cli import EXIT_FINDINGS

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, SAVE_AT, ATTACK_AT, STOP = 20, 10, 13, 17


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
    """Replayed from the checkpoint at step 10 up to step 16: steps 10-13 reproduce bit for
    bit on both ranks (each rank's dropout restored: without its own RNG states the replay
    parts within a step or two), and the first difference is rank 1's loss at
    step 14, put down to the update of step 13, with the parameters differing at the
    check at step 15."""
    run_dir, recorded = original
    assert recorded[0]["12"] != recorded[1]["12"], "the ranks train on different batches"
    status, verdict = replay(run_dir, owner_key, tmp_path, "--to", str(STOP))
    assert status == EXIT_FINDINGS, verdict
    assert verdict["start"] == SAVE_AT
    assert verdict["last_step"] == STOP - 1, "the job stopped at --to"
    assert verdict["reproduced_to"] == ATTACK_AT
    assert verdict["step"] == ATTACK_AT + 1, "the loss after the edit is the first to differ"
    assert verdict["ranks"] == [1], "only the edited rank's loss differs at first"
    assert verdict["cause_step"] == ATTACK_AT
    assert f"the update of step {ATTACK_AT}" in verdict["cause"]
    assert verdict["check"] == 15
    assert "params" in verdict["fields"]
    # the incident report shows the replay's verdict
    shown = subprocess.run(
        [sys.executable, "-m", "trainguard", "report", str(run_dir), "--format", "json",
         "--replay", str(tmp_path / "replay")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    (found,) = json.loads(shown.stdout)["replays"]
    assert found["step"] == ATTACK_AT + 1
    assert "first divergence at step 14 on rank(s) 1" in found["text"]
