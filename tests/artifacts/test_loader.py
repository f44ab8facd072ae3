"""The safe loader: reads the file once, rebuilds from the bytes it checked."""

from __future__ import annotations

import io
import os
import pickle
import threading
import time

import numpy as np
import pytest
import torch

import trainguard


def test_a_fifo_is_read_once_so_the_file_cannot_be_swapped(tmp_path):
    """Time-of-check vs time-of-use: a loader that scans a path and then hands the path
    to another reader would open it twice. A FIFO serves benign bytes on the first open
    and a payload on any later one."""
    marker = tmp_path / "SWAPPED-PAYLOAD-RAN"
    benign = io.BytesIO()
    torch.save({"w": torch.ones(3)}, benign)
    payload = pickle.dumps(_Payload(str(marker)), protocol=2)
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    opened = []

    def serve(data: bytes, wait: float) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails until a reader opens
            except OSError:
                time.sleep(0.01)
                continue
            os.set_blocking(fd, True)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            opened.append(len(data))
            return

    def writer() -> None:
        serve(benign.getvalue(), 10)
        time.sleep(0.3)  # let the first reader finish and close
        serve(payload, 2)  # only a loader that opens the path again gets this

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    loaded = trainguard.load(fifo)
    thread.join(5)
    assert torch.equal(loaded["w"], torch.ones(3))
    assert len(opened) == 1, "the loader opened the path more than once"
    assert not marker.exists()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_map_location_moves_storages(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    loaded = trainguard.load(path, map_location="meta")
    assert loaded["w"].device.type == "meta"
    loaded = trainguard.load(path, map_location=torch.device("cpu"))
    assert torch.equal(loaded["w"], torch.arange(4.0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_map_location_cuda(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    loaded = trainguard.load(path, map_location="cuda")
    assert loaded["w"].is_cuda
    assert torch.equal(loaded["w"].cpu(), torch.arange(4.0))


def test_numpy_files_load_like_numpy(tmp_path):
    arrays = {
        "f": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4),
        "i": np.arange(6, dtype=np.int64),
        "F": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "s": np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]),
    }
    for key, value in arrays.items():
        np.save(tmp_path / f"{key}.npy", value)
        got = trainguard.load(tmp_path / f"{key}.npy")
        assert (got.dtype, got.shape) == (value.dtype, value.shape)
        np.testing.assert_array_equal(got, value)
    np.savez_compressed(tmp_path / "all.npz", **arrays)
    got = trainguard.load(tmp_path / "all.npz")
    assert set(got) == set(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(got[key], value)


def test_object_array_of_plain_values_loads(tmp_path):
    value = np.array([1, "two", 3.0, None], dtype=object)
    np.save(tmp_path / "o.npy", value, allow_pickle=True)
    got = trainguard.load(tmp_path / "o.npy")
    assert list(got) == list(value)


def test_plain_pickle_of_plain_values_loads(tmp_path):
    state = {"lr": 0.1, "betas": (0.9, 0.99), "step": 5, "names": ["a", "b"], "raw": b"\x00"}
    path = tmp_path / "state.pkl"
    path.write_bytes(pickle.dumps(state, protocol=2))
    assert trainguard.load(path) == state


def test_tensor_pickled_without_torch_save_is_refused(tmp_path):
    """``pickle.dumps(tensor)`` stores each storage as ``torch.storage._load_from_bytes``,
    which calls ``torch.load(weights_only=False)`` on nested bytes: a full unsafe load."""
    path = tmp_path / "state.pkl"
    path.write_bytes(pickle.dumps({"w": torch.randn(2, 2)}, protocol=4))
    with pytest.raises(trainguard.UnsafeCheckpointError, match="_load_from_bytes"):
        trainguard.load(path)


def test_refusal_names_the_global(tmp_path):
    path = tmp_path / "evil.pkl"
    marker = tmp_path / "RAN"
    path.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    with pytest.raises(trainguard.UnsafeCheckpointError) as refused:
        trainguard.load(path)
    assert "io.open" in str(refused.value)  # builtins.open pickles as io.open
    assert any("io.open" in f.message for f in refused.value.findings)
    assert not marker.exists()
