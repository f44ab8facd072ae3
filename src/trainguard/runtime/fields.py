"""The fingerprint's fields, declared once: each with the detector that owns it, what a
difference between ranks means when replicas must hold it identical, and which evidence
bits of a rank's own sensors explain such a difference (``agreement`` names the rank they
flag when there is no majority to name it).

Every rank builds its row in this order, so adding a field is adding a line here and
filling it in the owner's ``row()``. A field with no ``agree`` meaning is recorded and
compared by its owner (if at all), never by the generic agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

# evidence bits a rank sets about itself (the row's "flags" field)
LR_OFF_SCHEDULE = 1
HYPER_CHANGED = 2
RESEEDED = 4
PATCHED = 8
PARAMS_WRITTEN = 16
DATA_ALTERED = 32
AUDIT_EVENT = 64
GRADS_ALTERED = 128
#: the rank's guard could not compute its row (a fault of its own, reported by that rank):
#: its values are unknown, not different, and are compared with nothing
GUARD_FAILED = 256
#: a compared buffer written outside the model's forward (evidence only: modelstate.py)
BUFFERS_WRITTEN = 512
#: the rank's random generators were set to a state their seeding does not explain
RNG_ALTERED = 1024

_PARAMS_EVIDENCE = (
    PARAMS_WRITTEN | PATCHED | LR_OFF_SCHEDULE | HYPER_CHANGED | DATA_ALTERED | GRADS_ALTERED
)


@dataclass(frozen=True)
class Field:
    name: str
    owner: str
    #: what it means that a rank holds another value; None: not compared by agreement
    agree: str | None = None
    #: evidence bits that explain a difference on this field
    evidence: int = 0


TABLE: tuple[Field, ...] = (
    Field("step", "guard", "is at another step"),
    Field("params", "guard", "holds different parameters", _PARAMS_EVIDENCE),
    Field("hyperparameters", "guard", "runs other optimizer settings", HYPER_CHANGED),
    Field("lr", "guard", "uses another learning rate", LR_OFF_SCHEDULE),
    Field(
        "optimizer_state",
        "guard",
        "holds a different optimizer state",
        PATCHED | HYPER_CHANGED | LR_OFF_SCHEDULE | GRADS_ALTERED,
    ),
    Field("rng_torch", "guard"),
    Field("rng_cuda", "guard"),
    Field("rng_python", "guard"),
    Field("rng_numpy", "guard"),
    Field("code", "guard", "runs different code", PATCHED),
    Field("events", "guard"),
    Field("flags", "guard"),
    Field("busy_us", "guard"),
    Field("loss_drift", "dynamics"),
    Field("pid", "guard"),
    Field("severity", "guard"),
    Field("arrival_us", "guard"),
    Field("lr0", "guard"),
    # the ledger's tail as this rank remembers it
    Field("tail_seq", "ledger-tail"),
    Field("tail_hash", "ledger-tail"),
    Field("tail_cut", "ledger-tail"),
    Field("modes", "model-state", "has other modules in training or eval mode", PATCHED),
    Field(
        "attributes",
        "model-state",
        "runs other module settings (dropout p, eps, momentum...)",
        PATCHED,
    ),
    Field("buffers", "model-state", "holds different buffers", BUFFERS_WRITTEN | PATCHED),
    # how many rows this rank has built: a replayed row repeats an old count (selfcheck.py)
    Field("rows", "guard-integrity"),
    # where this rank's model draws dropout masks in training: 0 nowhere, 1 torch's CPU
    # generator, 2 the accelerator's (selfcheck.py: a generator that stops while it must move)
    Field("dropout", "guard-integrity"),
    # the data each rank reads (data_check.py): compared by its owner, not by agreement
    Field("data_commit", "data"),
    Field("data_interval", "data"),
    Field("data_loss", "data"),
    Field("data_repeats", "data"),
    Field("data_sampler", "data"),
    Field("data_drawn", "data"),
    # the gradient all-reduces of the interval's sampled steps (grad_check.py): compared by
    # their owner (invariants of a world sum, not equality), not by agreement
    Field("grad_count", "gradients"),
    Field("grad_digest", "gradients"),
    Field("grad_before_sum", "gradients"),
    Field("grad_before_abs", "gradients"),
    Field("grad_reduced_sum", "gradients"),
    Field("grad_dot", "gradients"),
    Field("grad_self", "gradients"),
    Field("grad_result", "gradients"),
    Field("grad_slots", "gradients"),
    Field("grad_measured", "gradients"),
    # one pair per slot: grad_check.SLOTS of them
    *(Field(f"grad_norm_{i}", "gradients") for i in range(4)),
    *(Field(f"grad_cos_{i}", "gradients") for i in range(4)),
    # what the incident report plots (recorded in the ledger's check entry, never compared):
    # the chain over this rank's per-step metrics file (metrics_log.py), the interval's
    # mean gradient norm (float bits) and mean wall time per step
    Field("metrics_chain", "guard"),
    Field("grad_norm_mean", "guard"),
    Field("wall_us", "guard"),
)

FIELDS: tuple[str, ...] = tuple(f.name for f in TABLE)
INDEX: dict[str, int] = {name: i for i, name in enumerate(FIELDS)}
#: fields every replica must hold identical, and what a difference means
MUST_AGREE: dict[str, str] = {f.name: f.agree for f in TABLE if f.agree is not None}
#: which evidence explains a disagreement on which field
EVIDENCE: dict[str, int] = {f.name: f.evidence for f in TABLE if f.evidence}
OWNERS: dict[str, str] = {f.name: f.owner for f in TABLE}
