"""The RNG check (runtime/rng_check.py): generators held to what their seeding implies.

Each rewind or forgery below is done the way an insider's code inside the process would
do it (``set_state``/``setstate`` with a state saved earlier or made elsewhere), against
real generators; the clean cases are ordinary training practice and must stay quiet.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import trainguard
from tests.runtime.contexts import detector_context
from tests.runtime.test_guard_distributed import alerts, finish, start_ranks
from trainguard.runtime import _mt19937 as mt
from trainguard.runtime._rng_states import (
    MTState,
    PhiloxState,
    judge,
    judge_mt,
    philox_state,
    python_state,
    torch_state,
)
from trainguard.runtime.fields import RNG_ALTERED
from trainguard.runtime.rng_check import RngCheck
from trainguard.runtime.sensors import SeedWatch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def seed_sensor():
    """The seed sensor a Guard installs: seeding calls become events (``Job._event``)."""
    jobs: list[Job] = []
    watch = SeedWatch(lambda e: [job._event(e, 0) for job in jobs], torch.initial_seed())
    Job.live = jobs
    try:
        yield watch
    finally:
        watch.restore()


class Job:
    live: list[Job] = []

    """What the detector is given: a Context whose callables collect what it reports, and
    the real seed sensor, whose events the check reads (``ctx.events``) to tell a
    re-seeding from a rewind."""

    def __init__(self, loader=None) -> None:
        self.step = 0
        self.alerts: list = []
        self.records: list = []
        self.events: list = []
        self.ctx = detector_context(
            at=lambda: self.step,
            steps=lambda: self.step,
            alert=lambda alert, flag: self.alerts.append((alert, flag)),
            alert_once=self.alerts.append,
            record=self.records.append,
            fault=lambda where, exc: (_ for _ in ()).throw(exc),
            event=self._event,
            shared_key=b"k" * 32,
            options={"loader": loader, "seed": 0},
            events=lambda: self.events,
        )
        self.check = RngCheck(self.ctx)
        Job.live.append(self)

    def _event(self, event: dict, flag: int) -> None:
        self.events.append(event)

    def steps(self, n: int, draw=lambda: torch.rand(64)) -> None:
        """``n`` optimizer steps, each drawing, then a check."""
        for _ in range(n):
            draw()
            self.check.after_step()
            self.check.observe(None, None)
            self.step += 1
        self.check.at_check()

    def verdicts(self) -> list[str]:
        return [a.details["verdict"] for a, _ in self.alerts]


def words(gen: torch.Generator) -> MTState:
    state = torch_state(gen.get_state())
    assert isinstance(state, MTState)
    return state


# --- the generator itself ------------------------------------------------------------


def test_twist_is_the_one_torch_python_and_numpy_run():
    torch.manual_seed(1234)
    seeded = words(torch.default_generator)
    assert seeded.seed == 1234
    assert seeded.pos == 624  # a fresh seeding: the next draw twists
    assert np.array_equal(seeded.words, mt.init_genrand(1234))
    torch.rand(3)
    drawn = words(torch.default_generator)
    assert np.array_equal(drawn.words, mt.twist(seeded.words))
    assert drawn.pos == 3

    r = random.Random(5)
    before = python_state(r.getstate()[1])
    assert isinstance(before, MTState)
    r.getrandbits(32 * (625 - before.pos))  # through the end of the array, and one more
    after = python_state(r.getstate()[1])
    assert isinstance(after, MTState)
    assert np.array_equal(after.words, mt.twist(before.words))

    legacy = np.random.RandomState(77)
    start = legacy.get_state()[1].copy()
    assert np.array_equal(start, mt.init_genrand(77))
    legacy.randint(0, 10, size=5)
    assert np.array_equal(legacy.get_state()[1], mt.twist(start))


def test_twist_follows_pythons_random_for_many_twists_and_row_by_row_in_a_stack():
    r = random.Random(12345)
    state = python_state(r.getstate()[1])
    assert isinstance(state, MTState)
    words_now = state.words
    for k in range(40):
        r.getrandbits(32 * 624)  # one twist's worth of words
        words_now = mt.twist(words_now)
        after = python_state(r.getstate()[1])
        assert isinstance(after, MTState)
        assert np.array_equal(words_now, after.words), k
    stack = np.stack([mt.init_genrand(s) for s in (1, 2, 2**40 + 3)])
    twisted = mt.twist(stack)
    for row, seed in zip(twisted, (1, 2, 2**40 + 3), strict=True):
        assert np.array_equal(row, mt.twist(mt.init_genrand(seed)))


def test_untwist_and_seed_recognition_invert_the_twist():
    state = mt.init_genrand(2**40 + 9)  # torch seeds its twister with the low 32 bits
    assert mt.seed_candidate(state) == 9
    later = mt.twist(state)
    once = mt.untwist(later)
    assert np.array_equal(once[1:], state[1:])  # word 0's lower bits are lost
    assert mt.seed_candidate(later) is None
    for k in range(1, 7):
        back = later
        for _ in range(k - 1):
            back = mt.untwist(back)
        assert mt.seed_candidate(back) is None
        assert mt.seed_candidate(mt.untwist(back)) == 9, k
        later = mt.twist(later)


def test_torch_state_layout_is_pinned():
    """torch's CPU generator state as the check reads it (seed, left, seeded, next, 624
    words as u64, normal caches); a torch that lays it out otherwise fails here loudly,
    and the check then says it cannot read it rather than guessing."""
    gen = torch.Generator().manual_seed(2**33 + 77)
    raw = gen.get_state()
    assert raw.numel() == 5056
    state = words(gen)
    assert state.seed == 2**33 + 77
    assert np.array_equal(state.words, mt.init_genrand(77))
    torch.rand(10, generator=gen)
    assert words(gen).pos == 10
    assert isinstance(torch_state(raw[:-8]), str)
    broken = raw.clone()
    broken[8:12] = torch.tensor([0, 9, 0, 0], dtype=torch.uint8)  # left = 2304
    assert isinstance(torch_state(broken), str)


# --- rewinds and forgeries -------------------------------------------------------------


def test_default_generator_rewound_with_set_state_is_caught():
    """``torch.default_generator.set_state(saved)``: replaying dropout masks and random
    augmentations; it goes around every wrapped seeding function."""
    torch.manual_seed(3)
    saved = torch.default_generator.get_state()
    job = Job()
    job.steps(4)
    assert job.alerts == []
    torch.default_generator.set_state(saved)
    job.steps(2)
    assert job.verdicts() == ["backwards"]
    alert, flag = job.alerts[0]
    assert flag == RNG_ALTERED
    assert alert.rank == 0
    assert alert.details["generator"] == "torch.default_generator"


def test_rewound_before_every_check_is_caught_from_a_sampled_step():
    """The generator put back to the checked state at the end of every step: each check
    sees the same state as the last; the steps sampled in between see it move back."""
    torch.manual_seed(4)
    job = Job()
    saved = torch.default_generator.get_state()
    for _ in range(4):
        for _ in range(4):
            torch.rand(64)
            job.check.after_step()  # inside optimizer.step: before the rewind
            torch.default_generator.set_state(saved)
            job.check.observe(None, None)
            job.step += 1
        job.check.at_check()
    assert "backwards" in job.verdicts()


def test_state_of_another_seed_with_the_seed_field_forged_is_caught():
    """A state made with another seed, its seed field rewritten to the job's seed so that
    ``torch.initial_seed()`` (the seed sensor's view) still reports the declared one."""
    torch.manual_seed(1234)
    job = Job()
    job.steps(2)
    other = torch.Generator().manual_seed(99)
    torch.rand(700, generator=other)
    forged = other.get_state()
    forged[:8] = torch.tensor(list((1234).to_bytes(8, "little")), dtype=torch.uint8)
    torch.default_generator.set_state(forged)
    assert torch.initial_seed() == 1234
    job.steps(2)
    assert job.verdicts() == ["forged"]
    assert "seed 99" in job.alerts[0][0].message


def test_python_random_setstate_rewind_is_caught():
    random.seed(11)
    saved = random.getstate()
    job = Job()
    job.steps(3, draw=lambda: [random.random() for _ in range(500)])
    random.setstate(saved)
    job.steps(3, draw=lambda: [random.random() for _ in range(100)])
    assert job.verdicts() == ["backwards"]
    assert job.alerts[0][0].details["generator"] == "random"


def test_numpy_set_state_rewind_is_caught():
    np.random.seed(12)
    job = Job()
    job.steps(2, draw=lambda: np.random.rand(300))
    saved = np.random.get_state()
    job.steps(2, draw=lambda: np.random.rand(300))
    np.random.set_state(saved)  # back to the state verified at the first check
    job.steps(1, draw=lambda: None)
    assert job.verdicts() == ["backwards"]
    assert job.alerts[0][0].details["generator"] == "numpy.random"


def test_loader_generator_rewound_is_caught():
    """The DataLoader's own generator (shuffling, worker seeds) set back: the data order
    of an earlier epoch replays."""
    data = TensorDataset(torch.arange(4000.0))
    gen = torch.Generator().manual_seed(5)
    loader = DataLoader(data, batch_size=100, shuffle=True, generator=gen)
    saved = gen.get_state()
    job = Job(loader)
    epochs = iter(range(100))

    def epoch():
        next(epochs)
        for _ in loader:
            pass

    job.steps(2, draw=epoch)
    job.steps(2, draw=epoch)
    assert job.alerts == []
    gen.set_state(saved)
    job.steps(1, draw=epoch)
    assert job.verdicts() == ["backwards"]
    assert job.alerts[0][0].details["generator"] == "loader.generator"


# --- what ordinary jobs do ---------------------------------------------------------------


def test_clean_drawing_and_reseeding_are_quiet():
    """Many draws of every kind, re-seeding by the job (same and new seeds), a fresh
    generator per epoch drawn from the default one (RandomSampler), eval draws."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    data = TensorDataset(torch.arange(512.0))
    loader = DataLoader(data, batch_size=64, shuffle=True)
    job = Job(loader)

    def busy():
        torch.rand(3000)
        torch.randn(100)
        torch.randint(0, 10, (50,))
        torch.nn.functional.dropout(torch.ones(2000), 0.1)
        np.random.rand(200)
        random.random()
        for _ in loader:
            pass

    for round_ in range(6):
        job.steps(4, draw=busy)
        if round_ == 2:
            torch.manual_seed(0)  # the same seed again, as per-epoch seeding does
            np.random.seed(7)
        if round_ == 4:
            torch.manual_seed(42)
            torch.rand(2000)
    assert job.alerts == []
    assert job.records == []


def test_heavy_draws_are_recorded_unchecked_never_alerted():
    torch.manual_seed(0)
    job = Job()
    job.steps(1, draw=lambda: torch.rand(200_000))  # about 320 twists
    assert job.alerts == []
    assert [r["event"] for r in job.records] == ["rng-unchecked"]
    assert "more than" in job.records[0]["detail"]
    job.steps(3, draw=lambda: torch.rand(200_000))
    assert len(job.records) == 1  # once per generator


def test_reset_takes_the_restored_states_as_baselines():
    torch.manual_seed(0)
    saved = torch.default_generator.get_state()
    job = Job()
    job.steps(3)
    torch.default_generator.set_state(saved)  # a declared rollback restores it
    job.check.reset()
    job.steps(3)
    assert job.alerts == []


def test_a_restore_that_moves_the_step_counter_takes_new_baselines():
    """A resume: ``load_checkpoint`` restores the generators and sets the guard's step
    to the checkpoint's (no ``reset``: that is for rollbacks)."""
    torch.manual_seed(0)
    saved = torch.default_generator.get_state()
    job = Job()
    job.steps(3)
    torch.default_generator.set_state(saved)
    job.step = 40
    job.steps(3)
    assert job.alerts == []


def test_judge_says_which():
    base = mt.init_genrand(5)
    seeded = MTState(base, 624, 5)
    later = MTState(mt.twist(mt.twist(base)), 17, 5)
    further = MTState(mt.twist(later.words), 4, 5)
    assert judge_mt(seeded, later, 8).kind == "forward"
    # back to init(5): manual_seed(5) after a seeding call, a rewind without one
    assert judge_mt(later, seeded, 8, seeded=True).kind == "reseeded"
    assert judge_mt(later, seeded, 8, seeded=False).kind == "backwards"
    assert judge_mt(later, MTState(later.words, 3, 5), 8, seeded=False).kind == "backwards"
    assert judge_mt(further, MTState(later.words, 400, 5), 8, seeded=False).kind == "backwards"
    assert judge_mt(seeded, later, 1).kind == "unchecked"
    other = MTState(mt.twist(mt.init_genrand(6)), 9, 5)
    assert judge_mt(later, other, 8, seeded=False).kind == "forged"
    assert judge_mt(later, other, 8, seeded=True).kind == "forged"


def test_judge_counts_the_twists_of_each_search():
    """The forward, re-seeding and backward searches run together (one stack of arrays):
    each answer is the one its own search gives."""
    seeded = MTState(mt.init_genrand(11), 624, 11)
    states = [seeded]
    for _ in range(12):
        states.append(MTState(mt.twist(states[-1].words), 5, 11))
    assert judge_mt(states[2], states[9], 16).twists == 7
    assert judge_mt(states[2], states[9], 6).kind == "unchecked"
    back = judge_mt(states[9], states[6], 16, seeded=False)
    assert (back.kind, back.detail) == ("backwards", "set back by 3 twists (about 1872 draws)")
    again = judge_mt(states[9], states[5], 16, seeded=True)
    assert (again.kind, again.twists) == ("reseeded", 5)
    assert judge_mt(states[9], states[5], 16, thorough=False).kind == "unchecked"
    assert judge_mt(states[9], states[5], 3, seeded=False).kind == "unchecked"


def test_philox_offsets_only_grow():
    """CUDA's generators: the seed fixed, the offset only growing (read from the 16 bytes
    of ``get_state``: seed u64, offset i64)."""
    start = philox_state(struct.pack("<Qq", 7, 4096))
    later = philox_state(struct.pack("<Qq", 7, 8192))
    assert isinstance(start, PhiloxState)
    assert isinstance(later, PhiloxState)
    assert judge(start, later, 8).kind == "forward"
    assert judge(later, start, 8).kind == "backwards"
    assert judge(later, philox_state(struct.pack("<Qq", 9, 0)), 8).kind == "reseeded"
    assert isinstance(philox_state(b"\0" * 24), str)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_rewound_is_caught():
    torch.cuda.manual_seed(5)
    torch.rand(1000, device="cuda")
    job = Job()
    saved = torch.cuda.default_generators[0].get_state()
    job.steps(2, draw=lambda: torch.rand(1000, device="cuda"))
    torch.cuda.default_generators[0].set_state(saved)
    job.steps(1, draw=lambda: None)
    assert job.verdicts() == ["backwards"]
    assert job.alerts[0][0].details["generator"] == "torch.cuda.default_generators[0]"


# --- in a guarded job --------------------------------------------------------------------


@pytest.mark.slow
def test_guard_names_a_rewind_of_the_cpu_generator(tmp_path, owner_key):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = trainguard.Guard(
        model,
        optimizer,
        run_dir=tmp_path / "run",
        every=5,
        owner_key=owner_key,
        verify_env=False,
        seed=0,
        code_roots=[__file__],
    )
    saved = torch.default_generator.get_state()
    for step in range(20):
        if step == 12:
            torch.default_generator.set_state(saved)
        x = torch.randn(16, 8)
        loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        guard.step(loss=loss)
    guard.close()
    found = [a for a in guard.alerts if a.detector == "rng"]
    assert len(found) == 1
    assert found[0].rank == 0
    assert 12 <= found[0].step <= 15  # the first check after the rewind


@pytest.mark.slow
@pytest.mark.distributed
def test_only_the_rank_that_rewinds_its_generator_is_named(tmp_path, owner_key):
    """Two real ranks (gloo); rank 1 sets its CPU generator back after every optimizer
    step, so that every step draws the same dropout masks."""
    run_dir = tmp_path / "run"
    codes = finish(start_ranks("tests.runtime.rng_worker", [], 2, [str(run_dir), str(owner_key)]))
    assert codes == [0, 0], codes
    found = [[a for a in alerts(run_dir, r) if a["detector"] == "rng"] for r in range(2)]
    assert found[0] == []
    assert found[1]
    assert {a["rank"] for a in found[1]} == {1}
