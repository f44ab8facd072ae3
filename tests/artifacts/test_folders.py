"""``scan`` on real folders: what transformers, a Trainer, Lightning and a checkout leave.

Each folder is built once per module by the real libraries (tiny random-init models,
nothing downloaded): a ``save_pretrained`` folder with safetensors and one with a
``pytorch_model.bin``, both with a real tokenizer and a README; a Trainer's output after
two steps saved at every step; a Lightning run after a two-step fit; a copy of this
repository's sources and docs, committed with git. Each must scan clean (exit 0) with
every file that is not a model file skipped. Then the same folder with one malicious
file dropped in under an ordinary name must exit 1 naming it; the test proves the
payload real by loading the file with the victim's loader (the marker appears) after
checking that the scan never created it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy
import pytest
import torch

from trainguard.cli import main

ROOT = Path(__file__).resolve().parents[2]
#: The names the libraries give their model files; everything else must be skipped.
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _hf(root: Path) -> dict[str, Path]:
    transformers = pytest.importorskip(
        "transformers", reason="the hf extra (pip install -e '.[hf]') builds these folders"
    )
    from tokenizers import Tokenizer, models, pre_tokenizers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    vocab = {f"w{i}": i for i in range(62)} | {"[UNK]": 62, "[PAD]": 63}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]"
    )
    out = {}
    for name in ("hf-safetensors", "hf-bin"):
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "README.md").write_text("# tiny-gpt2\n\nA two-layer GPT-2 for tests.\n")
        out[name] = folder
    # transformers 5 writes safetensors only; the .bin it wrote before (and that hubs
    # still hold) is torch.save of the state dict, which is what this writes
    (out["hf-bin"] / "model.safetensors").unlink()
    torch.save(model.state_dict(), out["hf-bin"] / "pytorch_model.bin")

    class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.randint(0, 62, (8,))
            return {"input_ids": ids, "labels": ids}

    args = transformers.TrainingArguments(
        output_dir=str(root / "trainer"),
        max_steps=2,
        save_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=Tokens()).train()
    out["trainer"] = root / "trainer"
    return out


def _lightning(root: Path) -> Path:
    pl = pytest.importorskip(
        "lightning.pytorch", reason="the lightning extra builds the Lightning folder"
    )

    class Tiny(pl.LightningModule):  # type: ignore[misc]
        def __init__(self, hidden: int = 8, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(4, hidden)

        def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2
    )
    folder = root / "lightning"
    trainer = pl.Trainer(
        max_steps=2,
        default_root_dir=str(folder),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=pl.loggers.CSVLogger(str(folder)),
    )
    trainer.fit(Tiny(), data)
    return folder


def _checkout(root: Path) -> Path:
    folder = root / "checkout"
    shutil.copytree(ROOT / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "docs", folder / "docs")
    for name in ("pyproject.toml", "README.md", "Makefile"):
        shutil.copy(ROOT / name, folder / name)
    (folder / "LICENSE").write_text("MIT License\n\nCopyright (c) 2026 the authors\n")
    (folder / "requirements.txt").write_text("certifi==2024.2.2\ntorch>=2.1\n")
    (folder / "config.yaml").write_text("checkpoint_dir: runs/\nlr: 0.1\nclass_path: x.Y\n")
    (folder / "src" / "trainguard" / "empty.py").touch()
    if shutil.which("git"):  # .git's objects are zlib streams that must be skipped too
        git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t"]
        for argv in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
            subprocess.run([*git, *argv], check=True, capture_output=True, timeout=60)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    root = tmp_path_factory.mktemp("folders")
    built: dict[str, Path | str] = {"checkout": _checkout(root)}
    try:
        built |= _hf(root)
    except pytest.skip.Exception as missing:  # the other folders are still tested
        built |= dict.fromkeys(("hf-safetensors", "hf-bin", "trainer"), str(missing))
    try:
        built["lightning"] = _lightning(root)
    except pytest.skip.Exception as missing:
        built["lightning"] = str(missing)
    return built


def _folder(folders: dict[str, Path | str], name: str) -> Path:
    """The folder built for ``name``, or a skip saying which extra is missing."""
    found = folders[name]
    if isinstance(found, str):
        pytest.skip(found)
    return found


def _scan(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str]]:
    """Exit status and {path: verdict} of ``scan --format json ARGV``."""
    status = main(["scan", "--format", "json", *argv])
    document = json.loads(capsys.readouterr().out)
    assert document["errors"] == []
    return status, {f["path"]: f["verdict"] for f in document["files"]}


def _expected(folder: Path) -> dict[str, str]:
    """SAFE for the model files the libraries wrote, SKIPPED for everything else."""
    return {
        str(p): "SAFE" if p.name.endswith(MODEL_SUFFIXES) else "SKIPPED"
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("name", ["hf-safetensors", "hf-bin", "trainer", "lightning", "checkout"])
def test_a_real_folder_scans_clean_with_its_other_files_skipped(name, folders, capsys):
    folder = _folder(folders, name)
    status, verdicts = _scan([str(folder)], capsys)
    expected = _expected(folder)
    assert verdicts == expected
    assert "SAFE" in verdicts.values() or name == "checkout"
    assert status == 0


def test_a_trainer_folder_with_its_training_args_scans_clean(folders, capsys):
    """``training_args.bin`` is a pickled TrainingArguments dataclass: data, not code
    (docs/scan-policy.md): SAFE, with a note listing its classes."""
    status, verdicts = _scan([str(_folder(folders, "trainer"))], capsys)
    assert [v for p, v in verdicts.items() if p.endswith("training_args.bin")] == ["SAFE"] * 2
    assert status == 0


# --- the same folders, one malicious file dropped in -----------------------------------


def _protocol0(marker: Path) -> bytes:
    """Plain ASCII text, and a pickle whose load opens (creates) ``marker``."""
    return f"cbuiltins\nopen\n(V{marker}\nVw\ntR.".encode()


class _Opens:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (self.marker, "w")


def _torch_zip(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"weight": torch.ones(2), "extra": _Opens(marker)}, buf)
    return buf.getvalue()


def _npy_object(marker: Path) -> bytes:
    buf = io.BytesIO()
    numpy.save(buf, numpy.array([_Opens(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _load_torch(path: Path) -> None:
    torch.load(path, weights_only=False)


def _load_npy(path: Path) -> None:
    numpy.load(path, allow_pickle=True)


def _load_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        pickle.load(f)  # noqa: S301  (the victim's load, on a harmless payload)


Make = Callable[[Path], bytes]
Load = Callable[[Path], None]
DROPS: dict[str, tuple[str, Make, Load]] = {
    "hf-safetensors": ("notes.txt", _protocol0, _load_pickle),
    "hf-bin": ("config.json.bak", _torch_zip, _load_torch),
    "trainer": ("checkpoint-2/special_tokens_map.json", _npy_object, _load_npy),
    "lightning": ("lightning_logs/version_0/hparams.yaml.orig", _torch_zip, _load_torch),
    "checkout": ("docs/notes.md", _protocol0, _load_pickle),
}


@pytest.mark.parametrize("name", sorted(DROPS))
def test_one_malicious_file_dropped_in_makes_the_scan_fail_naming_it(
    name, folders, tmp_path, capsys
):
    folder = tmp_path / name
    shutil.copytree(_folder(folders, name), folder, symlinks=True)
    relative, make, load = DROPS[name]
    marker = tmp_path / "PAYLOAD-RAN"
    evil = folder / relative
    evil.write_bytes(make(marker))

    status, verdicts = _scan([str(folder)], capsys)
    assert status == 1
    assert verdicts.pop(str(evil)) == "UNSAFE"
    assert "UNSAFE" not in verdicts.values() or name == "trainer"
    assert not marker.exists(), "the scan ran the payload"
    assert main(["scan", str(folder)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("UNSAFE") and str(evil) in line for line in lines)
    assert not marker.exists(), "the scan ran the payload"

    cwd = os.getcwd()
    try:
        load(evil)  # the victim's loader runs it: the sample is a real attack
    except Exception:  # noqa: S110  (some payloads break the load after they ran)
        pass
    finally:
        os.chdir(cwd)
    assert marker.exists(), "the payload is not real: the victim's loader did not run it"
