"""convert: safe load, then safetensors with the structure kept; round trips exactly."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open

import trainguard
from trainguard.artifacts.convert import convert
from trainguard.cli import main


def training_checkpoint() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    embedding = torch.randn(10, 4)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "step": 120,
        "config": {"name": "tiny", "layers": [4, 8, 4], "dropout": 0.1, "tied": True, "x": None},
        "embed": embedding,
        "lm_head": embedding,  # tied weights: one storage, two names
        "half": torch.ones(3, dtype=torch.float16),
        "bf16": torch.ones(3, dtype=torch.bfloat16),
        "int8": torch.arange(-4, 4, dtype=torch.int8),
        "flags": OrderedDict(a=1, b=(1, 2)),
        "param": torch.nn.Parameter(torch.ones(2)),
    }


def test_round_trip_keeps_everything(tmp_path):
    source = tmp_path / "ckpt.pt"
    torch.save(training_checkpoint(), source)
    result = convert(source, tmp_path / "ckpt.safetensors")
    assert result.aliases == {"lm_head": "embed"}
    back = trainguard.load(tmp_path / "ckpt.safetensors")
    original = torch.load(source, weights_only=True)
    _same_values(back, original)
    assert back["embed"].data_ptr() == back["lm_head"].data_ptr(), "tied weights must stay tied"
    assert isinstance(back["flags"], OrderedDict)
    assert isinstance(back["optimizer"]["state"], dict)
    assert 0 in back["optimizer"]["state"]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)


def _same_values(got, want, path=""):
    if isinstance(want, torch.Tensor):
        assert type(got) is type(want), path
        assert (got.dtype, got.shape) == (want.dtype, want.shape), path
        assert torch.equal(_bits(got), _bits(want)), path
    elif isinstance(want, dict):
        assert type(got) is type(want), path
        assert list(got) == list(want), path
        for key in want:
            _same_values(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list | tuple):
        assert type(got) is type(want), path
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _same_values(a, b, f"{path}.{i}")
    else:
        assert got == want, path


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().flatten().view(torch.uint8)


def test_output_is_plain_safetensors(tmp_path):
    source = tmp_path / "ckpt.pt"
    torch.save(training_checkpoint(), source)
    out = tmp_path / "ckpt.safetensors"
    convert(source, out)
    with safe_open(str(out), framework="pt") as f:
        names = set(f.keys())
        metadata = f.metadata()
    assert {"model.0.weight", "embed"} <= names
    assert "lm_head" not in names
    structure = json.loads(metadata["trainguard.structure"])
    assert structure["__dict__"][2] == ["epoch", 3]


def test_views_of_one_storage_are_copied_not_lost(tmp_path):
    base = torch.arange(12.0)
    source = tmp_path / "views.pt"
    torch.save({"all": base, "tail": base[4:], "grid": base.view(3, 4).T}, source)
    result = convert(source, tmp_path / "views.safetensors")
    assert result.copied_views == [["all", "tail", "grid"]]
    back = trainguard.load(tmp_path / "views.safetensors")
    assert torch.equal(back["tail"], base[4:])
    assert torch.equal(back["grid"], base.view(3, 4).T)


def test_benign_corpus_round_trips(benign, tmp_path):
    for sample in benign:
        if sample.format not in ("torch-zip", "torch-legacy", "safetensors"):
            continue
        original = trainguard.load(sample.path)
        if _has_quantized(original):
            with pytest.raises(trainguard.CheckpointError, match="quantized"):
                convert(sample.path, tmp_path / f"{sample.name}.safetensors")
            continue
        convert(sample.path, tmp_path / f"{sample.name}.safetensors")
        assert_identical_values(trainguard.load(tmp_path / f"{sample.name}.safetensors"), original)


def assert_identical_values(got, want):
    _same_values(got, want)


def _has_quantized(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_quantized
    if isinstance(value, dict):
        return any(_has_quantized(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_quantized(v) for v in value)
    return False


def test_cli_refuses_to_overwrite_and_to_convert_unsafe(tmp_path, capsys):
    source = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(2)}, source)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(source), "-o", str(out)]) == 0
    assert main(["convert", str(source), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(source), "-o", str(out), "--force", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == 1
    assert main(["convert", str(source), "-o", str(source)]) == 2


def test_unsafe_input_writes_nothing(malicious, tmp_path, capsys):
    sample = next(s for s in malicious if s.format == "torch-zip")
    out = tmp_path / "never.safetensors"
    assert main(["convert", str(sample.path), "-o", str(out)]) == 1
    assert not out.exists()
    err = capsys.readouterr().err
    assert "refused" in err
    assert "Traceback" not in err


def test_identity_helper_is_strict():
    with pytest.raises(AssertionError):
        assert_identical_values({"a": torch.ones(2)}, {"a": torch.zeros(2)})
