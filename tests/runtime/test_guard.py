"""The Guard in one process: each sensor and detector on a real model and optimizer.

PYTEST_DONT_REWRITE: this file plays the job's own code, and the Guard checks that code
objects are what their file compiles to; pytest's assertion rewriting would make them not.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainguard
from trainguard.cli import main
from trainguard.runtime import GuardError, GuardHalt


def make(tmp_path: Path, key: Path, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    settings = {"every": 5, "owner_key": key, "verify_env": False, "seed": 0, **options}
    # this file plays the job's code: declared, as a job declares the code it sealed
    settings.setdefault("code_roots", [__file__])
    guard = trainguard.Guard(model, optimizer, run_dir=tmp_path / "run", **settings)
    return model, optimizer, guard


def train(model, optimizer, guard, steps, before_step=None, loss_scale=None):
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(16, 8, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
        if loss_scale is not None:
            loss = loss * loss_scale(step)
        optimizer.zero_grad()
        loss.backward()
        if before_step is not None:
            before_step(step)
        optimizer.step()
        guard.step(loss=loss)


def detectors(guard) -> set[str]:
    return {a.detector for a in guard.alerts}


def test_clean_training_is_quiet_and_closes_the_ledger(tmp_path, owner_key):
    model, optimizer, guard = make(tmp_path, owner_key, lr_schedule=lambda s: 1e-2)
    train(model, optimizer, guard, 60)
    guard.close()
    assert guard.alerts == []
    assert main(["ledger", "verify", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "alerts-rank0.json").read_text()) == []


def test_monkeypatched_optimizer_step_is_named(tmp_path, owner_key, foreign):
    model, optimizer, guard = make(tmp_path, owner_key)
    original = torch.optim.AdamW.step
    implant = foreign(
        """
        import torch
        original = torch.optim.AdamW.step
        def patched(self, *args, **kwargs):
            return original(self, *args, **kwargs)
        """
    )
    patched = implant.patched

    inherited = "step" not in vars(torch.optim.AdamW)
    try:
        train(model, optimizer, guard, 3)
        torch.optim.AdamW.step = patched
        train(model, optimizer, guard, 5)
    finally:
        if inherited:
            del torch.optim.AdamW.step
        else:
            torch.optim.AdamW.step = original
        guard.close()
    found = [a for a in guard.alerts if a.detector == "monkeypatch"]
    # AdamW inherits step from Adam: patching AdamW.step adds a name to its class
    assert any("AdamW.step" in a.message for a in found), [a.message for a in found]
    assert "unknown code" in found[0].message


def test_a_patch_by_the_jobs_own_code_is_recorded_not_alerted(tmp_path, owner_key):
    """The job (here: this test file, declared as the job's code) wrapping a torch
    function is the job's own business: recorded in the ledger, no alert."""
    model, optimizer, guard = make(tmp_path, owner_key)
    original = torch.nn.functional.mse_loss

    def logged(*args, **kwargs):
        return original(*args, **kwargs)

    try:
        torch.nn.functional.mse_loss = logged
        train(model, optimizer, guard, 6)
    finally:
        torch.nn.functional.mse_loss = original
        guard.close()
    assert guard.alerts == []
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainguard",
            "ledger",
            "show",
            str(tmp_path / "run"),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    events = [
        e["payload"] for e in json.loads(shown.stdout)["entries"] if e["kind"] == "sensor.event"
    ]
    assert any(e.get("event") == "monkeypatch" and e["origin"] == "job" for e in events), events


def test_functional_code_swap_is_seen(tmp_path, owner_key, foreign):
    """Swapping a function's ``__code__`` keeps its identity: only the code check sees it."""
    damped = foreign(
        """
        def damped(input, target, *args, **kwargs):
            return ((input - target) ** 2).mean() * 0.5
        """
    ).damped

    model, optimizer, guard = make(tmp_path, owner_key)
    code = torch.nn.functional.mse_loss.__code__
    try:
        torch.nn.functional.mse_loss.__code__ = damped.__code__
        train(model, optimizer, guard, 5)
    finally:
        torch.nn.functional.mse_loss.__code__ = code
        guard.close()
    assert any("mse_loss had its code replaced" in a.message for a in guard.alerts)


def test_new_global_optimizer_hook_is_reported(tmp_path, owner_key, foreign):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    model, optimizer, guard = make(tmp_path, owner_key)
    hook = foreign("hook = lambda *a: None").hook
    handle = register_optimizer_step_pre_hook(hook)
    mine = register_optimizer_step_pre_hook(lambda *a: None)  # the job's own: fine
    try:
        train(model, optimizer, guard, 5)
    finally:
        handle.remove()
        mine.remove()
        guard.close()
    (alert,) = guard.alerts
    assert "global optimizer pre-step hook" in alert.message
    assert "implant" in alert.message


@pytest.mark.parametrize(
    "source",
    [
        "import functools, torch\nhook = functools.partial(torch.mul, other=8.0)",
        "hook = compile('lambda g: g * 8', '<attack>', 'eval')\nhook = eval(hook)",
    ],
    ids=["partial-of-a-c-function", "compiled-from-a-string"],
)
def test_a_gradient_hook_nobody_can_vouch_for_is_reported(tmp_path, owner_key, foreign, source):
    """Evasions of attribution: a hook that is a partial of a torch C function (no Python
    code of its own), or code compiled from a string."""
    model, optimizer, guard = make(tmp_path, owner_key)
    hook = foreign(source).hook
    model[0].weight.register_hook(hook)
    train(model, optimizer, guard, 5)
    guard.close()
    assert any(a.detector == "hooks" and "gradient hook" in a.message for a in guard.alerts)


def test_a_module_dropped_next_to_the_job_is_not_the_jobs_code(tmp_path, owner_key):
    """Evasion: put the implant inside the job's own repository (next to the job's
    modules) so that a folder-based notion of "the job's code" would vouch for it. Only the
    entry script and the declared code roots are the job's."""
    implant = Path(__file__).with_name("_dropped_implant_for_test.py")
    implant.write_text("import torch\ndef reseed():\n    torch.manual_seed(4242)\n")
    try:
        import importlib

        module = importlib.import_module("tests.runtime._dropped_implant_for_test")
        model, optimizer, guard = make(tmp_path, owner_key)
        train(model, optimizer, guard, 3, before_step=lambda s: s == 1 and module.reseed())
        guard.close()
    finally:
        implant.unlink()
        sys.modules.pop("tests.runtime._dropped_implant_for_test", None)
    assert "sensor:reseed" in detectors(guard)


def test_code_claiming_a_trusted_file_is_unknown(tmp_path, owner_key):
    """Evasion: compile the attack with a torch file's name, so that its frames and its
    function look like torch's. Its bytes are not what that file compiles to."""
    model, optimizer, guard = make(tmp_path, owner_key)
    namespace: dict = {}
    adam = sys.modules["torch.optim.adam"].__file__
    exec(compile("def hook(*a):\n    return None\n", adam, "exec"), namespace)
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(namespace["hook"])
    try:
        train(model, optimizer, guard, 5)
    finally:
        handle.remove()
        guard.close()
    assert any(a.detector == "hooks" for a in guard.alerts), [a.message for a in guard.alerts]


def test_learning_rate_off_schedule(tmp_path, owner_key):
    model, optimizer, guard = make(tmp_path, owner_key, lr_schedule=lambda s: 1e-2)

    def bump(step):
        if step == 7:
            optimizer.param_groups[0]["lr"] = 5e-2

    train(model, optimizer, guard, 10, before_step=bump)
    guard.close()
    (alert,) = [a for a in guard.alerts if a.detector == "lr-schedule"]
    assert alert.step == 7


def test_betas_changed(tmp_path, owner_key):
    model, optimizer, guard = make(tmp_path, owner_key)

    def change(step):
        if step == 4:
            optimizer.param_groups[0]["betas"] = (0.5, 0.9)

    train(model, optimizer, guard, 8, before_step=change)
    guard.close()
    assert "hyperparameters" in detectors(guard)


def test_reseed_and_nan(tmp_path, owner_key, foreign):
    model, optimizer, guard = make(tmp_path, owner_key)
    implant = foreign("import torch\ndef reseed():\n    torch.manual_seed(99)\n")

    def reseed(step):
        if step == 2:
            torch.manual_seed(7)  # the job's own re-seed: recorded, not an alert
        if step == 3:
            implant.reseed()

    train(
        model,
        optimizer,
        guard,
        6,
        before_step=reseed,
        loss_scale=lambda s: math.nan if s == 5 else 1.0,
    )
    guard.close()
    assert {"sensor:reseed", "nonfinite"} <= detectors(guard)
    (reseed,) = [a for a in guard.alerts if a.detector == "sensor:reseed"]
    assert reseed.step == 3
    assert "implant" in reseed.details["by"]


def test_loss_spike_after_warmup(tmp_path, owner_key):
    model, optimizer, guard = make(tmp_path, owner_key)
    train(model, optimizer, guard, 60, loss_scale=lambda s: 1000.0 if s >= 50 else 1.0)
    guard.close()
    (alert,) = [a for a in guard.alerts if a.detector == "loss-anomaly"]
    assert 50 <= alert.step <= 53


def test_subprocess_is_recorded_and_blocked_under_halt(tmp_path, owner_key, foreign):
    model, optimizer, guard = make(tmp_path, owner_key, policy="halt")
    mine = tmp_path / "MINE"
    subprocess.run(["touch", str(mine)], check=True)  # the job's own: runs, no alert
    assert mine.exists()
    assert guard.alerts == []
    marker = tmp_path / "RAN"
    implant = foreign("import subprocess\ndef run(m):\n    subprocess.run(['touch', m])\n")
    with pytest.raises(PermissionError):
        implant.run(str(marker))
    assert not marker.exists()
    assert any(a.detector == "sensor:subprocess.Popen" for a in guard.alerts)
    with pytest.raises(GuardHalt):
        train(model, optimizer, guard, 1)
    guard.close(GuardHalt(guard.alerts[0]))


def test_unpickling_outside_the_allowlist_is_seen(tmp_path, owner_key):
    import pickle

    model, optimizer, guard = make(tmp_path, owner_key)
    pickle.loads(b"\x80\x02ccollections\ndeque\n)R.")  # plain data: not an event
    pickle.loads(b"\x80\x02cbuiltins\nlen\n.")  # a function a payload could call
    guard.close()
    assert [a.message for a in guard.alerts] == [
        "pickle.find_class: unpickling imports builtins.len"
    ]


def test_signed_checkpoint_round_trip_and_tampering(tmp_path, owner_key):
    model, optimizer, guard = make(tmp_path, owner_key)
    train(model, optimizer, guard, 5)
    guard.save_checkpoint(tmp_path / "ckpt.safetensors")
    reference = [p.detach().clone() for p in model.parameters()]
    train(model, optimizer, guard, 3)
    guard.load_checkpoint(tmp_path / "ckpt.safetensors", rollback=True)
    assert guard.alerts == []
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference, strict=True))
    data = bytearray((tmp_path / "ckpt.safetensors").read_bytes())
    data[-5] ^= 0x01
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(trainguard.CheckpointError):
        guard.load_checkpoint(tmp_path / "bad.safetensors")
    guard.close()
    assert "checkpoint" in detectors(guard)


def test_foreign_pickle_checkpoint_halts_before_training(tmp_path, owner_key):
    import os

    marker = tmp_path / "PAYLOAD-RAN"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    model, optimizer, guard = make(tmp_path, owner_key, policy="halt")
    with pytest.raises(GuardHalt):
        guard.load_checkpoint(tmp_path / "evil.pt")
    guard.close()
    assert not marker.exists()


def test_alert_hook_command_receives_json(tmp_path, owner_key):
    out = tmp_path / "hook.json"
    hook = f"{sys.executable} -c \"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())\""
    model, optimizer, guard = make(tmp_path, owner_key, hook=hook)
    train(model, optimizer, guard, 3, loss_scale=lambda s: math.inf if s == 1 else 1.0)
    guard.close()
    import time

    for _ in range(100):
        if out.exists() and out.read_text():
            break
        time.sleep(0.05)
    text = out.read_text()
    assert text.endswith("\n"), "newline-terminated"
    assert text.count("\n") == 1, "one document"
    payload = json.loads(text)
    assert payload["detector"] == "nonfinite"
    assert payload["run_id"] == guard.ledger.run_id
    assert payload["host"]
    assert payload["time"]
    assert payload["pid"]


def test_bad_arguments_are_clear_errors(tmp_path, owner_key):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GuardError, match="every"):
        trainguard.Guard(model, optimizer, run_dir=tmp_path, every=0, owner_key=owner_key)
    with pytest.raises(GuardError, match="owner key"):
        trainguard.Guard(model, optimizer, run_dir=tmp_path / "nokey", verify_env=False)


def test_environment_drift_halts_before_the_first_step(tmp_path, owner_key):
    keys = owner_key.parent
    code = tmp_path / "train.py"
    code.write_text("print('train')\n")
    manifest = tmp_path / "env.manifest"
    assert main(["seal", str(code), "--key", str(owner_key), "-o", str(manifest)]) == 0
    code.write_text("print('sabotaged')\n")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GuardHalt, match="environment"):
        trainguard.Guard(
            model,
            optimizer,
            run_dir=tmp_path / "run",
            owner_key=owner_key,
            policy="halt",
            manifest=manifest,
            pubkey=keys / "trainguard.pub",
        )
