"""Gradient integrity (runtime/grad_check.py): the cross-rank decision on tables of rows,
the keyed draw of sampled steps, and real gloo jobs (2 and 4 ranks) whose victim rank
scales, flips or edits its gradients before or after the all-reduce."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.runtime.grad_worker import AT, EVERY
from tests.runtime.test_guard_distributed import start_ranks
from trainguard.runtime import fields
from trainguard.runtime.fingerprint import float_bits
from trainguard.runtime.grad_check import COS, SLOTS, GradCheck, History, _draw

# --- the decision, on tables ------------------------------------------------------------


def rows(
    norms: list[float],
    coss: list[float] | None = None,
    *,
    digests: list[int] | None = None,
    flags: list[int] | None = None,
    sums: list[float] | None = None,
    result_sum: float | None = None,
    dots: list[float] | None = None,
    result_dot: float | None = None,
    count: int = 1,
    slots: int = 1,
) -> list[list[int]]:
    """One row per rank, as the gather gives them: every slot holds the same values."""
    world = len(norms)
    coss = coss or [0.5] * world
    sums = sums or [0.1 * (r + 1) for r in range(world)]
    dots = dots or [0.2 * (r + 1) for r in range(world)]
    out = []
    for r in range(world):
        row = [0] * len(fields.FIELDS)

        def put(name: str, value: int, row: list[int] = row) -> None:
            row[fields.INDEX[name]] = value

        put("flags", (flags or [0] * world)[r])
        put("grad_count", count)
        put("grad_digest", (digests or [7] * world)[r])
        put("grad_before_sum", float_bits(sums[r]))
        put("grad_before_abs", float_bits(abs(sums[r]) * 10 + 1.0))
        put("grad_reduced_sum", float_bits(sum(sums) if result_sum is None else result_sum))
        put("grad_dot", float_bits(dots[r]))
        put("grad_self", float_bits(dots[r] / 2))
        put("grad_result", float_bits(sum(dots) if result_dot is None else result_dot))
        put("grad_slots", 11)
        put("grad_measured", slots)
        for i in range(slots):
            put(f"grad_norm_{i}", float_bits(norms[r]))
            put(f"grad_cos_{i}", float_bits(coss[r]))
        out.append(row)
    return out


def verdicts(*tables: list[list[int]]) -> list[tuple[int | None, str]]:
    """What one History decides over consecutive checks: (rank, invariant) per verdict."""
    history = History()
    return [(v.rank, v.details["invariant"]) for table in tables for v in history.judge(table)]


CLEAN_4 = [1.0, 1.4, 0.7, 1.1]

TABLES: list[tuple[str, list[list[list[int]]], list[tuple[int | None, str]]]] = [
    ("clean four ranks, norms tens of percent apart", [rows(CLEAN_4)] * 3, []),
    ("clean two ranks, norms 3x apart", [rows([1.0, 3.0], slots=2)] * 2, []),
    (
        "rank 1 of 4 at 8x, two sampled steps",
        [rows([1.0, 8.0, 1.1, 0.9], slots=2)],
        [(1, "family-norm")],
    ),
    (
        "rank 1 of 4 at 8x, one sampled step per check, two checks",
        [rows([1.0, 8.0, 1.1, 0.9])] * 2,
        [(1, "family-norm")],
    ),
    ("rank 1 of 4 at 8x at one sampled step only", [rows([1.0, 8.0, 1.1, 0.9]), rows(CLEAN_4)], []),
    (
        "rank 1 of 4 at 8x then 3x: beyond 4x on the whole",
        [rows([1.0, 8.0, 1.1, 0.9]), rows([1.0, 3.0, 1.1, 0.9])],
        [(1, "family-norm")],
    ),
    ("rank 1 of 4 at 3x, again and again", [rows([1.0, 3.0, 1.1, 0.9])] * 4, []),
    (
        "rank 1 of 4 at 8x then 0.1x: not the same side",
        [rows([1.0, 8.0, 1.1, 0.9]), rows([1.0, 0.1, 1.1, 0.9])],
        [],
    ),
    ("named once per streak", [rows([1.0, 8.0, 1.1, 0.9], slots=4)] * 2, [(1, "family-norm")]),
    (
        "rank 3 of 4 sends almost nothing",
        [rows([1.0, 1.2, 0.9, 0.1], slots=2)],
        [(3, "family-norm")],
    ),
    (
        "rank 2 of 4 points against the others",
        [rows(CLEAN_4, [0.5, 0.3, -0.6, 0.4], slots=2)],
        [(2, "family-cosine")],
    ),
    (
        "rank 2 of 4 points against others that do not agree either",
        [rows(CLEAN_4, [0.1, -0.05, -0.6, 0.3], slots=4)],
        [],
    ),
    (
        "noise: small cosines of both signs",
        [rows(CLEAN_4, [0.05, -0.1, 0.02, -0.25], slots=4)] * 3,
        [],
    ),
    ("two ranks at 8x: cannot tell which", [rows([1.0, 8.0], slots=2)], [(None, "family-norm")]),
    (
        "rank 3 of 4 steps with other gradients: majority",
        [rows(CLEAN_4, digests=[5, 5, 5, 6])],
        [(3, "same-result")],
    ),
    (
        "two ranks differ, rank 1's own sensor saw it",
        [rows([1.0, 1.1], digests=[5, 6], flags=[0, fields.GRADS_ALTERED])],
        [(1, "same-result")],
    ),
    ("two ranks differ, no evidence", [rows([1.0, 1.1], digests=[5, 6])], [(None, "same-result")]),
    (
        "four ranks split 2-2, no evidence",
        [rows(CLEAN_4, digests=[5, 5, 6, 6])],
        [(None, "same-result")],
    ),
    (
        "the result is not the sum of the parts",
        [rows([1.0, 1.1], result_sum=5.0)],
        [(None, "sum-of-parts")],
    ),
    (
        "the result's projection is not the parts'",
        [rows(CLEAN_4, result_dot=8.0)],
        [(None, "sum-of-parts")],
    ),
    (
        "float rounding of the sum stays quiet",
        [rows(CLEAN_4, result_sum=1.0 * (1 + 1e-6), result_dot=2.0 * (1 - 1e-6))],
        [],
    ),
    (
        "a rank whose guard failed is compared with nothing",
        [
            rows(
                [1.0, 9.0, 1.1, 0.9],
                digests=[5, 6, 5, 5],
                flags=[0, fields.GUARD_FAILED, 0, 0],
                slots=2,
            )
        ],
        [],
    ),
    ("nothing sampled in the interval", [rows([1.0, 8.0, 1.0], count=0, slots=2)], []),
    (
        "a broken invariant is one alert, not one per check",
        [rows([1.0, 1.1], digests=[5, 6])] * 3,
        [(None, "same-result")],
    ),
    (
        "and again once it held in between",
        [rows([1.0, 1.1], digests=[5, 6]), rows([1.0, 1.1]), rows([1.0, 1.1], digests=[5, 6])],
        [(None, "same-result"), (None, "same-result")],
    ),
]


@pytest.mark.parametrize(("case", "tables", "expected"), TABLES, ids=[t[0] for t in TABLES])
def test_decision_table(case, tables, expected):
    assert verdicts(*tables) == expected, case


def test_every_slot_has_its_fields():
    for i in range(SLOTS):
        assert fields.OWNERS[f"grad_norm_{i}"] == fields.OWNERS[f"grad_cos_{i}"] == "gradients"
    assert f"grad_norm_{SLOTS}" not in fields.INDEX


def test_verdicts_name_the_values():
    history = History()
    (found,) = history.judge(rows([1.0, 8.0, 1.1, 0.9], slots=2))
    assert "rank 1" in found.message
    assert "norm 8" in found.message
    assert "median" in found.message
    (pair,) = History().judge(rows([1.0, 8.0], slots=2))
    assert pair.rank is None
    assert "cannot tell" in pair.message
    (flip,) = History().judge(rows(CLEAN_4, [0.5, 0.3, -0.6, 0.4], slots=2))
    assert f"cosine {-0.6:.3f}" in flip.message
    assert COS <= 0.6


# --- the keyed draw ---------------------------------------------------------------------


def detector(key: bytes) -> GradCheck:
    ctx: Any = SimpleNamespace(comm=None, world=1, shared_key=key, steps=lambda: 0)
    return GradCheck(ctx)


def test_sampled_steps_are_a_keyed_thirty_second():
    """Besides the check steps one step in 32 is sampled, drawn under the shared key: the
    same steps for the same key (every rank), others for another key (unpredictable)."""
    one, same, other = detector(b"a" * 32), detector(b"a" * 32), detector(b"b" * 32)
    first = {n for n in range(6400) if one._chosen(n)}
    assert first == {n for n in range(6400) if same._chosen(n)}
    second = {n for n in range(6400) if other._chosen(n)}
    assert 150 <= len(first) <= 250  # 200 expected
    assert 150 <= len(second) <= 250
    assert len(first & second) < 25  # independent draws: about 6 in common
    assert _draw(b"a" * 32, b"grads", 5) != _draw(b"b" * 32, b"grads", 5)


def test_rate_can_be_set():
    check = detector(b"k" * 32)
    check.rate = 1.0
    assert all(check._chosen(n) for n in range(100))
    check.rate = 0.5
    assert math.isclose(check.rate, 0.5)
    assert 30 < sum(check._chosen(n) for n in range(100)) < 70


# --- real jobs --------------------------------------------------------------------------


def job(scenario: str, victim: int, world: int, tmp_path: Path, key: Path) -> list[dict[str, Any]]:
    """Run the job; every alert any rank holds (alerts computed alike on every rank from
    the rows are held by all and reported by rank 0), once each."""
    run_dir = tmp_path / scenario
    procs = start_ranks(
        "tests.runtime.grad_worker", [scenario, str(victim)], world, [str(run_dir), str(key)]
    )
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # noqa: PERF203 - each rank on its own
            proc.kill()
            _, err = proc.communicate()
        assert proc.returncode == 0, err.decode()[-3000:]
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in range(world):
        for alert in json.loads((run_dir / f"alerts-rank{r}.json").read_text()):
            seen[(alert["detector"], alert["rank"], alert["step"], alert["message"])] = alert
    return list(seen.values())


def gradient_alerts(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This slice's alerts: the cross-rank gradient checks and the local after-the-reduction
    sensor (other detectors' verdicts are their own tests' business)."""
    return [a for a in found if a["detector"] in ("gradients", "sensor:grads-altered")]


@pytest.mark.parametrize(("scenario", "world"), [("clean", 2), ("clean", 4), ("loop-clean", 4)])
@pytest.mark.distributed
@pytest.mark.slow
def test_clean_ranks_with_their_own_data_raise_nothing(tmp_path, owner_key, scenario, world):
    assert gradient_alerts(job(scenario, -1, world, tmp_path, owner_key)) == []


@pytest.mark.parametrize("scenario", ["hook-x8", "loop-x8"])
@pytest.mark.distributed
@pytest.mark.slow
def test_gradients_scaled_before_the_reduction_name_the_rank(tmp_path, owner_key, scenario):
    """A tensor hook multiplies rank 1's gradients by 8 before they are reduced (through
    DDP's buckets, or a hand-written all-reduce loop): its contribution's norm is out of
    family among four ranks, and rank 1 alone is named."""
    found = [a for a in job(scenario, 1, 4, tmp_path, owner_key) if a["detector"] == "gradients"]
    assert found
    assert {a["rank"] for a in found} == {1}
    assert "norm" in found[0]["message"]
    assert found[0]["step"] <= AT + 2 * EVERY


@pytest.mark.distributed
@pytest.mark.slow
def test_sign_flip_in_a_patched_all_reduce_names_the_rank(tmp_path, owner_key):
    """Rank 2 wraps dist.all_reduce (after the guard's own wrapper) to negate its tensor
    before the collective: its contribution points against the others' sum."""
    found = gradient_alerts(job("flip-allreduce", 2, 4, tmp_path, owner_key))
    named = [a for a in found if a["detector"] == "gradients"]
    assert named
    assert {a["rank"] for a in found} == {2}
    assert "cosine" in named[0]["message"]
    assert named[0]["step"] <= AT + 2 * EVERY


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_at_8x_never_name_the_wrong_rank(tmp_path, owner_key):
    """A hook on the loss's autograd node scales rank 1's gradients by 8: with two ranks
    the larger cannot be told from the smaller being wrong."""
    found = gradient_alerts(job("node-x8", 1, 2, tmp_path, owner_key))
    assert found
    assert {a["rank"] for a in found} <= {None, 1}


@pytest.mark.distributed
@pytest.mark.slow
def test_a_contribution_changed_inside_the_collective(tmp_path, owner_key):
    """Rank 1's dist.all_reduce was replaced before the guard started by one that scales
    its tensor inside the call the guard observes: the result is not the parts' sum."""
    found = gradient_alerts(job("inside-x8", 1, 2, tmp_path, owner_key))
    sums = [a for a in found if a["details"].get("invariant") == "sum-of-parts"]
    assert sums
    assert sums[0]["step"] <= AT + EVERY
    assert {a["rank"] for a in found} <= {None, 1}


@pytest.mark.distributed
@pytest.mark.slow
def test_an_edit_after_the_reduction_on_unchecked_steps_is_caught(tmp_path, owner_key):
    """Rank 1 flips one layer's reduced gradients before optimizer.step, only on steps
    that are not check steps: the keyed draw samples such steps too."""
    found = gradient_alerts(job("after-edit", 1, 2, tmp_path, owner_key))
    named = [a for a in found if a["rank"] == 1]
    assert named
    assert min(a["step"] for a in named) <= AT + 2 * EVERY
    assert {a["rank"] for a in found} <= {None, 1}
