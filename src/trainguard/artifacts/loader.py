"""The safe loader: ``trainguard.load``.

The file is read once into private memory; the static analysis runs on those bytes and,
only if it finds nothing, a restricted unpickler rebuilds the object from the *same*
bytes (no second read of the path, so the file cannot be swapped in between). The
unpickler's ``find_class`` admits only the allowlist, so even a gap in the analysis
could not reach a callable outside it. Tensors are views into the private buffer, as
``torch.load`` reads each record into memory.

Objects of classes outside the allowlist that the analysis accepts as data (see
docs/scan-policy.md) come back as :class:`InertObject` records, their modules never
imported, unless the caller names the classes in ``allow``: then the real classes are
imported and rebuilt.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from trainguard._io import describe_mode, display, read_stream_capped, reason
from trainguard.artifacts.allowlist import allowing, caller_allows, reconstructible, rule_for
from trainguard.artifacts.budget import DEFAULT_MAX_MEMORY, MemoryBudget
from trainguard.artifacts.formats.pickles import LEGACY_MAGIC, storage_itemsizes
from trainguard.artifacts.interface import Analysis, FormatError, Verdict
from trainguard.artifacts.pickle_analysis import analyse_pickle
from trainguard.artifacts.scanner import analyse_buffer
from trainguard.artifacts.zipcheck import parse_zip, read_member, torch_archive_prefix
from trainguard.errors import (
    CheckpointError,
    InputError,
    Severity,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    UsageError,
)

MapLocation = Any
PersistentLoad = Callable[[Any], Any]


def read_private(path: str | os.PathLike[str], budget: MemoryBudget | None = None) -> bytearray:
    """The whole file, read once into memory we own (a FIFO works too: it is read once).

    Its size is reserved in ``budget`` before anything is allocated; a FIFO is read up to
    what the budget leaves. A device, a socket or a folder is refused from its ``stat``,
    before it is opened.
    """
    budget = budget if budget is not None else MemoryBudget()
    shown = display(path)
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise InputError(f"{shown}: is a directory (load takes one file)")
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
            raise InputError(f"{shown}: is {describe_mode(info.st_mode)}, not a file")
        with open(path, "rb", buffering=0) as f:
            info = os.fstat(f.fileno())
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
                raise InputError(f"{shown}: is {describe_mode(info.st_mode)}, not a file")
            if stat.S_ISFIFO(info.st_mode):
                data = bytearray(read_stream_capped(f, budget.available, shown))
                budget.reserve(len(data), "the file")
                return data
            if info.st_size > budget.available:
                raise CheckpointError(
                    f"{shown}: the file is {info.st_size} bytes, above the {budget.available} "
                    f"bytes the {budget.limit}-byte memory budget leaves (--max-memory)"
                )
            budget.reserve(info.st_size, "the file")
            data = bytearray(info.st_size)
            view = memoryview(data)
            filled = 0
            while filled < len(data):
                n = f.readinto(view[filled:])
                if not n:
                    break
                filled += n
            view.release()
            del data[filled:]
            if f.read(1):  # it grew while we read: what we checked would not be what it is
                raise InputError(f"{shown}: the file changed while it was read")
            return data
    except IsADirectoryError as exc:
        raise InputError(f"{shown}: is a directory (load takes one file)") from exc
    except OSError as exc:
        raise InputError(f"{shown}: cannot read: {reason(exc)}") from exc


@dataclass(frozen=True)
class InertObject:
    """An object the file rebuilds from a class that was not imported: its data only.

    ``cls`` is the class's qualified name (``module.Name``); ``state`` the attributes the
    file gives it (``None`` if none), ``args`` the value an enum member is looked up by.
    Pass ``allow=[cls]`` to :func:`load` to get the real object instead.
    """

    cls: str
    args: tuple[Any, ...] = ()
    state: Any = None


class _InertClass:
    """Stands in for a class that is not imported; rebuilding it makes an InertObject."""

    def __init__(self, qualified: str, *, callable_: bool) -> None:
        self.qualified = qualified
        self.callable = callable_

    def rebuild(self, args: tuple[Any, ...] = ()) -> InertObject:
        return InertObject(self.qualified, tuple(args))

    def __call__(self, *args: Any) -> InertObject:
        if not self.callable:  # the analysis refuses such a call first
            raise pickle.UnpicklingError(f"{self.qualified} may not be called")
        return self.rebuild(args)


def load(
    path: str | os.PathLike[str],
    map_location: MapLocation = None,
    *,
    max_memory: int | None = None,
    allow: Iterable[str] | None = None,
) -> Any:
    """Load a model file without executing code from it. See :func:`trainguard.load`."""
    name = os.fspath(path)
    budget = MemoryBudget(DEFAULT_MAX_MEMORY if max_memory is None else max_memory)
    data = read_private(name, budget)
    return load_bytes(data, display(name), map_location=map_location, budget=budget, allow=allow)


def load_bytes(
    data: bytearray,
    name: str,
    map_location: MapLocation = None,
    *,
    budget: MemoryBudget | None = None,
    allow: Iterable[str] | None = None,
) -> Any:
    """Analyse ``data`` and, if it is safe, rebuild its object from the same bytes.

    ``budget`` (1 GiB when not given) bounds what the analysis and the rebuild allocate
    beyond ``data`` itself. Classes named in ``allow`` (``module.Name``) are trusted:
    imported and rebuilt for real; other classes outside the allowlist that the file
    rebuilds as plain data come back as :class:`InertObject` records.
    """
    try:
        trusted = allowing(allow)
    except ValueError as exc:
        raise UsageError(f"allow: {exc}") from exc
    with trusted:
        return _load_bytes(data, name, map_location, budget)


def _load_bytes(
    data: bytearray, name: str, map_location: MapLocation, budget: MemoryBudget | None
) -> Any:
    budget = budget if budget is not None else MemoryBudget()
    buf = memoryview(data)
    analysis = analyse_buffer(buf, budget)
    verdict = analysis.verdict
    if verdict is Verdict.UNSUPPORTED:
        raise UnsupportedFormatError(f"{name}: {analysis.format} files are not supported")
    if verdict is not Verdict.SAFE:
        refused = [f for f in analysis.findings if f.severity >= Severity.MEDIUM]
        raise UnsafeCheckpointError(name, refused or analysis.findings)
    try:
        return _dispatch(analysis, data, buf, name, map_location)
    except (CheckpointError, InputError):
        raise
    except FormatError as exc:
        raise CheckpointError(f"{name}: cannot rebuild the checkpoint: {exc}") from exc
    except MemoryError as exc:
        raise CheckpointError(f"{name}: out of memory while rebuilding the checkpoint") from exc
    except Exception as exc:  # the bytes passed analysis but do not rebuild: fail closed
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{name}: cannot rebuild the checkpoint: {detail}") from exc


def _dispatch(
    analysis: Analysis, data: bytearray, buf: memoryview, name: str, map_location: MapLocation
) -> Any:
    fmt = analysis.format
    if fmt == "torch-zip":
        return _load_torch_zip(data, buf, map_location, analysis.budget)
    if fmt == "torch-legacy":
        return _load_torch_legacy(data, buf, map_location)
    if fmt == "torch-tar":
        return _load_torch_tar(data, buf, map_location)
    if fmt == "pickle":
        end = analyse_pickle(buf, 0, Analysis("pickle")).end
        return RestrictedUnpickler(io.BytesIO(buf[:end])).load()
    if fmt in ("npy", "npz", "safetensors"):
        from trainguard.artifacts import arrays

        return arrays.load_array_file(fmt, data, buf, map_location, analysis.budget)
    raise UnsupportedFormatError(f"{name}: {fmt} files can be scanned but not loaded")


def _check_array_state(inst: Any, state: Any) -> None:
    """Refuse an ``ndarray.__setstate__`` state that does not describe its own data.

    numpy trusts it: an object array whose state says 123 items but carries a list of 2
    makes numpy read past the list and crash the process (numpy 2.4), so the state is
    checked here, before numpy sees it.
    """
    import numpy

    if not isinstance(inst, numpy.ndarray):
        return
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise pickle.UnpicklingError("array state is not a 4- or 5-tuple")
    shape, dtype, _fortran, raw = state[-4:]
    if not isinstance(shape, tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise pickle.UnpicklingError(f"array state has a bad shape {shape!r:.80}")
    if not isinstance(dtype, numpy.dtype):
        raise pickle.UnpicklingError("array state has no dtype")
    count = 1
    for n in shape:
        count *= n
    if dtype.hasobject:
        if not isinstance(raw, list) or len(raw) != count:
            items = len(raw) if isinstance(raw, list) else "no"
            raise pickle.UnpicklingError(f"object array of shape {shape} carries {items} items")
    elif not isinstance(raw, (bytes, bytearray)) or len(raw) != count * dtype.itemsize:
        raise pickle.UnpicklingError(f"array of shape {shape} does not carry its bytes")


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler whose ``find_class`` admits only the allowlist.

    The pure-Python unpickler, so that BUILD can be checked before an object's own
    ``__setstate__`` sees the state (:func:`_check_array_state`); the pickles it reads are
    small (tensor bytes live outside them).
    """

    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(pickle._Unpickler.dispatch)

    def _load_build(self) -> None:
        stack = self.stack  # type: ignore[attr-defined]
        if len(stack) >= 2:
            _check_array_state(stack[-2], stack[-1])
        self.load_build()  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _load_build

    # Objects rebuilt as data from classes that are not imported: records, not calls.

    def _load_build_record(self) -> None:
        stack = self.stack  # type: ignore[attr-defined]
        if len(stack) >= 2 and isinstance(stack[-2], InertObject):
            state = stack.pop()
            if stack[-1].state is not None:
                raise pickle.UnpicklingError("second BUILD on a rebuilt object")
            object.__setattr__(stack[-1], "state", state)
            return
        self._load_build()

    def _load_newobj(self) -> None:
        stack = self.stack  # type: ignore[attr-defined]
        if len(stack) >= 2 and isinstance(stack[-2], _InertClass):
            args = stack.pop()
            stack[-1] = stack[-1].rebuild() if not args else _refuse(stack[-1])
            return
        self.load_newobj()  # type: ignore[attr-defined]

    def _load_newobj_ex(self) -> None:
        stack = self.stack  # type: ignore[attr-defined]
        if len(stack) >= 3 and isinstance(stack[-3], _InertClass):
            kwargs, args = stack.pop(), stack.pop()
            stack[-1] = stack[-1].rebuild() if not (args or kwargs) else _refuse(stack[-1])
            return
        self.load_newobj_ex()  # type: ignore[attr-defined]

    def _load_reduce(self) -> None:
        stack = self.stack  # type: ignore[attr-defined]
        if (
            len(stack) >= 2
            and any(stack[-2] is f for f in _RECONSTRUCTORS)
            and isinstance(stack[-1], tuple)
            and stack[-1]
            and isinstance(stack[-1][0], _InertClass)
        ):
            args = stack.pop()
            stack[-1] = args[0].rebuild()
            return
        self.load_reduce()  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _load_build_record
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.REDUCE[0]] = _load_reduce

    def __init__(self, file: io.BytesIO, persistent: PersistentLoad | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle

        mapped = _compat_pickle.NAME_MAPPING.get((module, name))
        if mapped is None:
            mapped = (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        qualified = f"{mapped[0]}.{mapped[1]}"
        if caller_allows(qualified):
            return super().find_class(module, name)
        rule = rule_for(qualified)
        if rule is None and reconstructible(qualified):
            return _InertClass(qualified, callable_=False)
        if rule is None:
            raise pickle.UnpicklingError(f"global {qualified} is not allowed")
        if rule.record:
            return _InertClass(qualified, callable_=True)
        if name.endswith("Storage") and module in ("torch", "torch.cuda", "torch.storage"):
            # As torch.load does: a storage class only says which dtype the bytes hold.
            return StorageType(name)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent ids are not allowed here")
        return self._persistent(pid)


_RECONSTRUCTORS = (
    copyreg._reconstructor,  # type: ignore[attr-defined]
    copyreg.__newobj__,  # type: ignore[attr-defined]
    copyreg.__newobj_ex__,  # type: ignore[attr-defined]
)


def _refuse(stand_in: _InertClass) -> Any:
    raise pickle.UnpicklingError(f"{stand_in.qualified} rebuilt with arguments")


class StorageType:
    """Stands in for a legacy storage class in a persistent id: just its dtype."""

    def __init__(self, name: str) -> None:
        import torch

        kind = getattr(torch, name, None)
        if name in ("UntypedStorage", "TypedStorage") or kind is None:
            self.dtype = torch.uint8
        else:
            self.dtype = kind._dtype
        self.itemsize = self.dtype.itemsize


def _restorer(map_location: MapLocation) -> Callable[[Any, str], Any]:
    import torch.serialization

    get = getattr(torch.serialization, "_get_restore_location", None)
    if get is not None:
        restore: Callable[[Any, str], Any] = get(map_location)
        return restore
    if map_location is None:
        return torch.serialization.default_restore_location
    raise UnsupportedFormatError("map_location is not supported by this torch version")


def _typed(untyped: Any, storage_type: StorageType) -> Any:
    import torch

    dtype = storage_type.dtype
    return torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
        wrap_storage=untyped, dtype=dtype, _internal=True
    )


def _view(data: bytearray, offset: int, size: int) -> Any:
    import torch

    if size == 0:
        return torch.UntypedStorage(0)  # type: ignore[no-untyped-call]
    return torch.frombuffer(data, dtype=torch.uint8, count=size, offset=offset).untyped_storage()


def _load_torch_zip(
    data: bytearray, buf: memoryview, map_location: MapLocation, budget: MemoryBudget
) -> Any:
    members = parse_zip(buf, Analysis("zip"))
    by_name = {m.name: m for m in members}
    prefix = torch_archive_prefix(members)
    order = by_name.get(f"{prefix}/byteorder")
    if order is not None and read_member(buf, order, limit=16).strip() not in (b"", b"little"):
        raise UnsupportedFormatError("big-endian checkpoints are not supported")
    restore = _restorer(map_location)
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
            untyped = _view(data, member.data_offset, nbytes)
        else:
            budget.reserve(member.size, f"storage record data/{key}")  # kept by the result
            raw = read_member(buf, member, limit=member.size)
            untyped = _view(raw if isinstance(raw, bytearray) else bytearray(raw), 0, nbytes)
        loaded[key] = _typed(restore(untyped, location), storage_type)
        return loaded[key]

    main = by_name[f"{prefix}/data.pkl"]
    # the pickle's bytes, and the objects built from its arguments (at most as many bytes)
    budget.reserve(2 * main.size, "data.pkl and what it builds")
    pkl = bytes(read_member(buf, main, limit=main.size))
    result = RestrictedUnpickler(io.BytesIO(pkl), persistent_load).load()
    _validate_sparse()
    return result


def _load_torch_legacy(data: bytearray, buf: memoryview, map_location: MapLocation) -> Any:
    import torch

    bounds = []
    pos = 0
    for _ in range(5):
        end = analyse_pickle(buf, pos, Analysis("legacy"), allow_persistent=True).end
        bounds.append((pos, end))
        pos = end
    head = [RestrictedUnpickler(io.BytesIO(buf[a:b])).load() for a, b in bounds[:3]]
    if head[0] != LEGACY_MAGIC or head[1] != 1001:
        raise UnsupportedFormatError(f"legacy protocol {head[1]!r} is not supported")
    if not head[2].get("little_endian", True):
        raise UnsupportedFormatError("big-endian checkpoints are not supported")
    keys = RestrictedUnpickler(io.BytesIO(buf[bounds[4][0] : bounds[4][1]])).load()
    main_pickle = analyse_pickle(buf, bounds[3][0], Analysis("legacy"), allow_persistent=True)
    itemsizes = storage_itemsizes(main_pickle)
    records: dict[str, tuple[int, int]] = {}  # key -> (data offset, element count)
    for key in keys:
        numel = int.from_bytes(buf[pos : pos + 8], "little", signed=True)
        records[key] = (pos + 8, numel)
        if key not in itemsizes:
            raise FormatError(f"storage {key!r} has no known element size")
        pos += 8 + numel * itemsizes[key]
    restore = _restorer(map_location)
    roots: dict[str, Any] = {}

    def persistent_load(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError("unexpected persistent id")
        _, storage_type, root_key, location, _numel, view = pid
        if not isinstance(storage_type, StorageType):
            raise pickle.UnpicklingError("persistent id without a storage type")
        itemsize = storage_type.itemsize
        if root_key not in roots:
            offset, count = records[root_key]
            roots[root_key] = _typed(
                restore(_view(data, offset, count * itemsize), location), storage_type
            )
        root = roots[root_key]
        if view is None:
            return root
        _view_key, view_offset, view_size = view
        start = view_offset * itemsize
        part = root._untyped_storage[start : start + view_size * itemsize]
        return torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
            wrap_storage=part, dtype=root.dtype, _internal=True
        )

    main = buf[bounds[3][0] : bounds[3][1]]
    result = RestrictedUnpickler(io.BytesIO(main), persistent_load).load()
    _validate_sparse()
    return result


def _tar_members(buf: memoryview) -> dict[str, tuple[int, int]]:
    import tarfile

    from trainguard.artifacts.formats.other import _View

    members: dict[str, tuple[int, int]] = {}
    with tarfile.open(fileobj=_View(buf), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                members[info.name] = (info.offset_data, info.size)
    return members


def _load_torch_tar(data: bytearray, buf: memoryview, map_location: MapLocation) -> Any:
    """The pre-1.0 tar format, read as torch's ``legacy_load`` reads it: storages (each a
    record and its bytes), views of them, tensors over them, then the pickle, whose
    persistent ids are the tensors' and storages' keys."""
    import torch

    members = _tar_members(buf)
    restore = _restorer(map_location)
    objects: dict[int, Any] = {}

    def next_pickle(start: int, end: int) -> tuple[Any, int]:
        stop = analyse_pickle(buf[:end], start, Analysis("tar")).end
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
        objects[key] = _typed(restore(_view(data, pos + 8, nbytes), location), storage_type)
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
    _validate_sparse()
    return result


def _validate_sparse() -> None:
    import torch

    check = getattr(torch._utils, "_validate_loaded_sparse_tensors", None)
    if check is not None:
        check()
