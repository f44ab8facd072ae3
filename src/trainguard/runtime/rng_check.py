"""RNG integrity: every random generator the job uses, checked against what its seeding
implies, however its state was set.

The invariant, not the call: a Mersenne-Twister generator (torch's CPU generators,
Python's ``random``, NumPy's legacy global ``RandomState``) only moves forward from its
seeding. Its 624-word array is ``init(seed)`` twisted ``k`` times, read up to a position;
between two looks it can only have been twisted further, or read further. CUDA's Philox
generators keep their seed and only grow their offset. A DistributedSampler's
epoch never goes back (its seed and shard are ``sampler.SamplerWatch``'s to check).

At each check every generator's state is compared with the last verified one:

* reachable forward within ``budget`` twists (the array twisted ``k`` times, or the same
  array read further): fine, the new baseline;
* re-seeded: the array is ``init_genrand(s)`` twisted a few times and ``s`` is the seed
  the state records (``torch.manual_seed``, ``numpy.random.seed``), after a seed change
  or a call of a watched seeding function since the last check (the seed sensor's
  events, ``sensors.SeedWatch``): re-seeding is that sensor's to report, so a new
  baseline and no second alert. Re-seeding with the same seed goes back to where the
  seeding started: without such a call, that is a rewind;
* backwards: the last verified state lies ahead of it, or it equals an earlier verified
  one. The job replays random numbers it already used (dropout masks, data order):
  HIGH, naming this rank (``fields.RNG_ALTERED``). A loader's generator has no watched
  seeding function: its ``manual_seed`` with the seed it already holds counts as a
  rewind (it replays the data order), with another seed as a re-seeding;
* forged: the array comes from seeding with another seed than the one the state records
  (a state copied from elsewhere with its seed field rewritten, which hides it from
  ``torch.initial_seed()``): HIGH, naming this rank;
* none of these within the budget: recorded once per generator as unchecked (heavy CPU
  draws between checks, or a re-seeding with a seed the state does not record, as
  ``random.seed`` leaves it), never an alert; the state is the new baseline.

Between checks, on optimizer steps drawn under the guard's shared key (a quarter of
them), the torch generators' states are also sampled (a microsecond each) and verified
at the check as a chain: a generator set back to the same state before every check is
seen moving backwards from a sampled step. A declared rollback (``reset``) or a restore
that moves the guard's step counter (a resume) makes the restored states the new
baselines.
"""

from __future__ import annotations

import _random
import collections
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainguard.errors import Severity
from trainguard.runtime._rng_states import (
    MTState,
    SamplerState,
    State,
    judge,
    numpy_state,
    philox_state,
    python_state,
    torch_state,
)
from trainguard.runtime.fields import RNG_ALTERED
from trainguard.runtime.interface import Alert, BaseDetector, Coins, Context

#: twists searched per check for a generator that outran the full budget before
HEAVY_BUDGET = 8
#: twists searched per generator and check; 96 twists are 59,904 32-bit draws. One twist
#: is about 10 us on the reference machine, and the searches a verdict may need twist
#: together (``_rng_states.forwards``): a generator that outruns the budget costs about
#: 2 ms at the check where it first does (``python -m benchmarks.rng_cost``)
DEFAULT_BUDGET = 96
#: the share of optimizer steps whose torch generator states are sampled, drawn under
#: the shared key so that code without it cannot keep its rewinds between samples
SAMPLE_RATE = 1 / 8
_MAX_SAMPLES = 8
#: earlier verified states remembered per generator: a state equal to one is a rewind
_RECENT = 8


@dataclass
class Source:
    """One generator: how to read its raw state cheaply, and how to parse it."""

    name: str
    grab: Callable[[], Any]
    parse: Callable[[Any], State | str]
    #: sampled between checks too (a cheap copy: torch's own generators)
    sampled: bool = False
    #: the watched seeding functions (``sensors._SEEDERS``) that seed it: a state that
    #: its own seed explains but that lies behind the last one is a re-seeding after such
    #: a call, a rewind without one. None of them for a loader's generator: its
    #: ``manual_seed`` with the seed it holds already replays its data order
    seeders: tuple[str, ...] = ()


def _generator_source(name: str, gen: torch.Generator) -> Source:
    if gen.device.type == "cpu":
        return Source(name, gen.get_state, torch_state, sampled=True)
    return Source(name, gen.get_state, philox_state)


def _sampler_state(sampler: Any) -> Callable[[], Any]:
    return lambda: SamplerState(int(sampler.seed), int(sampler.epoch))


def sources(loader: Any) -> list[Source]:
    """The generators a job uses: torch's default, Python's and NumPy's global ones, and
    those held by ``loader`` (its generator, its sampler's, a DistributedSampler's epoch;
    the sampler's seed and shard are the sampler check's). CUDA's are added once CUDA is
    initialised (``cuda_sources``)."""
    found = [
        Source(
            "torch.default_generator",
            torch.default_generator.get_state,
            torch_state,
            sampled=True,
            seeders=("torch.manual_seed", "torch.random.manual_seed"),
        ),
        Source("random", lambda: _random.Random.getstate(random._inst), python_state),
        Source(
            "numpy.random",
            lambda: np.random.get_state(legacy=True),
            numpy_state,
            seeders=("numpy.random.seed", "numpy.random.mtrand.seed"),
        ),
    ]
    if loader is None:
        return found
    seen = {id(torch.default_generator)}
    sampler = getattr(loader, "sampler", None)
    batch = getattr(loader, "batch_sampler", None)
    holders = [("loader", loader), ("loader.sampler", sampler)]
    holders.append(("loader.batch_sampler.sampler", getattr(batch, "sampler", None)))
    for label, holder in holders:
        gen = getattr(holder, "generator", None)
        if isinstance(gen, torch.Generator) and id(gen) not in seen:
            seen.add(id(gen))
            found.append(_generator_source(f"{label}.generator", gen))
        if isinstance(holder, torch.utils.data.DistributedSampler) and id(holder) not in seen:
            seen.add(id(holder))
            found.append(Source(f"{label} (seed, epoch)", _sampler_state(holder), lambda s: s))
    return found


def cuda_sources() -> list[Source]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return []
    return [
        Source(f"torch.cuda.default_generators[{i}]", gen.get_state, philox_state)
        for i, gen in enumerate(torch.cuda.default_generators)
    ]


def _same_raw(raw: Any, previous: Any) -> bool:
    """Whether a raw state is the one read before it, byte for byte (torch's states are
    uint8 tensors: compared as they are, without parsing)."""
    if previous is None:
        return False
    if isinstance(raw, torch.Tensor) and isinstance(previous, torch.Tensor):
        return (
            raw.shape == previous.shape
            and raw.dtype == previous.dtype
            and torch.equal(raw, previous)
        )
    return False


@dataclass
class _Track:
    source: Source
    base: State | None = None
    recent: collections.deque[bytes] = field(
        default_factory=lambda: collections.deque(maxlen=_RECENT)
    )
    heavy: bool = False
    noted: set[str] = field(default_factory=set)

    def take(self, state: State) -> None:
        if isinstance(self.base, MTState):
            self.recent.append(self.base.digest)
        self.base = state


class RngCheck(BaseDetector):
    """The detector; see the module docstring."""

    name = "rng"

    def __init__(self, ctx: Context, budget: int = DEFAULT_BUDGET) -> None:
        self.ctx = ctx
        self.budget = budget
        self._tracks = [_Track(s) for s in sources(ctx.options.get("loader"))]
        found = cuda_sources()
        self._tracks += [_Track(s) for s in found]
        self._cuda = bool(found)
        self._samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=_MAX_SAMPLES)
        self._steps = ctx.steps()
        self._coins = Coins(b"rng-sample", SAMPLE_RATE)
        self._events_seen = 0
        self._seeding_calls()  # the job's seeding before the guard started is set-up
        self._baseline()

    # --- baselines ---------------------------------------------------------------

    def _read(self, track: _Track, raw: Any) -> State | None:
        parsed = track.source.parse(raw)
        if isinstance(parsed, str):
            self._note(track, "unreadable", f"cannot be checked: {parsed}")
            return None
        return parsed

    def _seeding_calls(self) -> set[str] | None:
        """The watched seeding functions called since the last look (the seed sensor's
        events), or None where they cannot be known (then any seeding explains a state)."""
        events = self.ctx.events()
        if not isinstance(events, list):
            return None
        if self._events_seen > len(events):
            self._events_seen = 0
        new = events[self._events_seen :]
        self._events_seen = len(events)
        return {
            str(e.get("call"))
            for e in new
            if isinstance(e, dict) and e.get("event") == "reseed" and e.get("call")
        }

    def _baseline(self, restore: bool = False) -> None:
        self._samples.clear()
        for track in self._tracks:
            track.recent.clear()
            if restore and isinstance(track.base, SamplerState):
                # the job sets its sampler's epoch back after the restore: taken at the check
                track.base = None
                continue
            track.base = self._read(track, track.source.grab())

    def reset(self) -> None:
        # a declared rollback: the states the checkpoint restored are the new normal
        self._baseline(restore=True)
        self._seeding_calls()
        self._steps = self.ctx.steps()

    def _restored(self) -> bool:
        """The guard's step counter moved other than by one step: a checkpoint was
        restored (a resume), and the generators with it. New baselines."""
        steps = self.ctx.steps()
        last, self._steps = self._steps, steps
        if last <= steps <= last + 1:
            return False
        self._baseline(restore=True)
        return True

    # --- between checks ----------------------------------------------------------

    def _sampled(self, step: int) -> bool:
        return self._coins(self.ctx.shared_key, step)

    def after_step(self) -> None:
        if self._restored() or not self._sampled(self._steps):
            return
        self._samples.append(
            {t.source.name: t.source.grab() for t in self._tracks if t.source.sampled}
        )

    def observe(self, loss: Any, batch: Any) -> None:
        self._restored()

    # --- at the check ------------------------------------------------------------

    def at_check(self) -> None:
        if self._restored():
            return
        if not self._cuda:
            found = cuda_sources()
            if found:
                self._cuda = True
                for source in found:
                    track = _Track(source)
                    track.base = self._read(track, source.grab())
                    self._tracks.append(track)
        samples = list(self._samples)
        self._samples.clear()
        calls = self._seeding_calls()
        for track in self._tracks:
            seeded = calls is None or not calls.isdisjoint(track.source.seeders)
            chain = [s[track.source.name] for s in samples if track.source.name in s]
            chain.append(track.source.grab())
            left = self.budget  # twists, for all of this generator's links together
            previous: Any = None
            for i, raw in enumerate(chain):
                last = i == len(chain) - 1
                if left <= 0 and not last:
                    continue  # out of budget: straight to the state at the check
                if _same_raw(raw, previous):
                    continue  # the state just verified, unmoved (a loader's, between epochs)
                previous = raw
                # a generator that outran the budget before: its sampled states are only
                # compared with the states it held (no search); the search is for the last
                links = 0 if track.heavy and not last else max(left, 0)
                left -= self._verify(track, raw, seeded, links)

    def _verify(self, track: _Track, raw: Any, seeded: bool, budget: int) -> int:
        """Judge one state against the track's baseline; the twists it took."""
        now = self._read(track, raw)
        if now is None:
            return 0
        if track.base is None:
            track.base = now
            return 0
        name = track.source.name
        base = track.base
        if isinstance(now, MTState) and isinstance(base, MTState) and now.digest == base.digest:
            return 0
        if track.heavy:
            # it outran the budget before: a short search (a state it held at a check is
            # still recognised), not the whole budget at every check
            budget = min(budget, HEAVY_BUDGET)
        verdict = judge(track.base, now, budget, not track.heavy, track.recent, seeded)
        if verdict.kind in ("backwards", "forged"):
            what = "set back" if verdict.kind == "backwards" else "forged"
            self._alert(
                track,
                f"random generator {name} was {what}: {verdict.detail}; "
                + (
                    "the job replays random numbers it already used"
                    if verdict.kind == "backwards"
                    else "its numbers are not the ones its seeding implies"
                ),
                {"generator": name, "verdict": verdict.kind, "detail": verdict.detail},
            )
        elif verdict.kind == "unchecked":
            if "more than" in verdict.detail:
                track.heavy = True
            self._note(track, "unchecked", f"unchecked: {verdict.detail}")
        track.take(now)
        return verdict.twists if verdict.kind in ("forward", "reseeded") else budget

    def _alert(self, track: _Track, message: str, details: dict[str, Any]) -> None:
        if "alerted" in track.noted:
            # one alert per generator: later findings go to the ledger
            self.ctx.record({"event": "rng", "detail": message, "step": self.ctx.at()})
            return
        track.noted.add("alerted")
        alert = Alert(self.ctx.at(), self.ctx.rank, self.name, Severity.HIGH, message, details)
        self.ctx.alert(alert, RNG_ALTERED)

    def _note(self, track: _Track, kind: str, detail: str) -> None:
        if kind in track.noted:
            return
        track.noted.add(kind)
        self.ctx.record(
            {
                "event": "rng-unchecked",
                "generator": track.source.name,
                "detail": f"{track.source.name} {detail}",
                "step": self.ctx.at(),
                "rank": self.ctx.rank,
            }
        )
