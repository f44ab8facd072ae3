"""The arithmetic of the update-integrity check (``update_check.py``): what torch's SGD,
Adam and AdamW must make of a parameter's sampled coordinates, recomputed in float64 from
the gradient, the optimizer state and the settings read around the step, and the
tolerance each comparison allows (a few epsilons of the dtype times the magnitude of the
terms summed, so that fused, foreach and plain kernels all agree with it).

All the records pending at a drain are compared at once: their slots grouped by what
steers the update's control flow (``_sgd_signature``, ``_adam_signature``), each group's
settings made per-coordinate columns computed as the per-slot formulas did, the model run
once per group and every field tested in one comparison. Only when something is wrong is
it searched for in (record, slot, field) order, so that the alert is the one a
record-by-record comparison would raise first. Per-call overhead of small NumPy
operations, not arithmetic, is what the check costs; batching is what keeps it small."""

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
    if type(value) is float:
        return value
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
    name: str, coord: int, what: str, expected: float, actual: float, tol: float
) -> tuple[str, str, dict[str, Any]]:
    where = "" if what == "param" else f"{what} of "
    text = (
        f"optimizer.step did not compute the update: {where}{name}[{coord}] became "
        f"{actual!r}, expected {expected!r} (tolerance {tol:.3g})"
    )
    details = {
        "kind": "update",
        "param": name,
        "coordinate": coord,
        "field": what,
        "expected": expected,
        "actual": actual,
        "tolerance": tol,
    }
    return "update", text, details


def _equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    same: np.ndarray = (a == b) | (np.isnan(a) & np.isnan(b))
    return same


@dataclass
class _Item:
    """One slot of one pending record, as the batched comparison sees it."""

    order: int  # the (record, slot) position: findings are reported in this order
    step: int  # the record's step, for the alert
    slot: _Slot
    name: str
    eps: float  # the parameter dtype's epsilon
    scale: float  # what the gradient is divided by (1.0: unscaled, and exact)


#: a finding: ((item order, 0 between / 1 update, field order), step, kind, text, details)
_Found = tuple[tuple[int, int, int], int, str, str, dict[str, Any]]


def _cat(values: list[Any]) -> np.ndarray:
    """Many readings' values as one float64 array: one conversion where they share a
    type (the usual case), each its own otherwise."""
    first = values[0]
    if type(first) is np.ndarray and all(type(v) is np.ndarray for v in values):
        out: np.ndarray = np.concatenate(values, dtype=np.float64)
        return out
    if isinstance(first, tuple) and all(isinstance(v, tuple) for v in values):
        return _f64(("bf16", np.concatenate([v[1] for v in values])))
    return np.concatenate([_f64(v) for v in values])


def _fields(fields: list[list[Any]]) -> np.ndarray:
    """Several fields of the same items as the rows of one float64 array (one conversion
    for all of them: each field holds as many values as the items have coordinates)."""
    return _cat([v for values in fields for v in values]).reshape(len(fields), -1)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether nothing changed from ``a`` to ``b`` (NaN as itself): identical bytes, the
    usual case, settle it in one comparison."""
    return a.tobytes() == b.tobytes() or bool(_equal(a, b).all())


def _locate(lengths: list[int], i: int) -> tuple[int, int]:
    """Which part, and where in it, index ``i`` of the parts' concatenation falls."""
    for part, n in enumerate(lengths):
        if i < n:
            return part, i
        i -= n
    raise IndexError(i)


def _between(items: list[_Item]) -> _Found | None:
    """The first value that changed between the end of a step and the start of the next:
    all slots, fields and records tested at once, then searched in order if one did."""
    was: list[Any] = []
    became: list[Any] = []
    spans: list[tuple[_Item, int, str]] = []
    steps: list[tuple[Any, Any]] = []
    for item in items:
        base, now = item.slot.baseline, item.slot.before
        if base is None or now is None:
            continue
        # a write the version counter saw (or a new storage) is the params-written sensor's
        if base.version == now.version and base.pointer == now.pointer:
            was.append(base.param)
            became.append(now.param)
            spans.append((item, 0, "param"))
        for order, (key, (tensor, values)) in enumerate(base.state.items(), 1):
            current = now.state.get(key)
            # a state tensor replaced (load_state_dict) is a restore, not a write
            if current is not None and current[0] is tensor:
                was.append(values)
                became.append(current[1])
                spans.append((item, order, key))
        if base.step is not None and now.step is not None and base.step[0] is now.step[0]:
            pair = (_scalar_value(base.step[1]), _scalar_value(now.step[1]))
            was.append(pair[0])
            became.append(pair[1])
            spans.append((item, len(base.state) + 1, "step"))
            steps.append(pair)
    if not spans:
        return None
    # the usual case, nothing changed, settled in one comparison per kind of value
    if not steps or all(type(a) is float and type(b) is float for a, b in steps):
        steady = all(a == b or (a != a and b != b) for a, b in steps)
    else:
        steady = _same(_cat([a for a, _ in steps]), _cat([b for _, b in steps]))
    arrays = [i for i, span in enumerate(spans) if span[2] != "step"]
    if steady and (
        not arrays or _same(_cat([was[i] for i in arrays]), _cat([became[i] for i in arrays]))
    ):
        return None
    for (item, order, what), w, b in zip(spans, was, became, strict=True):
        a, z = _f64(w), _f64(b)
        wrong = np.flatnonzero(~_equal(a, z))
        if not len(wrong):
            continue
        at = int(wrong[0])
        coord = int(item.slot.coords[at]) if what != "step" else 0
        where = "" if what == "param" else f"{what} of "
        text = (
            f"written between optimizer steps, outside them: {where}{item.name}[{coord}] "
            f"was {float(a[at])!r} after a step and {float(z[at])!r} before the next"
        )
        details = {"kind": "between", "param": item.name, "coordinate": coord, "field": what}
        details.update(expected=float(a[at]), actual=float(z[at]))
        return (item.order, 0, order), item.step, "between", text, details
    return None


def _unchanged(items: list[_Item], why: str) -> _Found | None:
    """The first parameter coordinate a step that torch skips changed anyway."""
    if not items:
        return None
    was, became = _fields(
        [[_reading(item.slot.before).param for item in items]]
        + [[_reading(item.slot.after).param for item in items]]
    )
    if _same(was, became):
        return None
    wrong = np.flatnonzero(~_equal(was, became))
    at = int(wrong[0])
    part, i = _locate([len(item.slot.coords) for item in items], at)
    item = items[part]
    coord = int(item.slot.coords[i])
    text = (
        f"optimizer.step changed {item.name}[{coord}] from {float(was[at])!r} to "
        f"{float(became[at])!r} in {why}"
    )
    details = {"kind": "update", "param": item.name, "coordinate": coord}
    details.update(field="param", expected=float(was[at]), actual=float(became[at]))
    return (item.order, 1, 0), item.step, "update", text, details


def _reading(reading: _Reading | None) -> _Reading:
    assert reading is not None
    return reading


_Check = tuple[str, np.ndarray, np.ndarray, np.ndarray]


def _state(reading: _Reading, name: str, n: int, fill: float) -> Any:
    """A state field's values, or ``fill`` where the reading has none."""
    value = reading.state.get(name)
    return value[1] if value is not None else np.full(n, fill)


def _columns(rows: list[tuple[float, ...]], lengths: list[int]) -> np.ndarray:
    """Per-item settings, one row per item, repeated for each of the item's coordinates:
    the formulas then run on all items at once, each coordinate with its own settings."""
    return np.repeat(np.array(rows, dtype=np.float64).T, lengths, axis=1)


def _sgd_signature(item: _Item) -> tuple[tuple[bool, ...], tuple[float, ...]]:
    h, before = item.slot.group, _reading(item.slot.before)
    lr, wd = _num(_scalar_value(h["lr"])), _num(_scalar_value(h.get("weight_decay", 0)))
    momentum = _num(_scalar_value(h.get("momentum", 0)))
    dampening = _num(_scalar_value(h.get("dampening", 0)))
    on = momentum != 0
    signature = (
        bool(h.get("maximize")),
        wd != 0,
        on,
        on and bool(h.get("nesterov")),
        on and "momentum_buffer" not in before.state,
    )
    slack = _SLACK * item.eps
    # the scalars of ``_sgd``'s formulas, computed as the per-slot code did
    return signature, (lr, wd, momentum, 1 - dampening, item.eps, slack, slack * lr, item.scale)


def _sgd(signature: tuple[bool, ...], items: list[_Item], rows: list[Any]) -> list[_Check]:
    """torch.optim.sgd: ``_single_tensor_sgd``, ``_multi_tensor_sgd``, ``_fused_sgd``."""
    maximize, decay, momentum, nesterov, first = signature
    lengths = [len(item.slot.coords) for item in items]
    c = _columns(rows, lengths)
    befores = [_reading(item.slot.before) for item in items]
    afters = [_reading(item.slot.after) for item in items]
    fields = [[b.param for b in befores], [b.grad for b in befores], [a.param for a in afters]]
    if momentum:
        fields.append(
            [_state(a, "momentum_buffer", n, np.nan) for a, n in zip(afters, lengths, strict=True)]
        )
        if not first:
            fields.append([b.state["momentum_buffer"][1] for b in befores])
    values = _fields(fields)
    p, g = values[0], values[1] / c[7]
    if maximize:
        g = -g
    mag = np.abs(g)
    if decay:
        g = g + c[1] * p
        mag = mag + c[1] * np.abs(p)
    checks: list[_Check] = []
    d, dmag = g, mag
    if momentum:
        mu, buf = c[2], values[3]
        if first:  # the first step: the buffer is the gradient
            expected, bmag = g, mag
        else:
            prev = values[4]
            expected = mu * prev + c[3] * g
            bmag = mu * np.abs(prev) + c[3] * mag
        checks.append(("momentum_buffer", expected, buf, c[5] * bmag + _TINY))
        if nesterov:
            d, dmag = g + mu * buf, mag + mu * np.abs(buf)
        else:
            d, dmag = buf, np.abs(buf)
    new = p - c[0] * d
    tol = c[4] * (np.abs(p) + np.abs(new)) + c[6] * dmag + _TINY
    checks.append(("param", new, values[2], tol))
    return checks


def _adam_signature(item: _Item) -> tuple[tuple[bool, ...], tuple[float, ...]]:
    h, before, after = item.slot.group, _reading(item.slot.before), _reading(item.slot.after)
    lr, wd = _num(_scalar_value(h["lr"])), _num(_scalar_value(h.get("weight_decay", 0)))
    beta1, beta2 = (_num(_scalar_value(b)) for b in h["betas"])
    decoupled = bool(h.get("decoupled_weight_decay"))
    signature = (
        bool(h.get("maximize")),
        wd != 0 and not decoupled,
        wd != 0 and decoupled,
        bool(h.get("amsgrad")),
    )
    step = _first(before.step[1]) if before.step is not None else 0.0
    step_after = _first(after.step[1]) if after.step is not None else np.nan
    t = step + 1
    # the scalars of ``_adam``'s formulas, computed as the per-slot code did (Python
    # floats, in the same order), so that each coordinate's result is the same to the bit
    row = (
        lr,  # 0
        wd,
        1 - lr * wd,
        beta1,
        1 - beta1,
        beta2,  # 5
        1 - beta2,
        item.eps,
        _SLACK * item.eps,
        t,
        step_after,  # 10
        1 - beta2**t,
        _num(_scalar_value(h["eps"])),
        lr / (1 - beta1**t),
        item.scale,
    )
    return signature, row


def _adam(signature: tuple[bool, ...], items: list[_Item], rows: list[Any]) -> list[_Check]:
    """torch.optim.adam (AdamW is Adam with ``decoupled_weight_decay``):
    ``_single_tensor_adam``, ``_multi_tensor_adam``, ``_fused_adam``."""
    maximize, coupled, decoupled, amsgrad = signature
    lengths = [len(item.slot.coords) for item in items]
    c = _columns(rows, lengths)
    befores = [_reading(item.slot.before) for item in items]
    afters = [_reading(item.slot.after) for item in items]
    fields = [[b.param for b in befores], [b.grad for b in befores], [a.param for a in afters]]
    names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
    for name in names:
        fields.append([_state(b, name, n, 0.0) for b, n in zip(befores, lengths, strict=True)])
        fields.append([_state(a, name, n, np.nan) for a, n in zip(afters, lengths, strict=True)])
    values = _fields(fields)
    p, g = values[0], values[1] / c[14]
    m, m_new, v, v_new = values[3], values[4], values[5], values[6]
    if maximize:
        g = -g
    mag = np.abs(g)
    p0 = p
    if decoupled:
        p0 = p * c[2]
    elif coupled:
        g = g + c[1] * p
        mag = mag + c[1] * np.abs(p)
    beta1, beta2, slack = c[3], c[5], c[8]
    m_exp = beta1 * m + c[4] * g
    m_tol = slack * (np.abs(m) + c[4] * (mag + np.abs(m))) + _TINY
    v_exp = beta2 * v + c[6] * g * g
    v_tol = slack * (beta2 * v + c[6] * mag * mag) + _TINY
    checks: list[_Check] = [("exp_avg", m_exp, m_new, m_tol), ("exp_avg_sq", v_exp, v_new, v_tol)]
    table = np.array(rows, dtype=np.float64)  # the step: one value per item
    checks.append(("step", table[:, 9], table[:, 10], np.zeros(len(rows))))
    denom_v = v_new
    if amsgrad:
        vmax, vmax_new = values[7], values[8]
        checks.append(("max_exp_avg_sq", np.maximum(vmax, v_new), vmax_new, v_tol))
        denom_v = vmax_new
    denom = np.sqrt(denom_v) / np.sqrt(c[11]) + c[12]
    delta = c[13] * m_new / denom
    new = p0 - delta
    tol = c[7] * (np.abs(p) + np.abs(new)) + slack * np.abs(delta) + _TINY
    checks.append(("param", new, values[2], tol))
    return checks


_MODELS = {"sgd": (_sgd_signature, _sgd), "adam": (_adam_signature, _adam)}


def _updates(kind: str, items: list[_Item]) -> list[_Found]:
    """Every item's update recomputed: the items grouped by what steers the update's
    control flow, each group's model run once on all its coordinates, one test per field."""
    signature_of, model = _MODELS[kind]
    groups: dict[tuple[bool, ...], tuple[list[_Item], list[Any]]] = {}
    for item in items:
        signature, row = signature_of(item)
        members = groups.get(signature)
        if members is None:
            groups[signature] = members = ([], [])
        members[0].append(item)
        members[1].append(row)
    found: list[_Found] = []
    for signature, (group, rows) in groups.items():
        with np.errstate(all="ignore"):  # non-finite inputs are NonFinite's to report
            checks = model(signature, group, rows)
            every = [np.concatenate([check[k] for check in checks]) for k in (1, 2, 3)]
        if _mismatch(*every) is None:
            continue  # the usual case: all fields of all items at once
        lengths = [len(item.slot.coords) for item in group]
        for order, (what, expected, actual, tol) in enumerate(checks):
            bad = _mismatch(expected, actual, tol)
            if bad is None:
                continue
            part, i = (bad, 0) if what == "step" else _locate(lengths, bad)
            item = group[part]
            kind_, text, details = _finding(
                item.name,
                int(item.slot.coords[i]),
                what,
                float(expected[bad]),
                float(actual[bad]),
                float(tol[bad]),
            )
            found.append(((item.order, 1, order), item.step, kind_, text, details))
    return found
