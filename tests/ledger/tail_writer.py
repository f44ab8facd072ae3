"""A writer of a run's ledger in its own process, driven line by line from stdin.

``python -m tests.ledger.tail_writer RUN_DIR RANK``; each line ``append`` writes one
entry and prints its seq, ``close`` writes the closing entry the Guard writes (with the
count of entries this process wrote, its first and last) and prints its seq.
"""

from __future__ import annotations

import sys

from trainguard.ledger import Ledger
from trainguard.runtime.ledger_tail import closing_values


def main() -> None:
    run_dir, rank = sys.argv[1], int(sys.argv[2])
    with Ledger.open(run_dir, rank=rank) as ledger:
        for line in sys.stdin:
            if line.strip() == "append":
                entry = ledger.append("note", {"rank": rank})
            elif line.strip() == "close":
                entry = ledger.append("rank.closed", {"ledger": closing_values(ledger)})
            else:
                continue
            sys.stdout.write(f"{entry.seq}\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
