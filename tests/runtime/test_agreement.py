"""The cross-rank decision (``agreement.compare`` and the guard's self-check), as tables:
rows in, verdicts out. A verdict names a rank only when a strict majority or that rank's
own evidence proves it; otherwise it says the ranks disagree and that it cannot tell."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from tests.runtime.contexts import detector_context
from trainguard.runtime import agreement, fields
from trainguard.runtime.interface import Alert
from trainguard.runtime.selfcheck import GuardIntegrity

P, F = "params", "flags"


def rows(*specs: dict[str, int]) -> torch.Tensor:
    """One row per rank: every field 0 but those given."""
    table = []
    for spec in specs:
        values = dict.fromkeys(agreement.FIELDS, 0)
        values.update(spec)
        table.append([values[name] for name in agreement.FIELDS])
    return torch.tensor(table, dtype=torch.int64)


def verdicts(table: torch.Tensor, compared: set[str] | None = None) -> list[tuple[str, int | None]]:
    chosen = frozenset(compared) if compared is not None else None
    return sorted(
        ((str(a.details["field"]), a.rank) for a in agreement.compare(7, table, chosen)),
        key=lambda v: (v[0], -1 if v[1] is None else v[1]),
    )


# rows in                                                      verdicts out
CASES = [
    ("all agree", [{P: 1}, {P: 1}], []),
    ("all agree, four ranks", [{P: 5}] * 4, []),
    ("two ranks differ, no evidence", [{P: 1}, {P: 2}], [(P, None)]),
    ("two ranks, rank 1's own sensor", [{P: 1}, {P: 2, F: fields.PARAMS_WRITTEN}], [(P, 1)]),
    ("two ranks, rank 0's own sensor", [{P: 1, F: fields.PATCHED}, {P: 2}], [(P, 0)]),
    (
        "two ranks, evidence that does not explain the field",
        [{P: 1}, {P: 2, F: fields.RESEEDED}],
        [(P, None)],
    ),
    (
        "two ranks, both flagged: no way to choose",
        [{P: 1, F: fields.PATCHED}, {P: 2, F: fields.PATCHED}],
        [(P, None)],
    ),
    ("three ranks, a majority", [{P: 1}, {P: 1}, {P: 2}], [(P, 2)]),
    ("four ranks, one odd", [{P: 1}, {P: 9}, {P: 1}, {P: 1}], [(P, 1)]),
    ("four ranks split two and two", [{P: 1}, {P: 1}, {P: 2}, {P: 2}], [(P, None)]),
    (
        "four ranks split two and two, one side's evidence",
        [{P: 1}, {P: 1}, {P: 2, F: fields.GRADS_ALTERED}, {P: 2, F: fields.GRADS_ALTERED}],
        [(P, 2), (P, 3)],
    ),
    ("four ranks, two odd of a majority of two", [{P: 1}, {P: 1}, {P: 2}, {P: 3}], [(P, None)]),
    ("five ranks, two odd of three", [{P: 1}] * 3 + [{P: 2}, {P: 3}], [(P, 3), (P, 4)]),
    (
        "a rank whose guard failed proves nothing",
        [{P: 1}, {P: 0, F: fields.GUARD_FAILED}],
        [],
    ),
    (
        "a failed rank does not make a majority",
        [{P: 1}, {P: 2}, {P: 0, F: fields.GUARD_FAILED}],
        [(P, None)],
    ),
    (
        "lr named by its schedule evidence",
        [{"lr": 3}, {"lr": 4, F: fields.LR_OFF_SCHEDULE}],
        [("lr", 1)],
    ),
    (
        "several fields at once",
        [{P: 1, "code": 1}, {P: 1, "code": 1}, {P: 2, "code": 2}],
        [("code", 2), (P, 2)],
    ),
    ("rng fields differ legitimately", [{"rng_torch": 1}, {"rng_torch": 2}], []),
    (
        "busy time and pid are not compared",
        [{"busy_us": 1, "pid": 4}, {"busy_us": 9, "pid": 5}],
        [],
    ),
]


@pytest.mark.parametrize(("label", "table", "expected"), CASES, ids=[c[0] for c in CASES])
def test_compare(label: str, table: list[dict[str, int]], expected: list[tuple[str, int | None]]):
    assert verdicts(rows(*table)) == expected, label


def test_fields_not_compared_are_left_alone():
    table = rows({P: 1, "code": 1}, {P: 2, "code": 2})
    assert verdicts(table, {"code"}) == [("code", None)]
    assert verdicts(table, set()) == []


def test_every_field_has_an_owner_and_every_compared_field_a_meaning():
    assert len(set(fields.FIELDS)) == len(fields.FIELDS)
    for field in fields.TABLE:
        assert field.owner
        if field.evidence:
            assert field.agree, f"{field.name}: evidence for a field nobody compares"
    assert set(agreement.MUST_AGREE) <= set(fields.FIELDS)


def test_a_reported_divergence_is_not_reported_again():
    reported = agreement.Reported()
    named = agreement.compare(7, rows({P: 1}, {P: 1}, {P: 2}))
    assert [a.rank for a in reported.new(named)] == [2]
    assert reported.new(agreement.compare(8, rows({P: 3}, {P: 3}, {P: 4}))) == []
    # the field was blamed on a rank: a later "cannot tell" about it adds nothing
    fresh = agreement.Reported()
    fresh.new(named)
    fresh.diverged.clear()
    assert fresh.new(agreement.compare(9, rows({P: 1}, {P: 2}))) == []


# --- the guard's self-check: rows that are not their rank's own, or stopped moving -------


def _integrity(world: int, pids: list[int]) -> tuple[GuardIntegrity, list[Alert]]:
    said: list[Alert] = []

    ctx = detector_context(
        world=world,
        at=lambda: 7,
        steps=lambda: 7,
        alert=lambda alert, flag: said.append(alert),
        alert_once=said.append,
    )
    check = GuardIntegrity.__new__(GuardIntegrity)
    check.ctx = ctx
    check.bound = []
    check.pids = pids
    check._previous = None
    check._named = set()
    check._rows = 0
    check._rng_moves = deque(maxlen=2)
    check._restored, check._steps = False, None
    return check, said


def _named(
    check: GuardIntegrity, said: list[Alert], *tables: torch.Tensor
) -> list[tuple[int | None, str]]:
    for table in tables:
        check.compare(table.tolist())
    return [(a.rank, str(a.details["kind"])) for a in said]


A = "rows"
D = "dropout"
SELF_CASES = [
    (
        "moving rows",
        [10, 11],
        [
            rows({"pid": 10, A: 1, P: 1}, {"pid": 11, A: 1, P: 1}),
            rows({"pid": 10, A: 2, P: 2}, {"pid": 11, A: 2, P: 2}),
        ],
        [],
    ),
    (
        "rank 1 sends rank 0's row (its pid)",
        [10, 11],
        [rows({"pid": 10, A: 1}, {"pid": 10, A: 1})],
        [(1, "pid")],
    ),
    (
        "rank 1 replays its last row",
        [10, 11],
        [
            rows({"pid": 10, A: 1, P: 1}, {"pid": 11, A: 5, P: 1}),
            rows({"pid": 10, A: 2, P: 2}, {"pid": 11, A: 5, P: 1}),
        ],
        [(1, "replay")],
    ),
    (
        "three ranks, rank 2 frozen while the others train",
        [10, 11, 12],
        [
            rows({"pid": 10, A: 1, P: 1}, {"pid": 11, A: 1, P: 1}, {"pid": 12, A: 1, P: 1}),
            rows({"pid": 10, A: 2, P: 2}, {"pid": 11, A: 2, P: 2}, {"pid": 12, A: 2, P: 1}),
        ],
        [(2, "frozen")],
    ),
    (
        "two ranks, one frozen: cannot tell which is right, nobody named",
        [10, 11],
        [
            rows({"pid": 10, A: 1, P: 1}, {"pid": 11, A: 1, P: 1}),
            rows({"pid": 10, A: 2, P: 2}, {"pid": 11, A: 2, P: 1}),
        ],
        [],
    ),
    (
        "everyone still (lr 0, skipped steps): nothing",
        [10, 11, 12],
        [
            rows({"pid": 10, A: 1, P: 1}, {"pid": 11, A: 1, P: 1}, {"pid": 12, A: 1, P: 1}),
            rows({"pid": 10, A: 2, P: 1}, {"pid": 11, A: 2, P: 1}, {"pid": 12, A: 2, P: 1}),
        ],
        [],
    ),
    (
        "four ranks, rank 3's generator still while the others drew",
        [10, 11, 12, 13],
        [
            rows(*({"pid": 10 + r, A: 1, P: 1, "rng_torch": 5 + r} for r in range(4))),
            rows(
                *({"pid": 10 + r, A: 2, P: 2, "rng_torch": 9 + r if r < 3 else 8} for r in range(4))
            ),
        ],
        [(3, "rng-still")],
    ),
    (
        "only rank 0 draws (evaluation): nothing",
        [10, 11, 12],
        [
            rows(*({"pid": 10 + r, A: 1, P: 1, "rng_torch": 5 + r} for r in range(3))),
            rows(
                *(
                    {"pid": 10 + r, A: 2, P: 2, "rng_torch": 9 if r == 0 else 5 + r}
                    for r in range(3)
                )
            ),
        ],
        [],
    ),
    *(
        (
            label,
            [10, 11],
            [
                rows(*({"pid": 10 + r, A: 1, P: 1, "rng_torch": 5 + r, D: drop} for r in range(2))),
                rows(*({"pid": 10 + r, A: 2, P: 2, "rng_torch": 7 + r, D: drop} for r in range(2))),
                rows(
                    {"pid": 10, A: 3, P: 3, "rng_torch": 9, D: drop},
                    {"pid": 11, A: 3, P: 3, "rng_torch": last, D: drop, "events": events},
                ),
            ],
            expected,
        )
        for label, drop, last, events, expected in [
            (
                "two ranks with CPU dropout: rank 1's generator stops after moving",
                1,
                8,
                0,
                [(1, "rng-stopped")],
            ),
            ("two ranks, no dropout (rank 0 alone samples): nothing", 0, 8, 0, []),
            ("two ranks, dropout on the GPU: the CPU generator proves nothing", 2, 8, 0, []),
            ("two ranks, rank 1 re-seeded (a seeding event): nothing", 1, 8, 1, []),
            ("two ranks, both still moving: nothing", 1, 10, 0, []),
        ]
    ),
    (
        "two ranks, both stop together (the job stopped drawing): nothing",
        [10, 11],
        [
            rows(*({"pid": 10 + r, A: 1, P: 1, "rng_torch": 5 + r, D: 1} for r in range(2))),
            rows(*({"pid": 10 + r, A: 2, P: 2, "rng_torch": 7 + r, D: 1} for r in range(2))),
            rows(*({"pid": 10 + r, A: 3, P: 3, "rng_torch": 7 + r, D: 1} for r in range(2))),
        ],
        [],
    ),
    (
        "a failed row proves nothing",
        [10, 11],
        [rows({"pid": 10, A: 1}, {"pid": 0, A: 0, F: fields.GUARD_FAILED})],
        [],
    ),
]


@pytest.mark.parametrize(
    ("label", "pids", "tables", "expected"), SELF_CASES, ids=[c[0] for c in SELF_CASES]
)
def test_self_check(label, pids, tables, expected):
    check, said = _integrity(len(pids), pids)
    assert _named(check, said, *tables) == expected, label
