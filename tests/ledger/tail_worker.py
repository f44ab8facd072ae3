"""One rank of a two-rank gloo job under the Guard whose ledger's tail is cut mid-run.

``python -m tests.ledger.tail_worker RANK WORLD PORT RUN_DIR KEY``. Rank 1 writes an entry
at step 6; once it is the last, rank 0's process (playing the insider with write access)
deletes it with sqlite3; both train on (the ledger's numbers are handed out again).

PYTEST_DONT_REWRITE: this file is the job's own code.
"""

from __future__ import annotations

import os
import sqlite3
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import trainguard


def main() -> None:
    rank, world, port, run_dir, key = sys.argv[1:6]
    rank, world = int(rank), int(world)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)
    guard = trainguard.Guard(
        model, optimizer, run_dir=run_dir, every=5, owner_key=key, seed=0, verify_env=False,
        code_roots=[__file__],
    )  # fmt: skip
    with guard:
        for step in range(20):
            x = torch.randn(16, 8, generator=data)
            loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            guard.step(loss=loss)
            if step == 6:
                seq = [0]
                if rank == 1:
                    seq = [guard.ledger.append("note", {"rank": 1}).seq]
                dist.broadcast_object_list(seq, src=1)
                if rank == 0:
                    conn = sqlite3.connect(os.path.join(run_dir, "ledger.db"))
                    conn.execute("DELETE FROM entries WHERE seq >= ?", (seq[0],))
                    conn.commit()
                    conn.close()
                    with open(os.path.join(run_dir, "cut"), "w") as f:
                        f.write(str(seq[0]))
                dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
