"""The demonstration behind ``make demo-checkpoints``: checkpoint safety, step by step.

It builds a small folder of real checkpoints in a temporary directory (some benign,
some carrying a harmless payload that would create a marker file), scans the folder,
loads a benign checkpoint safely, refuses a malicious one, converts one to safetensors,
and shows that no payload ever ran.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import trainguard
from trainguard.artifacts.convert import convert


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def tg(*args: str) -> int:
    """Run the real command line, as a user would, and show it."""
    print(f"$ trainguard {' '.join(args)}", flush=True)
    return subprocess.run([sys.executable, "-m", "trainguard", *args], check=False).returncode


class Payload:
    """What an attacker plants: unpickling it runs os.system (here: touch a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


def build(folder: Path, marker: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, 16)).sum().backward()
    optimizer.step()
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}
    torch.save(checkpoint, folder / "good-checkpoint.pt")
    torch.save(
        model.state_dict(), folder / "good-weights.bin", _use_new_zipfile_serialization=False
    )
    np.save(folder / "good-embeddings.npy", np.random.default_rng(0).random((4, 4)))
    # The attacks: a payload inside a real torch checkpoint, under an innocent name;
    # the same payload in a plain pickle with no extension; and in a NumPy object array.
    poisoned = dict(checkpoint, hook=Payload(marker))
    torch.save(poisoned, folder / "resume-from-here.ckpt")
    (folder / "optimizer_state").write_bytes(pickle.dumps({"lr": Payload(marker)}, protocol=4))
    np.save(folder / "features.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="trainguard-demo-") as tmp:
        folder = Path(tmp) / "checkpoints"
        folder.mkdir()
        marker = Path(tmp) / "PAYLOAD-RAN"
        step("1. A shared checkpoint folder: three benign files, three carrying a payload")
        build(folder, marker)
        for path in sorted(folder.iterdir()):
            print(f"  {path.name:<24} {path.stat().st_size:>8} bytes")
        print("  Each payload, if a careless torch.load/pickle.load/np.load ran it,")
        print(f"  would execute `touch {marker.name}`.")

        step("2. Scan the folder: formats are told by their bytes, not their names")
        status = tg("scan", str(folder))
        print(f"  exit status {status}: 1 means something is unsafe or unverifiable")

        step("3. Load a benign checkpoint with the safe loader")
        print(">>> state = trainguard.load('good-checkpoint.pt')")
        state = trainguard.load(folder / "good-checkpoint.pt")
        reference = torch.load(folder / "good-checkpoint.pt", weights_only=True)
        same = all(
            torch.equal(state["model"][k], reference["model"][k]) for k in reference["model"]
        )
        print(f"  loaded {len(state['model'])} tensors, epoch {state['epoch']};")
        print(f"  bit-identical to torch.load(weights_only=True): {same}")

        step("4. Try to load the poisoned checkpoint")
        print(">>> trainguard.load('resume-from-here.ckpt')")
        try:
            trainguard.load(folder / "resume-from-here.ckpt")
            print("  loaded?! this should never happen")
            return 1
        except trainguard.UnsafeCheckpointError as refused:
            print(f"  refused: {refused}")
            for finding in refused.findings:
                print(f"    {finding.severity.name:<8} {finding.message} [{finding.location}]")

        step("5. Convert the benign checkpoint to safetensors (no code can live there)")
        out = folder / "good-checkpoint.safetensors"
        result = convert(folder / "good-checkpoint.pt", out)
        print(f"  wrote {out.name}: {result.tensors} tensors; epoch and hyperparameters kept")
        back = trainguard.load(out)
        print(f"  reloaded: epoch {back['epoch']}, lr {back['optimizer']['param_groups'][0]['lr']}")
        tg("scan", str(out))

        step("6. Did any payload run?")
        ran = marker.exists()
        print(f"  marker file present: {ran}")
        return 1 if ran else 0


if __name__ == "__main__":
    sys.exit(main())
