"""A small real training job for the resume test, run in fresh processes.

``python train_job.py full OUT KEY_DIR``: trains STEPS steps, saving a signed
checkpoint after step SAVE_AT along the way; writes the final state to OUT/full.safetensors.
``python train_job.py resume OUT KEY_DIR``: a fresh process loads that checkpoint and
trains on to STEPS; writes OUT/resumed.safetensors. The test compares the two bit for bit.

The job uses every source of randomness a real one does: dropout (torch's global
generator), a shuffling DataLoader driven by its own seeded generator, and Python's and
NumPy's generators (noise added to the loss), with AdamW and weight decay.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy
import torch
from safetensors.torch import save_file

from trainguard import checkpoint

STEPS = 20
SAVE_AT = 11  # mid-epoch: 8 batches per epoch, so epoch 1, batch 3
BATCH = 8


def build() -> tuple[
    torch.nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader, torch.Generator
]:
    torch.manual_seed(1234)
    random.seed(1234)
    numpy.random.seed(1234)
    data = torch.utils.data.TensorDataset(torch.randn(64, 10), torch.randn(64, 1))
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loader_rng = torch.Generator().manual_seed(99)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, generator=loader_rng)
    return model, optimizer, loader, loader_rng


def train(mode: str, out: Path, keys: Path) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model, optimizer, loader, loader_rng = build()
    ckpt = out / "step.safetensors"
    step, epoch, skip = 0, 0, 0
    if mode == "resume":
        done = checkpoint.load(
            ckpt,
            model=model,
            optimizer=optimizer,
            public_key=keys / "trainguard.pub",
            generators={"loader": loader_rng},
        )
        step, epoch, skip = done.step, done.data_position["epoch"], done.data_position["batch"]
    while step < STEPS:
        # the sampler draws its permutation from loader_rng when the epoch starts: keep
        # that starting state, so a resume mid-epoch replays the same permutation
        epoch_start = torch.Generator()
        epoch_start.set_state(loader_rng.get_state())
        for index, (x, y) in enumerate(loader):
            if index < skip:
                continue
            model.train()
            noise = random.random() * 1e-3 + float(numpy.random.rand()) * 1e-3
            loss = torch.nn.functional.mse_loss(model(x), y) + noise
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if mode == "full" and step == SAVE_AT:
                checkpoint.save(
                    ckpt,
                    model=model,
                    optimizer=optimizer,
                    step=step,
                    data_position={"epoch": epoch, "batch": index + 1},
                    generators={"loader": epoch_start},
                    key=keys / "trainguard.key",
                )
            if step == STEPS:
                break
        epoch, skip = epoch + 1, 0
    final = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    for pid, state in optimizer.state_dict()["state"].items():
        final.update({f"opt.{pid}.{k}": v.reshape(-1).contiguous() for k, v in state.items()})
    final["rng.torch"] = torch.get_rng_state()
    save_file(final, out / f"{'full' if mode == 'full' else 'resumed'}.safetensors")


if __name__ == "__main__":
    train(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
