"""The update check compares all pending records at once (``update_math._updates``): the
slots of every record grouped by the path their update takes, each group's settings made
per-coordinate. Where batching could go wrong, with real torch optimizers: records whose
settings differ (a scheduler's learning rate, Adam's step count), slots whose updates take
different paths in one record (momentum or not, amsgrad or not, weight decay or not, no
gradient), bf16 parameters; and a wrong coordinate is still named with its own record's
step, parameter and coordinate, the earliest record's first.

PYTEST_DONT_REWRITE: this file plays the job's own code (see test_guard.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.runtime.test_update_check import net
from trainguard.runtime.interface import StepInfo
from trainguard.runtime.update_check import UpdateCheck

optim = torch.optim

# (name, class, shared settings, settings of group 0 and group 1): the two groups' updates
# take different paths, so one record's slots fall in different batches
SETUPS = [
    (
        "sgd-nesterov-and-plain-decay",
        optim.SGD,
        {"lr": 0.05},
        ({"momentum": 0.9, "nesterov": True}, {"momentum": 0.0, "weight_decay": 0.1}),
    ),
    (
        "sgd-dampened-maximize-and-momentum-decay",
        optim.SGD,
        {"lr": 0.05},
        (
            {"momentum": 0.9, "dampening": 0.1, "maximize": True},
            {"momentum": 0.5, "weight_decay": 0.01},
        ),
    ),
    (
        "adam-amsgrad-and-plain-decay",
        optim.Adam,
        {"lr": 1e-2},
        ({"amsgrad": True}, {"amsgrad": False, "weight_decay": 0.1}),
    ),
    (
        "adamw-amsgrad-maximize-and-no-decay",
        optim.AdamW,
        {"lr": 1e-2},
        ({"amsgrad": True, "maximize": True}, {"weight_decay": 0.0}),
    ),
]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
IMPLS = pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
CASES = pytest.mark.parametrize(
    ("kind", "shared", "groups"), [s[1:] for s in SETUPS], ids=[s[0] for s in SETUPS]
)
START = 100  # the guard's step at the first optimizer step: records carry their own


class Job:
    """A small job: two parameter groups, an LR scheduler that changes the rate at every
    step, and the update check hooked in with a fixed key, drained only when asked."""

    def __init__(
        self,
        kind: Any,
        shared: dict[str, Any],
        groups: tuple[dict[str, Any], ...],
        dtype: torch.dtype,
        foreach: bool,
    ) -> None:
        self.model = net(dtype)
        params = list(self.model.parameters())
        self.opt = kind(
            [{"params": params[:3], **groups[0]}, {"params": params[3:], **groups[1]}],
            **shared,
            foreach=foreach,
        )
        self.scheduler = optim.lr_scheduler.LambdaLR(self.opt, lambda s: 0.9**s)
        self.events: list[dict[str, Any]] = []
        self.step = START
        # a hook registered before the check's runs first: after the step, before the
        # check reads what it wrote
        self.afters: list[Callable[[int], None]] = []
        self.opt.register_step_post_hook(lambda *_: [after(self.step) for after in self.afters])
        #: (parameter name, coordinate) of each change made by :meth:`corrupt`, in order
        self.found: list[tuple[str, int]] = []
        self.check = UpdateCheck(
            self.model,
            self.opt,
            0,
            clock=lambda: self.step,
            record=self.events.append,
            rate=1.0,
            key=b"batched" * 4,
            tensors=4,
            coordinates=32,
        )
        self.opt.register_step_pre_hook(lambda *_: self.check.before_step())
        self.opt.register_step_post_hook(lambda *_: self.check.after_step())
        self.gen = torch.Generator().manual_seed(2)

    def train(self, steps: int, before: Callable[[int], None] | None = None) -> None:
        dtype = next(self.model.parameters()).dtype
        for _ in range(steps):
            self.opt.zero_grad()
            x = torch.randn(16, 8, generator=self.gen, dtype=dtype)
            torch.nn.functional.mse_loss(self.model(x), x[:, :1]).backward()
            if before is not None:
                before(self.step)
            self.opt.step()
            self.scheduler.step()
            self.step += 1

    def drain(self) -> list[Any]:
        return list(self.check.on_step(StepInfo(self.step, None, [], None)))

    def corrupt(self, at: int, slot: int = 0, which: int = 2) -> None:
        """At guard step ``at``, after the step, change one coordinate the check samples
        (of its record's slot ``slot``), noted in :attr:`found`."""

        def after(step: int) -> None:
            if step != at:
                return
            record = self.check._current
            assert record is not None
            chosen = record.slots[slot]
            p = self.check._params[chosen.index]
            coord = int(chosen.coords[which])
            with torch.no_grad():
                p.view(-1)[coord] += 0.25
            self.found.append((self.check._names[id(p)], coord))

        self.afters.append(after)

    def drawn(self, count: int) -> list[Any]:
        """The slots the check samples at its ``count``-th optimizer step (the key is
        fixed: the same draw the check makes)."""
        self.check._refresh()
        return self.check._draw(count)


@CASES
@DTYPES
@IMPLS
def test_records_with_different_settings_compared_at_once_are_quiet(
    kind, shared, groups, dtype, foreach
):
    """12 records drained at once: every one with its own learning rate (the scheduler
    moves it at each step) and step count, each record's slots in several batches."""
    job = Job(kind, shared, groups, dtype, foreach)
    job.train(12)
    pending = job.check._pending
    assert len(pending) == 12
    lrs = {slot.group["lr"] for record in pending for slot in record.slots}
    assert len(lrs) >= 12  # a rate per record (two per record: group 1 is not group 0)
    assert job.drain() == []
    assert job.events == []


@CASES
@DTYPES
def test_a_wrong_coordinate_is_named_in_its_own_record(kind, shared, groups, dtype):
    """3 records drained at once; the 2nd and the 3rd each have a sampled coordinate
    changed after the step: one alert, naming the 2nd record's step, parameter and
    coordinate (the earliest, as record-by-record comparison would)."""
    job = Job(kind, shared, groups, dtype, foreach=False)
    job.train(2)
    assert job.drain() == []
    job.corrupt(START + 3)
    job.corrupt(START + 4, slot=1, which=5)
    job.train(3)
    assert len(job.check._pending) == 3
    alerts = job.drain()
    assert len(job.found) == 2
    name, coord = job.found[0]
    assert [a.detector for a in alerts] == ["update"]
    (alert,) = alerts
    assert alert.step == START + 3
    assert alert.details["kind"] == "update"
    assert alert.details["field"] == "param"
    assert (alert.details["param"], alert.details["coordinate"]) == (name, coord)
    assert f"{name}[{coord}]" in alert.message
    assert abs(alert.details["actual"] - alert.details["expected"]) > alert.details["tolerance"]


def _without_grad_at(job: Job, at: int) -> Callable[[int], None]:
    """A before-step callback that takes the gradient of the parameter the check samples
    first at step ``at`` (4 records in) away, at that step only."""
    slots = job.drawn(4)  # refreshes the check's parameter list: first
    target = job.check._params[slots[0].index]

    def drop(step: int) -> None:
        if step == at:
            target.grad = None

    return drop


@CASES
@DTYPES
def test_a_parameter_without_a_gradient_in_one_record_is_quiet(kind, shared, groups, dtype):
    """A parameter the check samples has no gradient at one step only (torch skips it
    there: its value and state stay): batched with the records around it, no alert."""
    job = Job(kind, shared, groups, dtype, foreach=False)
    drop = _without_grad_at(job, START + 4)
    job.train(8, before=drop)
    assert len(job.check._pending) == 8
    skipped = job.check._pending[4].slots[0]
    assert skipped.before is not None
    assert skipped.before.grad is None
    assert job.drain() == []
    assert job.events == []


@CASES
@DTYPES
def test_a_change_in_a_step_that_torch_skips_is_named(kind, shared, groups, dtype):
    """The same, with the skipped parameter changed after the step: named as changed in a
    step torch skips, with that record's step and the coordinate."""
    job = Job(kind, shared, groups, dtype, foreach=False)
    drop = _without_grad_at(job, START + 4)
    job.corrupt(START + 4)
    job.train(8, before=drop)
    alerts = job.drain()
    (name, coord) = job.found[0]
    assert [a.detector for a in alerts] == ["update"]
    assert alerts[0].step == START + 4
    assert "a step that torch skips" in alerts[0].message
    assert (alerts[0].details["param"], alerts[0].details["coordinate"]) == (name, coord)


@CASES
def test_a_write_between_steps_is_named_in_its_own_record(kind, shared, groups):
    """Between-step writes checked for all records at once: an optimizer state value
    changed in place after the 2nd of 3 records is named with the 3rd record's step (the
    one whose start saw it), and only once."""
    job = Job(kind, shared, groups, torch.float32, foreach=False)
    job.train(2)
    assert job.drain() == []
    slots = job.drawn(4)  # the 3rd record's sample, read as its baseline after the 2nd
    p = job.check._params[slots[0].index]
    field = "momentum_buffer" if kind is optim.SGD else "exp_avg"
    coord = int(slots[0].coords[0])

    def poke(step: int) -> None:
        if step == START + 4:
            state = job.opt.state[p].get(field)
            if state is None:  # a group without momentum: poke the parameter itself
                p.data.view(-1)[coord] += 0.25
            else:
                state.view(-1)[coord] += 0.25

    job.train(3, before=poke)
    alerts = job.drain()
    assert [a.details["kind"] for a in alerts] == ["between"]
    assert alerts[0].step == START + 4
    assert alerts[0].details["coordinate"] == coord
    assert alerts[0].details["param"] == job.check._names[id(p)]


@DTYPES
@pytest.mark.parametrize("kind", [optim.Adam, optim.AdamW], ids=["adam", "adamw"])
def test_a_wrong_step_count_is_named_in_its_own_record(kind, dtype):
    """Adam's step count advanced twice by one step, in the 2nd of 3 records: named as the
    ``step`` field, with that record's step (each record has its own count)."""
    job = Job(kind, {"lr": 1e-2}, ({"amsgrad": True}, {}), dtype, foreach=False)
    job.train(2)
    assert job.drain() == []

    def bump(step: int) -> None:
        if step == START + 3:
            record = job.check._current
            assert record is not None
            p = job.check._params[record.slots[0].index]
            job.opt.state[p]["step"] += 1
            job.found.append((job.check._names[id(p)], int(record.slots[0].coords[0])))

    job.afters.append(bump)
    job.train(3)
    alerts = job.drain()
    assert [a.details["field"] for a in alerts] == ["step"]
    assert alerts[0].step == START + 3
    assert (alerts[0].details["param"], alerts[0].details["coordinate"]) == job.found[0]
