"""Every fuzz target, briefly, under hypothesis: mutated real seeds, derandomized for CI.

``scripts/fuzz.py`` runs the same targets for as long as asked (see docs/fuzzing.md).
A contract the fuzzer has already shown broken is listed in :data:`KNOWN` with the name
of its regression test in ``test_regressions.py`` (an xfail until the fix lands); such
an input is set aside here so that the fuzz run keeps looking for new breakage.
"""

from __future__ import annotations

import re
import traceback
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import targets

#: (target, pattern in the error's last line) -> regression test that reproduces it
KNOWN: dict[tuple[str, str], str] = {}

EXAMPLES = {
    "scan": 120,
    "load": 120,
    "convert": 80,
    "manifest": 100,
    "head": 100,
    "ledger_json": 60,
    "ledger_db": 80,
    "ledger_rows": 100,
    "checkpoint": 80,
}


@pytest.fixture(scope="module", autouse=True)
def _traced() -> Iterator[None]:
    """Trace allocations so each target's memory bound is checked."""
    targets.workspace()  # built before tracing: seeds are not the targets' allocations
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    yield
    if started:
        tracemalloc.stop()


def _known(name: str, exc: BaseException) -> str | None:
    last = traceback.format_exception_only(type(exc), exc)[-1]
    return next(
        (
            test
            for (target, pattern), test in KNOWN.items()
            if target == name and re.search(pattern, last)
        ),
        None,
    )


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_target_keeps_its_contract(name: str) -> None:
    @settings(
        max_examples=EXAMPLES[name],
        deadline=None,  # the targets bound time themselves, with room for a slow CI box
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        seed = data.draw(st.sampled_from(targets.seeds(name)), label="seed")
        mutant = targets.mutate(name, seed, lambda n: data.draw(st.integers(0, n - 1)))
        _run(name, mutant)

    fuzz()


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_seeds_keep_the_contract(name: str) -> None:
    """The unmutated seeds pass: a failure here is a broken target, not a finding."""
    for seed in targets.seeds(name):
        _run(name, seed)


def _run(name: str, data: bytes) -> None:
    try:
        targets.run(name, data)
    except Exception as exc:
        if _known(name, exc) is None:
            raise


def test_malicious_seeds_are_caught() -> None:
    """The payload seeds really are refused, so the marker check means something."""
    from trainguard.artifacts.scanner import scan_bytes

    verdicts = [scan_bytes(seed).verdict.value for seed in targets.seeds("scan")]
    assert verdicts.count("UNSAFE") == 2
    assert verdicts.count("SAFE") == len(verdicts) - 2
