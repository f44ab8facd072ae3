"""Update integrity (``runtime/update_check.py``): torch's SGD, Adam and AdamW recomputed
on a secret sample of coordinates; every ordinary set-up quiet, every sabotage named.

PYTEST_DONT_REWRITE: this file plays the job's own code (see test_guard.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import trainguard
from tests.runtime.test_guard_distributed import alerts, finish, start_ranks
from trainguard.runtime.interface import StepInfo
from trainguard.runtime.update_check import UpdateCheck

ROOT = Path(__file__).resolve().parents[2]
optim = torch.optim

# (name, class, settings): the variants the check models, each tried plain, foreach, fused
VARIANTS = [
    ("sgd", optim.SGD, {"lr": 0.05}),
    ("sgd-momentum", optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.1}),
    ("sgd-nesterov", optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("sgd-weight-decay", optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}),
    ("sgd-maximize", optim.SGD, {"lr": 0.05, "momentum": 0.5, "maximize": True}),
    ("adam", optim.Adam, {"lr": 1e-2}),
    ("adam-amsgrad", optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    ("adam-weight-decay", optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
    ("adamw", optim.AdamW, {"lr": 1e-2}),
    ("adamw-amsgrad-maximize", optim.AdamW, {"lr": 1e-2, "amsgrad": True, "maximize": True}),
    ("adamw-tensor-lr", optim.AdamW, {"lr": torch.tensor(1e-2)}),
]
IMPLS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def net(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4), torch.nn.Linear(4, 1)
    ).to(dtype)


def optimizer(kind: Any, settings: dict[str, Any], impl: str, model: torch.nn.Module) -> Any:
    settings = dict(settings)
    if impl == "foreach" and isinstance(settings.get("lr"), torch.Tensor):
        pytest.skip("torch refuses a tensor lr with foreach=True and capturable=False")
    frozen, trained = list(model.parameters())[-1:], list(model.parameters())[:-1]
    # two groups, the second's learning rate halved; its last parameter never gets a grad
    groups = [{"params": trained[:-1]}, {"params": trained[-1:] + frozen}]
    opt = kind(groups, **settings, **IMPLS[impl])
    lr = opt.param_groups[1]["lr"]
    opt.param_groups[1]["lr"] = lr / 2
    return opt


def train(
    model: torch.nn.Module,
    opt: Any,
    step_hook: Callable[[int], None] | None = None,
    *,
    steps: int = 30,
    after: Callable[[int], None] | None = None,
    check: Any = None,
    guard: Any = None,
) -> None:
    """Ordinary practice all at once: an LR scheduler, 2 micro-batches accumulated, bf16
    autocast, gradient clipping; the last parameter is frozen (no grad)."""
    gen = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    list(model.parameters())[-1].requires_grad_(False)
    scheduler = optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s // 7))
    for step in range(steps):
        opt.zero_grad()
        for _ in range(2):
            x = torch.randn(16, 8, generator=gen, dtype=dtype)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(x).float(), x[:, :1].float()) / 2
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if step_hook is not None:
            step_hook(step)
        opt.step()
        if after is not None:
            after(step)
        scheduler.step()
        if guard is not None:
            guard.step(loss=float(loss.detach()))
        if check is not None:
            check.alerts += list(check.on_step(StepInfo(step, None, [], None)))


def attach(
    model: torch.nn.Module,
    opt: Any,
    events: list[dict[str, Any]],
    *,
    rate: float = 1.0,
    key: bytes | None = None,
    step: int = 0,
) -> UpdateCheck:
    check = UpdateCheck(model, opt, 0, clock=lambda: step, record=events.append, rate=rate, key=key)
    check.alerts = []  # type: ignore[attr-defined]
    opt.register_step_pre_hook(lambda *_: check.before_step())
    opt.register_step_post_hook(lambda *_: check.after_step())
    return check


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(("name", "kind", "settings"), VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_clean_training_is_quiet(name, kind, settings, impl, dtype):
    """30 steps of ordinary practice: not one alert, nothing recorded as unchecked."""
    if impl == "fused" and kind is optim.SGD and dtype == torch.bfloat16:
        # torch 2.13's fused CPU SGD leaves bf16 coordinates of vectorised blocks unchanged
        # (found by this check): a real wrong update, not a false alarm
        pytest.skip("torch's fused SGD on CPU does not update bf16 parameters")
    model = net(dtype)
    opt = optimizer(kind, settings, impl, model)
    events: list[dict[str, Any]] = []
    check = attach(model, opt, events)
    train(model, opt, check=check)
    assert check.alerts == []  # type: ignore[attr-defined]
    assert events == []


def test_torch_fused_sgd_bf16_is_caught_not_updating():
    """The check's first real find: torch 2.13's fused CPU SGD on bf16 parameters leaves
    whole 16-element blocks unchanged. Stays a finding as long as torch has the bug."""
    p = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    opt = optim.SGD([p], lr=0.5, fused=True)
    p.grad = torch.ones(16, dtype=torch.bfloat16)
    opt.step()
    if bool((p.detach() != 1).all()):
        pytest.skip("this torch updates bf16 parameters in fused SGD")
    model = torch.nn.Linear(32, 16).to(torch.bfloat16)
    opt = optim.SGD(model.parameters(), lr=0.5, fused=True)
    check = attach(model, opt, [])
    for _ in range(4):
        model(torch.ones(2, 32, dtype=torch.bfloat16)).sum().backward()
        opt.step()
        check.alerts += list(check.on_step(StepInfo(0, None, [], None)))  # type: ignore[attr-defined]
    assert [a.detector for a in check.alerts] == ["update"]  # type: ignore[attr-defined]


def test_the_draw_is_keyed_fresh_and_leaves_every_rng_alone():
    model = net()
    opt = optim.Adam(model.parameters())
    torch_state, np_state, py_state = (
        torch.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
    )
    one = UpdateCheck(model, opt, 0, clock=lambda: 0, record=print, key=b"k" * 32)
    same = UpdateCheck(model, opt, 0, clock=lambda: 0, record=print, key=b"k" * 32)
    other = UpdateCheck(model, opt, 0, clock=lambda: 0, record=print)
    for c in (one, same, other):
        c._refresh()
    draws = [
        [(s.index, s.coords.tolist()) for s in c._draw(n)]
        for c in (one, same, other)
        for n in (0, 1)
    ]
    assert draws[0] == draws[2]  # the same key and step: the same coordinates
    assert draws[0] != draws[1]  # a new step: new coordinates
    assert draws[0] != draws[4]  # another key (os.urandom): others
    assert sum(len(c) for _, c in draws[0]) == 64
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state, strict=True))


@pytest.mark.parametrize(
    "opt_factory",
    [
        lambda ps: optim.RMSprop(ps, lr=1e-3),
        lambda ps: type("MyAdam", (optim.Adam,), {})(ps, lr=1e-3),
    ],
    ids=["rmsprop", "adam-subclass"],
)
def test_unknown_optimizers_are_recorded_once_never_guessed(opt_factory):
    model = net()
    opt = opt_factory(model.parameters())
    events: list[dict[str, Any]] = []
    check = attach(model, opt, events)
    train(model, opt, check=check, steps=6)
    assert check.alerts == []  # type: ignore[attr-defined]
    assert len(events) == 1
    assert events[0]["event"] == "update-unchecked"


def test_options_not_modelled_are_recorded_once():
    """Sparse gradients (a sparse embedding under SGD) and ``differentiable`` (stepped by
    hand: torch itself refuses it on leaf parameters)."""
    embedding = torch.nn.Embedding(50, 4, sparse=True)
    opt = optim.SGD(embedding.parameters(), lr=0.1)
    events: list[dict[str, Any]] = []
    check = attach(embedding, opt, events)
    for _ in range(5):
        opt.zero_grad()
        embedding(torch.tensor([1, 7, 7])).sum().backward()
        opt.step()
        check.alerts += list(check.on_step(StepInfo(0, None, [], None)))  # type: ignore[attr-defined]
    assert check.alerts == []  # type: ignore[attr-defined]
    assert [e["detail"] for e in events] == [
        "optimizer updates not recomputed: SGD with sparse gradients"
    ]
    model = net()
    events.clear()
    check = UpdateCheck(
        model,
        optim.Adam(model.parameters(), differentiable=True),
        0,
        clock=lambda: 0,
        record=events.append,
        rate=1.0,
    )
    for _ in range(3):
        check.before_step()
        check.after_step()
    assert list(check.on_step(StepInfo(0, None, [], None))) == []
    assert len(events) == 1
    assert "differentiable=True" in events[0]["detail"]


@pytest.mark.parametrize("fused", [False, True])
def test_gradscaler_skipped_steps_are_not_flagged(fused):
    """GradScaler skips optimizer.step on an overflow (unfused), or steps with found_inf
    set (fused, the kernel skips): neither is a wrong update."""
    model = net()
    opt = optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    check = attach(model, opt, [])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        opt.zero_grad()
        x = torch.randn(16, 8, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
        if step in (3, 4):
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        check.alerts += list(check.on_step(StepInfo(step, None, [], None)))  # type: ignore[attr-defined]
    assert check.alerts == []  # type: ignore[attr-defined]


# --- sabotage, under the Guard --------------------------------------------------------

AT = 6  # the step the sabotage starts at
WITHIN = 10  # ... and the step by which it must be named


def guarded(tmp_path: Path, key: Path, kind: Any = optim.Adam, **settings: Any) -> tuple[Any, ...]:
    model = net()
    opt = kind(model.parameters(), **{"lr": 1e-2, "foreach": False, **settings})
    guard = trainguard.Guard(
        model,
        opt,
        run_dir=tmp_path / "run",
        every=5,
        owner_key=key,
        verify_env=False,
        code_roots=[__file__],
        update_rate=1.0,  # every step, so each means is caught by a known step
    )
    return model, opt, guard


def named(guard: Any) -> list[Any]:
    guard.close()
    found = [a for a in guard.alerts if a.detector == "update"]
    assert found, f"not caught; alerts: {[a.line() for a in guard.alerts]}"
    assert all(a.rank == 0 for a in found)
    assert min(a.step for a in found) <= WITHIN
    return found


def scaled(original: Callable[..., None], factor: float) -> Callable[..., None]:
    def update(params: list[torch.Tensor], *args: Any, **kwargs: Any) -> None:
        before = [p.detach().clone() for p in params]
        original(params, *args, **kwargs)
        with torch.no_grad():
            for p, b in zip(params, before, strict=True):
                p.copy_(b + factor * (p - b))

    return update


def test_a_patched_update_function_is_caught(tmp_path, owner_key, monkeypatch):
    """(a) torch.optim.adam._single_tensor_adam replaced by one that scales the update
    (an edited torch source does the same)."""
    model, opt, guard = guarded(tmp_path, owner_key)

    def patch(step: int) -> None:
        if step == AT:
            import torch.optim.adam as adam

            monkeypatch.setattr(adam, "_single_tensor_adam", scaled(adam._single_tensor_adam, 3.0))

    train(model, opt, patch, guard=guard, steps=WITHIN + 5)
    assert named(guard)[0].details["field"] == "param"


def test_reversed_sign_is_caught(tmp_path, owner_key, monkeypatch):
    """(d) the update applied backwards, through the functional ``adam.adam``."""
    model, opt, guard = guarded(tmp_path, owner_key)

    def patch(step: int) -> None:
        if step == AT:
            import torch.optim.adam as adam

            monkeypatch.setattr(adam, "adam", scaled(adam.adam, -1.0))

    train(model, opt, patch, guard=guard, steps=WITHIN + 5)
    named(guard)


def test_skipped_updates_are_caught(tmp_path, owner_key, monkeypatch):
    """(c) optimizer.step runs (and its hooks) but updates nothing."""
    model, opt, guard = guarded(tmp_path, owner_key, optim.SGD, momentum=0.9)

    def patch(step: int) -> None:
        if step == AT:
            import torch.optim.sgd as sgd

            monkeypatch.setattr(sgd, "sgd", lambda *a, **k: None)

    train(model, opt, patch, guard=guard, steps=WITHIN + 5)
    named(guard)


def test_noise_added_after_the_real_step_is_caught(tmp_path, owner_key):
    """(b) ``step`` wrapped on the instance: the real step, then noise added through
    ``p.data`` (no version counter moves). Every parameter, so every step's draw lands on
    the noise: on one parameter the draw misses it with a fixed chance per step (a third,
    for the first layer here), and a deadline of four steps would fail one run in a hundred."""
    model, opt, guard = guarded(tmp_path, owner_key)
    real = opt.step

    def step(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * 1e-3)
        return out

    def patch(s: int) -> None:
        if s == AT:
            opt.step = step

    train(model, opt, patch, guard=guard, steps=WITHIN + 5)
    assert named(guard)[0].details["kind"] == "between"


def test_state_changed_in_place_between_steps_is_caught(tmp_path, owner_key):
    """(e) exp_avg_sq scaled in place between steps: patches nothing, touches no parameter."""
    model, opt, guard = guarded(tmp_path, owner_key)

    def after(step: int) -> None:
        if step >= AT:
            for state in opt.state.values():
                state["exp_avg_sq"].mul_(0.5)

    train(model, opt, guard=guard, after=after, steps=WITHIN + 5)
    found = named(guard)
    assert found[0].details["field"] == "exp_avg_sq"


def test_lr_changed_after_the_guards_pre_hook_is_caught(tmp_path, owner_key):
    """(f) a pre-hook registered after the guard's raises the learning rate for the
    update, a post-hook puts it back: the rate the guard read is not the one used."""
    model, opt, guard = guarded(tmp_path, owner_key)
    saved: list[float] = []

    def raise_lr(o: Any, *_: Any) -> None:
        if len(saved) >= AT:
            o.param_groups[0]["lr"] *= 10
        saved.append(o.param_groups[0]["lr"])

    def restore(o: Any, *_: Any) -> None:
        if len(saved) > AT:
            o.param_groups[0]["lr"] /= 10

    opt.register_step_pre_hook(raise_lr)
    opt.register_step_post_hook(restore)
    train(model, opt, guard=guard, steps=WITHIN + 5)
    named(guard)
    assert "hyperparameters" not in {a.detector for a in guard.alerts}


def test_tampering_only_unsampled_coordinates_does_not_escape(tmp_path, owner_key):
    """An attacker who read this code: tamper with a fixed 5% of the coordinates, hoping
    they are not the sampled ones. The sample is secret and fresh every step, so each
    step's two draws of 32 coordinates miss a 5% corruption with probability about
    0.95 ** 32 * 0.95 ** 32 = 0.04, and ``WITHIN - AT`` steps with about 3e-6."""
    model, opt, guard = guarded(tmp_path, owner_key)
    gen = torch.Generator().manual_seed(7)
    masks = [torch.rand(p.shape, generator=gen) < 0.05 for p in model.parameters()]

    def after(step: int) -> None:
        if step >= AT:
            for p, m in zip(model.parameters(), masks, strict=True):
                p.data.add_(m * 1e-3)

    train(model, opt, guard=guard, after=after, steps=WITHIN + 5)
    named(guard)


# --- two ranks ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_only_the_patched_rank_is_named(tmp_path, owner_key):
    """Two real gloo ranks; only rank 1's torch is patched to scale the update: rank 1
    names itself, rank 0 stays quiet."""
    run_dir = tmp_path / "run"
    codes = finish(
        start_ranks("tests.runtime.update_worker", [], 2, [str(run_dir), str(owner_key)])
    )
    assert codes == [0, 0], codes
    found = [[a for a in alerts(run_dir, r) if a["detector"] == "update"] for r in range(2)]
    assert found[0] == []
    assert found[1]
    assert {a["rank"] for a in found[1]} == {1}


def test_checked_steps_are_a_keyed_thirty_second_at_the_default_rate():
    """At the default rate one optimizer step in 32 is checked, drawn under the key: the
    steps differ from key to key, so nobody without it can keep to unchecked ones."""
    model = net()
    opt = optim.SGD(model.parameters(), lr=1e-2)
    one = UpdateCheck(model, opt, 0, clock=lambda: 0, record=print, key=b"a" * 32)
    two = UpdateCheck(model, opt, 0, clock=lambda: 0, record=print, key=b"b" * 32)
    first = {n for n in range(6400) if one._chosen(n)}
    second = {n for n in range(6400) if two._chosen(n)}
    assert 150 <= len(first) <= 250  # 200 expected
    assert 150 <= len(second) <= 250
    assert len(first & second) < 25  # independent draws: about 6 in common
    with pytest.raises(ValueError, match="rate"):
        UpdateCheck(model, opt, 0, clock=lambda: 0, record=print, rate=0.0)


def test_a_persistent_wrong_update_is_caught_at_the_default_rate(monkeypatch):
    """torch's SGD patched to reverse its update on every step, at the default rate:
    caught within two check intervals of the default every=50 (1 - (31/32)**100 = 95.8%
    per run; the key here is fixed so the test is exact)."""
    import torch.optim.sgd as sgd_module

    from trainguard.runtime.update_check import DEFAULT_RATE

    model = net()
    opt = optim.SGD(model.parameters(), lr=1e-2, foreach=False)
    check = attach(model, opt, [], rate=DEFAULT_RATE, key=b"c" * 32)
    reversed_sgd = scaled(sgd_module._single_tensor_sgd, -1.0)
    monkeypatch.setattr(sgd_module, "_single_tensor_sgd", reversed_sgd)
    gen = torch.Generator().manual_seed(3)
    found = None
    for step in range(100):
        opt.zero_grad()
        x = torch.randn(16, 8, generator=gen)
        torch.nn.functional.mse_loss(model(x), x[:, :1]).backward()
        opt.step()
        if list(check.on_step(StepInfo(0, None, [], None))):
            found = step
            break
    assert found is not None
    assert found >= 1  # not every step is checked: the first one drawn under this key


def test_what_is_compared_early_in_a_long_interval_is_reported(monkeypatch):
    """More records pending than the check keeps (a long interval at rate 1): they are
    compared early, and what that finds is reported at the next drain, not lost."""
    import torch.optim.sgd as sgd_module

    from trainguard.runtime import update_check

    original = sgd_module._single_tensor_sgd
    doubled = scaled(original, 2.0)
    monkeypatch.setattr(update_check, "_MAX_PENDING", 8)
    model = net()
    opt = optim.SGD(model.parameters(), lr=1e-2, foreach=False)
    check = attach(model, opt, [], key=b"e" * 32, step=7)
    gen = torch.Generator().manual_seed(3)
    for step in range(20):
        if step == 2:
            monkeypatch.setattr(sgd_module, "_single_tensor_sgd", doubled)
        if step == 3:
            monkeypatch.setattr(sgd_module, "_single_tensor_sgd", original)
        opt.zero_grad()
        x = torch.randn(16, 8, generator=gen)
        torch.nn.functional.mse_loss(model(x), x[:, :1]).backward()
        opt.step()
    found = list(check.on_step(StepInfo(0, None, [], None)))
    assert [a.details["kind"] for a in found] == ["update"]
