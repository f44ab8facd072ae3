"""Fixtures that build real model files: the generated benign and malicious corpus.

The corpus is built once per session (a few seconds) in a temporary folder, at
collection time, so that every sample becomes its own named test.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from benchmarks.scan.corpus import Sample, build_benign, build_malicious


class Corpus:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="trainguard-corpus-"))
        self.marker = self.root / "PAYLOAD-RAN"
        self.malicious = build_malicious(self.root / "malicious", self.marker)
        self.benign = build_benign(self.root / "benign")


_corpus: Corpus | None = None


def corpus() -> Corpus:
    global _corpus
    if _corpus is None:
        _corpus = Corpus()
    return _corpus


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for name, pick in (("malicious_sample", "malicious"), ("benign_sample", "benign")):
        if name in metafunc.fixturenames:
            samples: list[Sample] = getattr(corpus(), pick)
            metafunc.parametrize(name, samples, ids=[s.name for s in samples])


def pytest_unconfigure(config: pytest.Config) -> None:
    if _corpus is not None:
        shutil.rmtree(_corpus.root, ignore_errors=True)


@pytest.fixture(scope="session")
def marker() -> Path:
    """The file every malicious payload would create if it ever ran."""
    return corpus().marker


@pytest.fixture(scope="session")
def malicious() -> list[Sample]:
    return corpus().malicious


@pytest.fixture(scope="session")
def benign() -> list[Sample]:
    return corpus().benign


@pytest.fixture(autouse=True)
def _payload_never_ran(marker: Path):
    """Around every test in this folder: no payload has run."""
    assert not marker.exists(), "a malicious payload executed before this test"
    yield
    assert not marker.exists(), "a malicious payload executed"
