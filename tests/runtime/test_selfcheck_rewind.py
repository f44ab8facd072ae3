"""Two ranks have no majority: a torch generator that moved on both and stops on one, with
CPU dropout in training mode on both, is named (selfcheck.GuardIntegrity._stopped); jobs
whose generator stops on one rank legitimately are not. Real gloo ranks."""

from __future__ import annotations

import pytest

from tests.runtime.rewind_worker import AT, EVERY
from tests.runtime.test_guard_distributed import alerts, finish, start_ranks


def run(mode: str, tmp_path, owner_key) -> list[list[dict]]:
    run_dir = tmp_path / mode
    args = [str(run_dir), str(owner_key)]
    codes = finish(start_ranks("tests.runtime.rewind_worker", [mode], 2, args))
    assert codes == [0, 0], codes
    return [alerts(run_dir, r) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_generator_set_back_before_every_update_on_one_of_two_ranks_is_named(tmp_path, owner_key):
    found = [a for per_rank in run("rewind", tmp_path, owner_key) for a in per_rank]
    assert found, "the rewound generator was not seen"
    assert {a["rank"] for a in found} == {1}, found
    assert min(a["step"] for a in found) <= AT + 2 * EVERY


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["clean", "lopsided"])
def test_generators_that_stop_legitimately_name_nobody(mode, tmp_path, owner_key):
    assert run(mode, tmp_path, owner_key) == [[], []]
