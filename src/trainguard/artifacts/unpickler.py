"""The restricted unpickler ``trainguard.load`` rebuilds objects with, and what the
format handlers' loads share: storages rebuilt as views into the caller's private buffer.

Objects of classes outside the allowlist that the analysis accepts as data (see
docs/scan-policy.md) come back as :class:`InertObject` records, their modules never
imported, unless the caller names the classes in ``allow``.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from trainguard.artifacts.allowlist import caller_allows, reconstructible, rule_for
from trainguard.errors import UnsupportedFormatError

MapLocation = Any
PersistentLoad = Callable[[Any], Any]


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


def restorer(map_location: MapLocation) -> Callable[[Any, str], Any]:
    """Where a storage goes, as ``torch.load`` decides it from ``map_location``."""
    import torch.serialization

    get = getattr(torch.serialization, "_get_restore_location", None)
    if get is not None:
        restore: Callable[[Any, str], Any] = get(map_location)
        return restore
    if map_location is None:
        return torch.serialization.default_restore_location
    raise UnsupportedFormatError("map_location is not supported by this torch version")


def typed_storage(untyped: Any, storage_type: StorageType) -> Any:
    """``untyped`` seen as the dtype its storage class names."""
    import torch

    dtype = storage_type.dtype
    return torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
        wrap_storage=untyped, dtype=dtype, _internal=True
    )


def storage_view(data: bytearray, offset: int, size: int) -> Any:
    """An untyped storage over ``size`` bytes of ``data`` at ``offset`` (no copy)."""
    import torch

    if size == 0:
        return torch.UntypedStorage(0)  # type: ignore[no-untyped-call]
    return torch.frombuffer(data, dtype=torch.uint8, count=size, offset=offset).untyped_storage()


def validate_sparse() -> None:
    """Check the sparse tensors just rebuilt, as ``torch.load`` does."""
    import torch

    check = getattr(torch._utils, "_validate_loaded_sparse_tensors", None)
    if check is not None:
        check()
