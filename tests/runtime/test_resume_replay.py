"""A resumed multi-rank run is the run that never stopped, bit for bit: each rank gets its
own RNG states back from the checkpoint (``runtime/checkpoints._every_rank_rng``), which
is what replay (issue 13) stands on. Real gloo ranks, real DDP, real signed checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.runtime.test_guard_distributed import finish, start_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, SAVE_AT = 14, 10


def job(run_dir: Path, key: Path, *options: str) -> dict[int, dict[str, float]]:
    procs = start_ranks(
        "tests.runtime.replay_worker", [], 2, [str(run_dir), str(key), str(STEPS), *options]
    )
    codes = finish(procs)
    errors = [p.stderr.read().decode()[-2000:] for p in procs if p.stderr]
    assert codes == [0, 0], errors
    return {r: json.loads((run_dir / f"losses-rank{r}.json").read_text()) for r in range(2)}


def test_a_resumed_two_rank_run_draws_each_ranks_own_dropout(tmp_path, owner_key):
    original = job(tmp_path / "original", owner_key, "--save-at", str(SAVE_AT))
    assert original[0]["12"] != original[1]["12"], "the ranks train on different batches"
    checkpoint = tmp_path / "original" / "ckpt.pt"
    resumed = job(tmp_path / "resumed", owner_key, "--resume", str(checkpoint))
    for rank in range(2):
        assert sorted(resumed[rank], key=int) == [str(s) for s in range(SAVE_AT, STEPS)]
        for step, loss in resumed[rank].items():
            assert loss == original[rank][step], f"rank {rank} step {step}"
