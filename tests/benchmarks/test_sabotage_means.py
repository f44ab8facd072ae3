"""The sabotage benchmark's second axis, the means (issue 11): the table and the new attacks.

Fast and in one process: the scenario table covers every goal through at least three means,
and each new in-process attack really changes the state it claims to (a real model, a real
AdamW, a real DistributedSampler and DataLoader, trainguard's real modules), without the
implant's global hooks or torchrun. The outside attackers run against a real SQLite file,
a real log and a real child process.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from benchmarks.sabotage import attackers, implant
from benchmarks.sabotage.model import GPT, PRESETS, ModelConfig
from benchmarks.sabotage.scenarios import GOALS, MEANS, SCENARIOS

#: goals where interfering only between checks is a way to hide: the state is read at checks
OFF_CHECK_GOALS = {"optimizer", "gradients", "data", "seeds", "weights", "liveness"}


def test_every_goal_is_reached_through_at_least_three_means() -> None:
    means: dict[str, set[str]] = defaultdict(set)
    for sc in SCENARIOS:
        assert sc.goal in GOALS, sc.name
        assert sc.means in MEANS, sc.name
        means[sc.goal].add(sc.means)
    assert set(means) == set(GOALS)
    for goal in GOALS:
        assert len(means[goal]) >= 3, (goal, means[goal])
    for goal in OFF_CHECK_GOALS:
        assert "non-check-steps" in means[goal], goal
    assert {sc.means for sc in SCENARIOS} >= {"guard-tamper", "non-check-steps"}
    assert len({sc.name for sc in SCENARIOS}) == len(SCENARIOS)


def test_off_check_attacks_know_the_check_steps() -> None:
    s = implant.Implant(spec={"every": 10})
    assert [step for step in range(30) if implant.is_check_step(s, step)] == [9, 19, 29]
    for sc in SCENARIOS:
        if sc.means == "non-check-steps" and sc.kind == "implant":
            assert sc.params["action"] in implant.ACTIONS, sc.name


@pytest.fixture
def job(monkeypatch: pytest.MonkeyPatch) -> Iterator[implant.Implant]:
    """A tiny GPT and its AdamW after two real steps, held by a fresh implant state."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, dropout=0.1, **PRESETS["tiny"])
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 16, (2, cfg.block_size))
    for _ in range(2):
        opt.zero_grad()
        model(x, x)[1].backward()
        opt.step()
    spec = {"action": "test", "step": 0, "rank": 0}
    monkeypatch.setenv("SABOTAGE_IMPLANT", json.dumps(spec))
    s = implant.Implant()
    s.reset(opt)
    s.model_for_test = model  # type: ignore[attr-defined]
    yield s
    s.reset(opt)  # restores every patch the attack made


def _grads(s: implant.Implant) -> None:
    model = s.model_for_test  # type: ignore[attr-defined]
    assert s.optimizer is not None
    s.optimizer.zero_grad()
    x = torch.randint(0, 16, (2, 32), generator=torch.Generator().manual_seed(1))
    model(x, x)[1].backward()


def test_optimizer_state_is_edited_in_place(job: implant.Implant) -> None:
    assert job.optimizer is not None
    states = [job.optimizer.state[p]["exp_avg_sq"] for p in implant._params(job.optimizer)]
    before = [t.clone() for t in states]
    implant._optimizer_state_inplace(job, job.optimizer)
    for t, b in zip(states, before, strict=True):
        assert torch.equal(t, b * 0.5)  # the same tensors, changed in place


def test_swapped_adam_function_triples_the_update_and_leaves_step_alone(
    job: implant.Implant,
) -> None:
    assert job.optimizer is not None
    step = torch.optim.AdamW.step
    _grads(job)
    snapshot = {
        "params": [p.detach().clone() for p in implant._params(job.optimizer)],
        "state": {
            k: {n: v.clone() for n, v in st.items()} for k, st in job.optimizer.state.items()
        },
    }
    job.optimizer.step()
    clean = [p.detach().clone() for p in implant._params(job.optimizer)]
    with torch.no_grad():  # back to before the step, then the same step under the attack
        for p, b in zip(implant._params(job.optimizer), snapshot["params"], strict=True):
            p.copy_(b)
        for k, st in snapshot["state"].items():
            for n, v in st.items():
                job.optimizer.state[k][n].copy_(v)
    implant._swap_adam_function(job)
    job.optimizer.step()
    assert torch.optim.AdamW.step is step
    moved = [
        float((p.detach() - b).abs().sum())
        for p, b in zip(implant._params(job.optimizer), snapshot["params"], strict=True)
    ]
    clean_moved = [
        float((c - b).abs().sum()) for c, b in zip(clean, snapshot["params"], strict=True)
    ]
    assert sum(moved) > 2.0 * sum(clean_moved)


def test_model_state_attacks_change_the_model(job: implant.Implant) -> None:
    model = job.model_for_test  # type: ignore[attr-defined]
    implant._dropout_p(job)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.5}
    implant._module_eval(job)
    assert not next(m for m in model.modules() if type(m).__name__ == "Block").training
    assert model.training
    params = dict(model.named_parameters())
    name = sorted(n for n in params if n.endswith("fc.weight"))[0]
    before, storage = params[name].detach().clone(), params[name].data_ptr()
    implant._replace_param_data(job)
    assert params[name] is dict(model.named_parameters())[name]  # the same Parameter object
    assert params[name].data_ptr() != storage
    assert torch.allclose(params[name].detach(), before * 1.5)


def test_weights_off_check_noise_is_never_there_at_a_check(job: implant.Implant) -> None:
    assert job.optimizer is not None
    params = implant._params(job.optimizer)
    clean = [p.detach().clone() for p in params]
    job.spec = {**job.spec, "every": 10}
    job.completed = 10  # after step 9, a check step: its guard.step is still to come
    implant._weights_off_check_add(job, job.optimizer)
    assert all(torch.equal(p, c) for p, c in zip(params, clean, strict=True))
    job.completed = 12  # after step 11: no check until step 19
    implant._weights_off_check_add(job, job.optimizer)
    assert not all(torch.equal(p, c) for p, c in zip(params, clean, strict=True))
    implant._weights_off_check_remove(job, job.optimizer)  # before step 12's update
    assert all(torch.allclose(p, c, atol=1e-6) for p, c in zip(params, clean, strict=True))


def test_rng_rewind_replays_the_same_numbers(job: implant.Implant) -> None:
    assert job.optimizer is not None
    implant._rng_rewind(job, job.optimizer)
    first = torch.rand(4)
    implant._rng_rewind(job, job.optimizer)
    assert torch.equal(torch.rand(4), first)
    job.spec = {**job.spec, "only_off_check": True, "every": 10}
    job.completed = 9  # a check step: left alone
    implant._rng_rewind(job, job.optimizer)
    assert not torch.equal(torch.rand(4), first)


def test_sampler_rank_and_live_iterator_point_at_another_shard(job: implant.Implant) -> None:
    from torch.utils.data import DataLoader, DistributedSampler

    data = list(range(64))
    sampler = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    it = iter(loader)
    mine = next(it).tolist()
    job.spec = {**job.spec, "rank": 1}
    implant._sampler_other_rank(job)  # one process: no other rank, nothing to point at
    assert sampler.rank == 0
    rank0 = [int(i) for i in DistributedSampler(data, num_replicas=2, rank=0, seed=0)]
    assert next(it).tolist() == rank0[4:8]  # rank 0's second batch, not this rank's
    assert mine != rank0[:4]


def test_guard_tamper_replaces_trainguard_functions_where_they_are_bound(
    job: implant.Implant,
) -> None:
    from trainguard.runtime import agreement, fingerprint, guard

    compare, params_hash = agreement.compare, fingerprint.params_hash
    job.spec = {**job.spec, "tamper": ["compare", "params_hash"], "then": "set-lr"}
    implant._guard_tamper(job)
    assert job.saved["report"]["tampered"]["compare"] >= 1
    assert agreement.compare(0, torch.zeros(2, 2)) == []
    model = job.model_for_test  # type: ignore[attr-defined]
    frozen = guard.params_hash(model)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert torch.equal(fingerprint.params_hash(model), frozen)  # the same frozen value
    assert job.optimizer is not None
    job.reset(job.optimizer)
    assert agreement.compare is compare
    assert fingerprint.params_hash is params_hash


def test_live_cut_deletes_the_last_ledger_rows_and_log_lines(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "ledger.db")
    db.execute("create table entries (seq integer primary key, body text)")
    db.executemany("insert into entries values (?, ?)", [(i, f"e{i}") for i in range(20)])
    db.commit()
    db.close()
    (tmp_path / "train.log").write_text("".join(f"step {i} loss 1.0\n" for i in range(12)))
    record = attackers.cut_when(tmp_path, step=10, count=5, timeout_s=5)
    assert record["sent"]
    assert record["records_changed"] == 10
    rows = sqlite3.connect(tmp_path / "ledger.db").execute("select max(seq) from entries")
    assert rows.fetchone()[0] == 14
    assert len((tmp_path / "train.log").read_text().splitlines()) == 7


def test_sigstop_pauses_a_process_and_sigcont_resumes_it(tmp_path: Path) -> None:
    (tmp_path / "pids").mkdir()
    (tmp_path / "train.log").write_text("step 3 loss 1.0\n")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "pids" / "rank1.pid").write_text(str(child.pid))
        started = time.monotonic()
        record = attackers.kill_when(tmp_path, 1, 3, "STOP", timeout_s=5, pause_s=0.3)
        assert record["sent"]
        assert record["paused_s"] == 0.3
        assert time.monotonic() - started >= 0.3
        state = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state in ("S", "R")  # running again, not stopped (T)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
