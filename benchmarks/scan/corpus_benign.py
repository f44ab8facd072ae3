"""The benign half of the scanner corpus: real files of the kinds a training cluster holds.

Everything here is written by the real libraries (torch.save, numpy.save/savez,
pickle.dump, joblib.dump, safetensors.torch.save_file) from real models and
optimizers, and carries no payload: a scanner that flags any of these is raising a
false positive. Every file stays well under 2 MB so the corpus builds in seconds.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchmarks.scan.corpus import Sample

_LOADERS = {
    "torch-zip": "torch.load",
    "torch-legacy": "torch.load",
    "pickle": "pickle.load",
    "npy": "numpy.load",
    "npz": "numpy.load",
    "joblib": "joblib.load",
    "safetensors": "safetensors",
}


class _Writer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.samples: list[Sample] = []

    def add(
        self, name: str, suffix: str, fmt: str, what: str, write: Callable[[Path], object]
    ) -> None:
        path = self.directory / f"{name}{suffix}"
        write(path)
        self.samples.append(Sample(name, path, what, "", False, fmt, _LOADERS[fmt]))

    def torch(self, name: str, obj: object, what: str, *, legacy: bool = False) -> None:
        import torch

        def write(path: Path) -> None:
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)

        self.add(name, ".pt", "torch-legacy" if legacy else "torch-zip", what, write)


def build(directory: Path) -> list[Sample]:
    """Write every benign sample; see :func:`benchmarks.scan.corpus.build_benign`."""
    import torch

    torch.manual_seed(0)
    w = _Writer(directory)
    models = _models()
    _state_dicts(w, models)
    _optimizers(w, models["mlp"])
    _checkpoints(w, models["mlp"])
    _arrays(w)
    _pickles(w)
    _safetensors(w, models)
    return w.samples


def _models() -> dict[str, Any]:
    from torch import nn

    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    conv = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    conv.train()
    conv(_randn(4, 3, 8, 8))  # one forward pass so BatchNorm running stats are real
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    transformer = nn.ModuleDict(
        {
            "embed": nn.Embedding(50, 32),
            "encoder": nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
            "head": nn.Linear(32, 50),
        }
    )
    return {"mlp": mlp, "conv": conv, "transformer": transformer}


def _randn(*shape: int) -> Any:
    import torch

    return torch.randn(*shape)


def _cast(state: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
    """Floating tensors cast to ``dtype``; integer buffers (num_batches_tracked) kept."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _int8(state: Mapping[str, Any]) -> dict[str, Any]:
    """Symmetric per-tensor int8 weights as plain int8 tensors, with their scales."""
    import torch

    out: dict[str, Any] = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        scale = float(value.abs().max()) / 127 or 1.0
        out[key] = (value / scale).round().clamp(-128, 127).to(torch.int8)
        out[f"{key}.scale"] = scale
    return out


def _state_dicts(w: _Writer, models: Mapping[str, Any]) -> None:
    import torch

    for name, model in models.items():
        state = model.state_dict()
        for label, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            w.torch(f"{name}_{label}", _cast(state, dtype), f"{name} state dict, {label}")
        w.torch(f"{name}_bf16", _cast(state, torch.bfloat16), f"{name} state dict, bf16")
        w.torch(f"{name}_int8", _int8(state), f"{name} state dict as int8 tensors + scales")
    weight = models["mlp"][0].weight.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized dtypes are deprecated, not gone
        qweight = torch.quantize_per_tensor(weight, 0.02, 0, torch.qint8)
    quantized = {"0.weight": qweight, "0.bias": models["mlp"][0].bias.detach().clone()}
    w.torch("mlp_qint8_per_tensor", quantized, "torch.quantize_per_tensor qint8 weight")


def _optimizers(w: _Writer, mlp: Any) -> None:
    import torch

    params = list(mlp.parameters())
    optimizers: dict[str, torch.optim.Optimizer] = {
        "sgd_momentum": torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
        "adam": torch.optim.Adam(params, lr=1e-3),
        "adamw": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
    }
    for name, optimizer in optimizers.items():
        for _ in range(3):
            optimizer.zero_grad()
            mlp(_randn(8, 16)).square().mean().backward()
            optimizer.step()
        w.torch(f"optimizer_{name}", optimizer.state_dict(), f"{name} state dict after 3 steps")


def _checkpoints(w: _Writer, mlp: Any) -> None:
    import torch

    optimizer = torch.optim.Adam(mlp.parameters(), lr=3e-4)
    mlp(_randn(8, 16)).sum().backward()
    optimizer.step()
    config = {
        "model": {"name": "mlp", "widths": [16, 32, 4], "activation": "relu", "dropout": None},
        "optim": {"lr": 3e-4, "betas": [0.9, 0.999], "amsgrad": False},
        "data": {"shards": ["a.bin", "b.bin"], "shuffle": True, "seed": 1234},
        "notes": "benign nested config",
    }
    checkpoint = {
        "model": mlp.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "step": 120,
        "config": config,
    }
    w.torch("training_checkpoint", checkpoint, "model + optimizer + epoch/step + nested config")
    base = torch.arange(24, dtype=torch.float32)
    shared = _randn(50, 8)
    tied = {
        "embed.weight": shared,
        "lm_head.weight": shared,  # tied: the same storage under two keys
        "window": base[6:18].view(3, 4),  # a view with a storage offset
        "base": base,
    }
    w.torch("tied_weights_and_view", tied, "tied weights sharing storage, an offset view")
    w.torch("mlp_legacy_format", mlp.state_dict(), "mlp state dict, legacy format", legacy=True)


def _arrays(w: _Writer) -> None:
    import joblib
    import numpy as np

    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {
        "npy_float32": rng.standard_normal((16, 8)).astype(np.float32),
        "npy_int64": np.arange(100, dtype=np.int64),
        "npy_bool": rng.random(64) > 0.5,
        "npy_fortran_2d": np.asfortranarray(rng.standard_normal((6, 5))),
    }
    for name, array in arrays.items():

        def save(path: Path, array: Any = array) -> None:
            np.save(path, array)

        w.add(name, ".npy", "npy", f"numpy.save {array.dtype}", save)
    bundle = {"weights": arrays["npy_float32"], "index": arrays["npy_int64"]}
    w.add("npz_savez", ".npz", "npz", "numpy.savez", lambda p: np.savez(p, **bundle))
    w.add(
        "npz_savez_compressed",
        ".npz",
        "npz",
        "numpy.savez_compressed",
        lambda p: np.savez_compressed(p, **bundle),
    )
    w.add(
        "joblib_numpy_dict",
        ".joblib",
        "joblib",
        "joblib.dump of numpy arrays",
        lambda p: joblib.dump({**bundle, "mask": arrays["npy_bool"]}, p),
    )


def _pickles(w: _Writer) -> None:
    record = {
        "epoch": 3,
        "loss": 0.4375,
        "name": "run-17",
        "tags": ["baseline", "fp32"],
        "history": [[1, 0.9], [2, 0.6], [3, 0.4375]],
        "done": False,
    }
    for protocol in range(6):

        def write(path: Path, protocol: int = protocol) -> None:
            path.write_bytes(pickle.dumps(record, protocol=protocol))

        w.add(
            f"pickle_dict_proto{protocol}",
            ".pkl",
            "pickle",
            f"plain dict, protocol {protocol}",
            write,
        )


def _safetensors(w: _Writer, models: Mapping[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    metadata = {"format": "pt", "step": "120", "source": "trainguard corpus"}
    for name, dtype in (("mlp", torch.float32), ("transformer", torch.bfloat16)):
        state = _cast(models[name].state_dict(), dtype)
        tensors = {key: value.detach().contiguous().clone() for key, value in state.items()}

        def write(path: Path, tensors: dict[str, Any] = tensors) -> None:
            save_file(tensors, str(path), metadata=metadata)

        w.add(
            f"safetensors_{name}", ".safetensors", "safetensors", "save_file with metadata", write
        )
