"""In-process sensors: monkeypatches, hooks, re-seeding, and audited operations.

* A watch-list of torch, optimizer, distributed and data-loading functions is
  snapshotted at start (object identity and code); any replacement is reported.
* Hooks the guard did not install (global optimizer hooks, module and gradient
  hooks) are reported when they appear.
* Seeding functions are wrapped: re-seeding after start is an event, and
  ``torch.initial_seed()`` is compared with the declared seed.
* ``sys.addaudithook`` sees code compiled from strings, subprocesses, ``os.system``,
  ``os.kill``, unpickling of globals outside the checkpoint allowlist and writes into
  site-packages. Audit hooks cannot be removed, and can block (policy "halt").

These are sensors, not proofs: code in the process can lie. Each rank's event count
also travels in the cross-rank fingerprint, and every event goes to the ledger.
"""

from __future__ import annotations

import sys
import sysconfig
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from trainguard.artifacts.allowlist import rule_for

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

Event = dict[str, Any]

#: set ``QUIET.on`` in a thread of the guard's own (the alert hook) to keep its
#: subprocesses and connections out of the audit sensor
QUIET = threading.local()


def _resolve(dotted: str) -> Any:
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


class PatchWatch:
    """Identity and code of every watched function, as at start."""

    def __init__(self, extra_classes: tuple[type, ...] = ()) -> None:
        self._seen: list[_Seen] = []
        self._reported: set[tuple[int, str]] = set()
        self._fast: list[tuple[Any, Any, str, Any, Any, Any]] | None = None
        self._class_keys: list[tuple[type, frozenset[str]]] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # walking torch's namespaces touches deprecated names
            self._snapshot(extra_classes)

    def _snapshot(self, extra_classes: tuple[type, ...]) -> None:
        for dotted in _WATCHED_MODULES:
            try:
                module = _resolve(dotted)
            except (ImportError, AttributeError):
                continue
            self._snapshot_namespace(module, vars(module), dotted, only_own=True)
        for dotted in _WATCHED_CLASSES:
            try:
                cls = _resolve(dotted)
            except (ImportError, AttributeError):
                continue
            self._snapshot_namespace(cls, vars(cls), dotted, only_own=False)
        for cls in extra_classes:
            self._snapshot_namespace(cls, vars(cls), cls.__qualname__, only_own=False)
        for dotted, names in _REEXPORTS.items():
            owner = _resolve(dotted)
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
                continue
            if isinstance(obj, (types.FunctionType, staticmethod, classmethod, property)):
                # the raw namespace entry: getattr would make a new bound classmethod each time
                self._seen.append(_Seen(owner, name, obj, _code_of(obj)))

    def __len__(self) -> int:
        return len(self._seen)

    def changes(self) -> Iterator[str]:
        """Each watched name whose object or code changed since the snapshot (once each)."""
        if self._fast is None:
            self._fast = [
                (seen.space, seen.owner, seen.name, seen.obj, _func_of(seen.obj), seen.code)
                for seen in self._seen
            ]
        for cls, keys in self._class_keys:
            space = vars(cls)
            if len(space) == len(keys) and space.keys() == keys:
                continue
            for name in sorted(set(space) - keys):
                key = (id(cls), name)
                if key not in self._reported and callable(getattr(cls, name, None)):
                    self._reported.add(key)
                    yield f"{cls.__name__}.{name} was added, overriding what it inherited"
        for space, owner, name, obj, func, code in self._fast:
            current = space.get(name) if space is not None else getattr(owner, name, None)
            if current is obj and (code is None or func.__code__ is code):
                continue
            key = (id(owner), name)
            if key in self._reported:
                continue
            self._reported.add(key)
            where = f"{getattr(owner, '__name__', owner)}.{name}"
            yield (
                f"{where} was replaced" if current is not obj else f"{where} had its code replaced"
            )


def _func_of(obj: Any) -> Any:
    return getattr(obj, "__func__", obj)


def _hook_ids(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, set[int]]:
    from torch.nn.modules import module as module_mod
    from torch.optim import optimizer as optim_mod

    ids: dict[str, set[int]] = {
        "global optimizer pre-step hook": set(optim_mod._global_optimizer_pre_hooks),
        "global optimizer post-step hook": set(optim_mod._global_optimizer_post_hooks),
        "optimizer pre-step hook": set(optimizer._optimizer_step_pre_hooks),
        "optimizer post-step hook": set(optimizer._optimizer_step_post_hooks),
        "global forward hook": set(module_mod._global_forward_hooks),
        "global forward pre-hook": set(module_mod._global_forward_pre_hooks),
        "global backward hook": set(module_mod._global_backward_hooks),
    }
    module_hooks: set[int] = set()
    for sub in model.modules():
        for table in (sub._forward_hooks, sub._forward_pre_hooks, sub._backward_hooks):
            module_hooks.update(id(v) for v in table.values())
    ids["module hook"] = module_hooks
    grad_hooks: set[int] = set()
    for param in model.parameters():
        tables: list[Any] = [
            param._backward_hooks,
            getattr(param, "_post_accumulate_grad_hooks", None),
        ]
        for table in tables:
            if table:
                grad_hooks.update(id(v) for v in table.values())
    ids["gradient hook"] = grad_hooks
    return ids


class HookWatch:
    """Hooks present at start (the guard's own included); new ones are reported."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self.known = _hook_ids(model, optimizer)

    def changes(self) -> Iterator[str]:
        """New hooks since start (each reported once)."""
        for kind, now in _hook_ids(self.model, self.optimizer).items():
            added = now - self.known.get(kind, set())
            if added:
                self.known.setdefault(kind, set()).update(added)
                yield f"{len(added)} new {kind}(s) registered after start"


_SEEDERS = (
    ("torch", "manual_seed"),
    ("torch.random", "manual_seed"),
    ("torch", "seed"),
    ("torch", "set_rng_state"),
    ("torch.cuda", "manual_seed"),
    ("torch.cuda", "manual_seed_all"),
    ("torch.cuda", "set_rng_state"),
    ("random", "seed"),
    ("random", "setstate"),
    ("numpy.random", "seed"),
    ("numpy.random", "set_state"),
)


class SeedWatch:
    """Wraps the seeding functions so that re-seeding after start is recorded."""

    def __init__(self, record: Callable[[Event], None], seed: int | None) -> None:
        self.record = record
        self.seed = seed
        self.active = True
        self._local = threading.local()
        self._originals: list[tuple[Any, str, Any]] = []
        for module_name, name in _SEEDERS:
            try:
                owner = _resolve(module_name)
            except (ImportError, AttributeError):
                continue
            original = getattr(owner, name, None)
            if original is None or getattr(original, "__trainguard_wrapped__", False):
                continue
            self._originals.append((owner, name, original))
            setattr(owner, name, self._wrap(f"{module_name}.{name}", original))

    def _wrap(self, label: str, original: Any) -> Any:
        watch = self

        def seeding(*args: Any, **kwargs: Any) -> Any:
            outermost = not getattr(watch._local, "inside", False)
            if watch.active and outermost:
                shown = [repr(a)[:40] for a in args]
                watch.record({"event": "reseed", "call": label, "args": shown})
            watch._local.inside = True
            try:
                return original(*args, **kwargs)
            finally:
                watch._local.inside = not outermost
                if outermost and watch.seed is not None:
                    watch.seed = torch.initial_seed()  # reported already; track the new seed

        seeding.__trainguard_wrapped__ = True  # type: ignore[attr-defined]
        seeding.__wrapped__ = original  # type: ignore[attr-defined]
        seeding.__name__ = getattr(original, "__name__", label)
        return seeding

    def initial_seed_changed(self) -> str | None:
        if self.seed is None:
            return None
        current = torch.initial_seed()
        return (
            None if current == self.seed else f"torch.initial_seed() is {current}, not {self.seed}"
        )

    def restore(self) -> None:
        self.active = False
        for owner, name, original in self._originals:
            setattr(owner, name, original)


_SITE_DIRS = tuple(
    p for p in {sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")} if p
)
_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND


class AuditSensor:
    """A ``sys.addaudithook`` hook; once added it stays for the life of the process,
    so ``close`` only switches it off."""

    def __init__(self, record: Callable[[Event], None], protected: tuple[str, ...] = ()) -> None:
        self.record = record
        self.block = False
        self.active = True
        self.protected = tuple(p for p in (*_SITE_DIRS, *protected) if p)
        self._local = threading.local()
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or getattr(self._local, "busy", False) or getattr(QUIET, "on", False):
            return
        finding = self._classify(event, args)
        if finding is None:
            return
        block = self.block and event not in ("compile", "exec")
        self._local.busy = True
        try:
            self.record({"event": event, "detail": finding, "blocked": block})
        finally:
            self._local.busy = False
        if block:
            raise PermissionError(f"blocked by trainguard: {event}: {finding}")

    def _classify(self, event: str, args: tuple[Any, ...]) -> str | None:
        if event in ("subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn"):
            return f"{event} {str(args[0])[:120] if args else ''}"
        if event in ("os.kill", "os.killpg") and len(args) > 1:
            # signal 0 only asks whether a process exists
            return f"signal {args[1]} to pid {args[0]}" if args[1] else None
        if event == "compile" and len(args) > 1 and str(args[1]).startswith("<"):
            source = args[0]
            text = source.decode(errors="replace") if isinstance(source, bytes) else str(source)
            return f"code compiled from a string ({args[1]}): {text[:80]!r}"
        if event == "exec" and args:
            code = args[0]
            name = getattr(code, "co_filename", "")
            return f"exec of code from {name}" if name.startswith("<") else None
        if event == "pickle.find_class" and len(args) > 1:
            qualified = f"{args[0]}.{args[1]}"
            return None if rule_for(qualified) else f"unpickling imports {qualified}"
        if event == "open" and len(args) > 2:
            path, mode, flags = args[0], args[1], args[2]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writes and isinstance(path, str) and path.startswith(self.protected):
                return f"write to {path}"
        return None

    def close(self) -> None:
        self.active = False
