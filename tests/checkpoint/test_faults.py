"""Signed checkpoints under hostile files and faults (issue 10).

A refused load changes nothing (model, optimizer, RNGs); every field of the signature block
is bound; hostile files and outputs (truncations, lying headers, nested JSON, FIFOs,
devices, read-only and full folders) give one-line ``CheckpointError``s, never a traceback,
a hang or a replaced device node.
"""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import signal
import stat
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.checkpoint.test_checkpoint import header, make_model, rewrite_header, trained
from tests.unprivileged import drop_file_privileges, permissions_mean_something
from trainguard import checkpoint
from trainguard.artifacts.convert import encode_tree
from trainguard.checkpoint import rng as _rng
from trainguard.checkpoint.signed_file import MANIFEST_KEY, SIGNATURE_KEY, Signer
from trainguard.checkpoint.signed_file import write as write_signed
from trainguard.errors import CheckpointError
from trainguard.integrity import keygen, signing
from trainguard.ledger import Ledger

GOLDEN = Path(__file__).parent / "golden"
SRC = str(Path(__file__).parents[2] / "src")


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return keygen(tmp_path / "owner")


def write_trees(path: Path, key: Path, trees: dict[str, Any], step: int = 3) -> None:
    """A genuine signed checkpoint holding exactly ``trees`` (what save() cannot be told to
    write: RNG states of the wrong kind, say)."""
    tensors: dict[str, Any] = {}
    structures: dict[str, Any] = {}
    for part, tree in trees.items():
        named, structures[part] = encode_tree(tree)
        tensors.update({f"{part}/{name}": t for name, t in named.items()})
    manifest = {"step": step, "data_position": None, "parts": structures, "run_id": None}
    write_signed(path, tensors, manifest, Signer(signing.load_private(key)))


# --- 1. a refused load changes nothing -------------------------------------------------


def live() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
    """The objects a job would load into: trained a step, so the optimizer has state."""
    model = make_model(seed=7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    model(torch.ones(2, 6)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.Generator().manual_seed(11)


def snapshot(model, optimizer, generator) -> dict[str, Any]:
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "python": random.getstate(),
        "numpy": copy.deepcopy(numpy.random.get_state()),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["model"].keys() == after["model"].keys()
    for name, tensor in before["model"].items():
        got = after["model"][name]
        assert got.dtype == tensor.dtype, name
        assert torch.equal(got, tensor), name
    want, got = before["optimizer"], after["optimizer"]
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for pid, state in want["state"].items():
        assert got["state"][pid].keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(got["state"][pid][key], value), (pid, key)
    assert after["python"] == before["python"]
    np_before, np_after = before["numpy"], after["numpy"]
    assert np_after[0] == np_before[0]
    assert numpy.array_equal(np_after[1], np_before[1])
    assert np_after[2:] == np_before[2:]
    assert torch.equal(after["torch"], before["torch"])
    assert torch.equal(after["generator"], before["generator"])


def _two_groups(path: Path, key: Path) -> None:
    model = make_model()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optimizer = torch.optim.AdamW([{"params": weights}, {"params": biases}], lr=0.1)
    checkpoint.save(path, model=model, optimizer=optimizer, key=key)


def _state_edit(change):
    def build(path: Path, key: Path) -> None:
        model, optimizer = trained()
        state = optimizer.state_dict()
        change(state)
        checkpoint.save(path, model=model, optimizer=state, key=key)

    return build


def _rng_edit(change, generators=None):
    def build(path: Path, key: Path) -> None:
        model, optimizer = trained()
        # the loader's state is there: each case breaks only the state it names
        state = _rng.capture(generators or {"loader": torch.Generator().manual_seed(2)})
        change(state)
        write_trees(path, key, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "rng": state})  # fmt: skip

    return build


def _model_edit(change):
    def build(path: Path, key: Path) -> None:
        model, optimizer = trained()
        state = model.state_dict()
        change(state)
        checkpoint.save(path, model=state, optimizer=optimizer, key=key)

    return build


def _plain(**options):
    def build(path: Path, key: Path) -> None:
        model, optimizer = trained()
        checkpoint.save(path, **{"model": model, "optimizer": optimizer, "key": key, **options})

    return build


def _set(mapping: dict, key: Any, value: Any) -> None:
    mapping[key] = value


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))


REFUSALS = {
    "optimizer with another number of param groups": _two_groups,
    "optimizer state tensor of the wrong shape": _state_edit(
        lambda s: _set(s["state"][0], "exp_avg", torch.zeros(5))
    ),
    "optimizer state for a parameter that does not exist": _state_edit(
        lambda s: _set(s["state"], 99, {"exp_avg": torch.zeros(3)})
    ),
    "optimizer group of another size": _state_edit(lambda s: s["param_groups"][0]["params"].pop()),
    "no optimizer state": _plain(optimizer=None),
    "no rng state": _plain(rng=False),
    "python rng state malformed": _rng_edit(lambda s: _set(s, "python", (3, (1, 2, 3), None))),
    "numpy rng state too short": _rng_edit(
        lambda s: _set(s, "numpy", ("MT19937", numpy.zeros(5, dtype=numpy.uint32), 0, 0, 0.0))
    ),
    "torch rng state of the wrong size": _rng_edit(
        lambda s: _set(s, "torch", torch.zeros(10, dtype=torch.uint8))
    ),
    "no state for the generator": _plain(),
    "generator state of the wrong size": _rng_edit(
        lambda s: _set(s["generators"], "loader", torch.zeros(7, dtype=torch.uint8))
    ),
    "model key missing": _model_edit(lambda s: s.pop("2.bias")),
    "model key extra": _model_edit(lambda s: _set(s, "9.weight", torch.zeros(2))),
    "model tensor of another shape": _model_edit(lambda s: _set(s, "2.bias", torch.zeros(4))),
    "model tensor of another dtype": _model_edit(lambda s: _set(s, "2.bias", s["2.bias"].double())),
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_refused_load_changes_nothing(tmp_path, keys, kind):
    """Everything is verified before anything is written: a checkpoint that does not fit
    the optimizer, the RNGs or the model leaves all of them exactly as they were."""
    path = tmp_path / "ckpt.safetensors"
    REFUSALS[kind](path, keys[0])
    model, optimizer, generator = live()
    before = snapshot(model, optimizer, generator)
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(
            path,
            model=model,
            optimizer=optimizer,
            public_key=keys[1],
            generators={"loader": generator},
        )
    assert "\n" not in str(refused.value)
    assert_same(before, snapshot(model, optimizer, generator))


@pytest.mark.parametrize("kind", ["bad signature", "truncated"])
def test_refused_file_changes_nothing(tmp_path, keys, kind):
    path = tmp_path / "ckpt.safetensors"
    _plain(generators={"loader": torch.Generator()})(path, keys[0])
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        _tamper(path)
    model, optimizer, generator = live()
    before = snapshot(model, optimizer, generator)
    with pytest.raises(CheckpointError):
        checkpoint.load(path, model=model, optimizer=optimizer, public_key=keys[1],
                        generators={"loader": generator})  # fmt: skip
    assert_same(before, snapshot(model, optimizer, generator))


def test_checkpoint_that_fits_still_restores_everything(tmp_path, keys):
    model, optimizer = trained()
    gen = torch.Generator().manual_seed(5)
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save(path, model=model, optimizer=optimizer, key=keys[0],
                    generators={"loader": gen})  # fmt: skip
    expected = torch.rand(3, generator=gen)
    target, target_opt, target_gen = live()
    checkpoint.load(path, model=target, optimizer=target_opt, public_key=keys[1],
                    generators={"loader": target_gen})  # fmt: skip
    assert torch.equal(torch.rand(3, generator=target_gen), expected)
    for name, tensor in model.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor)
    for pid, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(target_opt.state_dict()["state"][pid][key], value)


def test_adafactor_and_sgd_state_still_fit(tmp_path, keys):
    """Optimizer state whose tensors are not shaped like the parameter (Adafactor's
    factored second moments) or that is empty (SGD without momentum) still loads."""
    for cls in (torch.optim.Adafactor, torch.optim.SGD):
        model = make_model()
        optimizer = cls(model.parameters(), lr=0.01)
        model(torch.ones(2, 6)).sum().backward()
        optimizer.step()
        path = tmp_path / f"{cls.__name__}.safetensors"
        checkpoint.save(path, model=model, optimizer=optimizer, key=keys[0])
        target = make_model(seed=7)
        checkpoint.load(path, model=target, optimizer=cls(target.parameters(), lr=0.01),
                        public_key=keys[1])  # fmt: skip


def test_guard_refused_load_leaves_the_model(tmp_path, keys):
    import trainguard

    path = tmp_path / "ckpt.safetensors"
    _two_groups(path, keys[0])
    model = make_model(seed=7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard = trainguard.Guard(model, optimizer, run_dir=tmp_path / "run", owner_key=keys[0],
                             verify_env=False, seed=0, code_roots=[__file__])  # fmt: skip
    with pytest.raises(CheckpointError, match="param groups"):
        guard.load_checkpoint(path, fork=True)  # not of this run: a declared fork
    guard.close()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert [a.detector for a in guard.alerts] == ["checkpoint"]


# --- 2. every field of the signature block is bound ------------------------------------


def _owner_signed(tmp_path: Path, keys) -> Path:
    path = tmp_path / "owner.safetensors"
    model, optimizer = trained()
    checkpoint.save(path, model=model, optimizer=optimizer, step=3, key=keys[0])
    return path


def _run_signed(tmp_path: Path, keys) -> Path:
    path = tmp_path / "run.safetensors"
    model, optimizer = trained()
    with Ledger.create(tmp_path / "run", owner_key=keys[0], run_id="r") as ledger:
        checkpoint.save(path, model=model, optimizer=optimizer, step=3, ledger=ledger)
    return path


def _edit_signature(change):
    def edit(head: dict) -> None:
        block = json.loads(head["__metadata__"][SIGNATURE_KEY])
        text = change(block)
        head["__metadata__"][SIGNATURE_KEY] = (
            text
            if isinstance(text, str)
            else json.dumps(block, sort_keys=True, separators=(",", ":"))
        )

    return edit


def _certificate_of(tmp_path: Path, keys) -> dict:
    run = _run_signed(tmp_path / "other", keys)
    return json.loads(header(run)[0]["__metadata__"][SIGNATURE_KEY])["certificate"]


FIELD_EDITS = {
    "key_id changed": ("owner", _edit_signature(lambda b: _set(b, "key_id", "0" * 16))),
    "key_id changed (run key)": ("run", _edit_signature(lambda b: _set(b, "key_id", "f" * 16))),
    "certificate field added": (
        "run",
        _edit_signature(lambda b: _set(b["certificate"], "note", "harmless")),
    ),
    "certificate removed": ("run", _edit_signature(lambda b: _set(b, "certificate", None))),
    "field added to the block": ("owner", _edit_signature(lambda b: _set(b, "by", "mallory"))),
    "block reformatted": ("owner", _edit_signature(lambda b: json.dumps(b, indent=1))),
    "duplicate key_id": (
        "owner",
        _edit_signature(lambda b: json.dumps(b)[:-1] + ', "key_id": "' + "0" * 16 + '"}'),
    ),
    "metadata format changed": ("owner", lambda h: _set(h["__metadata__"], "format", "np")),
    "metadata format removed": ("owner", lambda h: h["__metadata__"].pop("format")),
}


@pytest.mark.parametrize("kind", sorted(FIELD_EDITS))
def test_signature_block_fields_are_bound(tmp_path, keys, kind):
    """Changing any field of the signature block (or the metadata around it) is refused."""
    which, change = FIELD_EDITS[kind]
    path = (_owner_signed if which == "owner" else _run_signed)(tmp_path, keys)
    rewrite_header(path, change)
    with pytest.raises(checkpoint.CheckpointVerificationError) as refused:
        checkpoint.load(path, public_key=keys[1], restore_rng=False)
    assert "\n" not in str(refused.value)


def test_certificate_added_to_an_owner_signed_checkpoint(tmp_path, keys):
    path = _owner_signed(tmp_path, keys)
    cert = _certificate_of(tmp_path, keys)
    rewrite_header(path, _edit_signature(lambda b: _set(b, "certificate", cert)))
    with pytest.raises(checkpoint.CheckpointVerificationError):
        checkpoint.load(path, public_key=keys[1], restore_rng=False)


def test_version_1_checkpoints_still_load():
    """Checkpoints written before the signature covered the whole block (format version 1)
    are still read: their unsigned fields are checked against what the signature binds."""
    for name in ("v1-owner.safetensors", "v1-run-key.safetensors"):
        torch.manual_seed(0)
        reference = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        done = checkpoint.load(GOLDEN / name, model=target, public_key=GOLDEN / "v1-owner.pub",
                               restore_rng=False)  # fmt: skip
        assert done.step == 1
        for a, b in zip(target.parameters(), reference.parameters(), strict=True):
            assert not torch.equal(a, b)  # the saved weights took one SGD step


V1_EDITS = [
    "key_id changed",
    "field added to the block",
    "metadata format changed",
    "certificate field added",
]


@pytest.mark.parametrize("kind", V1_EDITS)
def test_version_1_unsigned_fields_are_checked(tmp_path, kind):
    name = "v1-run-key.safetensors" if "certificate" in kind else "v1-owner.safetensors"
    path = tmp_path / name
    path.write_bytes((GOLDEN / name).read_bytes())
    rewrite_header(path, FIELD_EDITS[kind][1])
    with pytest.raises(checkpoint.CheckpointVerificationError):
        checkpoint.load(path, public_key=GOLDEN / "v1-owner.pub", restore_rng=False)


# --- 3. hostile files and outputs ----------------------------------------------------


@pytest.mark.slow
def test_truncated_at_every_cut(tmp_path, keys):
    path = _owner_signed(tmp_path, keys)
    data = path.read_bytes()
    _, start = header(path)
    # every byte of the length field and the header's start, then a stride through the
    # rest of the header (each cut there is the same failure) and through the tensor data
    cuts = [*range(256), *range(256, start + 64, 7), *range(start + 64, len(data), 61)]
    cut_path = tmp_path / "cut.safetensors"
    public = signing.load_public(keys[1])
    model = make_model(seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fd = os.open(cut_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for cut in cuts:
            # rewritten in place: reopening with O_TRUNC flushes on some file systems (slow)
            os.ftruncate(fd, 0)
            os.pwrite(fd, data[:cut], 0)
            with pytest.raises(CheckpointError) as refused:
                checkpoint.load(cut_path, model=model, public_key=public, restore_rng=False)
            assert "\n" not in str(refused.value), cut
    finally:
        os.close(fd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 100_000_001, 10**6, 0, 1, 7])
def test_header_length_that_lies(tmp_path, keys, length):
    path = _owner_signed(tmp_path, keys)
    data = path.read_bytes()
    path.write_bytes(length.to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError):
        checkpoint.load(path, public_key=keys[1], restore_rng=False)


def test_lying_tensor_sizes_allocate_nothing(tmp_path, keys):
    """A header declaring a 16 TiB tensor over a file of a few kilobytes is refused
    without allocating by the declared size."""
    path = _owner_signed(tmp_path, keys)

    def grow(head: dict) -> None:
        name = next(n for n in head if n != "__metadata__")
        begin = head[name]["data_offsets"][0]
        head[name] = {
            "dtype": "F32",
            "shape": [2**21, 2**21],
            "data_offsets": [begin, begin + 2**44],
        }

    rewrite_header(path, grow)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError):
            checkpoint.load(path, public_key=keys[1], restore_rng=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * path.stat().st_size + (1 << 20)


def _signed_metadata(key: Path, manifest_text: str) -> str:
    return json.dumps(Signer(signing.load_private(key)).signature_for(manifest_text.encode()))


def test_deeply_nested_manifest_signed_by_the_owner(tmp_path, keys):
    """Nesting the manifest 100,000 deep (even under a valid signature) is one line."""
    path = _owner_signed(tmp_path, keys)
    deep = "[" * 100_000 + "]" * 100_000

    def nest(head: dict) -> None:
        head["__metadata__"][MANIFEST_KEY] = deep
        head["__metadata__"][SIGNATURE_KEY] = _signed_metadata(keys[0], deep)

    rewrite_header(path, nest)
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(path, public_key=keys[1], restore_rng=False)
    assert "\n" not in str(refused.value)


def test_deeply_nested_signature_block(tmp_path, keys):
    path = _owner_signed(tmp_path, keys)
    rewrite_header(path, _edit_signature(lambda b: "[" * 100_000 + "]" * 100_000))
    with pytest.raises(CheckpointError):
        checkpoint.load(path, public_key=keys[1], restore_rng=False)


def test_duplicate_tensor_key_in_the_header(tmp_path, keys):
    path = _owner_signed(tmp_path, keys)
    head, start = header(path)
    body = path.read_bytes()[start:]
    name = next(n for n in head if n != "__metadata__")
    raw = json.dumps(head, separators=(",", ":"))
    raw = raw[:-1] + f",{json.dumps(name)}:{json.dumps(head[name])}}}"
    encoded = raw.encode() + b" " * (-len(raw) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + body)
    with pytest.raises(CheckpointError, match="duplicate"):
        checkpoint.load(path, public_key=keys[1], restore_rng=False)


def test_fifo_as_checkpoint_is_refused_without_hanging(tmp_path, keys):
    fifo = tmp_path / "ckpt.safetensors"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            checkpoint.load(fifo, public_key=keys[1], restore_rng=False)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # release the reader blocked in open() before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail("loading a FIFO blocked")
    assert len(outcome) == 1
    assert isinstance(outcome[0], CheckpointError), outcome
    assert "fifo" in str(outcome[0]).lower()


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_device_as_checkpoint_is_refused(keys, path):
    with pytest.raises(CheckpointError, match="character device"):
        checkpoint.load(path, public_key=keys[1], restore_rng=False)


def _special(tmp_path: Path, kind: str) -> Path:
    node = tmp_path / "out.safetensors"
    if kind == "fifo":
        os.mkfifo(node)
    else:
        try:
            os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")
    return node


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_output_that_is_not_a_file_is_not_replaced(tmp_path, keys, kind):
    node = _special(tmp_path, kind)
    mode = node.stat().st_mode
    with pytest.raises(CheckpointError, match="refusing to replace"):
        checkpoint.save(node, model=make_model(), key=keys[0])
    assert node.stat().st_mode == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "owner"]


def test_parent_that_is_a_file(tmp_path, keys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError) as refused:
        checkpoint.save(tmp_path / "file" / "c.safetensors", model=make_model(), key=keys[0])
    assert "\n" not in str(refused.value)


_SAVE_SCRIPT = """
import sys, torch
from trainguard import checkpoint
from trainguard.errors import CheckpointError
model = torch.nn.Linear(64, 64)
try:
    checkpoint.save(sys.argv[1], model=model, key=sys.argv[2])
except CheckpointError as exc:
    print("refused:", exc)
    sys.exit(3)
"""


def _save_in_subprocess(out: Path, key: Path, preexec) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run(
        [sys.executable, "-c", _SAVE_SCRIPT, str(out), str(key)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=preexec,
        env=env,
    )


def test_read_only_folder_on_save(tmp_path, keys):
    """Saving into a folder the user cannot write is one line, and leaves nothing."""
    why = permissions_mean_something()
    if why is not None:
        pytest.skip(why)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    result = _save_in_subprocess(folder / "c.safetensors", keys[0], drop_file_privileges)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("refused:")
    assert result.stdout.count("\n") == 1
    assert list(folder.iterdir()) == []


def _small_files() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_full_disk_on_save(tmp_path, keys):
    """A write that fails part-way (the file-size limit: EFBIG, as a full disk gives ENOSPC)
    is one line, and no temporary file is left."""
    folder = tmp_path / "full"
    folder.mkdir()
    result = _save_in_subprocess(folder / "c.safetensors", keys[0], _small_files)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("refused:")
    assert result.stdout.count("\n") == 1
    assert list(folder.iterdir()) == []


def test_full_tmpfs_on_save(tmp_path, keys):
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with pytest.raises(CheckpointError) as refused:
            checkpoint.save(folder / "c.safetensors", model=torch.nn.Linear(128, 128),
                            key=keys[0])  # fmt: skip
        assert "\n" not in str(refused.value)
        assert list(folder.iterdir()) == []
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_untrusted_signer_with_garbage_certificate(tmp_path, keys):
    """A stranger's signature with a certificate that is not JSON-shaped is one line."""
    path = _owner_signed(tmp_path, keys)
    stranger = Signer(Ed25519PrivateKey.generate())

    def forge(head: dict) -> None:
        block = stranger.signature_for(head["__metadata__"][MANIFEST_KEY].encode())
        block["certificate"] = {"seq": "x"}
        head["__metadata__"][SIGNATURE_KEY] = json.dumps(block)

    rewrite_header(path, forge)
    with pytest.raises(checkpoint.CheckpointSignatureError):
        checkpoint.load(path, public_key=keys[1], restore_rng=False)
