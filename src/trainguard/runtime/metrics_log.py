"""Per-step metrics beside the ledger, chained into it: what the incident report plots.

Each rank appends one line per training step to ``RUN_DIR/metrics/rank{R}.jsonl``:
``{"step": s, "loss": x, "grad_norm": x, "lr": x, "busy_s": x}`` (``null`` for a value the
job did not give, or one that is not finite). The lines are formed when the steps are
read at the check (the values stay on their device until then) and written in one chunk
per check, never per step.

The file is not signed line by line: a chain is. ``chain_k = BLAKE2b-64(chain_{k-1} ||
chunk_k)`` from 8 zero bytes, and every check carries each rank's ``chain_k`` in the
fingerprint row (``metrics_chain``), which rank 0 records in the ledger's ``check`` entry;
the rank's closing entry records the chain over every line it wrote. A file edited,
cut or extended afterwards no longer hashes to what the ledger holds (``trainguard
report`` checks it: see docs/report.md).
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import IO, Any

#: the chain before the first chunk
CHAIN0 = bytes(8)


def chain(previous: bytes, chunk: bytes) -> bytes:
    """The next link: BLAKE2b with an 8-byte digest over the previous link and the chunk."""
    return hashlib.blake2b(previous + chunk, digest_size=8).digest()


def chain_bits(link: bytes) -> int:
    """A link as a signed int64 (a fingerprint row field)."""
    return int.from_bytes(link, "big", signed=True)


def bits_link(value: int) -> str:
    """A row field back to the link's 16 hex digits."""
    return (value & ((1 << 64) - 1)).to_bytes(8, "big").hex()


def _number(value: Any) -> str:
    if value is None:
        return "null"
    number = float(value)
    return repr(number) if math.isfinite(number) else "null"


class MetricsLog:
    """One rank's per-step metrics file and its chain; see the module docstring."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.path = run_dir / "metrics" / f"rank{rank}.jsonl"
        self.link = CHAIN0
        self.lines = 0
        #: why writing stopped (the chain then covers what was written before)
        self.failed: str | None = None
        self._chunk: list[str] = []
        self._file: IO[bytes] | None = None
        # the interval's values for the check's row
        self._norms: list[float] = []
        self._steps = 0
        self._since = time.perf_counter()

    def add(self, step: int, loss: Any, grad_norm: Any, lr: Any, busy: float) -> None:
        """One step's line (written at :meth:`flush`)."""
        self._steps += 1
        if grad_norm is not None and math.isfinite(grad_norm):
            self._norms.append(float(grad_norm))
        if self.failed is None:
            self._chunk.append(
                f'{{"step": {int(step)}, "loss": {_number(loss)}, '
                f'"grad_norm": {_number(grad_norm)}, "lr": {_number(lr)}, '
                f'"busy_s": {_number(busy)}}}\n'
            )

    def flush(self) -> None:
        """Append the lines formed since the last flush as one chunk and extend the chain.
        Raises OSError (the caller reports it once); nothing is written after a failure."""
        chunk, self._chunk = self._chunk, []
        if not chunk or self.failed is not None:
            return
        data = "".join(chunk).encode()
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "ab")  # noqa: SIM115 - kept open for the run
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            raise
        self.link = chain(self.link, data)
        self.lines += len(chunk)

    def interval(self) -> tuple[float, float]:
        """The mean gradient norm (NaN: none given) and the mean wall seconds per step
        since the last call: the check's row values."""
        now = time.perf_counter()
        norms, steps = self._norms, self._steps
        wall = (now - self._since) / steps if steps else 0.0
        self._norms, self._steps, self._since = [], 0, now
        return (sum(norms) / len(norms) if norms else math.nan), wall

    def closing(self) -> dict[str, Any]:
        """What the rank's closing entry says about its file."""
        out: dict[str, Any] = {"lines": self.lines, "chain": self.link.hex()}
        if self.failed is not None:
            out["failed"] = self.failed
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
