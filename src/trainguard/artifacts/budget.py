"""The memory budget of one scan, load or convert: declared sizes are checked before allocating.

Every size a file declares (a ZIP member's uncompressed size, a decompressed stream, a
pickle's number of opcodes, the private copy ``load`` makes, the tensors ``convert``
writes) is reserved here *before* the memory is allocated, so a small file whose headers
promise gigabytes is refused in microseconds instead of taking the machine down. Over
the budget, the part is UNVERIFIABLE (scan) or refused (load, convert), naming
``--max-memory``.

The library counts only what trainguard allocates for a file's contents; the command line
also counts the interpreter's own resident memory (``baseline``), so a command's peak
resident set stays under ``--max-memory``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from trainguard.artifacts.interface import FormatError

#: The default budget: 1 GiB.
DEFAULT_MAX_MEMORY = 1 << 30
#: What one simulated pickle value costs at most (a small object and its stack slot),
#: measured on the worst opcodes (EMPTY_LIST/APPEND chains, short strings): ~150 bytes.
VALUE_COST = 200

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class BudgetExceeded(FormatError):
    """A declared size does not fit the memory budget (the part is UNVERIFIABLE)."""


def parse_size(text: str) -> int:
    """``"512M"``, ``"1G"``, ``"1GiB"``, ``"1073741824"`` -> bytes (units are powers of 1024).

    Raises ValueError for anything else, or a size under 1 MiB.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (use bytes or K, M, G, T)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < 1 << 20:
        raise ValueError(f"{text!r} is below the 1 MiB minimum")
    return value


def current_rss() -> int:
    """This process's resident set in bytes, or 0 where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        import os

        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class MemoryBudget:
    """Bytes that may still be allocated for a file's contents.

    ``reserve`` before allocating, ``release`` (or ``hold``) when the memory is freed.
    """

    def __init__(self, limit: int = DEFAULT_MAX_MEMORY, *, baseline: int = 0) -> None:
        if limit <= 0:
            raise ValueError("the memory budget must be positive")
        self.limit = limit
        self.used = baseline

    @property
    def available(self) -> int:
        return max(0, self.limit - self.used)

    def check(self, size: int, what: str, *, member: str | None = None) -> None:
        """Raise :class:`BudgetExceeded` unless ``size`` more bytes fit."""
        if size > self.available:
            raise BudgetExceeded(
                f"{what} needs {size} bytes, above the memory limit ({self.available} of "
                f"{self.limit} bytes left; see --max-memory)",
                member=member,
            )

    def reserve(self, size: int, what: str, *, member: str | None = None) -> None:
        self.check(size, what, member=member)
        self.used += size

    def release(self, size: int) -> None:
        self.used = max(0, self.used - size)

    @contextmanager
    def hold(self, size: int, what: str, *, member: str | None = None) -> Iterator[None]:
        """Reserve ``size`` bytes for the duration of the block."""
        self.reserve(size, what, member=member)
        try:
            yield
        finally:
            self.release(size)

    def max_values(self) -> int:
        """How many pickle opcodes a simulation (or an unpickler) may run within the budget."""
        return self.available // VALUE_COST
