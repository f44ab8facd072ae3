"""Every malicious technique in the corpus is caught by scan and refused by load;
every benign file is SAFE and loads. Each sample is its own named test; its
``technique`` and ``reference`` fields say what the evasion is and where it was
published (see benchmarks/scan/corpus_malicious.py)."""

from __future__ import annotations

import pytest
import torch

import trainguard
from trainguard.artifacts.interface import Verdict
from trainguard.artifacts.loader import load_bytes

TORCH_FORMATS = {"torch-zip", "torch-legacy"}


def test_scan_catches(malicious_sample):
    report = trainguard.scan(malicious_sample.path)
    (file,) = report.files
    assert file.verdict in (Verdict.UNSAFE, Verdict.UNVERIFIABLE), (
        f"{malicious_sample.name} ({malicious_sample.technique}) scanned {file.verdict}"
    )
    assert not report.safe


def test_load_refuses(malicious_sample):
    with pytest.raises(trainguard.Error) as refused:
        trainguard.load(malicious_sample.path)
    assert isinstance(refused.value, trainguard.UnsafeCheckpointError | trainguard.CheckpointError)
    if isinstance(refused.value, trainguard.UnsafeCheckpointError):
        assert refused.value.findings, "a refusal must say what it refused"


def test_benign_is_safe(benign_sample):
    (file,) = trainguard.scan(benign_sample.path).files
    problems = [f.message for f in file.findings if f.severity >= trainguard.Severity.LOW]
    assert file.verdict is Verdict.SAFE, f"{benign_sample.name}: {problems}"


def test_benign_loads(benign_sample):
    if benign_sample.format in ("joblib", "torch-tar"):
        pytest.skip(f"{benign_sample.format} files are scanned, not loaded")
    loaded = trainguard.load(benign_sample.path)
    if benign_sample.format in TORCH_FORMATS:
        expected = torch.load(benign_sample.path, weights_only=True)
        assert_identical(loaded, expected)


def assert_identical(got: object, want: object, path: str = "") -> None:
    """Same structure, types, dtypes, shapes, strides and bytes; storage sharing kept."""
    assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert (got.dtype, got.shape, got.stride(), got.storage_offset()) == (
            want.dtype,
            want.shape,
            want.stride(),
            want.storage_offset(),
        ), path
        assert got.requires_grad == want.requires_grad, path
        if want.is_quantized:
            assert torch.equal(got.int_repr(), want.int_repr()), path
            assert (got.q_scale(), got.q_zero_point()) == (want.q_scale(), want.q_zero_point())
        else:
            assert bytes(got.untyped_storage()) == bytes(want.untyped_storage()), path
    elif isinstance(want, dict):
        assert list(got) == list(want), path  # type: ignore[call-overload]
        for key in want:
            assert_identical(got[key], want[key], f"{path}.{key}")  # type: ignore[index]
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), path  # type: ignore[arg-type]
        for i, (a, b) in enumerate(zip(got, want, strict=True)):  # type: ignore[call-overload]
            assert_identical(a, b, f"{path}.{i}")
    else:
        assert got == want, path


def test_tied_weights_stay_tied():
    import io

    weight = torch.randn(4, 4)
    buf = io.BytesIO()
    torch.save({"a": weight, "b": weight, "view": weight[1:]}, buf)
    loaded = load_bytes(bytearray(buf.getvalue()), "tied.pt")
    assert loaded["a"].data_ptr() == loaded["b"].data_ptr()
    assert loaded["view"].untyped_storage().data_ptr() == loaded["a"].untyped_storage().data_ptr()
