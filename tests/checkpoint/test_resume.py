"""Training resumed from a signed checkpoint in a fresh process is bit-identical on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainguard.integrity import keygen

JOB = Path(__file__).with_name("train_job.py")


@pytest.mark.slow
def test_resumed_training_matches_uninterrupted_bit_for_bit(tmp_path):
    keys = tmp_path / "keys"
    keygen(keys)
    for mode in ("full", "resume"):
        done = subprocess.run(
            [sys.executable, str(JOB), mode, str(tmp_path), str(keys)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    full = load_file(tmp_path / "full.safetensors")
    resumed = load_file(tmp_path / "resumed.safetensors")
    assert full.keys() == resumed.keys()
    assert any(name.startswith("opt.") for name in full)
    for name, tensor in full.items():
        bits = tensor.reshape(-1).view(torch.uint8)
        assert torch.equal(bits, resumed[name].reshape(-1).view(torch.uint8)), name
    # and the checkpoint really was mid-run: the weights moved after it
    saved = load_file(tmp_path / "step.safetensors")
    assert not torch.equal(saved["model/0.weight"], full["model.0.weight"])
