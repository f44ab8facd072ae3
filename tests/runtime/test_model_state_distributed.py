"""Model state beyond parameters on two real gloo ranks: the interfered rank is named.

Each scenario changes rank 1 at step AT (tests/runtime/worker.py): a setting or training
flag from an insider's module, a buffer edited in place (DDP told not to broadcast
buffers, so the BatchNorm statistics differ per rank as they do in real jobs, and must
not alarm), a gradient-scaling hook on a parameter's AccumulateGrad node.
"""

from __future__ import annotations

import pytest

from tests.runtime.test_guard_distributed import alerts, run
from tests.runtime.worker import AT, VICTIM

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize(
    ("scenario", "detector", "field"),
    [
        ("dropout", "model-state", "attributes"),
        ("eval", "model-state", "modes"),
        ("buffer", None, "buffers"),
        ("node-hook", "hooks", None),
    ],
)
def test_model_state_interference_names_the_rank(tmp_path, owner_key, scenario, detector, field):
    run_dir, codes = run(scenario, tmp_path, owner_key)
    assert codes == [0, 0]
    mine = alerts(run_dir, VICTIM)
    everything = mine + alerts(run_dir, 0)
    assert everything, "the interference is seen"
    # the victim is named, and no other rank ever is: the gradient check may add an honest
    # "cannot tell" (rank None) about gradients the interference moved out of family
    assert VICTIM in {a["rank"] for a in everything}, everything
    assert {a["rank"] for a in everything} <= {VICTIM, None}, everything
    assert AT <= min(a["step"] for a in everything) <= AT + 2 * 5, "within two check intervals"
    if detector is not None:
        assert any(a["detector"] == detector for a in mine), mine
    if field is not None:
        cross = [a for a in alerts(run_dir, 0) if a["detector"] == "agreement"]
        assert [a["details"]["field"] for a in cross] == [field], cross
