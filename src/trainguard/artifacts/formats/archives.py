"""ZIP containers: PyTorch checkpoints (any member ending in ``.pkl``) and NumPy ``.npz``.

Only the central directory, local headers and pickle members are read: the time to scan
does not grow with tensor bytes. Storage records named by the pickle are checked to
exist and to be large enough, from the directory alone.
"""

from __future__ import annotations

import io
import pickle
import zlib
from typing import Any

from trainguard.artifacts.budget import BudgetExceeded, MemoryBudget
from trainguard.artifacts.formats.numpy_files import NeedsWhole, analyse_npy
from trainguard.artifacts.formats.pickles import PickleFormat, analyse_tail, const, itemsize_of
from trainguard.artifacts.interface import Analysis, Format, FormatError, NotLoadable
from trainguard.artifacts.pickle_analysis import Container, PickleResult, analyse_pickle
from trainguard.artifacts.unpickler import (
    RestrictedUnpickler,
    StorageType,
    restorer,
    storage_view,
    typed_storage,
    validate_sparse,
)
from trainguard.artifacts.zipcheck import (
    ZipMember,
    find_eocd,
    parse_zip,
    read_member,
    torch_archive_prefix,
)
from trainguard.errors import Severity, UnsupportedFormatError

#: A pickle member larger than this (uncompressed) is not analysed: UNVERIFIABLE.
MAX_PICKLE_MEMBER = 1 << 30
#: How much of a compressed .npy member is inflated to read its header.
NPY_HEADER_PREFIX = 1 << 16

_KERAS_MARKERS = ("config.json", "model.weights.h5", "metadata.json")
#: Records torch.save writes besides data.pkl and the storages.
_TORCH_RECORDS = frozenset(
    {"version", ".format_version", ".storage_alignment", "byteorder", "serialization_id"}
)


class ZipFormat:
    """Any ZIP archive: dispatches to PyTorch or NumPy by what the members are."""

    name = Format.ZIP

    def sniff(self, head: bytes, size: int) -> bool:
        return head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06")

    def analyse(self, buf: memoryview, analysis: Analysis) -> None:
        members = parse_zip(buf, analysis)
        # PyTorch's reader looks names up ignoring ASCII case
        pickles = [m for m in members if m.name.lower().endswith(".pkl")]
        # numpy.load opens any ZIP as an npz and parses every member that starts with
        # the .npy magic as an array, whatever its name: in a checkpoint too
        chosen = {id(m) for m in pickles}
        arrays = [m for m in members if id(m) not in chosen and _starts_npy(buf, m, analysis)]
        if pickles:
            analysis.format = Format.TORCH_ZIP
            analyse_torch(buf, members, pickles, analysis)
            for member in arrays:
                analyse_npz_member(buf, member, analysis)
        elif arrays or any(m.name.endswith(".npy") for m in members):
            analysis.format = Format.NPZ
            for member in members:
                analyse_npz_member(buf, member, analysis)
        elif any(m.name.rsplit("/", 1)[-1] in _KERAS_MARKERS for m in members):
            analysis.format = Format.KERAS
            analysis.supported = False
            analysis.add(Severity.INFO, "format", "Keras archive: not supported by this scanner")
        else:
            analysis.supported = False
            analysis.add(Severity.INFO, "format", "ZIP archive with no pickle or array members")

    def load(self, data: bytearray, analysis: Analysis, map_location: Any) -> Any:
        if analysis.format is Format.TORCH_ZIP:
            return load_torch_zip(data, memoryview(data), map_location, analysis.budget)
        if analysis.format is Format.NPZ:
            from trainguard.artifacts import arrays

            return arrays.load_npz(memoryview(data), analysis.budget)
        raise NotLoadable


def _starts_npy(buf: memoryview, member: ZipMember, analysis: Analysis) -> bool:
    try:
        return member_prefix(buf, member, 6, analysis.budget.available) == b"\x93NUMPY"
    except FormatError:
        return False  # unreadable: the reading that needs it reports it


def analyse_torch(
    buf: memoryview, members: list[ZipMember], pickles: list[ZipMember], analysis: Analysis
) -> None:
    by_name = {m.name: m for m in members}
    prefix = torch_archive_prefix(members)
    folded = {m.name.lower() for m in members}
    if prefix is None or f"{prefix}/data.pkl".lower() not in folded:
        analysis.fail(
            FormatError(
                "PyTorch's reader would not find data.pkl under the first entry's folder "
                f"({prefix!r}): not loadable by torch.load"
            )
        )
    if any("/code/" in f"/{m.name.lower()}" for m in members):  # found ignoring case
        analysis.add(
            Severity.MEDIUM,
            "torchscript",
            "TorchScript archive: holds code that torch.jit.load compiles and runs",
        )
        from trainguard.artifacts.torchscript import describe_code

        describe_code(buf, members, analysis)  # what the code defines and calls (-v)
    referenced: set[str] = set()
    for member in pickles:
        try:
            # the inflated member is held while its pickle is simulated
            with analysis.budget.hold(member.size, "the pickle member", member=member.name):
                data = _pickle_bytes(buf, member, analysis)
                view = memoryview(data)
                result = analyse_pickle(
                    view, 0, analysis, member=member.name, allow_persistent=True
                )
                analyse_tail(view, result.end, analysis, member=member.name)
                view.release()
                del data
        except FormatError as exc:
            if exc.member is None:
                exc.member = member.name
            analysis.fail(exc)
            continue
        folder = member.name.rsplit("/", 1)[0] if "/" in member.name else ""
        referenced.update(check_storages(result, folder, by_name, analysis, member.name))
    chosen = {id(m) for m in pickles}
    for member in members:
        if id(member) in chosen or member.name in referenced:
            continue
        if member.name.rsplit("/", 1)[-1] not in _TORCH_RECORDS:
            analyse_stray(buf, member, analysis)


def _pickle_bytes(buf: memoryview, member: ZipMember, analysis: Analysis) -> bytes | bytearray:
    """A pickle member's bytes; one that fails its CRC is still analysed (PyTorch's reader
    loads it, Python's zipfile refuses it), the mismatch itself being a finding."""
    try:
        return read_member(buf, member, limit=MAX_PICKLE_MEMBER)
    except FormatError as exc:
        if "crc-32" not in str(exc):
            raise
        analysis.add(
            Severity.HIGH,
            "zip",
            "crc-32 mismatch: the member was altered after writing (PyTorch's reader loads "
            "it anyway, Python's zipfile refuses it)",
            member=member.name,
        )
        return read_member(buf, member, limit=MAX_PICKLE_MEMBER, check_crc=False)


def check_storages(
    result: PickleResult,
    folder: str,
    by_name: dict[str, ZipMember],
    analysis: Analysis,
    member: str,
) -> set[str]:
    """Every storage the pickle names must be a record big enough for it; returns their names."""
    names: set[str] = set()
    for ref in result.persistent_ids:
        pid = ref.pid.items if isinstance(ref.pid, Container) else []
        if len(pid) < 5 or const(pid[0]) != "storage":
            analysis.fail(
                FormatError(
                    "persistent id is not a storage reference", member=member, offset=ref.offset
                )
            )
            continue
        key, numel = const(pid[2]), const(pid[4])
        itemsize = itemsize_of(pid[1])
        name = f"{folder}/data/{key}" if folder else f"data/{key}"
        names.add(name)
        record = by_name.get(name)
        if record is None:
            analysis.fail(
                FormatError(
                    f"storage record data/{key} is missing", member=member, offset=ref.offset
                )
            )
        elif isinstance(numel, int) and itemsize is not None and record.size < numel * itemsize:
            analysis.fail(
                FormatError(
                    f"storage record data/{key} holds {record.size} bytes, "
                    f"{numel * itemsize} expected",
                    member=member,
                    offset=ref.offset,
                )
            )
    return names


def analyse_stray(buf: memoryview, member: ZipMember, analysis: Analysis) -> None:
    """A member torch.load never reads: noted, and analysed if it looks like a pickle,
    since other code may load it (a payload hidden beside the checkpoint)."""
    head = member_prefix(buf, member, 16, analysis.budget.available) if member.size else b""
    if not PickleFormat().sniff(head, member.size):
        analysis.add(Severity.INFO, "zip", "member not read by torch.load", member=member.name)
        return
    analysis.add(
        Severity.LOW,
        "zip",
        "member not read by torch.load, yet it looks like a pickle",
        member=member.name,
    )
    scratch = Analysis(Format.PICKLE, budget=analysis.budget)
    try:
        with analysis.budget.hold(member.size, "the member", member=member.name):
            data = read_member(buf, member, limit=MAX_PICKLE_MEMBER)
            analyse_tail(memoryview(data), 0, scratch, member=member.name)
    except BudgetExceeded as exc:
        analysis.fail(exc)  # a possible pickle too large to check: not passed unread
    except FormatError:
        pass  # not a pickle after all: only what it would do, if it were, matters here
    analysis.findings.extend(
        f for f in scratch.findings if f.detector != "parse" and f.severity >= Severity.MEDIUM
    )


def analyse_npz_member(buf: memoryview, member: ZipMember, analysis: Analysis) -> None:
    name = member.name
    try:
        head = member_prefix(buf, member, NPY_HEADER_PREFIX, analysis.budget.available)
        if not head.startswith(b"\x93NUMPY"):
            analysis.add(
                Severity.LOW,
                "npz",
                "member is not a .npy array (numpy.load returns its raw bytes)",
                member=name,
            )
            return
        analyse_npy(memoryview(head), analysis, member=name, size=member.size, full=False)
    except NeedsWhole:
        try:
            with analysis.budget.hold(member.size, "the object array", member=name):
                data = read_member(buf, member, limit=MAX_PICKLE_MEMBER)
                analyse_npy(memoryview(data), analysis, member=name, size=len(data), full=True)
        except FormatError as exc:
            if exc.member is None:
                exc.member = name
            analysis.fail(exc)
    except FormatError as exc:
        if exc.member is None:
            exc.member = name
        analysis.fail(exc)


def member_prefix(buf: memoryview, member: ZipMember, n: int, limit: int) -> bytes:
    """The first ``n`` uncompressed bytes of a member, without inflating the rest."""
    if member.method == 0:
        end = min(member.data_offset + member.compressed_size, member.data_offset + n)
        if end > len(buf):
            raise FormatError("member data runs past the end of the file", member=member.name)
        return bytes(buf[member.data_offset : end])
    if member.method == 8:
        raw = bytes(buf[member.data_offset : member.data_offset + min(member.compressed_size, n)])
        try:
            return zlib.decompressobj(-15).decompress(raw, n)
        except zlib.error as exc:
            raise FormatError(f"corrupt deflate data: {exc}", member=member.name) from exc
    # bz2 and lzma members are inflated whole, within what the memory budget leaves
    return bytes(read_member(buf, member, limit=limit)[:n])


def load_torch_zip(
    data: bytearray, buf: memoryview, map_location: Any, budget: MemoryBudget
) -> Any:
    """A ``torch.save`` zip checkpoint rebuilt from ``data``: stored records are views."""
    members = parse_zip(buf, Analysis(Format.ZIP))
    by_name = {m.name: m for m in members}
    prefix = torch_archive_prefix(members)
    order = by_name.get(f"{prefix}/byteorder")
    if order is not None and read_member(buf, order, limit=16).strip() not in (b"", b"little"):
        raise UnsupportedFormatError("big-endian checkpoints are not supported")
    restore = restorer(map_location)
    loaded: dict[str, Any] = {}

    def persistent_load(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError("unexpected persistent id")
        _, storage_type, key, location, numel = pid
        if key in loaded:
            return loaded[key]
        member = by_name.get(f"{prefix}/data/{key}")
        if member is None:
            raise FormatError(f"storage record data/{key} is missing")
        if not isinstance(storage_type, StorageType):
            raise pickle.UnpicklingError("persistent id without a storage type")
        nbytes = numel * storage_type.itemsize
        if nbytes > member.size:
            raise FormatError(f"storage record data/{key} is too short")
        if member.method == 0:
            untyped = storage_view(data, member.data_offset, nbytes)
        else:
            budget.reserve(member.size, f"storage record data/{key}")  # kept by the result
            raw = read_member(buf, member, limit=member.size)
            untyped = storage_view(raw if isinstance(raw, bytearray) else bytearray(raw), 0, nbytes)
        loaded[key] = typed_storage(restore(untyped, location), storage_type)
        return loaded[key]

    main = by_name[f"{prefix}/data.pkl"]
    # the pickle's bytes, and the objects built from its arguments (at most as many bytes)
    budget.reserve(2 * main.size, "data.pkl and what it builds")
    pkl = bytes(read_member(buf, main, limit=main.size))
    result = RestrictedUnpickler(io.BytesIO(pkl), persistent_load).load()
    validate_sparse()
    return result


def has_trailing_zip(buf: memoryview) -> bool:
    """True if a ZIP central directory sits at the end of a file that is not a ZIP."""
    return find_eocd(buf) is not None
