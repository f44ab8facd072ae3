"""A declared rollback replays steps: the replayed check's generator states and parameters
may equal the ones the check before the rollback saw. ``GuardIntegrity.reset`` (called
after every restore) keeps the must-move rules quiet for that check only when the guard's
step count really went back; a ``reset()`` called by other code silences nothing.

The rows are the two ranks' fingerprint rows as ``compare`` receives them after the
all_gather (built here from the real field table); the practice matrix's ``rollback``
entry runs the same case end to end with real gloo ranks.
"""

from __future__ import annotations

from tests.runtime.contexts import detector_context
from trainguard.runtime import fields
from trainguard.runtime.interface import Alert
from trainguard.runtime.selfcheck import GuardIntegrity

EVERY = 4


def integrity(clock: list[int], found: list[Alert]) -> GuardIntegrity:
    ctx = detector_context(
        world=2,
        at=lambda: clock[0],
        steps=lambda: clock[0],
        alert_once=found.append,
        shared_key=b"k" * 32,
    )
    return GuardIntegrity(ctx, object(), [])


def rows(count: int, rng: tuple[int, int]) -> list[list[int]]:
    """Both ranks' rows at a check: CPU dropout on, a fresh row count, these generators."""
    out = []
    for rank in range(2):
        row = [0] * len(fields.TABLE)
        row[fields.INDEX["dropout"]] = 1
        row[fields.INDEX["rows"]] = count
        row[fields.INDEX["pid"]] = 1000 + rank
        row[fields.INDEX["rng_torch"]] = rng[rank]
        out.append(row)
    return out


def checks(watch: GuardIntegrity, clock: list[int], *, reset: bool, back: int) -> None:
    """Two checks where both generators move, then (after ``reset``, with the step count
    set back by ``back`` steps) a check where rank 0's equals the last one's."""
    for count, rng in ((1, (10, 20)), (2, (11, 21)), (3, (12, 22))):
        clock[0] += EVERY
        watch.compare(rows(count, rng))
    if reset:
        watch.reset()
    clock[0] += EVERY - back
    watch.compare(rows(4, (12, 23)))


def test_a_replay_after_a_rollback_names_nobody():
    clock, found = [0], []
    checks(integrity(clock, found), clock, reset=True, back=EVERY)
    assert found == []


def test_a_reset_with_no_steps_set_back_silences_nothing():
    clock, found = [0], []
    checks(integrity(clock, found), clock, reset=True, back=0)
    assert [(a.rank, a.detector) for a in found] == [(0, "guard-integrity")], found


def test_without_a_reset_the_stopped_generator_is_named():
    clock, found = [0], []
    checks(integrity(clock, found), clock, reset=False, back=EVERY)
    assert [(a.rank, a.detector) for a in found] == [(0, "guard-integrity")], found
