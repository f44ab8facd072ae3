"""The arithmetic of the update-integrity check (``update_check.py``): what torch's SGD,
Adam and AdamW must make of a parameter's sampled coordinates, recomputed in float64 from
the gradient, the optimizer state and the settings read around the step, and the
tolerance each comparison allows (a few epsilons of the dtype times the magnitude of the
terms summed, so that fused, foreach and plain kernels all agree with it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: slack, in units of the dtype's epsilon times the magnitude of the terms summed
_SLACK = 8.0
_TINY = float(np.finfo(np.float32).tiny)
_FIRST = np.zeros(1, dtype=np.int64)


def _f64(values: Any) -> np.ndarray:
    if isinstance(values, tuple):  # bf16 bits: the upper half of a float32
        bits = values[1].astype(np.uint16).astype(np.uint32) << 16
        out: np.ndarray = bits.view(np.float32).astype(np.float64)
        return out
    if isinstance(values, torch.Tensor):
        return values.detach().to(torch.float64).cpu().numpy().reshape(-1)
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _first(value: Any) -> float:
    return float(_f64(_scalar_value(value))[0])


def _num(value: Any) -> float:
    return float(value) if value is not None else 0.0


@dataclass
class _Reading:
    """One tensor's sampled coordinates, read at one moment."""

    param: Any
    version: int
    pointer: int
    grad: Any = None  # None: no gradient, torch skips the parameter
    state: dict[str, tuple[torch.Tensor, Any]] = field(default_factory=dict)
    step: Any = None


@dataclass
class _Slot:
    """A tensor of the sample and what was read of it around one step."""

    index: int  # position in the optimizer's flat parameter list
    coords: np.ndarray
    baseline: _Reading | None = None  # at the end of the previous step
    before: _Reading | None = None
    after: _Reading | None = None
    group: dict[str, Any] = field(default_factory=dict)


def _scalar_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return float(value.cpu())
    return value


def _mismatch(expected: np.ndarray, actual: np.ndarray, tol: np.ndarray) -> int | None:
    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.abs(actual - expected) <= tol
    # a coordinate whose inputs were not finite is the NonFinite detector's
    ok |= ~np.isfinite(expected)
    wrong = np.flatnonzero(~ok)
    return int(wrong[0]) if len(wrong) else None


def _finding(
    name: str,
    slot: _Slot,
    what: str,
    i: int,
    expected: np.ndarray,
    actual: np.ndarray,
    tol: np.ndarray,
) -> tuple[str, str, dict[str, Any]]:
    coord = int(slot.coords[i])
    where = "" if what == "param" else f"{what} of "
    text = (
        f"optimizer.step did not compute the update: {where}{name}[{coord}] became "
        f"{float(actual[i])!r}, expected {float(expected[i])!r} (tolerance {float(tol[i]):.3g})"
    )
    details = {
        "kind": "update",
        "param": name,
        "coordinate": coord,
        "field": what,
        "expected": float(expected[i]),
        "actual": float(actual[i]),
        "tolerance": float(tol[i]),
    }
    return "update", text, details


def _equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    same: np.ndarray = (a == b) | (np.isnan(a) & np.isnan(b))
    return same


def _between(name: str, slot: _Slot, eps: float) -> list[tuple[str, str, dict[str, Any]]]:
    """Values that changed between the end of the previous step and this one."""
    base, now = slot.baseline, slot.before
    assert base is not None
    assert now is not None
    changes: list[tuple[str, np.ndarray, np.ndarray]] = []
    # a write the version counter saw (or a new storage) is the params-written sensor's
    if base.version == now.version and base.pointer == now.pointer:
        changes.append(("param", _f64(base.param), _f64(now.param)))
    for key, (tensor, values) in base.state.items():
        current = now.state.get(key)
        # a state tensor replaced (load_state_dict) is a restore, not a write
        if current is not None and current[0] is tensor:
            changes.append((key, _f64(values), _f64(current[1])))
    if base.step is not None and now.step is not None and base.step[0] is now.step[0]:
        changes.append(
            ("step", _f64(_scalar_value(base.step[1])), _f64(_scalar_value(now.step[1])))
        )
    found = []
    for what, was, became in changes:
        wrong = np.flatnonzero(~_equal(was, became))
        if len(wrong):
            i = int(wrong[0])
            coord = int(slot.coords[i]) if what != "step" else 0
            where = "" if what == "param" else f"{what} of "
            text = (
                f"written between optimizer steps, outside them: {where}{name}[{coord}] "
                f"was {float(was[i])!r} after a step and {float(became[i])!r} before the next"
            )
            details = {"kind": "between", "param": name, "coordinate": coord, "field": what}
            details.update(expected=float(was[i]), actual=float(became[i]))
            found.append(("between", text, details))
    return found


def _unchanged(name: str, slot: _Slot, why: str) -> list[tuple[str, str, dict[str, Any]]]:
    before, after = slot.before, slot.after
    assert before is not None
    assert after is not None
    was, became = _f64(before.param), _f64(after.param)
    wrong = np.flatnonzero(~_equal(was, became))
    if not len(wrong):
        return []
    i = int(wrong[0])
    text = (
        f"optimizer.step changed {name}[{int(slot.coords[i])}] from {float(was[i])!r} to "
        f"{float(became[i])!r} in {why}"
    )
    details = {"kind": "update", "param": name, "coordinate": int(slot.coords[i])}
    details.update(field="param", expected=float(was[i]), actual=float(became[i]))
    return [("update", text, details)]


_Check = tuple[str, np.ndarray, np.ndarray, np.ndarray]


def _state(reading: _Reading, name: str) -> np.ndarray | None:
    value = reading.state.get(name)
    return _f64(value[1]) if value is not None else None


def _sgd(slot: _Slot, g: np.ndarray, eps: float) -> list[_Check]:
    """torch.optim.sgd: ``_single_tensor_sgd``, ``_multi_tensor_sgd``, ``_fused_sgd``."""
    before, after, h = slot.before, slot.after, slot.group
    assert before is not None
    assert after is not None
    p = _f64(before.param)
    lr, wd = _num(_scalar_value(h["lr"])), _num(_scalar_value(h.get("weight_decay", 0)))
    momentum, dampening = _num(h.get("momentum", 0)), _num(h.get("dampening", 0))
    if h.get("maximize"):
        g = -g
    mag = np.abs(g)
    if wd != 0:
        g = g + wd * p
        mag = mag + wd * np.abs(p)
    checks: list[_Check] = []
    d, dmag = g, mag
    if momentum != 0:
        prev = _state(before, "momentum_buffer")
        buf = _state(after, "momentum_buffer")
        if prev is None:  # the first step: the buffer is the gradient
            expected, bmag = g, mag
        else:
            expected = momentum * prev + (1 - dampening) * g
            bmag = momentum * np.abs(prev) + (1 - dampening) * mag
        if buf is None:
            buf = np.full_like(expected, np.nan)
        checks.append(("momentum_buffer", expected, buf, _SLACK * eps * bmag + _TINY))
        if h.get("nesterov"):
            d, dmag = g + momentum * buf, mag + momentum * np.abs(buf)
        else:
            d, dmag = buf, np.abs(buf)
    new = p - lr * d
    tol = eps * (np.abs(p) + np.abs(new)) + _SLACK * eps * lr * dmag + _TINY
    checks.append(("param", new, _f64(after.param), tol))
    return checks


def _adam(slot: _Slot, g: np.ndarray, eps: float) -> list[_Check]:
    """torch.optim.adam (AdamW is Adam with ``decoupled_weight_decay``):
    ``_single_tensor_adam``, ``_multi_tensor_adam``, ``_fused_adam``."""
    before, after, h = slot.before, slot.after, slot.group
    assert before is not None
    assert after is not None
    p = _f64(before.param)
    lr, wd = _num(_scalar_value(h["lr"])), _num(_scalar_value(h.get("weight_decay", 0)))
    beta1, beta2 = (_num(_scalar_value(b)) for b in h["betas"])
    if h.get("maximize"):
        g = -g
    mag = np.abs(g)
    p0 = p
    if wd != 0:
        if h.get("decoupled_weight_decay"):
            p0 = p * (1 - lr * wd)
        else:
            g = g + wd * p
            mag = mag + wd * np.abs(p)
    zero = np.zeros_like(p)
    m = _state(before, "exp_avg")
    v = _state(before, "exp_avg_sq")
    m, v = (zero if m is None else m), (zero if v is None else v)
    step = _first(before.step[1]) if before.step is not None else 0.0
    m_new, v_new = _state(after, "exp_avg"), _state(after, "exp_avg_sq")
    missing = np.full_like(p, np.nan)
    m_new = missing if m_new is None else m_new
    v_new = missing if v_new is None else v_new
    m_exp = beta1 * m + (1 - beta1) * g
    m_tol = _SLACK * eps * (np.abs(m) + (1 - beta1) * (mag + np.abs(m))) + _TINY
    v_exp = beta2 * v + (1 - beta2) * g * g
    v_tol = _SLACK * eps * (beta2 * v + (1 - beta2) * mag * mag) + _TINY
    checks: list[_Check] = [("exp_avg", m_exp, m_new, m_tol), ("exp_avg_sq", v_exp, v_new, v_tol)]
    step_after = _first(after.step[1]) if after.step is not None else np.nan
    one = np.ones(1)
    checks.append(("step", one * (step + 1), one * step_after, one * 0.0))
    t = step + 1
    denom_v = v_new
    if h.get("amsgrad"):
        vmax = _state(before, "max_exp_avg_sq")
        vmax = zero if vmax is None else vmax
        vmax_new = _state(after, "max_exp_avg_sq")
        vmax_new = missing if vmax_new is None else vmax_new
        checks.append(("max_exp_avg_sq", np.maximum(vmax, v_new), vmax_new, v_tol))
        denom_v = vmax_new
    denom = np.sqrt(denom_v) / np.sqrt(1 - beta2**t) + _num(_scalar_value(h["eps"]))
    delta = lr / (1 - beta1**t) * m_new / denom
    new = p0 - delta
    tol = eps * (np.abs(p) + np.abs(new)) + _SLACK * eps * np.abs(delta) + _TINY
    checks.append(("param", new, _f64(after.param), tol))
    return checks
