"""A rank that appends to a run's ledger and acknowledges each entry once append returned.

Run as ``python appender.py RUN_DIR RANK COUNT ACK_FILE``; writes one line per returned
append (``seq rank i``) to ACK_FILE, unbuffered, so a SIGKILL at any moment leaves
exactly the acknowledgements of appends that had returned (and perhaps one entry more
in the ledger than acknowledged, never one less).
"""

from __future__ import annotations

import os
import sys

from trainguard.ledger import Ledger


def main() -> None:
    run_dir, rank, count, ack = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    fd = os.open(ack, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with Ledger.open(run_dir, rank=rank) as ledger:
        for i in range(count):
            entry = ledger.append("step", {"rank": rank, "i": i})
            os.write(fd, f"{entry.seq} {rank} {i}\n".encode())
    os.close(fd)


if __name__ == "__main__":
    main()
