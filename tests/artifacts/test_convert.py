"""convert: safe load, then safetensors with the structure kept; round trips exactly."""

from __future__ import annotations

import json
import os
import shutil
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


# --- folders, sharded checkpoints, tied weights -----------------------------------------


class TiedLM(torch.nn.Module):
    """An embedding tied to the output head: two state-dict names, one storage."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)))


def _shards(folder, state: dict, split: int, names=None) -> None:
    """``state`` as two torch.save shards and a Hugging Face style index."""
    keys = list(state)
    names = names or [f"pytorch_model-0000{i}-of-00002.bin" for i in (1, 2)]
    parts = [keys[:split], keys[split:]]
    weight_map = {}
    for name, part in zip(names, parts, strict=True):
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 1, "note": "kept"}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny GPT-2 (tied embedding and head) saved as a .bin folder, a sharded copy with
    its index, a Trainer-style checkpoint subfolder, and the files around them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=32,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    root = tmp_path_factory.mktemp("model")
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    config.save_pretrained(root)
    torch.save(state, root / "pytorch_model.bin")
    (root / "README.md").write_text("# tiny\n\nA test model.\n")
    (root / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (root / "train.py").write_text("import torch\n\nprint(torch.__version__)\n")
    (root / "LICENSE").write_text("MIT License\n\nCopyright (c) the authors\n")
    sharded = root / "sharded"
    sharded.mkdir()
    config.save_pretrained(sharded)
    keys = list(state)  # the tied pair in the first shard: one storage within one file
    _shards(sharded, {k: state[k] for k in [*keys[:6], "lm_head.weight", *keys[6:-1]]}, 7)
    step = root / "checkpoint-2"
    step.mkdir()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), step / "optimizer.pt")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    torch.save(scheduler.state_dict(), step / "scheduler.pt")
    (step / "trainer_state.json").write_text('{"global_step": 2}\n')
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,), check_invariants=True)
    torch.save({"sparse": sparse}, step / "extra.pt")  # safe, but no safetensors form
    return root, transformers


def _tree(folder) -> dict:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_folder_converts_each_checkpoint_and_leaves_the_rest(model_folder, tmp_path, capsys):
    root, _ = model_folder
    before = _tree(root)
    out = tmp_path / "out"
    assert main(["convert", str(root), "-o", str(out), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert _tree(root) == before, "the input folder is never changed"
    assert sorted(_tree(out)) == [
        "checkpoint-2/optimizer.safetensors",
        "checkpoint-2/scheduler.safetensors",
        "model.safetensors",
        "sharded/model-00001-of-00002.safetensors",
        "sharded/model-00002-of-00002.safetensors",
        "sharded/model.safetensors.index.json",
    ]
    assert out.stat().st_mode & 0o777 != 0o700, "the output folder gets the umask's mode"
    [kept] = doc["kept"]
    assert kept["path"].endswith("extra.pt")
    assert "sparse" in kept["reason"] or "layout" in kept["reason"]
    skipped = {os.path.basename(p) for p in doc["skipped"]}
    assert {"README.md", "config.json", "train.py", "LICENSE", "trainer_state.json"} <= skipped
    assert doc["files"][0]["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    for name in ("pytorch_model.bin", "checkpoint-2/optimizer.pt", "checkpoint-2/scheduler.pt"):
        target = out / name.replace("pytorch_model.bin", "model.safetensors").replace(
            ".pt", ".safetensors"
        )
        _same_values(trainguard.load(target), torch.load(root / name, weights_only=True))
    index = json.loads((out / "sharded/model.safetensors.index.json").read_text())
    original = json.loads((root / "sharded/pytorch_model.bin.index.json").read_text())
    assert index["metadata"]["note"] == "kept"
    assert index["metadata"]["trainguard.aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert set(index["weight_map"]) == set(original["weight_map"]) - {"lm_head.weight"}
    stored = 0
    for tensor, shard in index["weight_map"].items():
        old = original["weight_map"][tensor].replace("pytorch_model", "model")
        assert shard == old.replace(".bin", ".safetensors")
        with safe_open(str(out / "sharded" / shard), framework="pt") as f:
            got = f.get_tensor(tensor)
        want = torch.load(root / "sharded" / original["weight_map"][tensor], weights_only=True)
        assert torch.equal(_bits(got), _bits(want[tensor]))
        assert got.dtype == want[tensor].dtype
        stored += got.numel() * got.element_size()
    assert index["metadata"]["total_size"] == stored


def test_transformers_loads_a_folder_converted_alongside(model_folder, tmp_path, capsys):
    """Written next to the originals (``-o`` the folder itself), then with the pickles
    removed, Hugging Face's own loader reads the result: one file and the sharded index."""
    root, transformers = model_folder
    folder = tmp_path / "model"
    shutil.copytree(root, folder)
    assert main(["convert", str(folder), "-o", str(folder)]) == 0
    err = capsys.readouterr().err
    assert "dropped lm_head.weight: an alias of transformer.wte.weight" in err
    assert "state['lm_head.weight'] = state['transformer.wte.weight']" in err
    assert main(["convert", str(folder), "-o", str(folder)]) == 2, "outputs exist now"
    assert "already exists (use --force" in capsys.readouterr().err
    assert main(["convert", str(folder), "-o", str(folder), "--force"]) == 0
    assert not list(folder.glob(".trainguard-convert-*")), "no staging folder left"
    for pickled in [*folder.glob("**/pytorch_model*.bin"), *folder.glob("**/*.bin.index.json")]:
        pickled.unlink()
    want = torch.load(root / "pytorch_model.bin", weights_only=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_pretrained(root))
    reference.load_state_dict(want)
    expected = reference.eval()(ids).logits
    for where in (folder, folder / "sharded"):
        model = transformers.GPT2LMHeadModel.from_pretrained(where).eval()
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        assert torch.equal(model(ids).logits, expected), where


def test_tied_weights_restore_with_plain_safetensors(tmp_path, capsys):
    """The documented recipe: ``load_file`` + ``load_state_dict(strict=False)`` on a model
    that ties the pair; on one that does not, the aliases from the metadata first."""
    from safetensors.torch import load_file

    torch.manual_seed(1)
    model = TiedLM()
    torch.save(model.state_dict(), tmp_path / "tied.pt")
    out = tmp_path / "tied.safetensors"
    assert main(["convert", str(tmp_path / "tied.pt"), "-o", str(out)]) == 0
    assert "dropped head.weight: an alias of embed.weight" in capsys.readouterr().err
    fresh = TiedLM()
    result = fresh.load_state_dict(load_file(out), strict=False)
    assert result.missing_keys == ["head.weight"]
    assert not result.unexpected_keys
    ids = torch.tensor([1, 5, 9])
    assert torch.equal(fresh(ids), model(ids))
    state = load_file(out)
    with safe_open(str(out), framework="pt") as f:
        aliases = json.loads(f.metadata().get("trainguard.aliases", "{}"))
    assert aliases == {"head.weight": "embed.weight"}
    for alias, target in aliases.items():
        state[alias] = state[target]
    untied = TiedLM(tied=False)
    untied.load_state_dict(state)  # strict: every key is back
    assert torch.equal(untied(ids), model(ids))


def test_unsafe_file_in_a_folder_refuses_the_whole_folder(malicious, marker, tmp_path, capsys):
    """One unsafe file (under any name), or one unsafe shard, refuses the whole folder:
    every such file is named in one run, and nothing is written anywhere."""
    sample = next(s for s in malicious if s.format == "torch-zip")
    folder = tmp_path / "model"
    (folder / "sharded").mkdir(parents=True)
    torch.save({"w": torch.ones(3)}, folder / "pytorch_model.bin")
    shutil.copy(sample.path, folder / "training_state.bin")
    _shards(folder / "sharded", {"a": torch.ones(2), "b": torch.zeros(2)}, 1)
    shutil.copy(sample.path, folder / "sharded" / "pytorch_model-00002-of-00002.bin")
    array = next(s for s in malicious if s.format == "npy")  # never converted, still refused
    shutil.copy(array.path, folder / "embeddings.npy")
    unsafe = [
        str(folder / "embeddings.npy"),
        str(folder / "training_state.bin"),
        str(folder / "sharded/pytorch_model-00002-of-00002.bin"),
    ]
    before = _tree(folder)
    out = tmp_path / "out"
    assert main(["convert", str(folder), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    for path in unsafe:
        assert f"refused: {path} is not safe to load" in err
    assert "nothing written: 3 file(s)" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert main(["convert", str(folder), "-o", str(folder), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert sorted(doc["refused_files"]) == sorted(unsafe)
    assert _tree(folder) == before, "nothing written next to the originals either"
    assert not marker.exists()


def _bad_sharded(folder, case: str) -> None:
    state = {"a": torch.ones(2), "b": torch.zeros(3), "c": torch.arange(4.0)}
    _shards(folder, state, 2)
    index_path = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    if case == "missing shard":
        (folder / "pytorch_model-00002-of-00002.bin").unlink()
    elif case == "no index entry":
        del index["weight_map"]["b"]
    elif case == "entry not in shard":
        index["weight_map"]["z"] = "pytorch_model-00002-of-00002.bin"
    elif case == "shard not a checkpoint":
        (folder / "pytorch_model-00002-of-00002.bin").write_text('{"not": "weights"}\n')
    elif case == "shard outside the folder":
        index["weight_map"]["c"] = "../elsewhere.bin"
    elif case == "not an index":
        index = {"weights": {}}
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing shard", "shard pytorch_model-00002-of-00002.bin is listed but missing"),
        ("no index entry", "has no entry for 'b', held in shard pytorch_model-00001"),
        ("entry not in shard", "lists 'z' in shard pytorch_model-00002-of-00002.bin, which"),
        ("shard not a checkpoint", "shard pytorch_model-00002-of-00002.bin is not a pickle"),
        ("shard outside the folder", "shard '../elsewhere.bin' is not a file name in the"),
        ("not an index", "not a checkpoint index (no weight_map"),
    ],
)
def test_bad_sharded_input_is_one_line_and_writes_nothing(case, message, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save({"x": torch.ones(1)}, folder / "head.pt")  # converts fine: must not be written
    _bad_sharded(folder, case)
    before = _tree(folder)
    for out in (tmp_path / "out", folder):
        assert main(["convert", str(folder), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert err.count("\n") == 1
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert _tree(folder) == before
    index = str(folder / "pytorch_model.bin.index.json")
    assert main(["convert", index, "-o", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_two_inputs_for_one_output_are_refused(tmp_path, capsys):
    torch.save({"w": torch.ones(1)}, tmp_path / "a.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "a.bin")
    assert main(["convert", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    assert "would both be written as a.safetensors" in capsys.readouterr().err
    assert main(["convert", str(tmp_path), "-o", str(tmp_path / "all.safetensors")]) == 2
    assert "converts into a folder of files; name a folder" in capsys.readouterr().err


def test_a_written_file_that_reads_back_different_is_refused(tmp_path):
    """The read-back check itself, on a real file: what safetensors returns is compared
    with what it was given, name by name, dtype, shape and bytes."""
    from safetensors.torch import save_file

    from trainguard.artifacts.convert import verify_written

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "t.safetensors")
    verify_written(tmp_path / "t.safetensors", tensors, "t")
    flipped = tensors["a"].clone()
    flipped.view(torch.int32)[0, 0] ^= 1  # one bit of the lowest mantissa
    for changed, what in [
        ({**tensors, "a": flipped}, "other bytes"),
        ({**tensors, "b": torch.ones(2)}, "another dtype"),
        ({**tensors, "a": tensors["a"].reshape(3, 2)}, "another shape"),
        ({**tensors, "c": torch.ones(1)}, "other tensors"),
    ]:
        with pytest.raises(trainguard.CheckpointError, match=what):
            verify_written(tmp_path / "t.safetensors", changed, "t")
