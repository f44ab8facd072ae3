"""The append worker of the ledger benchmark (its own module, so spawned processes import it)."""

from __future__ import annotations

import time
from typing import Any


def append_worker(run_dir: str, rank: int, count: int, start_at: float, out: Any) -> None:
    from trainguard.ledger import Ledger

    with Ledger.open(run_dir, rank=rank) as ledger:
        while time.time() < start_at:
            time.sleep(0.001)
        begin = time.time()
        for i in range(count):
            ledger.append("step", {"rank": rank, "i": i, "loss": 0.125})
        out.put((begin, time.time()))
