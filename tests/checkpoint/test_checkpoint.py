"""Signed checkpoints: tampered files are refused, naming what differs, before the model
is touched; untouched ones restore model, optimizer, extra state and RNGs exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file

from trainguard import checkpoint
from trainguard.checkpoint import (
    CheckpointIntegrityError,
    CheckpointMismatchError,
    CheckpointSignatureError,
)
from trainguard.checkpoint.signed_file import SIGNATURE_KEY, Signer
from trainguard.errors import CheckpointError, UsageError
from trainguard.integrity import keygen, signing
from trainguard.ledger import Ledger, verify


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.Dropout(0.2), torch.nn.Linear(12, 3)
    )


def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.8, 0.95))
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 6)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return keygen(tmp_path / "owner")


@pytest.fixture
def saved(tmp_path: Path, keys) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    model, optimizer = trained()
    path = tmp_path / "ckpt" / "step-3.safetensors"
    checkpoint.save(
        path,
        model=model,
        optimizer=optimizer,
        step=3,
        data_position={"epoch": 0, "batch": 3},
        extra={"scaler": torch.tensor([65536.0]), "config": {"lr": 3e-3, "name": "tiny"}},
        key=keys[0],
    )
    return path, model, optimizer


def header(path: Path) -> tuple[dict, int]:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), 8 + size


def rewrite_header(path: Path, change) -> None:
    """Re-serialise the header after ``change(header)``, keeping the tensor bytes."""
    head, start = header(path)
    body = path.read_bytes()[start:]
    change(head)
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model(seed=7)
    return model, torch.optim.AdamW(model.parameters(), lr=1.0)


def assert_untouched(model: torch.nn.Module) -> None:
    reference = make_model(seed=7)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_untouched_checkpoint_loads_bit_identical(saved, keys):
    path, model, optimizer = saved
    random.seed(5)
    numpy.random.seed(5)
    torch.manual_seed(5)
    # the RNG states at save time were captured in `saved`; draw what they would give
    target, target_opt = fresh()
    done = checkpoint.load(path, model=target, optimizer=target_opt, public_key=keys[1])
    after_load = (random.random(), float(numpy.random.rand()), torch.rand(3))
    checkpoint.load(path, public_key=keys[1])
    assert (random.random(), float(numpy.random.rand())) == after_load[:2]
    assert torch.equal(torch.rand(3), after_load[2])
    for name, tensor in model.state_dict().items():
        got = target.state_dict()[name]
        assert got.dtype == tensor.dtype
        assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)), name
    want, got = optimizer.state_dict(), target_opt.state_dict()
    assert got["param_groups"] == want["param_groups"]
    for pid, state in want["state"].items():
        for key, value in state.items():
            assert torch.equal(got["state"][pid][key], value), (pid, key)
    assert done.step == 3
    assert done.data_position == {"epoch": 0, "batch": 3}
    assert done.extra["config"] == {"lr": 3e-3, "name": "tiny"}
    assert torch.equal(done.extra["scaler"], torch.tensor([65536.0]))
    assert done.signer_key_id == signing.key_id(signing.load_public(keys[1]))


def test_one_flipped_bit_in_one_tensor(saved, keys):
    path, _, _ = saved
    head, start = header(path)
    begin, _ = head["optimizer/state.1.exp_avg_sq"]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[start + begin + 2] ^= 0x01
    path.write_bytes(bytes(data))
    model, optimizer = fresh()
    with pytest.raises(CheckpointIntegrityError) as refused:
        checkpoint.load(path, model=model, optimizer=optimizer, public_key=keys[1])
    assert refused.value.reasons == (
        "tensor 'optimizer/state.1.exp_avg_sq': content differs from its signed hash",
    )
    assert_untouched(model)


def test_renamed_tensor(saved, keys):
    path, _, _ = saved

    def rename(head: dict) -> None:
        head["model/2.weighs"] = head.pop("model/2.weight")

    rewrite_header(path, rename)
    model, _ = fresh()
    with pytest.raises(CheckpointIntegrityError, match="renamed") as refused:
        checkpoint.load(path, model=model, public_key=keys[1])
    assert refused.value.reasons == ("tensor 'model/2.weight' was renamed to 'model/2.weighs'",)
    assert_untouched(model)


def test_manifest_signed_by_another_key(saved, keys):
    """The attacker changes a tensor, fixes the manifest and signs it with their own key."""
    path, _, _ = saved
    head, start = header(path)
    manifest = json.loads(head["__metadata__"]["trainguard.checkpoint"])
    manifest["step"] = 999
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    forged = Signer(Ed25519PrivateKey.generate()).signature_for(text.encode())

    def resign(h: dict) -> None:
        h["__metadata__"]["trainguard.checkpoint"] = text
        h["__metadata__"][SIGNATURE_KEY] = json.dumps(forged)

    rewrite_header(path, resign)
    model, _ = fresh()
    with pytest.raises(CheckpointSignatureError, match="not a trusted key"):
        checkpoint.load(path, model=model, public_key=keys[1])
    assert_untouched(model)


def test_manifest_edited_without_resigning(saved, keys):
    path, _, _ = saved

    def edit(h: dict) -> None:
        h["__metadata__"]["trainguard.checkpoint"] = h["__metadata__"][
            "trainguard.checkpoint"
        ].replace('"step":3', '"step":4')

    rewrite_header(path, edit)
    with pytest.raises(CheckpointSignatureError, match="bad signature"):
        checkpoint.load(path, public_key=keys[1])


def test_plain_safetensors_without_manifest_is_refused(tmp_path, keys):
    path = tmp_path / "plain.safetensors"
    save_file({"model/0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointSignatureError, match="no signed trainguard manifest"):
        checkpoint.load(path, public_key=keys[1])


def test_truncated_file_is_refused(saved, keys):
    path, _, _ = saved
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointIntegrityError, match="not a valid safetensors"):
        checkpoint.load(path, public_key=keys[1])


def test_checkpoint_for_another_model_is_refused_before_loading(saved, keys):
    path, _, _ = saved
    other = torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.Dropout(0.2), torch.nn.Linear(12, 4)
    )
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(CheckpointMismatchError, match="2.weight"):
        checkpoint.load(path, model=other, public_key=keys[1])
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))


def test_save_and_load_need_keys(tmp_path, saved, keys):
    model, _ = fresh()
    with pytest.raises(UsageError):
        checkpoint.save(tmp_path / "x.safetensors", model=model)
    with pytest.raises(UsageError):
        checkpoint.load(saved[0])
    with pytest.raises(CheckpointError, match="no safetensors representation"):
        checkpoint.save(tmp_path / "x.safetensors", model=model, extra={"f": open}, key=keys[0])


def test_run_key_checkpoints_and_the_ledger(tmp_path, keys):
    """Signed by the run key; trusted through the owner's certificate; all recorded."""
    run_dir = tmp_path / "run"
    model, optimizer = trained()
    path = tmp_path / "run-ckpt.safetensors"
    with Ledger.create(run_dir, owner_key=keys[0], run_id="run-a") as ledger:
        saved = checkpoint.save(path, model=model, optimizer=optimizer, step=3, ledger=ledger)
    assert saved.ledger_seq == 2
    # a resumed run (a new process, a new run key from the same owner) accepts it
    with Ledger.create(run_dir, owner_key=keys[0]) as resumed:
        target, target_opt = fresh()
        done = checkpoint.load(path, model=target, optimizer=target_opt, ledger=resumed)
        assert done.run_id == "run-a"
        assert done.signer_key_id != resumed.certificate.run_key_id
        # another owner's run, with its own ledger, signs a checkpoint ...
        stranger = Ledger.create(tmp_path / "other", owner_key=Ed25519PrivateKey.generate())
        foreign = tmp_path / "foreign.safetensors"
        checkpoint.save(foreign, model=model, ledger=stranger)
        stranger.close()
        # ... which this run refuses, and records the refusal
        with pytest.raises(CheckpointSignatureError, match="not by a trusted key"):
            checkpoint.load(foreign, model=fresh()[0], ledger=resumed)
        kinds = [e.kind for e in resumed.entries()]
        resumed.close_run()
    assert kinds[-3:] == ["run.certificate", "checkpoint.loaded", "checkpoint.refused"]
    saved_entry = next(Ledger.open(run_dir, readonly=True).entries("checkpoint.saved"))
    assert saved_entry.payload["manifest_blake3"] == saved.manifest_hash
    assert verify(run_dir, owner_public_key=keys[1]).verdict == "intact"


def test_generators_are_restored(tmp_path, keys):
    generator = torch.Generator().manual_seed(3)
    torch.rand(2, generator=generator)
    path = tmp_path / "g.safetensors"
    checkpoint.save(path, model=make_model(), generators={"loader": generator}, key=keys[0])
    expected = torch.rand(4, generator=generator)
    other = torch.Generator().manual_seed(42)
    checkpoint.load(path, public_key=keys[1], generators={"loader": other})
    assert torch.equal(torch.rand(4, generator=other), expected)
    with pytest.raises(CheckpointError, match="no state for generator"):
        checkpoint.load(path, public_key=keys[1], generators={"missing": other})


def test_checkpoint_is_a_safe_safetensors_file(saved):
    import trainguard

    report = trainguard.scan(saved[0])
    assert report.safe
