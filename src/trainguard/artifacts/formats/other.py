"""safetensors, the legacy PyTorch tar format, and formats recognised only to be refused."""

from __future__ import annotations

import io
import tarfile

from trainguard.artifacts.formats.pickles import analyse_stream, analyse_tail, itemsize_of
from trainguard.artifacts.interface import Analysis, FormatError
from trainguard.artifacts.pickle_analysis import Container, analyse_pickle
from trainguard.artifacts.safetensors_check import check_safetensors, is_safetensors
from trainguard.errors import Severity

MAX_TAR_MEMBERS = 64


class SafetensorsFormat:
    """safetensors holds no code: valid means safe, malformed means unverifiable."""

    name = "safetensors"

    def sniff(self, head: bytes, size: int) -> bool:
        return is_safetensors(head, size)

    def analyse(self, buf: memoryview, analysis: Analysis) -> None:
        check_safetensors(buf, analysis)


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

    name = "torch-tar"

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
            analysis.format = "tar"
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


# --- recognised, not supported -------------------------------------------------------


class Unsupported:
    """A format recognised by its magic bytes that this scanner does not analyse."""

    def __init__(self, name: str, magic: bytes, at: int = 0, why: str = "") -> None:
        self.name = name
        self.magic = magic
        self.at = at
        self.why = why

    def sniff(self, head: bytes, size: int) -> bool:
        return head[self.at : self.at + len(self.magic)] == self.magic

    def analyse(self, buf: memoryview, analysis: Analysis) -> None:
        analysis.supported = False
        analysis.add(Severity.INFO, "format", f"{self.name}: not supported{self.why}")


UNSUPPORTED = [
    Unsupported("hdf5", b"\x89HDF\r\n\x1a\n", why=" (Keras HDF5 files can hold Lambda-layer code)"),
    Unsupported("gguf", b"GGUF"),
    Unsupported("tflite", b"TFL3", at=4),
]
