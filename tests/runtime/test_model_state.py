"""Model state beyond parameters: module settings, training flags, buffers, autograd hooks.

PYTEST_DONT_REWRITE: this file plays the job's own code, and the Guard checks that code
objects are what their file compiles to; pytest's assertion rewriting would make them not.
"""

from __future__ import annotations

import torch

import trainguard
from trainguard.runtime import agreement
from trainguard.runtime.modelstate import ModelState, comparable_buffers, settings, settings_digests
from trainguard.runtime.provenance import Provenance


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.norm = torch.nn.BatchNorm1d(16)
        self.drop = torch.nn.Dropout(0.1)
        self.out = torch.nn.Linear(16, 1)
        self.register_buffer("mask", torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.norm(self.inp(x)))) * self.mask)


def make(tmp_path, key, **options):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    settings_ = {"every": 5, "owner_key": key, "verify_env": False, "seed": 0, **options}
    settings_.setdefault("code_roots", [__file__])
    guard = trainguard.Guard(model, optimizer, run_dir=tmp_path / "run", **settings_)
    return model, optimizer, guard


def train(model, optimizer, guard, steps, before_step=None):
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(16, 8, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
        optimizer.zero_grad()
        loss.backward()
        if before_step is not None:
            before_step(step, loss)
        optimizer.step()
        guard.step(loss=loss)


def run(tmp_path, key, attack, steps=10, at=3):
    model, optimizer, guard = make(tmp_path, key)
    try:
        train(
            model, optimizer, guard, steps, lambda s, loss: attack(model, loss) if s == at else None
        )
    finally:
        guard.close()
    return [(a.detector, a.message) for a in guard.alerts]


# --- the fingerprint fields ---------------------------------------------------------------


def test_each_digest_follows_its_state():
    """Rows in, verdicts out: what moves each digest, and what must not."""
    model = Net()
    modes, attrs = settings_digests(settings(model))
    buffers = lambda: int(  # noqa: E731
        trainguard.runtime.fingerprint.tensors_hash(b for _, b in comparable_buffers(model))
    )
    start = buffers()
    model.drop.p = 0.9
    assert settings_digests(settings(model)) == (modes, settings_digests(settings(model))[1])
    assert settings_digests(settings(model))[1] != attrs
    model.drop.p = 0.1
    model.norm.eval()
    assert settings_digests(settings(model)) == (settings_digests(settings(model))[0], attrs)
    assert settings_digests(settings(model))[0] != modes
    model.train()
    assert settings_digests(settings(model)) == (modes, attrs)
    with torch.no_grad():
        model.norm.running_mean.add_(1.0)  # per rank under plain DDP: not compared
    assert buffers() == start
    with torch.no_grad():
        model.mask.mul_(2.0)
    assert buffers() != start


def test_synchronized_batchnorm_statistics_are_compared():
    sync = torch.nn.SyncBatchNorm(4)
    plain = torch.nn.BatchNorm1d(4)
    assert {n for n, _ in comparable_buffers(sync)} == {
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    assert comparable_buffers(plain) == []


def test_a_float_subclass_cannot_hide_a_setting():
    class Lying(float):
        def __eq__(self, other):
            return True

        __hash__ = float.__hash__

        def __repr__(self):
            return "0.1"

    model = Net()
    before = settings_digests(settings(model))[1]
    model.drop.p = Lying(0.9)
    assert settings_digests(settings(model))[1] != before


def test_a_buffer_the_forward_writes_leaves_the_comparison():
    class Running(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("seen", torch.zeros(1))
            self.register_buffer("table", torch.ones(3))

        def forward(self, x):
            self.seen.add_(1)
            return x * self.table.sum()

    model = Running()
    state = ModelState(model, Provenance([__file__]))
    try:
        model(torch.ones(2))
        assert [n for n, _ in state.buffers] == ["table"]
        assert not state.buffers_written()
        model.table.mul_(2)  # outside the forward: evidence
        assert state.buffers_written()
        assert not state.buffers_written()
        model(torch.ones(2))
        model.table.mul_(2)
        model(torch.ones(2))  # seen at the next forward's start
        assert state.buffers_written()
    finally:
        state.close()
    assert torch.nn.Module.__setattr__.__module__ == "torch.nn.modules.module"


def test_agreement_names_the_rank_with_evidence():
    def row(attributes, flags=0):
        values = dict.fromkeys(agreement.FIELDS, 0)
        values.update(attributes=attributes, flags=flags)
        return [values[n] for n in agreement.FIELDS]

    table = torch.tensor([row(1), row(2, agreement.PATCHED)])
    (alert,) = agreement.compare(10, table, frozenset({"attributes"}))
    assert alert.rank == 1
    table = torch.tensor([row(1), row(2)])
    (alert,) = agreement.compare(10, table, frozenset({"attributes"}))
    assert alert.rank is None
    assert "cannot tell" in alert.message
    table = torch.tensor([row(1), row(1), row(2)])
    (alert,) = agreement.compare(10, table, frozenset({"attributes"}))
    assert alert.rank == 2


# --- settings changed during training ------------------------------------------------------


def test_dropout_p_set_by_unknown_code_is_an_alert(tmp_path, owner_key, foreign):
    """An insider's module raises dropout to 0.9 mid-run (issue 11): nothing is patched."""
    implant = foreign("def attack(model, loss):\n    model.drop.p = 0.9\n")
    found = run(tmp_path, owner_key, implant.attack)
    assert any(d == "model-state" and "drop.p" in m and "0.9" in m for d, m in found), found


def test_eval_by_unknown_code_is_an_alert(tmp_path, owner_key, foreign):
    implant = foreign("def attack(model, loss):\n    model.norm.eval()\n")
    found = run(tmp_path, owner_key, implant.attack)
    assert any(d == "model-state" and "norm.training" in m for d, m in found), found


def test_a_setting_written_around_setattr_is_an_alert(tmp_path, owner_key):
    """``module.__dict__["p"] = ...`` never reaches Module.__setattr__: seen at the check."""

    def attack(model, loss):
        model.drop.__dict__["p"] = 0.7

    found = run(tmp_path, owner_key, attack)
    assert any(d == "model-state" and "without Module.__setattr__" in m for d, m in found), found


def test_the_jobs_own_evaluation_and_settings_are_recorded_not_alerted(tmp_path, owner_key):
    def practice(model, loss):
        model.eval()
        with torch.no_grad():
            model(torch.zeros(4, 8))
        model.train()
        model.drop.p = 0.2  # a dropout schedule of the job's

    model, optimizer, guard = make(tmp_path, owner_key)
    try:
        train(model, optimizer, guard, 12, lambda s, loss: practice(model, loss) if s % 3 else None)
    finally:
        guard.close()
    assert guard.alerts == []


# --- autograd node hooks -------------------------------------------------------------------


def test_an_accumulate_grad_hook_from_unknown_code_is_an_alert(tmp_path, owner_key, foreign):
    """A pre-hook on a parameter's AccumulateGrad node scales its gradient: no tensor or
    module hook table shows it (issue 11)."""
    implant = foreign(
        """
        nodes = []
        def attack(model, loss):
            p = model.out.weight
            node = p.view_as(p).grad_fn.next_functions[0][0]
            nodes.append(node)  # kept alive, as DDP's reducer keeps them
            node.register_prehook(lambda grads: tuple(g * 10 for g in grads))
        """
    )
    found = run(tmp_path, owner_key, implant.attack)
    assert any(d == "hooks" and "autograd node hook" in m for d, m in found), found


def test_a_loss_grad_fn_hook_from_unknown_code_is_an_alert(tmp_path, owner_key, foreign):
    implant = foreign(
        "def attack(model, loss):\n    loss.grad_fn.register_hook(lambda gi, go: None)\n"
    )
    model, optimizer, guard = make(tmp_path, owner_key)

    def before(step, loss):
        pass

    try:
        gen = torch.Generator().manual_seed(1)
        for step in range(10):
            x = torch.randn(16, 8, generator=gen)
            loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
            if step == 3:
                implant.attack(model, loss)  # before backward: the hook runs in it
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            guard.step(loss=loss)
    finally:
        guard.close()
    assert any(a.detector == "hooks" and "autograd node" in a.message for a in guard.alerts)


def test_the_jobs_own_node_hooks_and_full_backward_hooks_are_quiet(tmp_path, owner_key):
    model, optimizer, guard = make(tmp_path, owner_key)
    model.out.register_full_backward_hook(lambda m, gi, go: None)  # torch adds node hooks
    kept = []

    def own(step, loss):
        if step == 2:
            p = model.inp.weight
            kept.append(p.view_as(p).grad_fn.next_functions[0][0])
            kept[-1].register_hook(lambda gi, go: None)

    try:
        train(model, optimizer, guard, 12, own)
    finally:
        guard.close()
    assert guard.alerts == []


def test_removing_the_node_hook_sensor_is_seen(tmp_path, owner_key, foreign):
    implant = foreign(
        """
        from torch.autograd import function
        def attack(model, loss):
            function._HookMixin._register_hook = staticmethod(
                function._HookMixin._register_hook.__wrapped_original__
                if hasattr(function._HookMixin._register_hook, "__wrapped_original__")
                else (lambda d, h: (d, None))
            )
        """
    )
    from torch.autograd.function import _HookMixin

    saved = vars(_HookMixin)["_register_hook"]
    try:
        found = run(tmp_path, owner_key, implant.attack)
    finally:
        _HookMixin._register_hook = saved
    assert any(d == "hooks" and "node hook sensor" in m for d, m in found), found
