"""The states of random generators, as the RNG check (``rng_check.py``) reads them,
and the verdict on how one state follows from another.

A Mersenne-Twister state (:class:`MTState`) follows from an earlier one when the earlier
array twisted ``k`` times is the later one (``k`` 0: the same array read further); it is
a re-seeding when ``init_genrand(seed)`` twisted a few times is it; it went backwards
when the earlier state lies ahead of it. Searches are bounded by a budget of twists: a
state none of them explains within it is "unchecked", never a finding.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainguard.runtime import _mt19937 as mt

#: untwisting loses a few bits a time: a seeding is recognised this many twists back
_UNTWISTS = 6

#: torch's CPU generator state (``CPUGeneratorImplStateLegacy``): the seed (u64), left
#: (i32), seeded (i32), next (u64), the 624 words (u64 each), then the normal-sample caches
_TORCH_HEAD = struct.Struct("<QiiQ")
_TORCH_WORDS = 24
_TORCH_BYTES = _TORCH_WORDS + 624 * 8 + 40
_PHILOX_BYTES = 16


@dataclass(frozen=True, eq=False)
class MTState:
    """A Mersenne-Twister generator's state."""

    words: np.ndarray
    #: the index of the next word to output; 624: the next draw twists first
    pos: int
    #: the seed the state records (torch's), None where it records none
    seed: int | None

    @functools.cached_property
    def digest(self) -> bytes:
        # asked for several times a check (the rewind list, the baseline): computed once
        head = struct.pack("<qq", self.pos, -1 if self.seed is None else self.seed)
        return hashlib.blake2b(head + self.words.tobytes(), digest_size=16).digest()


@dataclass(frozen=True)
class PhiloxState:
    seed: int
    offset: int


@dataclass(frozen=True)
class SamplerState:
    seed: int
    epoch: int


State = MTState | PhiloxState | SamplerState


def torch_state(raw: Any) -> MTState | str:
    """A torch CPU generator's state from ``get_state()``, or why it cannot be read."""
    data = bytes(raw.numpy()) if isinstance(raw, torch.Tensor) else bytes(raw)
    if len(data) != _TORCH_BYTES:
        return f"a state of {len(data)} bytes, not the {_TORCH_BYTES} of the known layout"
    seed, left, seeded, nxt = _TORCH_HEAD.unpack_from(data)
    wide = np.frombuffer(data, dtype="<u8", count=624, offset=_TORCH_WORDS)
    # torch steps ``--left`` before it reads word ``next``: left + next == 625 once
    # twisted; a fresh seeding holds left 1, next 0 (the next draw twists)
    fresh = left == 1 and nxt == 0
    if seeded != 1 or not 1 <= left <= 624 or not (fresh or left + nxt == 625):
        return f"a state whose header ({left}, {seeded}, {nxt}) is not of the known layout"
    if int(wide.max()) >= 2**32:
        return "a state whose words are not 32-bit"
    return MTState(wide.astype(np.uint32), 625 - left, int(seed))


def python_state(raw: Any) -> MTState | str:
    if not isinstance(raw, tuple) or len(raw) != 625:
        return "a Python random state of an unknown version"
    return MTState(np.array(raw[:624], dtype=np.uint32), int(raw[624]), None)


def numpy_state(raw: Any) -> MTState | str:
    if not isinstance(raw, tuple) or raw[0] != "MT19937":
        return "numpy's global generator is not the legacy MT19937"
    return MTState(np.asarray(raw[1], dtype=np.uint32).copy(), int(raw[2]), None)


def philox_state(raw: Any) -> PhiloxState | str:
    data = bytes(raw.numpy()) if isinstance(raw, torch.Tensor) else bytes(raw)
    if len(data) != _PHILOX_BYTES:
        return f"a CUDA generator state of {len(data)} bytes, not {_PHILOX_BYTES}"
    seed, offset = struct.unpack("<Qq", data)
    return PhiloxState(seed, offset)


@dataclass
class Verdict:
    kind: str  # "forward", "reseeded", "backwards", "forged", "unchecked"
    detail: str = ""
    twists: int = 0


def forward(base: MTState, now: MTState, budget: int) -> int | None:
    """How many twists take ``base`` to ``now`` (0: the same array read further), or
    None if none within ``budget``."""
    return forwards([(base, now)], budget)[0]


def forwards(
    pairs: list[tuple[MTState, MTState]], budget: int, decisive: bool = False
) -> list[int | None]:
    """:func:`forward` of each (base, now) pair. The arrays are twisted together, as rows
    of one stack: a twist of a few rows costs little more than a twist of one. With
    ``decisive``, the search stops once the first pair's answer is found (the others'
    are then not used, and left None)."""
    found: list[int | None] = [None] * len(pairs)
    rows = []
    for i, (base, now) in enumerate(pairs):
        if np.array_equal(base.words, now.words):
            found[i] = 0 if now.pos >= base.pos else None
        else:
            rows.append(i)
    if not rows or budget <= 0 or (decisive and found[0] is not None):
        return found
    words = np.stack([pairs[i][0].words for i in rows])
    targets = np.stack([pairs[i][1].words for i in rows])
    firsts = targets[:, 0].tolist()
    open_rows = list(range(len(rows)))
    for k in range(1, budget + 1):
        words = mt.twist(words)
        leading = words[:, 0].tolist()
        for j in list(open_rows):
            if leading[j] == firsts[j] and np.array_equal(words[j], targets[j]):
                open_rows.remove(j)
                found[rows[j]] = k
        if not open_rows or (decisive and found[0] is not None):
            break
    return found


def _seeded(seed: int) -> MTState:
    return MTState(mt.init_genrand(seed), mt.N, seed)


def seeding_behind(
    now: MTState, budget: int, hint: int | None = None, hinted: list[int | None] | None = None
) -> tuple[int, int] | None:
    """(seed, twists) when ``now`` is ``init_genrand(seed)`` twisted at most ``budget``
    times: ``hint`` (the seed the state records) is tried over the whole budget; any
    other seed is found by untwisting, over at most ``_UNTWISTS`` twists. ``hinted``:
    that first search's answer (``forward(_seeded(hint), now, budget)``), already found."""
    if hint is not None:
        k = forward(_seeded(hint), now, budget) if hinted is None else hinted[0]
        if k is not None:
            return hint & 0xFFFFFFFF, k
    words = now.words
    for k in range(min(budget, _UNTWISTS) + 1):
        seed = mt.seed_candidate(words)
        if seed is not None and seed != hint:
            start = mt.init_genrand(seed)
            for _ in range(k):
                start = mt.twist(start)
            if np.array_equal(start, now.words):
                return seed, k
        words = mt.untwist(words)
    return None


def _cheap_backwards(base: MTState, now: MTState, recent: Collection[bytes]) -> Verdict | None:
    if now.digest in recent:
        return Verdict("backwards", "set back to a state it held at an earlier check")
    if np.array_equal(base.words, now.words) and now.pos < base.pos:
        return Verdict("backwards", f"read position set back from {base.pos} to {now.pos}")
    return None


def judge_mt(
    base: MTState,
    now: MTState,
    budget: int,
    thorough: bool = True,
    recent: Collection[bytes] = (),
    seeded: bool = True,
) -> Verdict:
    """Whether ``now`` follows from ``base`` (``recent``: digests of states verified
    before it). ``seeded``: a seeding function was called since ``base`` (or none is
    watched); its seeding then explains a state before a rewind does, since re-seeding
    with the same seed goes back to where the seeding started: the seed sensor reports
    that call. ``thorough`` False (a generator known to outrun the budget) skips the
    searches that only explain an anomaly."""
    same_seed = base.seed is None or now.seed == base.seed
    hinted: list[int | None] | None = None
    behind: int | None = None
    if same_seed:
        # the searches below that the verdict may need, twisted together with this one
        # (they are not needed, and stopped, once it is found)
        pairs = [(base, now)]
        if thorough:
            if now.seed is not None:
                pairs.append((_seeded(now.seed), now))
            pairs.append((now, base))
        ks = forwards(pairs, budget, decisive=True)
        k = ks[0]
        if k is not None:
            return Verdict("forward", twists=k)
        if not thorough:
            return _cheap_backwards(base, now, recent) or Verdict(
                "unchecked", f"advanced more than {budget} twists between checks"
            )
        hinted = [ks[1]] if now.seed is not None else None
        behind = ks[-1]
    found = seeding_behind(now, budget, now.seed, hinted)
    if found is not None:
        seed, k = found
        if now.seed is not None and seed != now.seed & 0xFFFFFFFF:
            return Verdict(
                "forged",
                f"holds the state of seed {seed} while it records seed {now.seed} (what "
                "torch.initial_seed() reports)",
            )
        if seeded or not same_seed:
            return Verdict("reseeded", twists=k)
        # its own seeding explains it, yet nothing seeded it: set back towards its seeding?
    if same_seed:
        cheap = _cheap_backwards(base, now, recent)
        if cheap is not None:
            return cheap
        if behind is not None:
            return Verdict("backwards", f"set back by {behind} twists (about {behind * 624} draws)")
        return Verdict(
            "unchecked",
            f"advanced more than {budget} twists between checks, or re-seeded with a seed "
            "it does not record",
        )
    return Verdict(
        "unchecked",
        f"its seed changed from {base.seed} to {now.seed} and it is more than {budget} "
        "twists past that seeding",
    )


def judge(
    base: State,
    now: State,
    budget: int,
    thorough: bool = True,
    recent: Collection[bytes] = (),
    seeded: bool = True,
) -> Verdict:
    if isinstance(base, MTState) and isinstance(now, MTState):
        return judge_mt(base, now, budget, thorough, recent, seeded)
    if isinstance(base, PhiloxState) and isinstance(now, PhiloxState):
        if now.seed != base.seed:
            # a Philox state has no seeding to re-derive: re-seeding is the seed sensor's
            return Verdict("reseeded")
        if now.offset < base.offset:
            return Verdict("backwards", f"offset set back from {base.offset} to {now.offset}")
        return Verdict("forward")
    if isinstance(base, SamplerState) and isinstance(now, SamplerState):
        if now.seed != base.seed:
            # the sampler check (``sampler.SamplerWatch``) reports a changed seed
            return Verdict("reseeded")
        if now.epoch < base.epoch:
            return Verdict("backwards", f"epoch set back from {base.epoch} to {now.epoch}")
        return Verdict("forward")
    return Verdict("unchecked", "its kind of state changed")
