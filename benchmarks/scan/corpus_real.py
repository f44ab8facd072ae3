"""The real-world part of the scanner corpus: the folders training code writes, as written.

Nothing is downloaded and nothing is imitated where the real writer runs here: a tiny
random-init GPT-2 goes through ``save_pretrained`` with a real fast tokenizer, a real
one-step ``transformers.Trainer`` run writes its checkpoint folder (``training_args.bin``,
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``), a real
one-epoch Lightning run writes its ``.ckpt`` and CSV logs, and ``torch.save`` writes the
checkpoints projects keep (an ``argparse.Namespace``, a whole ``nn.Module``, the legacy
format, ``pathlib``/``datetime``/``enum`` values). The text a repository holds next to
them (LICENSE, a training script, YAML, notes) completes the folder.

transformers 5 no longer has ``save_pretrained(safe_serialization=False)``; the ``.bin``
folder is written as transformers 4 wrote it then: ``torch.save`` of the state dict to
``pytorch_model.bin`` beside the same ``config.json``.

Every file is benign and becomes one :class:`~benchmarks.scan.corpus.Sample` of part
"real" whose ``expected`` is the trainguard outcome a user should get: ``clean`` for a
model file, ``skipped`` for one no model loader opens. The benchmark reports what each
tool did; it never assumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import os
import pathlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.scan.corpus import Sample

PART = "real"
#: ``Sample.format`` of the files no model loader opens (not a core-corpus format)
TEXT = "text"

_TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".txt", ".py", ".csv", ".cfg", ".toml"}
_MODEL_FORMATS = {
    ".safetensors": ("safetensors", "safetensors"),
    ".pkl": ("pickle", "pickle.load"),
}

LICENSE = """MIT License

Copyright (c) 2026 The Tiny Model Authors

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.
"""

TRAIN_PY = '''"""Fine-tune the tiny model on the shards listed in config.yaml."""
import argparse

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained("hf-tiny-gpt2")
    training = TrainingArguments(output_dir="trainer-output", learning_rate=args.lr)
    Trainer(model=model, args=training).train()
    torch.save({"args": args, "model": model.state_dict()}, "checkpoints/last.pt")


if __name__ == "__main__":
    main()
'''

CONFIG_YAML = """model:
  name: tiny-gpt2
  n_layer: 2
  n_embd: 32
optim:
  lr: 3.0e-4
  betas: [0.9, 0.999]
data:
  shards: [shard-000.bin, shard-001.bin]
  seed: 1234
"""

NOTES = """run 17 notes
- lr 3e-4 diverged at step 1200, restarted from checkpoint-1000 with 1e-4
- loss 2.31 at step 2000 (was 2.45 on run 16)
- TODO: try batch 64 / grad accum 2
"""

README = """---
license: mit
library_name: transformers
---

# tiny-gpt2

A two-layer GPT-2 with random weights, for tests. Load it with
`AutoModelForCausalLM.from_pretrained("hf-tiny-gpt2")`.
"""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the libraries' progress bars, warnings and log lines while they write."""
    loggers = [logging.getLogger(n) for n in ("transformers", "lightning", "lightning.pytorch")]
    levels = [lg.level for lg in loggers]
    env = {"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build(directory: Path) -> list[Sample]:
    """Write the real-world folders into ``directory``; one benign sample per file."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with _quiet():
        model = _hugging_face(directory)
        _trainer(directory / "trainer-output", model)
        _lightning(directory / "lightning")
        _checkpoints(directory / "checkpoints")
    _repository(directory)
    return [_sample(directory, path) for path in sorted(directory.rglob("*")) if path.is_file()]


def _sample(root: Path, path: Path) -> Sample:
    name = path.relative_to(root).as_posix()
    suffix = path.suffix.lower()
    if suffix in _TEXT_SUFFIXES or path.name in {"LICENSE", ".gitignore"}:
        fmt, loader, what, expected = TEXT, "none", "text (no model loader opens it)", "skipped"
    elif suffix in _MODEL_FORMATS:
        fmt, loader = _MODEL_FORMATS[suffix]
        what, expected = f"{fmt} written by its library", "clean"
    else:  # .bin, .pt, .pth, .ckpt: torch.save, zip or (marked by its name) legacy
        fmt = "torch-legacy" if "legacy" in path.name else "torch-zip"
        loader, what, expected = "torch.load", "torch.save", "clean"
    return Sample(name, path, what, "", False, fmt, loader, part=PART, expected=expected)


def _tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    return GPT2LMHeadModel(config)


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + [f"w{i}" for i in range(124)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )


def _hugging_face(directory: Path) -> Any:
    """``save_pretrained`` of a tiny GPT-2 and its tokenizer, and the same model as .bin."""
    import torch

    model = _tiny_gpt2()
    folder = directory / "hf-tiny-gpt2"
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text(README)
    legacy = directory / "hf-tiny-gpt2-bin"
    model.config.save_pretrained(legacy)
    model.generation_config.save_pretrained(legacy)
    torch.save(model.state_dict(), legacy / "pytorch_model.bin")
    return model


def _trainer(output: Path, model: Any) -> None:
    """A real one-step Trainer run that saves its checkpoint folder."""
    import torch
    from transformers import Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset[dict[str, Any]]):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, index: int) -> dict[str, Any]:
            ids = (torch.arange(16) + index) % 128
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(
        output_dir=str(output),
        max_steps=1,
        save_steps=1,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=Tokens()).train()


def _lightning(root: Path) -> None:
    """A real one-epoch Lightning run: its checkpoint and CSV logger's files."""
    import lightning
    import torch
    from lightning.pytorch.loggers import CSVLogger

    class Regressor(lightning.LightningModule):
        def __init__(self, width: int = 8, lr: float = 0.01) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 1))

        def training_step(self, batch: Any, index: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])

    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=CSVLogger(str(root), name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=str(root),
    )
    trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=4))


def _checkpoints(folder: Path) -> None:
    """What training scripts torch.save beside their weights."""
    import torch
    from torch import nn
    from transformers.trainer_utils import IntervalStrategy

    folder.mkdir(parents=True, exist_ok=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    args = argparse.Namespace(lr=3e-4, batch_size=32, epochs=3, data="shards/", amp=True)
    torch.save({"args": args, "model": model.state_dict(), "epoch": 3}, folder / "last.pt")
    torch.save(model, folder / "whole_model.pt")
    legacy = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2}
    torch.save(legacy, folder / "legacy_checkpoint.pt", _use_new_zipfile_serialization=False)
    started = datetime.datetime(2026, 11, 21, 9, 30, tzinfo=datetime.timezone.utc)
    values = {
        "model": model.state_dict(),
        "data_dir": pathlib.PurePosixPath("/data/shards"),
        "output_dir": pathlib.PosixPath("/scratch/run-17"),
        "started": started,
        "elapsed": datetime.timedelta(hours=2, minutes=5),
        "date": started.date(),
        "save_strategy": IntervalStrategy.STEPS,
    }
    torch.save(values, folder / "paths_dates_enum.pt")
    metrics = {"step": [100, 200], "loss": [2.5, 2.25], "run": "run-17", "best": None}
    (folder / "metrics_proto0.pkl").write_bytes(pickle.dumps(metrics, protocol=0))


def _repository(root: Path) -> None:
    """The text a repository checkout holds next to the model folders."""
    for name, text in (
        ("LICENSE", LICENSE),
        ("train.py", TRAIN_PY),
        ("config.yaml", CONFIG_YAML),
        ("notes.txt", NOTES),
        ("requirements.txt", "torch>=2.3\ntransformers>=4.44\nlightning>=2.3\n"),
        ("README.md", README),
    ):
        (root / name).write_text(text)
