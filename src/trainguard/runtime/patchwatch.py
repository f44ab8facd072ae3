"""The patch watch: torch's (and trainguard's own) functions as they were at start.

A watch-list of functions is snapshotted when the guard starts: each namespace entry's
identity and, for Python functions, the code, defaults and what the closure holds. At
each check :meth:`PatchWatch.changes` reports every replacement once.

Reading ``func.__code__`` or ``__defaults__`` is an audited operation (each read calls
every Python audit hook in the process), so a scan of some two thousand functions costs
milliseconds. The check first asks, in a few C-level calls, whether anything the scan
reads differs at all from the last state the scan saw (:class:`_Layout`); only when
something does (even something harmless) does the exact per-function scan run, and it
alone decides what is reported.
"""

from __future__ import annotations

import gc
import operator
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat
from typing import Any

_WATCHED_MODULES = (
    "torch",
    "torch.nn.functional",
    "torch.optim.adam",
    "torch.optim.adamw",
    "torch.optim.sgd",
    "torch.optim.optimizer",
    "torch.nn.utils.clip_grad",
    "torch.distributed.distributed_c10d",
    "torch.utils.data._utils.collate",
    "torch.autograd",
)
_WATCHED_CLASSES = (
    "torch.Tensor",
    "torch.nn.Module",
    "torch.optim.Optimizer",
    "torch.optim.AdamW",
    "torch.optim.Adam",
    "torch.optim.SGD",
    "torch.utils.data.DataLoader",
    "torch.utils.data.dataloader._BaseDataLoaderIter",
    "torch.utils.data.dataloader._SingleProcessDataLoaderIter",
    "torch.utils.data.dataloader._MultiProcessingDataLoaderIter",
    "torch.utils.data.DistributedSampler",
    "torch.utils.data.RandomSampler",
    "torch.nn.parallel.DistributedDataParallel",
)
_REEXPORTS = {
    "torch.distributed": ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "barrier"),
    "torch": ("manual_seed", "seed", "set_rng_state", "get_rng_state"),
}


def resolve(dotted: str) -> Any:
    """The object at a dotted path, importing modules along the way."""
    import importlib

    parts = dotted.split(".")
    obj: Any = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        obj = getattr(obj, part, None) or importlib.import_module(".".join(parts[: i + 1]))
    return obj


def _code_of(obj: Any) -> Any:
    func = getattr(obj, "__func__", obj)
    return getattr(func, "__code__", None)


@dataclass(frozen=True)
class _Seen:
    owner: Any
    name: str
    obj: Any
    code: Any

    @property
    def space(self) -> Any:
        return vars(self.owner) if isinstance(self.owner, type) else None


#: one watched name: (class namespace or None, owner, name, object, its function, the
#: function's code or None, the function's defaults and closure contents or None)
_Entry = tuple[Any, Any, str, Any, Any, Any, "tuple[Any, ...] | None"]


class _Layout:
    """Where everything the exact scan reads is found without reading it attribute by
    attribute (each ``__code__``, ``__defaults__`` or ``__kwdefaults__`` read is an audited
    event): a few C-level calls return it all, as lists compared by identity.

    * namespaces: each watched name's entry, by ``operator.itemgetter`` over the class's
      or module's ``__dict__`` (a deleted name raises ``KeyError``). A module is read
      through its ``__dict__`` only while its class is ``types.ModuleType`` itself: a
      module class of its own could answer ``getattr`` with something else.
    * functions: ``gc.get_referents`` of every watched Python function gives its code,
      defaults, keyword defaults and closure tuple (and its name, doc, ``__dict__``...).
    * closures: ``gc.get_referents`` of every cell gives what the cell holds.

    Each function's and each cell's referents are followed by a private marker, so that
    a slot emptied in one function and filled in another cannot shift the rest into
    line. Comparison is by identity (``operator.is_``): ``==`` would call the ``__eq__``
    of whatever was put in place, and one that answers ``True`` would hide it. Names
    this cannot read exactly (a module of its own class, a name a module answers from
    ``__getattr__``, a non-Python function with a ``__code__``) are scanned exactly at
    every check (``loose``).
    """

    def __init__(self, entries: list[_Entry]) -> None:
        self.loose: list[_Entry] = []
        self._modules: list[Any] = []
        names: dict[int, tuple[Any, list[str]]] = {}
        funcs: list[Any] = []
        cells: list[Any] = []
        self._mark = (object(),)
        for entry in entries:
            space, owner, name, obj, func, code, parts = entry
            if space is None:
                space = vars(owner) if type(owner) is types.ModuleType else None
                if space is None or hasattr(types.ModuleType, name) or space.get(name) is not obj:
                    self.loose.append(entry)
                    continue
                if all(m is not owner for m in self._modules):
                    self._modules.append(owner)
            elif code is not None and parts is None:
                self.loose.append(entry)
                continue
            # one read per owner (each vars(cls) is a new view of the same namespace)
            names.setdefault(id(owner), (space, []))[1].append(name)
            if parts is not None:
                funcs += (func, self._mark)
                for cell in func.__closure__ or ():
                    cells += (cell, self._mark)
        # a name twice over: itemgetter of one name returns the entry, not a 1-tuple
        self._getters = [
            (space, operator.itemgetter(*found, found[0])) for space, found in names.values()
        ]
        self._funcs, self._cells = funcs, cells

    def state(self) -> list[list[Any]] | None:
        """All the scan reads, in a fixed order; None when a name is gone or a module's
        class changed (the exact scan then decides)."""
        if not all(map(operator.is_, map(type, self._modules), repeat(types.ModuleType))):
            return None
        entries: list[Any] = []
        try:
            for space, getter in self._getters:
                entries += getter(space)
        except KeyError:
            return None
        return [entries, gc.get_referents(*self._funcs), gc.get_referents(*self._cells)]


def _identical(now: list[list[Any]], then: list[list[Any]]) -> bool:
    return all(
        len(a) == len(b) and not any(map(operator.is_not, a, b))
        for a, b in zip(now, then, strict=True)
    )


class PatchWatch:
    """Identity and code of every watched function, as at start."""

    def __init__(
        self,
        extra_classes: tuple[type, ...] = (),
        *,
        modules: tuple[str, ...] = _WATCHED_MODULES,
        classes: tuple[str, ...] = _WATCHED_CLASSES,
        reexports: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self._modules, self._classes = modules, classes
        self._reexports = _REEXPORTS if reexports is None else reexports
        self._seen: list[_Seen] = []
        self._reported: set[tuple[int, str]] = set()
        self._class_keys: list[tuple[type, frozenset[str]]] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # walking torch's namespaces touches deprecated names
            self._snapshot(extra_classes)
        # defaults and closures as at start (a change before the first check counts too)
        self._fast: list[_Entry] = [
            (
                seen.space,
                seen.owner,
                seen.name,
                seen.obj,
                _func_of(seen.obj),
                seen.code,
                _parts(_func_of(seen.obj)),
            )
            for seen in self._seen
        ]
        self._layout = _Layout(self._fast)
        #: the state the exact scan last saw (None: it has not run yet)
        self._base: list[list[Any]] | None = None
        #: how many times the exact scan of every watched function ran at a check
        self.scans = 0
        # the snapshot's own state is the first baseline, once a scan confirms it (the
        # first check is then as cheap as the others)
        try:
            now = self._layout.state()
            if not any(self._differs(entry)[0] for entry in self._fast):
                self._settle(now)
        except Exception:  # the first check's scan decides, as it would
            self._base = None

    def _snapshot(self, extra_classes: tuple[type, ...]) -> None:
        for dotted in self._modules:
            try:
                module = resolve(dotted)
            except (ImportError, AttributeError):
                continue
            self._snapshot_namespace(module, vars(module), dotted, only_own=True)
        for dotted in self._classes:
            try:
                cls = resolve(dotted)
            except (ImportError, AttributeError):
                continue
            self._snapshot_namespace(cls, vars(cls), dotted, only_own=False)
        for cls in extra_classes:
            self._snapshot_namespace(cls, vars(cls), cls.__qualname__, only_own=False)
        for dotted, names in self._reexports.items():
            owner = resolve(dotted)
            for name in names:
                if hasattr(owner, name):
                    obj = getattr(owner, name)
                    self._seen.append(_Seen(owner, name, obj, _code_of(obj)))

    def _snapshot_namespace(self, owner: Any, space: Any, label: str, only_own: bool) -> None:
        if isinstance(owner, type):
            # a name added later shadows an inherited method (AdamW.step is Adam's)
            self._class_keys.append((owner, frozenset(space)))
        for name, obj in list(space.items()):
            if isinstance(obj, types.BuiltinFunctionType) and only_own:
                # C functions re-exported by a module (F.gelu, torch.matmul): watched by identity
                self._seen.append(_Seen(owner, name, obj, None))
                continue
            if only_own and getattr(obj, "__module__", None) != label:
                if isinstance(obj, types.FunctionType):
                    # a helper imported from elsewhere (adam's _get_value): by identity
                    self._seen.append(_Seen(owner, name, obj, None))
                continue
            if isinstance(obj, (types.FunctionType, staticmethod, classmethod, property)):
                # the raw namespace entry: getattr would make a new bound classmethod each time
                self._seen.append(_Seen(owner, name, obj, _code_of(obj)))

    def __len__(self) -> int:
        return len(self._seen)

    def changes(self) -> Iterator[tuple[str, Any]]:
        """Each watched name whose object or code changed since the snapshot (once each),
        with the object now in its place (to attribute the change to its code)."""
        yield from self._added()
        # read before the scan: a change made while it runs differs from this next time
        now = self._layout.state()
        if now is not None and self._base is not None and _identical(now, self._base):
            # nothing the scan reads differs from what it saw last time, when everything
            # that differed from the snapshot was reported
            yield from self._scan(self._layout.loose)
            return
        self.scans += 1
        yield from self._scan(self._fast)
        self._settle(now)

    def _settle(self, before: list[list[Any]] | None) -> None:
        """``before`` (read before a scan that found nothing unreported) is the new
        baseline, unless something the scan reads moved while it ran. A patch put in
        place only while no check looks, and taken away while one does, is beyond any
        check of this kind, the exact scan's included."""
        if before is not None:
            after = self._layout.state()
            if after is not None and _identical(before, after):
                self._base = before

    def _added(self) -> Iterator[tuple[str, Any]]:
        for cls, keys in self._class_keys:
            space = vars(cls)
            if len(space) == len(keys) and space.keys() == keys:
                continue
            for name in sorted(set(space) - keys):
                key = (id(cls), name)
                if key not in self._reported and _callable_attr(cls, name):
                    self._reported.add(key)
                    yield (
                        f"{cls.__name__}.{name} was added, overriding what it inherited",
                        space[name],
                    )

    def _scan(self, entries: list[_Entry]) -> Iterator[tuple[str, Any]]:
        """The exact scan: each entry's object, code, defaults and closure by identity."""
        for entry in entries:
            changed, current = self._differs(entry)
            if not changed:
                continue
            _, owner, name, obj, func, code, _ = entry
            key = (id(owner), name)
            if key in self._reported:
                continue
            self._reported.add(key)
            where = f"{getattr(owner, '__name__', owner)}.{name}"
            if current is not obj:
                yield f"{where} was replaced", current
            elif code is not None and func.__code__ is not code:
                yield f"{where} had its code replaced", func
            else:
                # the same function and code, other defaults or closure: whose is unknown
                yield f"{where} had its defaults or closure replaced", None

    @staticmethod
    def _differs(entry: _Entry) -> tuple[bool, Any]:
        """Whether an entry differs from its snapshot, and what is in its place now."""
        space, owner, name, obj, func, code, parts = entry
        current = space.get(name) if space is not None else getattr(owner, name, None)
        if current is obj and (code is None or func.__code__ is code):
            if parts is None:
                return False, current
            defaults, kwdefaults, held = parts
            # by identity, cheapest first (no id(): it is an audited call), and most
            # watched functions hold no closure
            if (
                func.__defaults__ is defaults
                and func.__kwdefaults__ is kwdefaults
                and (not held or _same(_held(func), held))
            ):
                return False, current
        return True, current


def _callable_attr(cls: type, name: str) -> bool:
    """Whether a class attribute is callable; one that raises when read (a planted
    descriptor) is treated as callable: it can only be there to run code."""
    try:
        return callable(getattr(cls, name, None))
    except Exception:
        return True


def _parts(func: Any) -> tuple[Any, ...] | None:
    """What a function runs with besides its code: defaults and what its closure holds
    (a decorator's cell can be pointed at another function), kept to compare by identity."""
    if not isinstance(func, types.FunctionType):
        return None
    return (func.__defaults__, func.__kwdefaults__, _held(func))


_EMPTY = object()  # an empty cell's contents


def _held(func: Any) -> tuple[Any, ...]:
    return tuple(_contents(cell) for cell in func.__closure__ or ())


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return _EMPTY


def _same(now: tuple[Any, ...], then: tuple[Any, ...]) -> bool:
    return len(now) == len(then) and all(a is b for a, b in zip(now, then, strict=True))


def _func_of(obj: Any) -> Any:
    return getattr(obj, "__func__", obj)
