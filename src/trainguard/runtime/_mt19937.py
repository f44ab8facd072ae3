"""The Mersenne Twister (MT19937) as its definition states it, vectorised with NumPy.

Only what the RNG check needs: the state-array twist forwards and backwards, the array
``init_genrand(seed)`` writes, and recognising such an array (which seed made it). The
generators of torch (CPU), Python's ``random`` and NumPy's legacy ``RandomState`` all hold
this state: 624 32-bit words and the index of the next word to temper and output.

Twist (Matsumoto and Nishimura, 1998): for ``i`` in ``0..623`` in order,
``y = upper bit of x[i] | lower 31 bits of x[i+1]`` and
``x[i] = x[i+397] ^ (y >> 1) ^ (MATRIX_A if y is odd)``, indices mod 624, updating in
place: from ``i = 227`` on, ``x[i+397]`` is a word already rewritten in this twist. Every
``y`` but the last reads words not yet rewritten, so all of them are computed at once;
the ``x[i+397]`` side is cut into runs of 227 whose words are all known beforehand.
"""

from __future__ import annotations

import functools

import numpy as np

N = 624
M = 397
MATRIX_A = np.uint32(0x9908B0DF)
UPPER = np.uint32(0x80000000)
LOWER = np.uint32(0x7FFFFFFF)
_INIT_MULT = 1812433253
#: the inverse of ``_INIT_MULT`` modulo 2**32 (it is odd)
_INIT_MULT_INV = pow(_INIT_MULT, -1, 2**32)
#: the words rewritten in one run: each run reads the ones 397 further on (mod 624),
#: which from word 227 on are the previous run's output
_RUN = N - M
_ONE = np.uint32(1)
_STEPS = np.arange(2, N, dtype=np.uint64)
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT31 = np.uint32(31)
_SHIFT30 = np.uint32(30)


def twist(x: np.ndarray) -> np.ndarray:
    """The state array after one twist (a new array; ``x`` is ``uint32[..., 624]``, and
    rows of a 2-D array twist independently)."""
    y = (x[..., : N - 1] & UPPER) | (x[..., 1:] & LOWER)
    mixed = (y >> _ONE) ^ ((y & _ONE) * MATRIX_A)
    out = np.empty_like(x)
    np.bitwise_xor(x[..., M:], mixed[..., :_RUN], out=out[..., :_RUN])
    np.bitwise_xor(out[..., :_RUN], mixed[..., _RUN : 2 * _RUN], out=out[..., _RUN : 2 * _RUN])
    np.bitwise_xor(
        out[..., _RUN : N - 1 - _RUN], mixed[..., 2 * _RUN :], out=out[..., 2 * _RUN : N - 1]
    )
    # the last word's y reads word 0, already rewritten
    last = (x[..., N - 1] & UPPER) | (out[..., 0] & LOWER)
    out[..., N - 1] = out[..., M - 1] ^ (last >> _ONE) ^ ((last & _ONE) * MATRIX_A)
    return out


def _y_from(z: np.ndarray) -> np.ndarray:
    # z = (y >> 1) ^ (MATRIX_A if y odd): MATRIX_A's top bit is set and y >> 1's is not
    odd = z >> _SHIFT31
    y: np.ndarray = ((z ^ (odd * MATRIX_A)) << _ONE) | odd
    return y.astype(np.uint32)


def untwist(x: np.ndarray) -> np.ndarray:
    """The state array one twist earlier (``uint32[624]``). Word 0's lower 31 bits are
    not recoverable (no later word depends on them); they are returned as zero."""
    y = np.empty(N, dtype=np.uint32)
    # i >= 227 read a word this twist had already rewritten: x[i - 227]
    y[N - M :] = _y_from(x[N - M :] ^ x[:M])
    prev = np.empty(N, dtype=np.uint32)
    # words 397..623 of the earlier array: upper bit from y[j], lower bits from y[j - 1]
    prev[M:] = (y[M:] & UPPER) | (y[M - 1 : N - 1] & LOWER)
    y[: N - M] = _y_from(x[: N - M] ^ prev[M:])
    prev[1:M] = (y[1:M] & UPPER) | (y[0 : M - 1] & LOWER)
    prev[0] = y[0] & UPPER
    return prev


def init_genrand(seed: int) -> np.ndarray:
    """The untwisted array ``init_genrand(seed & 0xffffffff)`` writes (what
    ``torch.manual_seed`` and ``numpy.random.seed(int)`` set)."""
    return _init_genrand(seed & 0xFFFFFFFF).copy()


@functools.lru_cache(maxsize=8)
def _init_genrand(seed: int) -> np.ndarray:
    # a Python loop of 623 steps: the seeds a job uses are few, and asked for at each check
    out = np.empty(N, dtype=np.uint32)
    value = seed & 0xFFFFFFFF
    out[0] = value
    for i in range(1, N):
        value = (_INIT_MULT * (value ^ (value >> 30)) + i) & 0xFFFFFFFF
        out[i] = value
    out.flags.writeable = False  # shared by every caller: each gets a copy
    return out


def seed_candidate(x: np.ndarray) -> int | None:
    """The 32-bit seed whose ``init_genrand`` array ``x`` may be, read from the first three
    consecutive words that follow the recurrence, or None. Only a candidate: an array
    untwisted more than once is wrong in a few words (:func:`untwist` loses bits), so
    the caller confirms it by twisting ``init_genrand(seed)`` forwards."""
    prev: np.ndarray = x[1 : N - 1].astype(np.uint64)
    expect: np.ndarray = (np.uint64(_INIT_MULT) * (prev ^ (prev >> np.uint64(30)))) + _STEPS
    ok = (expect & _MASK32) == x[2:].astype(np.uint64)  # ok[j]: word j + 2 follows word j + 1
    pairs = np.flatnonzero(ok[:-1] & ok[1:])
    if pairs.size == 0:
        return None
    index = int(pairs[0]) + 2  # words index - 1, index, index + 1 agree
    value = int(x[index])
    for j in range(index, 0, -1):
        mixed = ((value - j) * _INIT_MULT_INV) & 0xFFFFFFFF
        value = mixed ^ (mixed >> 30)  # v ^ (v >> 30) is its own inverse on 32 bits
    return value
