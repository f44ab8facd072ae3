"""Hooks the guard did not install: global optimizer hooks, module and parameter hooks
(:class:`HookWatch`, compared with a snapshot at each check), and hooks on autograd nodes
(:class:`NodeHooks`, seen as they are registered, through torch's one registration path,
and attributed to the code that registered them)."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from trainguard.runtime.provenance import Attribution, Origin, Provenance, code_of
from trainguard.runtime.sensors import FaultCallback, arm, log_fault


def _hooks(model: torch.nn.Module, optimizer: Any) -> dict[str, dict[int, Any]]:
    """Every hook that can change a step, by kind: id -> the hook."""
    from torch.nn.modules import module as module_mod
    from torch.optim import optimizer as optim_mod

    def table(*dicts: Any) -> dict[int, Any]:
        return {id(v): v for d in dicts if d for v in d.values()}

    found: dict[str, dict[int, Any]] = {
        "global optimizer pre-step hook": table(optim_mod._global_optimizer_pre_hooks),
        "global optimizer post-step hook": table(optim_mod._global_optimizer_post_hooks),
        "optimizer pre-step hook": table(getattr(optimizer, "_optimizer_step_pre_hooks", None)),
        "optimizer post-step hook": table(getattr(optimizer, "_optimizer_step_post_hooks", None)),
        "global forward hook": table(module_mod._global_forward_hooks),
        "global forward pre-hook": table(module_mod._global_forward_pre_hooks),
        "global backward hook": table(
            module_mod._global_backward_hooks, module_mod._global_backward_pre_hooks
        ),
    }
    module_hooks: dict[int, Any] = {}
    for sub in model.modules():
        module_hooks.update(
            table(
                sub._forward_hooks,
                sub._forward_pre_hooks,
                sub._backward_hooks,
                getattr(sub, "_backward_pre_hooks", None),
            )
        )
    found["module hook"] = module_hooks
    grad_hooks: dict[int, Any] = {}
    for param in model.parameters():
        grad_hooks.update(
            table(param._backward_hooks, getattr(param, "_post_accumulate_grad_hooks", None))
        )
    found["gradient hook"] = grad_hooks
    return found


class HookWatch:
    """Hooks present at start (the guard's own included); new ones are reported, each with
    the hook itself so that it can be attributed to its code.

    Hooks on autograd nodes (``loss.grad_fn.register_hook``, a parameter's
    ``AccumulateGrad`` node's ``register_hook``/``register_prehook``) live in C++ where no
    Python code can list them; given a ``provenance``, every registration is seen as it
    happens (all go through ``torch.autograd.function._HookMixin._register_hook``) and is
    reported with an :class:`Attribution` in place of the hook: the code that registered
    it, or the hook's own code when that is unknown. Torch's own registrations for the
    job (full backward module hooks) are the job's; DDP's reducer registers its hooks in
    C++ and is not seen at all.
    """

    def __init__(
        self, model: torch.nn.Module, optimizer: Any, provenance: Provenance | None = None
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.known = {kind: set(hooks) for kind, hooks in _hooks(model, optimizer).items()}
        self.nodes = NodeHooks(provenance) if provenance is not None else None

    def changes(self) -> Iterator[tuple[str, Any]]:
        """(kind, hook) for each hook added since start (each reported once); for autograd
        node hooks, (kind, Attribution)."""
        for kind, now in _hooks(self.model, self.optimizer).items():
            known = self.known.setdefault(kind, set())
            for ident, hook in now.items():
                if ident not in known:
                    known.add(ident)
                    yield kind, hook
        if self.nodes is not None:
            yield from self.nodes.changes()

    def close(self) -> None:
        if self.nodes is not None:
            self.nodes.close()


_NODE_WATCHES: weakref.WeakSet[NodeHooks] = weakref.WeakSet()
_node_installed: tuple[Any, Any] | None = None  # (original, wrapper) of _register_hook


def _register_node_hook(backward_hooks: Any, hook: Any) -> Any:
    assert _node_installed is not None
    for watch in list(_NODE_WATCHES):
        if watch.active:
            try:
                watch.saw(hook, sys._getframe(1))
            except Exception as exc:  # the sensor's part; the registration is the job's
                watch.on_fault("the autograd hook sensor", exc)
    return _node_installed[0](backward_hooks, hook)


class NodeHooks:
    """Every hook registered on an autograd node, attributed when it is registered."""

    KIND = "autograd node hook"

    def __init__(self, provenance: Provenance) -> None:
        global _node_installed
        from torch.autograd.function import _HookMixin

        self.provenance = provenance
        self.active = True
        self.on_fault: FaultCallback = log_fault
        self._found: list[Attribution] = []
        self._places: set[tuple[str, Origin]] = set()
        self._tamper_reported = False
        if not any(w.active for w in _NODE_WATCHES):
            _node_installed = None  # no watch left: whatever is in place now is torch's
        if _node_installed is None:
            _node_installed = (_HookMixin._register_hook, _register_node_hook)
            _HookMixin._register_hook = staticmethod(_register_node_hook)  # type: ignore[method-assign]
        _NODE_WATCHES.add(self)
        arm(self)

    def saw(self, hook: Any, frame: Any) -> None:
        by = self.provenance.of_stack(frame)
        if by.trusted and code_of(hook) is not None:
            own = self.provenance.of_callable(hook)
            if own.origin is Origin.UNKNOWN:
                by = own  # trusted code handed a hook nobody can vouch for
        place = (by.where, by.origin)
        if place not in self._places and len(self._found) < 256:
            self._places.add(place)  # once per place: torch registers some every step
            self._found.append(by)

    def changes(self) -> Iterator[tuple[str, Attribution]]:
        found, self._found = self._found, []
        for by in found:
            yield self.KIND, by
        from torch.autograd.function import _HookMixin

        current = vars(_HookMixin).get("_register_hook")
        if (
            not self._tamper_reported
            and _node_installed is not None
            and getattr(current, "__func__", None) is not _node_installed[1]
        ):
            self._tamper_reported = True
            yield (
                "autograd node hook sensor",
                Attribution(Origin.UNKNOWN, "code that removed the guard's wrapper"),
            )

    def close(self) -> None:
        global _node_installed
        from torch.autograd.function import _HookMixin

        self.active = False
        _NODE_WATCHES.discard(self)
        current = vars(_HookMixin).get("_register_hook")
        if not any(w.active for w in _NODE_WATCHES) and _node_installed is not None:
            # put the original back unless someone replaced our wrapper since (theirs stays,
            # and the next watch installs over it)
            if getattr(current, "__func__", None) is _node_installed[1]:
                _HookMixin._register_hook = staticmethod(_node_installed[0])  # type: ignore[method-assign]
            _node_installed = None
