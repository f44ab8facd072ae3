"""Data integrity (runtime/data_check.py, runtime/sampler.py): batch digests, the sampler
check and per-rank losses, as decision tables and as real gloo runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tests.runtime.contexts import detector_context
from tests.runtime.data_worker import AT, EVERY
from tests.runtime.test_guard_distributed import start_ranks
from trainguard.runtime import fields
from trainguard.runtime.batches import HOLD_BYTES, batch_digest
from trainguard.runtime.data_check import (
    DataCheck,
    LossFamily,
    _fold,
    repeaters,
    same_data,
)
from trainguard.runtime.fingerprint import float_bits
from trainguard.runtime.interface import Alert, Context, StepInfo
from trainguard.runtime.sampler import Shard

# --- digests -------------------------------------------------------------------------


def test_digest_reads_every_kind_of_batch():
    ids = torch.arange(8 * 512).reshape(8, 512)
    cases = [
        ids,
        (ids, ids[:, 0]),
        [ids, {"labels": ids[:, :3]}],
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "n": 3},
        numpy.arange(10),
        torch.zeros(0),
        torch.randn(4, 4, requires_grad=True),
        torch.randn(4, 4).to(torch.bfloat16),
        torch.randn(6, 4).t(),  # not contiguous
    ]
    digests = [batch_digest(case) for case in cases]
    assert all(isinstance(d, int) and d > 0 for d in digests)
    assert len(set(digests)) == len(digests)


def test_digest_is_the_same_in_every_process_and_changes_with_the_data():
    ids = torch.arange(8 * 512).reshape(8, 512)
    code = "import torch; from trainguard.runtime.batches import HOLD_BYTES, batch_digest as d; "
    code += "print(d(torch.arange(8 * 512).reshape(8, 512)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == batch_digest(ids)
    changed = ids.clone()
    changed[0, 0] = -1  # the strided sample starts at the first element
    assert batch_digest(changed) != batch_digest(ids)
    assert batch_digest(ids.reshape(512, 8)) != batch_digest(ids), "the shape is digested"


@pytest.mark.parametrize("batch", [object(), "text", [object()], {"a": {1, 2}}, ()])
def test_a_batch_of_unknown_type_is_recorded_once_never_an_error(batch):
    ctx, seen = context()
    check = DataCheck(ctx)
    check.observe(None, batch)
    check.observe(None, batch)
    check.at_check()
    assert seen["alerts"] == []
    assert [e["event"] for e in seen["records"]] in ([], ["data-unchecked"])
    assert check.row()["data_interval"] == 0


def context(loader: Any = None, rank: int = 0, world: int = 1) -> tuple[Context, dict[str, Any]]:
    seen: dict[str, Any] = {"alerts": [], "once": [], "records": [], "flags": 0, "faults": []}

    def alert(a: Alert, flag: int) -> None:
        seen["alerts"].append(a)
        seen["flags"] |= flag

    def flag(bit: int) -> None:
        seen["flags"] |= bit

    ctx = detector_context(
        rank=rank,
        world=world,
        alert=alert,
        alert_once=seen["once"].append,
        record=seen["records"].append,
        fault=lambda where, exc: seen["faults"].append((where, exc)),
        flag=flag,
        options={"loader": loader, "seed": 0},
    )
    return ctx, seen


def test_commitment_follows_every_batch_in_order_and_the_interval_restarts():
    a, b = torch.arange(10), torch.arange(10, 20)
    rows = []
    for order in ([a, b], [b, a], [a, b]):
        check = DataCheck(context()[0])
        for batch in order:
            check.observe(None, batch)
        check.at_check()
        first = dict(check.row())
        check.observe(None, a)
        check.at_check()
        rows.append((first, dict(check.row())))
    (ab, ab2), (ba, _), (ab_again, _) = rows
    assert ab == ab_again
    assert ab["data_commit"] != ba["data_commit"]
    assert ab["data_interval"] != ba["data_interval"]
    assert ab2["data_commit"] != ab["data_commit"]
    assert ab2["data_interval"] == _fold(0, batch_digest(a)), "the interval restarts"


def intervals(check: DataCheck, batches: list[Any], every: int) -> list[tuple[int, int]]:
    """(interval digest, commitment) at each check of a run over ``batches``."""
    out = []
    for step, batch in enumerate(batches, 1):
        check.observe(None, batch)
        if step % every == 0:
            check.at_check()
            out.append((check.row()["data_interval"], check.row()["data_commit"]))
    return out


def test_small_cpu_batches_kept_to_the_check_digest_as_at_their_step():
    batches = [(torch.arange(i, i + 64), {"y": torch.ones(3) * i}) for i in range(12)]
    kept = DataCheck(context()[0])
    at_step = DataCheck(context()[0])
    at_step._hold = False  # digested at each step, as large or device batches are
    assert intervals(kept, batches, 4) == intervals(at_step, batches, 4)
    assert kept._hold is True
    large = DataCheck(context()[0])
    large.observe(None, torch.zeros(HOLD_BYTES // 4 + 1, dtype=torch.float32))
    assert large._hold is False
    assert large.held == []


def test_a_loader_refilling_one_buffer_loses_that_interval_and_never_alerts():
    buffer = torch.zeros(64, dtype=torch.int64)

    def refilled(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        buffer.copy_(torch.arange(i, i + 64))  # the loader writes each batch into its buffer
        return buffer, buffer[:8]

    ctx, seen = context()
    check = DataCheck(ctx)
    fresh = DataCheck(context()[0])
    fresh._hold = False
    first: list[tuple[int, int]] = []
    for step in range(12):
        check.observe(None, refilled(step))
        fresh.observe(None, (buffer.clone(), buffer[:8].clone()))
        if step % 4 == 3:
            check.at_check()
            fresh.at_check()
            first.append((check.row()["data_interval"], fresh.row()["data_interval"]))
    assert seen["alerts"] == []
    assert check.row()["data_repeats"] == 0
    assert [r["event"] for r in seen["records"]] == ["data-unchecked"]
    assert "refills its batch buffers" in seen["records"][0]["detail"]
    assert first[0][0] == 0, "the refilled interval is not digested (its batches are gone)"
    assert [a for a, _ in first[1:]] == [b for _, b in first[1:]], "then digested at each step"


def test_each_ranks_commitments_are_recorded_at_close():
    ctx, seen = context(world=2)
    check = DataCheck(ctx)
    for step in range(3):
        check.observe(None, torch.arange(step, step + 10))
        check.at_check()
        check.compare(rows_with(data_commit=[check.commitment, 5], data_loss=[NAN, NAN]))
    check.observe(None, torch.arange(50))  # after the last check: in the final commitment
    last = check.commitment
    check.close()
    (final,) = [e for e in seen["records"] if e["event"] == "data-commitments"]
    assert final["rank"] == 0
    assert [c for _, c in final["checks"]][-1] == f"{last:016x}"
    assert final["commitment"] == f"{check.commitment:016x}" != f"{last:016x}"


def test_interval_loss_is_the_mean_of_the_steps_losses():
    check = DataCheck(context()[0])
    for step, loss in enumerate([1.0, 2.0, float("nan"), 3.0]):
        list(check.on_step(StepInfo(step, loss, [0.1], None)))
    check.at_check()
    assert check.row()["data_loss"] == float_bits(2.0)


# --- decisions: rows in, verdicts out --------------------------------------------------


@pytest.mark.parametrize(
    ("digests", "groups"),
    [
        ([11, 22], []),
        ([11, 11], [[0, 1]]),
        ([0, 0], []),  # no batches passed: nothing to compare
        ([11, 22, 33, 44], []),
        ([11, 22, 33, 22], [[1, 3]]),
        ([5, 5, 7, 7], [[0, 1], [2, 3]]),
    ],
)
def test_same_data_table(digests, groups):
    assert same_data(digests) == groups


@pytest.mark.parametrize(
    ("repeats", "named"),
    [
        ([0, 0], []),
        ([0, 3], [1]),
        ([0, 1], []),  # one repeat: not enough to name
        ([3, 3], []),  # every rank repeats: the job's own doing
        ([0, 0, 0, 4], [3]),
        ([4, 4, 0, 0], [0, 1]),
        ([4, 4, 4, 0], []),
        ([2, 0, 1, 0], []),  # a rank with one repeat is neither clean nor repeating
    ],
)
def test_repeat_table(repeats, named):
    assert repeaters(repeats) == named


def losses_run(family: LossFamily, checks: list[list[float]]) -> list[list[int]]:
    return [family.check(losses)[0] for losses in checks]


NOISY_TWO = [[14.2, 4.25], [6.2, 17.3], [3.7, 7.0], [6.7, 18.2], [6.1, 2.4], [2.0, 2.6]]
FOUR_CLEAN = [[2.0 + 0.1 * i, 2.1, 1.9, 2.05] for i in range(6)]
FOUR_LABELS = FOUR_CLEAN[:3] + [[0.3, 0.31, 0.29, 2.2], [0.25, 0.24, 0.26, 2.4]]


@pytest.mark.parametrize(
    ("checks", "verdicts"),
    [
        # the practice matrix's noisiest two-rank interval losses (batches of 8): quiet
        (NOISY_TWO, [[]] * 6),
        (FOUR_CLEAN, [[]] * 6),
        # rank 3 of 4 trains on permuted labels from the fourth check: named at the fifth
        (FOUR_LABELS, [[], [], [], [], [3]]),
        # two ranks apart by a large factor twice on the same side: both (cannot tell)
        ([[1.0, 1.1], [1.0, 0.9], [1.0, 1.05], [0.2, 2.0], [0.2, 2.2]], [[]] * 4 + [[0, 1]]),
        # the same factor, but the sides swap: noise
        ([[1.0, 1.1], [1.0, 0.9], [1.0, 1.05], [0.2, 2.0], [2.2, 0.2]], [[]] * 5),
        # half the ranks move: no family to stand out from
        ([[1.0] * 4, [1.0] * 4, [1.0] * 4, [0.1, 0.1, 2, 2], [0.1, 0.1, 2, 2]], [[]] * 5),
        # a loss that is missing, zero or negative: skipped
        ([[1.0, float("nan")], [0.0, 5.0], [-1.0, 1.0]], [[]] * 3),
    ],
)
def test_loss_family_table(checks, verdicts):
    assert losses_run(LossFamily(), checks) == verdicts


def rows_with(**columns: list[int]) -> list[list[int]]:
    world = len(next(iter(columns.values())))
    rows = [[0] * len(fields.FIELDS) for _ in range(world)]
    for name, values in columns.items():
        for rank, value in enumerate(values):
            rows[rank][fields.INDEX[name]] = value
    return rows


NAN = float_bits(math.nan)


@pytest.mark.parametrize(
    ("columns", "verdicts"),
    [
        ({"data_interval": [11, 22]}, []),
        ({"data_interval": [11, 11]}, [(None, "same data")]),
        ({"data_interval": [11, 11], "flags": [0, fields.DATA_ALTERED]}, [(1, "same data")]),
        ({"data_interval": [5, 6, 7, 6]}, [(None, "same data")]),
        ({"data_repeats": [0, 5]}, [(1, "same batch again")]),
        ({"data_sampler": [3, 3, 3, 9]}, [(3, "sampler settings")]),
        ({"data_sampler": [3, 9]}, [(None, "sampler settings")]),
        ({"data_sampler": [3, 9], "flags": [fields.DATA_ALTERED, 0]}, [(0, "sampler settings")]),
        ({"data_drawn": [64, 64, 128, 64]}, [(2, "number of samples")]),
        ({"data_drawn": [64, 128]}, [(None, "number of samples")]),
        ({"data_drawn": [64, 128], "flags": [0, fields.DATA_ALTERED]}, [(1, "number of samples")]),
        # a rank whose guard failed: its values are unknown, compared with nothing
        ({"data_interval": [11, 11], "flags": [0, fields.GUARD_FAILED]}, []),
    ],
)
def test_compare_table(columns, verdicts):
    world = len(next(iter(columns.values())))
    ctx, seen = context(world=world)
    check = DataCheck(ctx)
    columns.setdefault("data_loss", [NAN] * world)
    check.compare(rows_with(**columns))
    check.compare(rows_with(**columns))  # reported once (counts drawn: at the second)
    got = [(a.rank, a.message) for a in seen["once"]]
    assert len(got) == len(verdicts), got
    for (rank, text), (want_rank, want_text) in zip(got, verdicts, strict=True):
        assert rank == want_rank
        assert want_text in text


# --- the sampler check -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "world", "shuffle", "drop_last"),
    [
        (100, 4, True, False),
        (101, 4, True, False),
        (101, 4, True, True),
        (10, 3, False, False),
        (2, 4, True, False),
        (7, 2, False, True),
    ],
)
def test_recomputed_shard_is_what_distributed_sampler_yields(length, world, shuffle, drop_last):
    dataset = TensorDataset(torch.arange(length))
    for rank in range(world):
        sampler = DistributedSampler(
            dataset, world, rank, shuffle=shuffle, seed=5, drop_last=drop_last
        )
        for epoch in (0, 3):
            sampler.set_epoch(epoch)
            shard = Shard(rank, world, 5, shuffle, drop_last)
            assert shard.indices(length, epoch) == list(sampler)


def sampler_loader(rank: int, world: int) -> tuple[DataLoader[Any], DistributedSampler[Any]]:
    dataset = TensorDataset(torch.arange(64).float())
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=3)
    return DataLoader(dataset, batch_size=4, sampler=sampler), sampler


def test_drawn_counts_differing_once_are_a_peek_not_a_skip():
    """Rank 0 draws one batch more in one interval (a batch peeked at for a log): quiet.
    The same difference at two checks in a row is reported."""
    ctx, seen = context(world=2)
    check = DataCheck(ctx)
    nan = [NAN, NAN]
    for drawn in ([36, 32], [32, 32], [36, 32], [32, 32]):
        check.compare(rows_with(data_drawn=drawn, data_loss=nan))
    assert seen["once"] == []
    check.compare(rows_with(data_drawn=[64, 32], data_loss=nan))
    check.compare(rows_with(data_drawn=[64, 32], data_loss=nan))
    assert [a.rank for a in seen["once"]] == [None]


def test_sampler_check_is_quiet_on_a_clean_loader_and_restores_it():
    loader, sampler = sampler_loader(1, 2)
    ctx, seen = context(loader, rank=1, world=2)
    check = DataCheck(ctx)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for (xb,) in loader:
            check.observe(None, xb)
        check.at_check()
    assert seen["alerts"] == []
    assert seen["flags"] == 0
    assert check.row()["data_drawn"] == 32, "drawn in the interval"
    check.close()
    assert loader.batch_sampler.sampler is sampler


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda s: setattr(s, "rank", 0), "they are rank 0's shard"),
        (lambda s: setattr(s, "seed", 4), "seed 4"),
        (lambda s: setattr(s, "shuffle", False), "shuffle False"),
        (lambda s: setattr(s, "drop_last", True), "drop_last True"),
    ],
)
def test_sampler_changed_under_the_job_names_this_rank(change, says):
    loader, sampler = sampler_loader(1, 2)
    ctx, seen = context(loader, rank=1, world=2)
    check = DataCheck(ctx)
    list(loader)
    change(sampler)
    sampler.set_epoch(1)
    list(loader)
    check.at_check()
    assert seen["alerts"], "alerted"
    assert all(a.rank == 1 and a.detector == "data" for a in seen["alerts"])
    assert any(says in a.message for a in seen["alerts"]), [a.message for a in seen["alerts"]]
    assert seen["flags"] & fields.DATA_ALTERED


def test_a_replaced_sampler_iter_is_caught_by_the_recompute(foreign):
    """The class's ``__iter__`` patched to yield another shard: the recompute does not
    ask the sampler how to compute its indices."""
    loader, sampler = sampler_loader(1, 2)
    ctx, seen = context(loader, rank=1, world=2)
    check = DataCheck(ctx)
    implant = foreign(
        """
        def attack(sampler):
            original = type(sampler).__iter__
            class Other(type(sampler)):
                def __iter__(self):
                    return iter(sorted(original(self)))
            sampler.__class__ = Other
        """
    )
    implant.attack(sampler)
    list(loader)
    check.at_check()
    assert [a.rank for a in seen["alerts"]] == [1]
    assert "other indices" in seen["alerts"][0].message


def test_sampler_of_another_group_is_held_to_its_start():
    """A sampler over a data-parallel group smaller than the guard's world: its rank is not
    the process group's, and is only held to what it was at start."""
    dataset = TensorDataset(torch.arange(64).float())
    sampler = DistributedSampler(dataset, 2, 1, shuffle=True, seed=3)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    ctx, seen = context(loader, rank=3, world=4)
    check = DataCheck(ctx)
    list(loader)
    check.at_check()
    assert seen["alerts"] == []
    sampler.rank = 0
    check.at_check()
    assert [a.rank for a in seen["alerts"]] == [3]


def test_the_loader_still_says_its_sampler_is_a_distributed_sampler():
    """accelerate and Lightning ask the loader's sampler what it is."""
    loader, sampler = sampler_loader(0, 2)
    check = DataCheck(context(loader, world=2)[0])
    proxy = loader.batch_sampler.sampler
    assert proxy is not sampler
    assert isinstance(proxy, DistributedSampler)
    proxy.set_epoch(4)
    assert sampler.epoch == 4
    assert len(proxy) == len(sampler)
    check.close()
    assert loader.batch_sampler.sampler is sampler


def test_a_sampler_it_cannot_read_is_a_fault_not_the_jobs_end():
    loader, sampler = sampler_loader(0, 2)
    del sampler.seed  # a sampler subclass without the attribute
    ctx, seen = context(loader, world=2)
    check = DataCheck(ctx)
    assert not check.sampler.active
    assert [where for where, _ in seen["faults"]] == ["the data sampler check"]


def test_a_loader_without_a_distributed_sampler_is_left_alone():
    loader = DataLoader(TensorDataset(torch.arange(8).float()), batch_size=2, shuffle=True)
    before = loader.batch_sampler.sampler
    check = DataCheck(context(loader)[0])
    assert not check.sampler.active
    assert loader.batch_sampler.sampler is before
    assert len(list(loader)) == 4


# --- real gloo runs --------------------------------------------------------------------------


def run_job(scenario: str, world: int, tmp_path: Path, key: Path) -> Path:
    run_dir = tmp_path / scenario
    procs = start_ranks(
        "tests.runtime.data_worker", [scenario], world, [str(run_dir), str(key)], text=True
    )
    for rank, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{err[-3000:]}"
    return run_dir


def alerts(run_dir: Path, rank: int) -> list[dict[str, Any]]:
    return json.loads((run_dir / f"alerts-rank{rank}.json").read_text())


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.distributed
@pytest.mark.slow
def test_clean_runs_raise_nothing(tmp_path, owner_key, world):
    run_dir = run_job("clean", world, tmp_path, owner_key)
    for rank in range(world):
        assert alerts(run_dir, rank) == []


@pytest.mark.parametrize("scenario", ["labels", "half-labels"])
@pytest.mark.distributed
@pytest.mark.slow
def test_labels_altered_on_rank_3_of_4_is_named_by_its_loss(tmp_path, owner_key, scenario):
    """Labels permuted, or half of them replaced at random, after the loader: the sampler
    and the digests cannot see it; the loss does."""
    run_dir = run_job(scenario, 4, tmp_path, owner_key)
    found = [a for a in alerts(run_dir, 0) if a["detector"] == "data"]
    assert found, "rank 0 reports the rows' verdict"
    assert {a["rank"] for a in found} == {3}
    assert "out of family" in found[0]["message"]
    assert found[0]["step"] <= AT + 2 * EVERY, "within two intervals"


@pytest.mark.distributed
@pytest.mark.slow
def test_rank_1_fed_rank_0s_shard_is_named_by_the_sampler_check(tmp_path, owner_key):
    run_dir = run_job("shard", 2, tmp_path, owner_key)
    own = [a for a in alerts(run_dir, 1) if a["detector"] == "data" and a["rank"] == 1]
    assert any("rank" in a["message"] for a in own), own
    assert any("rank 0's shard" in a["message"] for a in own), own
    seen_by_0 = [a for a in alerts(run_dir, 0) if a["detector"] == "data"]
    assert {a["rank"] for a in seen_by_0} <= {1}


@pytest.mark.distributed
@pytest.mark.slow
def test_a_rank_repeating_one_batch_is_named(tmp_path, owner_key):
    run_dir = run_job("repeat", 2, tmp_path, owner_key)
    found = [a for a in alerts(run_dir, 0) if a["detector"] == "data"]
    assert any(a["rank"] == 1 and "same batch again" in a["message"] for a in found), found
    assert {a["rank"] for a in found} <= {1, None}


@pytest.mark.distributed
@pytest.mark.slow
def test_a_rank_reading_another_shuffle_is_named_by_its_seed(tmp_path, owner_key):
    run_dir = run_job("seed", 2, tmp_path, owner_key)
    found = [a for r in (0, 1) for a in alerts(run_dir, r) if a["detector"] == "data"]
    assert any(a["rank"] == 1 and "seed 4" in a["message"] for a in found), found
    assert {a["rank"] for a in found} == {1}
    assert min(a["step"] for a in found) <= AT + EVERY


@pytest.mark.distributed
@pytest.mark.slow
def test_a_rank_skipping_every_other_batch_is_named_by_the_majority(tmp_path, owner_key):
    run_dir = run_job("skip", 4, tmp_path, owner_key)
    found = [a for a in alerts(run_dir, 0) if a["detector"] == "data"]
    assert any(a["rank"] == 3 and "number of samples" in a["message"] for a in found), found
    assert {a["rank"] for a in found} == {3}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_batch_on_the_gpu_is_digested_without_a_device_sync():
    check = DataCheck(context()[0])
    ids = torch.arange(8 * 512, device="cuda").reshape(8, 512)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            check.observe(None, {"input_ids": ids, "labels": ids[:, :4].float()})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check.at_check()
    assert check.row()["data_interval"] != 0
    assert check.row()["data_repeats"] == 2


def test_the_device_digest_follows_the_values():
    """The accelerator's digest (an integer reduction), run here on the CPU."""
    from trainguard.runtime.batches import _device_sample

    ids = torch.arange(8 * 512).reshape(8, 512)
    changed = ids.clone()
    changed[0, 0] = 7
    assert int(_device_sample(ids, 0)) != int(_device_sample(changed, 0))
    assert int(_device_sample(ids, 0)) != int(_device_sample(ids, 1)), "position in the batch"
    assert int(_device_sample(torch.zeros(0), 0)) == 0


def test_a_held_batch_has_the_digest_of_the_same_batch_taken_at_its_step():
    """What the check computes for a kept batch (its sample read at the check) is the
    digest the step path computes from its copied sample, with the layout strings cached:
    a job whose loader starts refilling its buffers in place (digested per step from then
    on) keeps one commitment."""
    from trainguard.runtime import batches

    gen = torch.Generator().manual_seed(4)
    samples = [
        (torch.randint(0, 50, (16, 64), generator=gen), torch.randn(16, 64, generator=gen)),
        {
            "input_ids": torch.randint(0, 9, (4, 300), generator=gen),
            "mask": torch.rand(4, 300, generator=gen) > 0.5,
            "pixels": torch.randn(2, 3, 8, 8, generator=gen).to(torch.bfloat16),
            "nested": [torch.arange(5, dtype=torch.int16), numpy.arange(7.0)],
            "name": "batch-3",
        },
        [torch.tensor([], dtype=torch.int64), torch.randn(5, 4, generator=gen).t()],
    ]
    for batch in samples:
        found: list[tuple[str, torch.Tensor]] = []
        assert batches.leaves(batch, "", found, 0)
        at_step = batches.batch_digest(batch)
        assert batches.digest(batches.sample_leaves(found, copy=False)) == at_step
        assert batches.batch_digest(batch) == at_step  # from the cached layout string
    # and it depends on the values and on where they sit
    x, y = samples[0]
    swapped = [("[0]", y), ("[1]", x)]
    held = batches.digest(batches.sample_leaves(swapped, copy=False))
    assert held != batches.batch_digest(samples[0])
