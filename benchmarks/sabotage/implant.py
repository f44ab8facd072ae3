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
import gc
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
    saved: dict[str, Any] = field(default_factory=dict)  # what an action keeps between steps

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
        self.saved = {}

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


def _patch_loader(s: Implant, mode: str = "", only_off_check: bool = False) -> None:
    """The DataLoader iterator patched: this rank's batches from step K on are not its own.

    Both iterators are patched (in the main process: a loader with worker processes
    hands their batches over in ``_MultiProcessingDataLoaderIter._next_data``).
    """
    mode = mode or s.spec["mode"]
    last: list[Any] = []

    def make(original_next: Callable[..., Any]) -> Callable[..., Any]:
        def next_data(self: Any) -> Any:
            if mode == "skip":
                original_next(self)  # a batch this rank never trains on
            batch = original_next(self)
            if only_off_check and is_check_step(s, s.completed):
                return batch  # the batch of a step the Guard checks is left alone
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


# --- the second axis: the same goals through other means -------------------------------


def is_check_step(s: Implant, step: int) -> bool:
    """Whether training step ``step`` (0-based) ends in one of the Guard's checks.

    The implant reads the check interval from its spec (``every``, the job's
    ``guard_every``): the Guard checks at the ``guard.step`` of steps s with
    ``(s + 1) % every == 0``. Without it every step counts as a check step.
    """
    every = int(s.spec.get("every", 0))
    return every <= 0 or (step + 1) % every == 0


def _model(s: Implant) -> torch.nn.Module:
    """The bare model the optimizer trains, found in the process's live objects."""
    assert s.optimizer is not None
    wanted = {id(p) for p in _params(s.optimizer)}
    for obj in gc.get_objects():
        if (
            issubclass(type(obj), torch.nn.Module)
            and type(obj).__name__ != "DistributedDataParallel"
            and {id(p) for p in obj.parameters()} == wanted
        ):
            return obj
    raise RuntimeError("implant: the optimizer's model is not among the live objects")


def _live(kind: type) -> list[Any]:
    # type(), not isinstance: some live objects warn when their __class__ is read
    return [obj for obj in gc.get_objects() if issubclass(type(obj), kind)]


def _optimizer_state_inplace(s: Implant, opt: torch.optim.Optimizer) -> None:
    """AdamW's second moment halved before every update: larger steps, nothing patched."""
    for p in _params(opt):
        state = opt.state.get(p, {})
        if "exp_avg_sq" in state:
            state["exp_avg_sq"].mul_(float(s.spec.get("factor", 0.5)))


def _swap_adam_function(s: Implant) -> None:
    """The functions ``torch.optim.adam.adam`` looks up at each call replaced (lr x3):
    ``AdamW.step`` and ``adam`` themselves stay untouched."""
    from torch.optim import adam

    factor = float(s.spec.get("factor", 3.0))

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def update(*args: Any, **kwargs: Any) -> Any:
            kwargs["lr"] = kwargs["lr"] * factor
            return original(*args, **kwargs)

        return update

    for name in ("_single_tensor_adam", "_multi_tensor_adam"):
        s.patch(adam, name, make)


def _scale_lr_off_check(s: Implant, opt: torch.optim.Optimizer) -> None:
    if not is_check_step(s, s.completed):
        _scale_lr(s, opt)


def _grads_after_reduce_off_check(s: Implant, opt: torch.optim.Optimizer) -> None:
    if not is_check_step(s, s.completed):
        _grads_after_reduce(s, opt)


def _grad_node_hook(s: Implant) -> None:
    """A pre-hook on the loss's autograd node scales every gradient of this rank before the
    all-reduce (registered on each forward's fresh graph through a module forward hook)."""
    factor = float(s.spec.get("factor", 8.0))
    model = _model(s)

    def on_forward(module: Any, args: Any, output: Any) -> None:
        loss = output[1]
        if loss is not None and loss.grad_fn is not None:
            loss.grad_fn.register_prehook(lambda grads: tuple(g * factor for g in grads))

    s.undo.append(model.register_forward_hook(on_forward).remove)


def _sampler_other_rank(s: Implant) -> None:
    """The sampler's ``rank`` set to another rank's, and the live loader iterator's index
    stream re-pointed at that shard from the current position: no function replaced."""
    from torch.utils.data import DistributedSampler

    world = dist.get_world_size() if dist.is_initialized() else 1
    victim = (int(s.spec.get("rank", 0)) + 1) % world
    for sampler in _live(DistributedSampler):
        sampler.rank = victim
    for it in _live(dl._BaseDataLoaderIter):
        # the index batches already taken: yielded, or sent ahead to worker processes
        taken = getattr(it, "_send_idx", it._num_yielded)
        stream = iter(it._index_sampler)
        for _ in range(taken):
            next(stream, None)
        it._sampler_iter = stream


def _labels_hook(s: Implant) -> None:
    """A forward pre-hook on the model shifts the targets by one character (a batch
    changed after the loader handed it over)."""
    model = _model(s)

    def before(module: Any, args: Any) -> Any:
        x, y = args
        return (x, torch.roll(y, 1, dims=1))

    s.undo.append(model.register_forward_pre_hook(before).remove)


def _labels_off_check(s: Implant) -> None:
    """Half the targets replaced at random, only in batches of steps without a check."""
    _patch_loader(s, mode="labels", only_off_check=True)


def _corrupt_dataset(s: Implant) -> None:
    """The training set's character tensor overwritten in place (30% random characters) in
    this rank's memory: a data-level change, nothing patched."""
    from torch.utils.data import Dataset

    sets = [d for d in _live(Dataset) if isinstance(getattr(d, "data", None), torch.Tensor)]
    train = max(sets, key=len)
    data = train.data
    flip = torch.rand(data.shape, generator=s.gen) < 0.3
    noise = torch.randint(0, int(data.max()) + 1, data.shape, generator=s.gen, dtype=data.dtype)
    data.copy_(torch.where(flip, noise, data))


def _rng_rewind(s: Implant, opt: torch.optim.Optimizer) -> None:
    """torch's default generator set back to its state at step K before each update: the
    same dropout masks every step from then on."""
    if "rng" not in s.saved:
        s.saved["rng"] = torch.default_generator.get_state()
    if s.spec.get("only_off_check") and is_check_step(s, s.completed):
        return
    torch.default_generator.set_state(s.saved["rng"])


def _dropout_generator_patch(s: Implant) -> None:
    """F.dropout replaced by one that draws its masks from the attacker's own generator."""
    gen = torch.Generator().manual_seed(int(s.spec.get("seed", 4242)))

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def dropout(x: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
            if not training or p == 0.0:
                return original(x, p, training, inplace)
            keep = (torch.rand(x.shape, generator=gen) >= p).to(x.device, x.dtype)
            return x * keep / (1.0 - p)

        return dropout

    s.patch(F, "dropout", make)


def _dropout_p(s: Implant) -> None:
    for module in _model(s).modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = float(s.spec.get("p", 0.5))


def _module_eval(s: Implant) -> None:
    """One block put in eval mode on this rank: its dropout stops."""
    model = _model(s)
    blocks = [m for m in model.modules() if type(m).__name__ == "Block"]
    (blocks[0] if blocks else model).eval()


def _replace_param_data(s: Implant) -> None:
    """One MLP weight's ``.data`` rebound to a new tensor (x1.5): the parameter object, its
    optimizer state and DDP's buckets stay; its storage and version counter are new."""
    params = dict(_model(s).named_parameters())
    name = sorted(n for n in params if n.endswith("fc.weight"))[0]
    params[name].data = params[name].data * float(s.spec.get("factor", 1.5))


def _forward_hook(s: Implant) -> None:
    """A forward hook halves the output of every MLP layer on this rank."""
    model = _model(s)
    for name, module in model.named_modules():
        if name.endswith("fc") and isinstance(module, torch.nn.Linear):
            hook = module.register_forward_hook(lambda m, a, out: out * 0.5)
            s.undo.append(hook.remove)


def _weights_off_check_add(s: Implant, opt: torch.optim.Optimizer) -> None:
    """After step s-1's update: noise added to the weights, taken out again before step s's
    update (pre hook). Step s-1's own ``guard.step`` runs after this hook, so only when s-1
    has no check: no check ever sees the noise."""
    if is_check_step(s, s.completed - 1):
        return
    scale = float(s.spec.get("scale", 0.05))
    with torch.no_grad():
        noise = []
        for p in _params(opt):
            n = _noise_like(p, s.gen) * scale * float(p.std() if p.numel() > 1 else 1.0)
            p.add_(n)
            noise.append(n)
    s.saved["noise"] = noise


def _weights_off_check_remove(s: Implant, opt: torch.optim.Optimizer) -> None:
    """Before the update of that step the noise is taken out again: the gradients were
    computed at weights nobody checks."""
    noise = s.saved.pop("noise", None)
    if noise is not None:
        with torch.no_grad():
            for p, n in zip(_params(opt), noise, strict=True):
                p.sub_(n)


def _sleep_off_check(s: Implant, opt: torch.optim.Optimizer) -> None:
    if not is_check_step(s, s.completed):
        _sleep(s, opt)


def _stall_loader(s: Implant) -> None:
    """The DataLoader iterator patched to sleep before each batch: a slow rank."""

    def make(original_next: Callable[..., Any]) -> Callable[..., Any]:
        def next_data(self: Any) -> Any:
            time.sleep(
                s.rng.uniform(float(s.spec.get("min_s", 0.02)), float(s.spec.get("max_s", 0.2)))
            )
            return original_next(self)

        return next_data

    for it_cls in (dl._SingleProcessDataLoaderIter, dl._MultiProcessingDataLoaderIter):
        s.patch(it_cls, "_next_data", make)


def _clear_alerts(s: Implant, opt: torch.optim.Optimizer) -> None:
    """The Guard's own list of alerts emptied in place before every update (nothing
    patched), while the lr is scaled: what the Guard raised on this rank is forgotten."""
    if "alerts" not in s.saved:  # found once: a scan of every object each step would be slow
        guards = [obj for obj in gc.get_objects() if type(obj).__name__ == "Guard"]
        lists = [getattr(g, "alerts", None) for g in guards]
        s.saved["alerts"] = [a for a in lists if isinstance(a, list)]
    for alerts in s.saved["alerts"]:
        alerts.clear()
    _scale_lr(s, opt)


# --- tampering with the Guard itself, then damage -------------------------------------------


def _replace_everywhere(
    s: Implant, prefix: str, name: str, make: Callable[[Any], Callable[..., Any]]
) -> int:
    """Replaces function ``name`` in every loaded module under ``prefix`` that holds it (as
    an attacker who read the source would: ``from ... import name`` copies included) and
    the method ``name`` of the classes those modules define."""
    import sys

    mods = [m for k, m in list(sys.modules.items()) if k.startswith(prefix) and m]
    # one replacement per original function, shared by every module that holds it
    shared: dict[int, Callable[..., Any]] = {}
    for m in mods:
        found = getattr(m, name, None)
        if callable(found) and not isinstance(found, type) and id(found) not in shared:
            shared[id(found)] = make(found)
    done = 0
    for module in mods:
        replacement = shared.get(id(getattr(module, name, None)))
        if replacement is not None:
            s.patch(module, name, lambda original, r=replacement: r)
            done += 1
    for module in mods:
        for cls in list(vars(module).values()):
            if isinstance(cls, type) and cls.__module__ == module.__name__ and name in vars(cls):
                s.patch(cls, name, make)
                done += 1
    return done


def _frozen(original: Callable[..., Any]) -> Callable[..., Any]:
    cache: list[Any] = []

    def frozen(*args: Any, **kwargs: Any) -> Any:
        if not cache:
            value = original(*args, **kwargs)
            cache.append(value.clone() if isinstance(value, torch.Tensor) else value)
        return cache[0]

    return frozen


#: what each guard tamper replaces: (modules under, function name, replacement)
TAMPERS: dict[str, tuple[str, str, Callable[[Any], Callable[..., Any]]]] = {
    "compare": ("trainguard.runtime", "compare", lambda original: lambda *a, **k: []),
    "params_hash": ("trainguard.runtime", "params_hash", _frozen),
    "rng_hashes": ("trainguard.runtime", "rng_hashes", _frozen),
    "after_step": ("trainguard.runtime", "after_step", lambda original: lambda *a, **k: None),
    "ledger": ("trainguard.ledger", "append", lambda original: lambda *a, **k: None),
    "try_append": ("trainguard.ledger", "try_append", lambda original: lambda *a, **k: None),
}


def _guard_tamper(s: Implant) -> None:
    """The Guard's own code replaced in this process (``tamper``: names in TAMPERS), then
    the damage of the action named by ``then``."""
    replaced = {}
    for tamper in s.spec.get("tamper", []):
        prefix, name, make = TAMPERS[tamper]
        replaced[tamper] = _replace_everywhere(s, prefix, name, make)
    s.saved["report"] = {"tampered": replaced}
    once = ACTIONS[s.spec["then"]][0]
    if once is not None:
        once(s)


def _guard_tamper_step(s: Implant, opt: torch.optim.Optimizer) -> None:
    per_step = ACTIONS[s.spec["then"]][1]
    if per_step is not None:
        per_step(s, opt)


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
    "optimizer-state": (None, _optimizer_state_inplace),
    "swap-adam-function": (_swap_adam_function, None),
    "set-lr-off-check": (None, _scale_lr_off_check),
    "grad-after-off-check": (None, _grads_after_reduce_off_check),
    "grad-node-hook": (_grad_node_hook, None),
    "sampler-other-rank": (_sampler_other_rank, None),
    "labels-hook": (_labels_hook, None),
    "labels-off-check": (_labels_off_check, None),
    "corrupt-dataset": (_corrupt_dataset, None),
    "rng-rewind": (None, _rng_rewind),
    "dropout-generator": (_dropout_generator_patch, None),
    "dropout-p": (_dropout_p, None),
    "module-eval": (_module_eval, None),
    "replace-data": (_replace_param_data, None),
    "forward-hook": (_forward_hook, None),
    "weights-off-check": (None, _weights_off_check_remove),
    "sleep-off-check": (None, _sleep_off_check),
    "stall-loader": (_stall_loader, None),
    "clear-alerts": (None, _clear_alerts),
    "guard-tamper": (_guard_tamper, _guard_tamper_step),
}

#: name -> after every optimizer step from K on (the step count already advanced)
AFTER: dict[str, Callable[[Implant, torch.optim.Optimizer], None]] = {
    "weights-off-check": _weights_off_check_add,
}


#: actions that start inside step K's optimizer step (before the update) rather than before
#: its forward pass
IN_STEP = {"set-hparam", "reseed", "perturb-weights", "dropout-p", "module-eval", "replace-data"}


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
    after = AFTER.get(s.spec.get("action", ""))
    if s.active and after is not None:
        after(s, opt)


def _start(s: Implant) -> None:
    s.active = True
    once = ACTIONS[s.spec["action"]][0]
    if once is not None:
        once(s)
    marker = s.spec.get("marker")
    if marker:  # lets the runner check that the attack really ran
        ran = {"step": s.completed, "pid": os.getpid(), **s.saved.get("report", {})}
        Path(marker).write_text(json.dumps(ran))


def _patch_load_state_dict(spec: dict[str, Any]) -> None:
    """``torch.nn.Module.load_state_dict`` replaced: once the model's state is restored,
    one MLP weight matrix is multiplied by ``factor`` (the checkpoint file is untouched)."""
    original = torch.nn.Module.load_state_dict
    factor = float(spec.get("factor", 3.0))

    @functools.wraps(original)
    def load_state_dict(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        model = getattr(self, "module", self)
        if type(model).__name__ == "GPT":
            params = dict(model.named_parameters())
            name = sorted(n for n in params if n.endswith("fc.weight"))[0]
            with torch.no_grad():
                params[name].mul_(factor)
            marker = spec.get("marker")
            if marker:
                Path(marker).write_text(json.dumps({"tensor": name, "pid": os.getpid()}))
        return out

    torch.nn.Module.load_state_dict = load_state_dict  # type: ignore[method-assign]


#: attacks that must be in place before the job's code runs (``SABOTAGE_EARLY``, set by the
#: runner for that launch alone): they act when the job resumes, before any step
EARLY: dict[str, Callable[[dict[str, Any]], None]] = {"load-patch": _patch_load_state_dict}


def activate() -> None:
    """Installs the implant's hooks; called from sitecustomize at interpreter start."""
    early = json.loads(os.environ.get("SABOTAGE_EARLY") or "{}")
    if early and int(os.environ.get("RANK", "0")) == int(early.get("rank", 0)):
        EARLY[early["action"]](early)
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    register_optimizer_step_pre_hook(_pre_hook)
    register_optimizer_step_post_hook(_post_hook)
