"""Red team of signed checkpoints: edited manifests and signed-but-odd values.

One named test per finding, each reproduced on the code before its fix: a raw Python
exception instead of a ``CheckpointError``, or a refused load that had already changed the
optimizer and the RNGs. Every test compares every tensor, optimizer state and RNG state
before and after the refused load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoint.test_checkpoint import rewrite_header
from tests.checkpoint.test_faults import assert_same, live, snapshot
from trainguard import checkpoint
from trainguard.artifacts.convert import encode_tree
from trainguard.checkpoint.signed_file import MANIFEST_KEY, Signer
from trainguard.checkpoint.signed_file import write as write_signed
from trainguard.errors import CheckpointError
from trainguard.integrity import keygen, signing


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return keygen(tmp_path / "owner")


def _refused_changes_nothing(path: Path, public: Path, *, rng: bool = True) -> CheckpointError:
    model, optimizer, generator = live()
    before = snapshot(model, optimizer, generator)
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(
            path,
            model=model,
            optimizer=optimizer,
            public_key=public,
            restore_rng=rng,
            generators={"data": generator} if rng else None,
        )
    assert_same(before, snapshot(model, optimizer, generator))
    return refused.value


def test_manifest_integer_over_the_conversion_limit(tmp_path, keys):
    """An edited checkpoint whose manifest holds a 5,000-digit ``step``: ``json.loads``
    raised a raw ValueError (Python's int-conversion limit) out of ``checkpoint.load``."""
    private, public = keys
    model, optimizer, generator = live()
    path = tmp_path / "c.safetensors"
    checkpoint.save(
        path, model=model, optimizer=optimizer, key=private, step=5, generators={"data": generator}
    )

    def edit(header: dict[str, Any]) -> None:
        meta = header["__metadata__"]
        meta[MANIFEST_KEY] = meta[MANIFEST_KEY].replace('"step":5', '"step":' + "5" * 5000)

    rewrite_header(path, edit)
    refused = _refused_changes_nothing(path, public)
    assert isinstance(refused, checkpoint.CheckpointVerificationError)


def _signed_with_parts(
    path: Path, private: Path, parts: dict[str, Any], tensors: dict[str, Any]
) -> None:
    """A checkpoint the owner's key signed whose ``parts`` structures are given verbatim."""
    manifest = {"step": 1, "data_position": None, "parts": parts, "run_id": None}
    write_signed(path, tensors, manifest, Signer(signing.load_private(private)))


def _genuine_parts() -> tuple[dict[str, Any], dict[str, Any]]:
    model, optimizer, generator = live()
    from trainguard.checkpoint import rng as _rng

    parts: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for part, tree in {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": _rng.capture({"data": generator}),
    }.items():
        named, parts[part] = encode_tree(tree)
        tensors.update({f"{part}/{n}": t for n, t in named.items()})
    return parts, tensors


@pytest.mark.parametrize(
    "odd",
    [{"__complex__": []}, {"__device__": "no-such-device"}, {"__numpy__": ["float32"]}],
    ids=["complex-of-nothing", "unknown-device", "numpy-without-value"],
)
def test_signed_structure_with_odd_values(tmp_path, keys, odd):
    """A checkpoint signed by the trusted key whose ``extra`` structure holds a value the
    decoder cannot build (``__complex__`` of an empty list: IndexError; a device torch does
    not know: RuntimeError): the raw exception escaped ``checkpoint.load``."""
    private, public = keys
    parts, tensors = _genuine_parts()
    parts["extra"] = {"__dict__": [["odd", odd]]}
    path = tmp_path / "c.safetensors"
    _signed_with_parts(path, private, parts, tensors)
    refused = _refused_changes_nothing(path, public)
    assert "extra" in str(refused)


def test_signed_optimizer_state_naming_parameters_by_lists(tmp_path, keys):
    """Signed optimizer state whose param group lists ``[0]`` instead of ``0``: the fit check
    hashed the list and raised a raw TypeError out of ``checkpoint.load``."""
    private, public = keys
    parts, tensors = _genuine_parts()
    groups = parts["optimizer"]["__dict__"]
    for key, value in groups:
        if key == "param_groups":
            group = value["__list__"][0]["__dict__"]
            for i, (name, ids) in enumerate(group):
                if name == "params":
                    group[i] = [name, {"__list__": [{"__list__": [n]} for n in ids["__list__"]]}]
    path = tmp_path / "c.safetensors"
    _signed_with_parts(path, private, parts, tensors)
    refused = _refused_changes_nothing(path, public)
    assert isinstance(refused, checkpoint.CheckpointMismatchError)


class _Versioned(torch.nn.Module):
    """A layer with extra state (a format version) it refuses to load from another version."""

    def __init__(self, version: str) -> None:
        super().__init__()
        self.version = version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def get_extra_state(self) -> Any:
        return {"version": self.version}

    def set_extra_state(self, state: Any) -> None:
        if state["version"] != self.version:
            raise ValueError(f"layer version {state['version']}, expected {self.version}")


class _TensorsOnly:
    """The model's tensors, without the extra state ``snapshot`` cannot clone."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        own = self.model.state_dict().items()
        return {k: v for k, v in own if isinstance(v, torch.Tensor)}


def _versioned_model(version: str) -> torch.nn.Module:
    torch.manual_seed(0 if version == "1" else 3)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), _Versioned(version), torch.nn.Linear(12, 3))


def test_model_extra_state_that_refuses_leaves_everything(tmp_path, keys):
    """A genuine checkpoint whose model extra state the live layer refuses (its
    ``set_extra_state`` raises): the optimizer and every RNG had already been restored, and
    the first Linear's weights overwritten, when the raw ValueError escaped."""
    private, public = keys
    path = tmp_path / "c.safetensors"
    saved = _versioned_model("1")
    saved_opt = torch.optim.AdamW(saved.parameters(), lr=1.0)
    saved(torch.ones(2, 6)).sum().backward()
    saved_opt.step()
    generator = torch.Generator().manual_seed(5)
    checkpoint.save(
        path, model=saved, optimizer=saved_opt, key=private, step=1, generators={"data": generator}
    )

    model = _versioned_model("2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    model(torch.ones(2, 6)).sum().backward()
    optimizer.step()
    mine = torch.Generator().manual_seed(11)
    torch.manual_seed(1234)
    before = snapshot(_TensorsOnly(model), optimizer, mine)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="version"):
        checkpoint.load(
            path, model=model, optimizer=optimizer, public_key=public, generators={"data": mine}
        )
    assert_same(before, snapshot(_TensorsOnly(model), optimizer, mine))
    assert model[1].version == "2"


def test_same_model_with_extra_state_still_loads(tmp_path, keys):
    """The backup taken for extra state does not get in the way of a load that fits."""
    private, public = keys
    path = tmp_path / "c.safetensors"
    saved = _versioned_model("1")
    checkpoint.save(path, model=saved, key=private, step=1)
    model = _versioned_model("1")
    checkpoint.load(path, model=model, public_key=public, restore_rng=False)
    for name, tensor in saved.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(model.state_dict()[name], tensor), name
