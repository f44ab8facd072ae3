"""One regression test per way around the Guard's sensors found by reading their code.

PYTEST_DONT_REWRITE: the job's code here is declared to the Guard, and the Guard checks
that code objects are what their file compiles to (pytest's rewriting would change them).

Each attacker's part is imported from a folder outside the job (the ``foreign`` fixture),
as an insider's module in /tmp or a ``sitecustomize`` on a writable path would be. The
techniques come from an internal red-team pass against the provenance sensors (2026-11-24).
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest

from tests.runtime import test_guard
from tests.runtime.test_guard import make, train
from trainguard.errors import Severity

JOB = [test_guard.__file__, __file__]


def high(guard) -> list[tuple[str, str]]:
    return [(a.detector, a.message) for a in guard.alerts if a.severity >= Severity.HIGH]


def attacked(tmp_path, key, attack, *, at=3, steps=8, **options):
    model, optimizer, guard = make(tmp_path, key, code_roots=JOB, **options)
    try:
        train(
            model,
            optimizer,
            guard,
            steps,
            before_step=lambda s: attack(model, optimizer) if s == at else None,
        )
    finally:
        guard.close()
    return guard


def test_switching_the_sensors_off_is_tamper_evidence(tmp_path, owner_key, foreign):
    """Calling the fork handler that disarms the sensors, in the parent, then re-seeding."""
    implant = foreign(
        """
        import torch
        from trainguard.runtime import sensors
        def attack(model, optimizer):
            sensors._disarm_in_child()
            torch.manual_seed(0)
        """
    )
    guard = attacked(tmp_path, owner_key, implant.attack)
    assert any(d == "guard-tampered" for d, _ in high(guard)), high(guard)


def test_libc_reached_through_ctypes_is_blocked(tmp_path, owner_key, foreign):
    """``ctypes.CDLL(None).system(...)`` calls libc directly: no subprocess event at all."""
    marker = tmp_path / "RAN"
    implant = foreign(
        f"""
        import ctypes
        def attack():
            ctypes.CDLL(None).system(b"touch {marker}")
        """
    )
    model, optimizer, guard = make(tmp_path, owner_key, code_roots=JOB, policy="halt")
    with pytest.raises(PermissionError):
        implant.attack()
    guard.close()
    assert not marker.exists()
    assert any(d.startswith("sensor:ctypes") for d, _ in high(guard)), high(guard)


def test_a_decorators_closure_cell_pointed_elsewhere(tmp_path, owner_key, foreign):
    """``Adam.step`` is a decorator's wrapper; its closure cell holds the real step. Swap the
    cell's contents: identity and code of the watched function stay the same."""
    implant = foreign(
        """
        import torch
        cell = torch.optim.Adam.step.__closure__[0]
        original = cell.cell_contents
        def attack(model, optimizer):
            cell.cell_contents = lambda self, closure=None: original(self, closure)
        """
    )
    try:
        guard = attacked(tmp_path, owner_key, implant.attack)
    finally:
        implant.cell.cell_contents = implant.original
    assert any("defaults or closure" in m for _, m in high(guard)), high(guard)


def test_a_helper_in_the_optimizer_modules_namespace(tmp_path, owner_key, foreign):
    """``torch.optim.adam._get_value`` is imported from elsewhere, so it is not adam's own
    function; the optimizer calls it through adam's globals."""
    adam = sys.modules["torch.optim.adam"]
    implant = foreign(
        """
        import sys
        adam = sys.modules["torch.optim.adam"]
        original = adam._get_value
        def attack(model, optimizer):
            adam._get_value = lambda x: original(x)
        """
    )
    try:
        guard = attacked(tmp_path, owner_key, implant.attack)
    finally:
        adam._get_value = implant.original
    assert any("_get_value was replaced" in m for _, m in high(guard)), high(guard)


def test_a_watched_functions_defaults(tmp_path, owner_key, foreign):
    """``mse_loss.__defaults__`` changed: same function, same code, another reduction."""
    implant = foreign(
        """
        import torch
        f = torch.nn.functional.mse_loss
        saved = f.__defaults__
        def attack(model, optimizer):
            d = list(f.__defaults__)
            d[2] = "sum"
            f.__defaults__ = tuple(d)
        """
    )
    try:
        guard = attacked(tmp_path, owner_key, implant.attack)
    finally:
        implant.f.__defaults__ = implant.saved
    assert any("mse_loss had its defaults" in m for _, m in high(guard)), high(guard)


@pytest.mark.parametrize(
    "hook",
    [
        "torch.nn.init.zeros_",
        "functools.singledispatch(lambda g: g * -100.0)",
        "functools.partial(torch.mul, other=-100.0)",
    ],
    ids=["a-torch-function", "a-standard-library-wrapper", "a-partial-of-a-c-function"],
)
def test_a_gradient_hook_laundered_through_trusted_code(tmp_path, owner_key, foreign, hook):
    """The hook's code is torch's or the standard library's, so its file says nothing about
    who registered it."""
    implant = foreign(
        f"""
        import functools, torch
        hook = {hook}
        def attack(model, optimizer):
            model[0].weight.register_hook(hook)
        """
    )
    guard = attacked(tmp_path, owner_key, implant.attack)
    assert any(d == "hooks" for d, _ in high(guard)), high(guard)


def test_a_setting_that_compares_equal_to_its_old_value(tmp_path, owner_key, foreign):
    """``weight_decay`` as a float subclass whose ``__eq__`` is always true and whose repr
    is the old value; AdamW computes with 50.0."""
    implant = foreign(
        """
        class Same(float):
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            __hash__ = float.__hash__
            def __repr__(self): return "0.01"
        def attack(model, optimizer):
            for group in optimizer.param_groups:
                group["weight_decay"] = Same(50.0)
        """
    )
    guard = attacked(tmp_path, owner_key, implant.attack)
    assert any("weight_decay of group 0 from 0.01 to 50.0" in m for _, m in high(guard))


def test_a_learning_rate_whose_float_lies(tmp_path, owner_key, foreign):
    """``lr`` as a float subclass whose ``__float__`` returns the scheduled rate."""
    implant = foreign(
        """
        class Lr(float):
            def __float__(self): return 1e-2
            def __repr__(self): return "0.01"
        def attack(model, optimizer):
            for group in optimizer.param_groups:
                group["lr"] = Lr(10.0)
        """
    )
    guard = attacked(tmp_path, owner_key, implant.attack, lr_schedule=lambda s: 1e-2)
    assert any(d == "lr-schedule" for d, _ in high(guard)), high(guard)


def test_trusted_bytecode_with_other_names(tmp_path, owner_key, foreign):
    """``code.replace(co_names=("os", "system"))`` on a standard-library function keeps its
    bytecode and its file name; registered as an optimizer hook, it calls os.system."""
    marker = tmp_path / "RAN"
    implant = foreign(
        f"""
        import _pyio, functools, os, types
        from torch.optim.optimizer import register_optimizer_step_post_hook
        source = compile(open(_pyio.__file__).read(), _pyio.__file__, "exec")
        stack, template = [source], None
        while stack:
            c = stack.pop()
            stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]
            if c.co_name == "__repr__" and c.co_names == ("object", "__repr__"):
                template = c
        code = template.replace(
            co_names=("os", "system"), co_argcount=4, co_varnames=("s", "b", "c", "d"),
            co_nlocals=4,
        )
        forged = types.FunctionType(code, {{"os": os}})
        handles = []
        def attack(model, optimizer):
            handles.append(register_optimizer_step_post_hook(
                functools.partial(forged, "touch {marker}")))
        """
    )
    model, optimizer, guard = make(tmp_path, owner_key, code_roots=JOB, policy="halt")
    try:
        # the hook runs inside optimizer.step: its os.system is refused there
        with pytest.raises(PermissionError):
            train(
                model,
                optimizer,
                guard,
                8,
                before_step=lambda s: implant.attack(model, optimizer) if s == 3 else None,
            )
    finally:
        for handle in implant.handles:
            handle.remove()
        guard.close()
    assert not marker.exists()
    detectors = {d for d, _ in high(guard)}
    assert "sensor:os.system" in detectors, high(guard)


def test_the_jobs_own_thread_running_a_subprocess_is_not_an_alert(tmp_path, owner_key):
    """False alarm found by the same pass: the job hands a subprocess (a checkpoint upload)
    to a background thread, whose stack then holds only standard-library frames."""
    import threading

    marker = tmp_path / "uploaded"

    def upload(step: int) -> None:
        if step == 3:
            worker = threading.Thread(target=subprocess.run, args=(["touch", str(marker)],))
            worker.start()
            worker.join()

    model, optimizer, guard = make(tmp_path, owner_key, code_roots=JOB, policy="halt")
    train(model, optimizer, guard, 6, before_step=upload)
    guard.close()
    assert marker.exists()
    assert guard.alerts == []


def test_sanity_the_same_job_without_attack_is_quiet(tmp_path, owner_key):
    guard = attacked(tmp_path, owner_key, lambda model, optimizer: None)
    assert guard.alerts == []
    assert functools  # imported for the parametrised hooks' sources
