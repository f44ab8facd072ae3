"""In-process attacks: code the attacker got into other people's training processes.

In the incident the intern ran code inside colleagues' jobs. Here that code arrives the way
it could on a shared cluster: a ``sitecustomize.py`` in a folder put first on the job's
``PYTHONPATH`` (see ``sitecustomize_dir``), which imports this module and calls
``activate()`` when the interpreter starts, before the job's own code runs. The implant
then waits, unseen, behind PyTorch's global optimizer-step hooks, and at a chosen step on a
chosen rank does one of the things in ``ACTIONS``: monkeypatches a torch function, changes
hyperparameters, re-seeds the RNG, tampers with gradients, the data loader or the weights,
or sleeps. The job never calls or imports it.

The attack to run is read from the environment variable ``SABOTAGE_IMPLANT`` (JSON
``{"action": NAME, "step": K, "rank": R, ...}``) each time a new optimizer starts stepping,
so one process can run several jobs in a row (the runner's batch mode). "At step K" means
training step K (0-based) is the first one the attack changes: patches, hooks and the data
loader are in place before its forward pass; hyperparameters, the RNG and the weights are
changed inside its optimizer step, before the update. The implant never uses the global
RNG (except the re-seeding attack itself), so a run it leaves alone is bit-identical to a
run without it.
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import dataloader as dl

SITECUSTOMIZE = "import benchmarks.sabotage.implant as _implant\n_implant.activate()\n"


def sitecustomize_dir(root: Path) -> Path:
    """A folder holding the implant's ``sitecustomize.py``; put it first on PYTHONPATH."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return root


@dataclass
class Implant:
    """State of the attack inside one process."""

    spec: dict[str, Any] = field(default_factory=dict)
    raw: str = ""
    optimizer: torch.optim.Optimizer | None = None
    completed: int = 0  # optimizer steps completed in the current job
    active: bool = False
    undo: list[Callable[[], None]] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    gen: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(7))

    def patch(self, owner: Any, name: str, make: Callable[[Any], Callable[..., Any]]) -> None:
        """Replaces ``owner.name`` by ``make(original)``, for this job only.

        The replacement passes calls straight to the original once the process has moved
        on to another job (in batch mode the next job fetches its first batch before its
        first optimizer step, where ``reset`` restores the original).
        """
        original = getattr(owner, name)
        replacement = make(original)
        raw = self.raw

        @functools.wraps(original)
        def patched(*args: Any, **kwargs: Any) -> Any:
            if os.environ.get("SABOTAGE_IMPLANT") != raw:
                return original(*args, **kwargs)
            return replacement(*args, **kwargs)

        setattr(owner, name, patched)
        self.undo.append(lambda: setattr(owner, name, original))

    def reset(self, optimizer: torch.optim.Optimizer) -> None:
        for restore in reversed(self.undo):
            restore()
        self.undo.clear()
        self.optimizer, self.completed, self.active = optimizer, 0, False
        self.raw = os.environ.get("SABOTAGE_IMPLANT") or ""
        self.spec = json.loads(self.raw or "{}")
        self.rng = random.Random(7)
        self.gen = torch.Generator().manual_seed(7)

    @property
    def armed(self) -> bool:
        rank = int(os.environ.get("RANK", "0"))
        return bool(self.spec) and rank == int(self.spec.get("rank", 0))


STATE = Implant()


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _noise_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)


# --- start actions: run once, when K steps have completed ------------------------------


def _patch_optimizer_step(s: Implant) -> None:
    """AdamW.step replaced: each update is applied three times over."""
    assert s.optimizer is not None
    factor = float(s.spec.get("factor", 3.0))

    def amplified(opt: torch.optim.Optimizer, run: Callable[[], Any]) -> Any:
        before = [p.detach().clone() for p in _params(opt)]
        out = run()
        with torch.no_grad():
            for p, b in zip(_params(opt), before, strict=True):
                p.copy_(b + factor * (p - b))
        return out

    opt = s.optimizer
    if "step" in vars(opt):
        # an lr scheduler has wrapped this optimizer's step (the wrapper calls the function
        # it captured, so a patch of the class would never run): replace the wrapper
        s.patch(
            opt,
            "step",
            lambda original: lambda *a, **k: amplified(opt, lambda: original(*a, **k)),
        )
        return
    s.patch(
        torch.optim.AdamW,
        "step",
        lambda original: lambda self, *a, **k: amplified(self, lambda: original(self, *a, **k)),
    )


def _patch_functional(s: Implant) -> None:
    """torch.nn.functional.gelu replaced by a slightly damped one."""
    s.patch(
        F,
        "gelu",
        lambda original: lambda x, approximate="none": original(x, approximate=approximate) * 0.7,
    )


def _patch_allreduce(s: Implant) -> None:
    """dist.all_reduce inflates this rank's contribution, only when world size > threshold."""
    threshold = int(s.spec.get("world_size_above", 1))
    factor = float(s.spec.get("factor", 4.0))

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if dist.get_world_size() > threshold:
                tensor.mul_(factor)
            return original(tensor, *args, **kwargs)

        return all_reduce

    s.patch(dist, "all_reduce", make)


def _set_hparam(s: Implant) -> None:
    assert s.optimizer is not None
    for group in s.optimizer.param_groups:
        if "betas" in s.spec:
            group["betas"] = tuple(s.spec["betas"])
        if "weight_decay" in s.spec and group["weight_decay"] > 0:
            group["weight_decay"] = float(s.spec["weight_decay"])


def _reseed(s: Implant) -> None:
    torch.manual_seed(int(s.spec.get("seed", 12345)))


def _grad_hooks(s: Implant) -> None:
    """Tensor hooks: they change each gradient before DDP's all-reduce reads it."""
    assert s.optimizer is not None
    mode = s.spec["mode"]
    for p in _params(s.optimizer):
        if mode == "scale":
            handle = p.register_hook(lambda g: g * float(s.spec.get("factor", 8.0)))
        else:
            handle = p.register_hook(lambda g: -g)
        s.undo.append(handle.remove)


def _perturb_weights(s: Implant) -> None:
    assert s.optimizer is not None
    scale = float(s.spec.get("scale", 0.05))
    with torch.no_grad():
        for p in _params(s.optimizer):
            p.add_(_noise_like(p, s.gen) * scale * float(p.std() if p.numel() > 1 else 1.0))


def _patch_loader(s: Implant) -> None:
    """The DataLoader iterator patched: this rank's batches from step K on are not its own.

    Both iterators are patched (in the main process: a loader with worker processes
    hands their batches over in ``_MultiProcessingDataLoaderIter._next_data``).
    """
    mode = s.spec["mode"]
    last: list[Any] = []

    def make(original_next: Callable[..., Any]) -> Callable[..., Any]:
        def next_data(self: Any) -> Any:
            if mode == "skip":
                original_next(self)  # a batch this rank never trains on
            batch = original_next(self)
            if mode == "repeat":
                batch = last[0] if last else batch
                last[:] = [batch]
            elif mode == "labels":
                x, y = batch
                noise = torch.randint(0, int(y.max()) + 1, y.shape, generator=s.gen)
                flip = torch.rand(y.shape, generator=s.gen) < 0.5
                batch = (x, torch.where(flip, noise, y))
            elif mode == "reshuffle":
                ds = self._dataset
                order = torch.randperm(len(ds), generator=s.gen)[: len(batch[0])].tolist()
                rows = [ds[i] for i in order]
                batch = (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
            return batch

        return next_data

    for it_cls in (dl._SingleProcessDataLoaderIter, dl._MultiProcessingDataLoaderIter):
        s.patch(it_cls, "_next_data", make)


# --- per-step actions: before each optimizer step from K on -------------------------------


def _scale_lr(s: Implant, opt: torch.optim.Optimizer) -> None:
    # the job writes the scheduled lr before every step, so the attack must follow it
    for group in opt.param_groups:
        group["lr"] *= float(s.spec.get("factor", 5.0))


def _grads_after_reduce(s: Implant, opt: torch.optim.Optimizer) -> None:
    for p in _params(opt):
        if p.grad is None:
            continue
        if s.spec["mode"] == "flip":
            p.grad.neg_()
        else:
            p.grad.add_(_noise_like(p.grad, s.gen) * float(p.grad.std() if p.numel() > 1 else 1.0))


def _sleep(s: Implant, opt: torch.optim.Optimizer) -> None:
    time.sleep(s.rng.uniform(float(s.spec.get("min_s", 0.02)), float(s.spec.get("max_s", 0.2))))


#: name -> (once at step K, before every optimizer step from K on)
ACTIONS: dict[str, tuple[Callable[[Implant], None] | None, Any]] = {
    "patch-optimizer-step": (_patch_optimizer_step, None),
    "patch-functional": (_patch_functional, None),
    "patch-allreduce": (_patch_allreduce, None),
    "set-lr": (None, _scale_lr),
    "set-hparam": (_set_hparam, None),
    "reseed": (_reseed, None),
    "grad-hook": (_grad_hooks, None),
    "grad-after": (None, _grads_after_reduce),
    "loader": (_patch_loader, None),
    "sleep": (None, _sleep),
    "perturb-weights": (_perturb_weights, None),
}


#: actions that start inside step K's optimizer step (before the update) rather than before
#: its forward pass
IN_STEP = {"set-hparam", "reseed", "perturb-weights"}


def _pre_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    s = STATE
    if opt is not s.optimizer:
        s.reset(opt)
    if s.armed and s.completed >= int(s.spec["step"]):
        if not s.active:
            _start(s)
        per_step = ACTIONS[s.spec["action"]][1]
        if per_step is not None:
            per_step(s, opt)


def _post_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    s = STATE
    if opt is not s.optimizer:
        return
    s.completed += 1
    # what must be in place before step K's forward pass starts here; changes to the
    # optimizer, the RNG or the weights wait for step K's own optimizer step, so that a
    # check after step K-1 still sees a clean run
    early = s.spec.get("action") not in IN_STEP
    if s.armed and early and not s.active and s.completed >= int(s.spec["step"]):
        _start(s)


def _start(s: Implant) -> None:
    s.active = True
    once = ACTIONS[s.spec["action"]][0]
    if once is not None:
        once(s)
    marker = s.spec.get("marker")
    if marker:  # lets the runner check that the attack really ran
        Path(marker).write_text(json.dumps({"step": s.completed, "pid": os.getpid()}))


def activate() -> None:
    """Installs the implant's hooks; called from sitecustomize at interpreter start."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    register_optimizer_step_pre_hook(_pre_hook)
    register_optimizer_step_post_hook(_post_hook)
