"""Model state beyond parameters: module settings, training flags and buffers.

Three digests join each rank's fingerprint row (compared across ranks at every check):

* ``modes``: every module's ``training`` flag;
* ``attributes``: the scalar settings in each module's ``__dict__`` (bools, ints, floats,
  strings, ``None`` and tuples of them: dropout's ``p``, ``eps``, ``momentum``,
  ``negative_slope``, ``inplace``...), public names only (``_``-prefixed names are a
  module's bookkeeping), the DistributedDataParallel wrapper's own flags excepted (its
  ``no_sync`` toggles them; what they change shows in the parameters);
* ``buffers``: the buffers that replicas hold equal. Running statistics of normalization
  layers (BatchNorm's ``running_mean``, ``running_var``, ``num_batches_tracked``) are
  left out unless the layer is a ``SyncBatchNorm``: under plain DDP each rank updates them
  from its own batch after DDP's broadcast (``broadcast_buffers=True``) or without it, so
  they differ by design. So is any buffer that the module's own forward writes (seen on
  the first forward that writes it).

Who changed a setting: ``Module.__setattr__`` is wrapped once per process; a set on a
guarded module that changes a scalar setting is attributed to the code that asked
(:meth:`Provenance.of_stack`) when it happens, so the job's own ``model.eval()`` around an
evaluation is recorded and an insider's ``dropout.p = 0.9`` from unknown code is an
alert. A change that went around ``__setattr__`` (``module.__dict__[...]``,
``object.__setattr__``) is found at the next check by comparison with the values last
seen, and is unknown by construction. Buffers are written in place, with no setter to
watch: a write outside the module's forward is local evidence (it names the rank when the
``buffers`` digest disagrees across ranks), never an alert on its own.
"""

from __future__ import annotations

import operator
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from trainguard.runtime.fingerprint import _plain, tensors_hash, text_hash
from trainguard.runtime.provenance import Attribution, Origin, Provenance

_VERSION = operator.attrgetter("_version")
_STATS = frozenset({"running_mean", "running_var", "num_batches_tracked"})
_MISSING = object()
Key = tuple[str, str]  # (module path, attribute name)

#: id(module) -> (its watch, its path); one wrapper of Module.__setattr__ serves them all
_WATCHED: dict[int, tuple[ModelState, str]] = {}
_LOCK = threading.Lock()
_installed: tuple[Any, Any] | None = None  # (original, wrapper)


def _scalar(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    return isinstance(value, tuple) and len(value) <= 8 and all(_scalar(v) for v in value)


def _shown(value: Any) -> Any:
    """The value the module's code sees (a float subclass's disguise removed)."""
    return value if isinstance(value, str) or value is None else _plain(value)


def _ddp(module: torch.nn.Module) -> bool:
    return type(module).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel")


def settings(model: torch.nn.Module) -> dict[Key, Any]:
    """Every module's training flag and public scalar settings, by (path, name)."""
    out: dict[Key, Any] = {}
    for path, module in model.named_modules():
        out[(path, "training")] = bool(module.training)
        if _ddp(module):
            continue
        for name, value in list(vars(module).items()):
            if name[0] != "_" and name != "training" and _scalar(value):
                out[(path, name)] = _shown(value)
    return out


def settings_digests(values: dict[Key, Any]) -> tuple[int, int]:
    """(modes, attributes): digests of the training flags and of the other settings."""
    modes = [f"{p}" for (p, n), v in values.items() if n == "training" and v]
    attrs = [f"{p}.{n}={type(v).__name__}:{v!r}" for (p, n), v in values.items() if n != "training"]
    return text_hash("\n".join(modes)), text_hash("\n".join(attrs))


def comparable_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers replicas hold equal: all but non-synchronized normalization statistics."""
    from torch.nn.modules.batchnorm import SyncBatchNorm, _NormBase

    out = []
    for path, module in model.named_modules():
        per_rank = isinstance(module, _NormBase) and not isinstance(module, SyncBatchNorm)
        for name, buf in module.named_buffers(prefix=path, recurse=False):
            if buf is not None and not (per_rank and name.rsplit(".", 1)[-1] in _STATS):
                out.append((name, buf))
    return out


def _setattr(module: torch.nn.Module, name: str, value: Any) -> None:
    assert _installed is not None
    entry = _WATCHED.get(id(module))
    if entry is None or not entry[0].active or name[0] == "_":
        _installed[0](module, name, value)
        return
    old = module.__dict__.get(name, _MISSING)
    _installed[0](module, name, value)
    watch, path = entry
    try:
        if _scalar(value) and (old is _MISSING or type(old) is not type(value) or old != value):
            watch.saw((path, name), value, sys._getframe(1))
    except Exception as exc:  # the sensor's own failure; the set itself is the job's
        watch.on_fault("the model-state sensor", exc)


class ModelState:
    """Watches a model's settings, training flags and buffers (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, provenance: Provenance) -> None:
        global _installed
        self.model = model
        self.provenance = provenance
        self.active = True
        self.on_fault: Callable[[str, BaseException], None] = lambda where, exc: None
        self.baseline = settings(model)
        self._changes: list[tuple[str, Attribution]] = []
        #: the settings as changes() last read them, for digests() at the same check
        self._read: dict[Key, Any] | None = None
        self._seen_trusted: set[tuple[Key, str]] = set()
        self._ids = [id(m) for m in model.modules()]
        with _LOCK:
            for path, module in model.named_modules():
                if not _ddp(module):
                    _WATCHED[id(module)] = (self, path)
            if _installed is None:
                original = torch.nn.Module.__setattr__
                _installed = (original, _setattr)
                torch.nn.Module.__setattr__ = _setattr  # type: ignore[method-assign,assignment]
        self.buffers = comparable_buffers(model)
        self._written = False
        self._after: int | None = None
        self._before: list[int] = []
        # DDP syncs buffers inside its forward, before the wrapped module's: writes between
        # the outer and the inner pre-hook are DDP's, not evidence
        inner = getattr(model, "module", model) if _ddp(model) else model
        self._handles = [
            model.register_forward_pre_hook(self._outer_pre),
            inner.register_forward_pre_hook(self._inner_pre),
            inner.register_forward_hook(self._inner_post),
        ]

    # --- settings --------------------------------------------------------------------

    def saw(self, key: Key, value: Any, frame: Any) -> None:
        """A scalar setting set through Module.__setattr__: attributed now."""
        by = self.provenance.of_stack(frame)
        old = self.baseline.get(key, "<unset>")
        self.baseline[key] = _shown(value)
        path, name = key
        change = f"{path or 'the model'}.{name} set from {old!r} to {_shown(value)!r}"
        if by.trusted:
            if (key, by.where) in self._seen_trusted:
                return  # the same code setting the same thing (eval() every epoch): once
            self._seen_trusted.add((key, by.where))
        if len(self._changes) < 256:
            self._changes.append((change, by))

    def changes(self) -> Iterator[tuple[str, Attribution]]:
        """Each setting changed since the last call, with who changed it; those that went
        around Module.__setattr__ are unknown (nobody could be seen doing it)."""
        pending, self._changes = self._changes, []
        yield from pending
        now = self._read = settings(self.model)
        if now != self.baseline:
            for key in sorted(set(now) | set(self.baseline)):
                was, is_ = self.baseline.get(key, "<unset>"), now.get(key, "<unset>")
                if was != is_ or type(was) is not type(is_):
                    path, name = key
                    yield (
                        f"{path or 'the model'}.{name} changed from {was!r} to {is_!r} "
                        "without Module.__setattr__",
                        Attribution(Origin.UNKNOWN, "code that wrote the module's __dict__"),
                    )
            self.baseline = now

    def digests(self) -> tuple[int, int]:
        """(modes, attributes) of the model as it is now (as :meth:`changes` read it at
        this check: one walk of the model per check)."""
        now, self._read = self._read, None
        return settings_digests(now if now is not None else settings(self.model))

    # --- buffers ---------------------------------------------------------------------

    def _versions(self) -> int:
        return sum(map(_VERSION, (b for _, b in self.buffers)))

    def _outer_pre(self, module: Any, args: Any) -> None:
        if self.active and self._after is not None and self._versions() != self._after:
            self._written = True

    def _inner_pre(self, module: Any, args: Any) -> None:
        if self.active:
            self._before = [b._version for _, b in self.buffers]

    def _inner_post(self, module: Any, args: Any, output: Any) -> None:
        if not self.active:
            return
        now = [b._version for _, b in self.buffers]
        if now != self._before and len(now) == len(self._before):
            # the forward's own writes (a custom module's running statistic): per rank by
            # design, so no longer compared
            kept = zip(self.buffers, now, self._before, strict=True)
            self.buffers = [pair for pair, v, was in kept if v == was]
            now = [b._version for _, b in self.buffers]
        self._after = sum(now)

    def buffers_hash(self) -> torch.Tensor:
        return tensors_hash(b for _, b in self.buffers)

    def buffers_written(self) -> bool:
        """Whether a compared buffer was written outside the model's forward since the
        last call (evidence for naming a rank, not an alert)."""
        written = self._written or (self._after is not None and self._versions() != self._after)
        self._written = False
        if self._after is not None:
            self._after = self._versions()
        return written

    def close(self) -> None:
        global _installed
        self.active = False
        for handle in self._handles:
            handle.remove()
        with _LOCK:
            for ident in self._ids:
                entry = _WATCHED.get(ident)
                if entry is not None and entry[0] is self:
                    del _WATCHED[ident]
            # put the original back unless someone wrapped ours since
            if (
                not _WATCHED
                and _installed is not None
                and vars(torch.nn.Module).get("__setattr__") is _installed[1]
            ):
                torch.nn.Module.__setattr__ = _installed[0]  # type: ignore[method-assign]
                _installed = None
