"""safetensors, the legacy PyTorch tar format, and formats recognised only to be refused."""

from __future__ import annotations

import io
import pickle
import tarfile
from typing import Any

from trainguard.artifacts.formats.pickles import analyse_stream, analyse_tail, itemsize_of
from trainguard.artifacts.interface import Analysis, Format, FormatError, NotLoadable
from trainguard.artifacts.pickle_analysis import Container, analyse_pickle
from trainguard.artifacts.safetensors_check import check_safetensors, is_safetensors
from trainguard.artifacts.unpickler import (
    RestrictedUnpickler,
    StorageType,
    restorer,
    storage_view,
    typed_storage,
    validate_sparse,
)
from trainguard.errors import Severity

MAX_TAR_MEMBERS = 64


class SafetensorsFormat:
    """safetensors holds no code: valid means safe, malformed means unverifiable."""

    name = Format.SAFETENSORS

    def sniff(self, head: bytes, size: int) -> bool:
        return is_safetensors(head, size)

    def analyse(self, buf: memoryview, analysis: Analysis) -> None:
        check_safetensors(buf, analysis)

    def load(self, data: bytearray, analysis: Analysis, map_location: Any) -> Any:
        from trainguard.artifacts import arrays

        return arrays.load_safetensors(data, memoryview(data), map_location)


class _View(io.RawIOBase):
    """A read-only file over a memoryview, so tarfile reads headers without a copy."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        # RawIOBase.read allocates ``size`` bytes before reading: a tar header declaring a
        # gigabyte of pax data must cost what the file holds, not what it claims
        left = max(0, len(self.buf) - self.pos)
        n = left if size is None or size < 0 else min(size, left)
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return data

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(target), len(self.buf) - self.pos))
        target[:n] = self.buf[self.pos : self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: len(self.buf)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


class TorchTarFormat:
    """The oldest PyTorch format: a tar of sys_info, pickle, storages and tensors."""

    name = Format.TORCH_TAR

    def sniff(self, head: bytes, size: int) -> bool:
        if len(head) >= 262 and head[257:262] == b"ustar":
            return True
        # torch.load tries tarfile first, which also reads pre-POSIX (v7) headers with no
        # magic at all: a first block whose checksum holds is a tar to it
        if len(head) < 512 or not any(head[:100]):
            return False
        try:
            tarfile.TarInfo.frombuf(head[:512], "utf-8", "surrogateescape")
        except (tarfile.HeaderError, ValueError):
            return False
        return True

    def analyse(self, buf: memoryview, analysis: Analysis) -> None:
        members: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(fileobj=_View(buf), mode="r:") as tar:
                for count, info in enumerate(tar):
                    if count >= MAX_TAR_MEMBERS:
                        raise FormatError("too many tar members for a PyTorch checkpoint")
                    if not info.isfile():
                        analysis.add(
                            Severity.MEDIUM,
                            "tar",
                            f"non-file tar member ({info.type!r})",
                            member=info.name,
                        )
                        continue
                    if info.name in members:
                        analysis.add(Severity.HIGH, "tar", "duplicate tar member", member=info.name)
                    members[info.name] = (info.offset_data, info.size)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise FormatError(f"unreadable tar: {exc}") from exc
        if not {"pickle", "storages", "tensors"} <= members.keys():
            analysis.format = Format.TAR
            analysis.supported = False
            analysis.add(Severity.INFO, "format", "tar archive that is not a PyTorch checkpoint")
            return
        for name, (start, size) in members.items():
            if start + size > len(buf):
                analysis.fail(FormatError("tar member runs past the end", member=name))
                continue
            view = buf[start : start + size]
            try:
                if name == "pickle":  # its persistent ids name the tensors (legacy_load)
                    main = analyse_pickle(view, 0, analysis, member=name, allow_persistent=True)
                    analyse_tail(view, main.end, analysis, member=name)
                elif name == "sys_info":
                    analyse_stream(view, analysis, member=name)
                elif name == "storages":
                    _storages(view, analysis)
                elif name == "tensors":
                    _tensors(view, analysis)
                else:
                    analysis.add(Severity.MEDIUM, "tar", "unexpected tar member", member=name)
            except FormatError as exc:
                if exc.member is None:
                    exc.member = name
                analysis.fail(exc)

    def load(self, data: bytearray, analysis: Analysis, map_location: Any) -> Any:
        if analysis.format is not Format.TORCH_TAR:
            raise NotLoadable
        return load_torch_tar(data, memoryview(data), map_location)


def _count(buf: memoryview, pos: int, analysis: Analysis, member: str) -> tuple[int, int]:
    result = analyse_pickle(buf, pos, analysis, member=member)
    count = result.root.value if hasattr(result.root, "value") else None
    if not isinstance(count, int) or count < 0:
        raise FormatError("expected a count", member=member, offset=pos)
    return count, result.end


def _storages(buf: memoryview, analysis: Analysis) -> None:
    count, pos = _count(buf, 0, analysis, "storages")
    for _ in range(count):
        record = analyse_pickle(buf, pos, analysis, member="storages")
        items = record.root.items if isinstance(record.root, Container) else []
        itemsize = itemsize_of(items[2]) if len(items) == 3 else None
        if itemsize is None:
            raise FormatError(
                "storage record without a storage type", member="storages", offset=pos
            )
        pos = record.end
        numel = int.from_bytes(buf[pos : pos + 8], "little", signed=True)
        pos += 8 + numel * itemsize
        if numel < 0 or pos > len(buf):
            raise FormatError("storage data runs past the end", member="storages", offset=pos)
    views = analyse_pickle(buf, pos, analysis, member="storages")
    analyse_tail(buf, views.end, analysis, member="storages")


def _tensors(buf: memoryview, analysis: Analysis) -> None:
    count, pos = _count(buf, 0, analysis, "tensors")
    for _ in range(count):
        pos = analyse_pickle(buf, pos, analysis, member="tensors").end
        ndim = int.from_bytes(buf[pos : pos + 4], "little", signed=True)
        pos += 8 + 16 * ndim + 8
        if ndim < 0 or pos > len(buf):
            raise FormatError("tensor record runs past the end", member="tensors", offset=pos)
    analyse_tail(buf, pos, analysis, member="tensors")


def _tar_members(buf: memoryview) -> dict[str, tuple[int, int]]:
    import tarfile

    members: dict[str, tuple[int, int]] = {}
    with tarfile.open(fileobj=_View(buf), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                members[info.name] = (info.offset_data, info.size)
    return members


def load_torch_tar(data: bytearray, buf: memoryview, map_location: Any) -> Any:
    """The pre-1.0 tar format, read as torch's ``legacy_load`` reads it: storages (each a
    record and its bytes), views of them, tensors over them, then the pickle, whose
    persistent ids are the tensors' and storages' keys."""
    import torch

    members = _tar_members(buf)
    restore = restorer(map_location)
    objects: dict[int, Any] = {}

    def next_pickle(start: int, end: int) -> tuple[Any, int]:
        stop = analyse_pickle(buf[:end], start, Analysis(Format.TORCH_TAR)).end
        return RestrictedUnpickler(io.BytesIO(buf[start:stop])).load(), stop

    start, size = members["storages"]
    end = start + size
    count, pos = next_pickle(start, end)
    for _ in range(count):
        (key, location, storage_type), pos = next_pickle(pos, end)
        if not isinstance(storage_type, StorageType):
            raise pickle.UnpicklingError("storage record without a storage type")
        numel = int.from_bytes(buf[pos : pos + 8], "little", signed=True)
        nbytes = numel * storage_type.itemsize
        if numel < 0 or pos + 8 + nbytes > end:
            raise FormatError("storage data runs past the end")
        objects[key] = typed_storage(
            restore(storage_view(data, pos + 8, nbytes), location), storage_type
        )
        pos += 8 + nbytes
    views, pos = next_pickle(pos, end)
    for target, root_key, offset, numel in views:
        root = objects[root_key]
        itemsize = root.element_size()
        part = root._untyped_storage[offset * itemsize : (offset + numel) * itemsize]
        objects[target] = torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
            wrap_storage=part, dtype=root.dtype, _internal=True
        )

    start, size = members["tensors"]
    end = start + size
    count, pos = next_pickle(start, end)
    for _ in range(count):
        (key, storage_id, _kind), pos = next_pickle(pos, end)
        storage = objects[storage_id]
        ndim = int.from_bytes(buf[pos : pos + 4], "little", signed=True)
        if ndim < 0 or pos + 16 + 16 * ndim > end:
            raise FormatError("tensor record runs past the end")
        words = [
            int.from_bytes(buf[p : p + 8], "little", signed=True)
            for p in range(pos + 8, pos + 16 + 16 * ndim, 8)
        ]
        sizes, strides, offset = words[:ndim], words[ndim : 2 * ndim], words[-1]
        objects[key] = torch.empty((0,), dtype=storage.dtype).set_(
            storage._untyped_storage, offset, sizes, strides
        )
        pos += 16 + 16 * ndim

    def persistent_load(pid: Any) -> Any:
        if isinstance(pid, tuple):
            raise pickle.UnpicklingError("module source records are not supported")
        return objects[int(pid)]

    start, size = members["pickle"]
    result = RestrictedUnpickler(io.BytesIO(buf[start : start + size]), persistent_load).load()
    validate_sparse()
    return result


# --- recognised, not supported -------------------------------------------------------


class Unsupported:
    """A format recognised by its magic bytes that this scanner does not analyse."""

    def __init__(self, name: Format, magic: bytes, at: int = 0, why: str = "") -> None:
        self.name = name
        self.magic = magic
        self.at = at
        self.why = why

    def sniff(self, head: bytes, size: int) -> bool:
        return head[self.at : self.at + len(self.magic)] == self.magic

    def analyse(self, buf: memoryview, analysis: Analysis) -> None:
        analysis.supported = False
        analysis.add(Severity.INFO, "format", f"{self.name}: not supported{self.why}")

    def load(self, data: bytearray, analysis: Analysis, map_location: Any) -> Any:
        raise NotLoadable


UNSUPPORTED = [
    Unsupported(
        Format.HDF5, b"\x89HDF\r\n\x1a\n", why=" (Keras HDF5 files can hold Lambda-layer code)"
    ),
    Unsupported(Format.GGUF, b"GGUF"),
    Unsupported(Format.TFLITE, b"TFL3", at=4),
]
