"""Signed checkpoints: ``save`` and ``load`` (what ``guard.save_checkpoint`` calls).

    saved = checkpoint.save("ckpt/step-100.safetensors", model=model, optimizer=opt,
                            step=100, data_position={"epoch": 1, "batch": 37},
                            ledger=ledger)                  # or key="owner/trainguard.key"
    done = checkpoint.load("ckpt/step-100.safetensors", model=model, optimizer=opt,
                           public_key="owner/trainguard.pub")

A checkpoint is one safetensors file: model, optimizer, ``extra`` and RNG states as
tensors plus tagged JSON (never pickle), and a manifest signed by the owner's key or by
a run key with its owner-signed certificate. ``load`` refuses, naming what differs,
before it touches the model, the optimizer or any RNG. See docs/guard.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from trainguard.artifacts.convert import decode_structure, encode_tree
from trainguard.checkpoint import fit as _fit
from trainguard.checkpoint import rng as _rng
from trainguard.checkpoint.fit import CheckpointMismatchError
from trainguard.checkpoint.signed_file import (
    CheckpointIntegrityError,
    CheckpointSignatureError,
    CheckpointVerificationError,
    Signer,
)
from trainguard.checkpoint.signed_file import check_target as _check_target
from trainguard.checkpoint.signed_file import read as _read
from trainguard.checkpoint.signed_file import write as _write
from trainguard.errors import CheckpointError, UsageError
from trainguard.integrity import signing

if TYPE_CHECKING:
    from trainguard.ledger import Ledger

__all__ = [
    "CheckpointIntegrityError",
    "CheckpointMismatchError",
    "CheckpointSignatureError",
    "CheckpointVerificationError",
    "LoadedCheckpoint",
    "SavedCheckpoint",
    "load",
    "save",
]

PrivateKeyLike = str | os.PathLike[str] | Ed25519PrivateKey
PublicKeyLike = str | os.PathLike[str] | Ed25519PublicKey
_PARTS = ("model", "optimizer", "extra", "rng", "rng_ranks")


@dataclass(frozen=True)
class SavedCheckpoint:
    """What :func:`save` wrote."""

    path: str
    bytes: int
    tensors: int
    manifest_hash: str
    key_id: str
    ledger_seq: int | None


@dataclass
class LoadedCheckpoint:
    """What :func:`load` verified and restored.

    ``model_state`` / ``optimizer_state`` are the state dicts (also when they were
    loaded into the objects passed in); ``notes`` lists what could not be restored here
    (CUDA RNG states on a machine without CUDA).
    """

    path: str
    step: int | None
    data_position: Any
    extra: Any
    model_state: Any
    optimizer_state: Any
    manifest_hash: str
    signer_key_id: str
    owner_key_id: str
    run_id: str | None
    ledger_seq: int | None = None
    notes: list[str] = field(default_factory=list)


def _state(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def save(
    path: str | os.PathLike[str],
    *,
    model: Any = None,
    optimizer: Any = None,
    extra: Any = None,
    step: int | None = None,
    data_position: Any = None,
    rng: bool = True,
    generators: Mapping[str, Any] | None = None,
    key: PrivateKeyLike | None = None,
    ledger: Ledger | None = None,
    rng_ranks: Sequence[Any] | None = None,
) -> SavedCheckpoint:
    """Write a signed checkpoint to ``path`` atomically (temporary file, then rename).

    ``model`` / ``optimizer`` are modules and optimizers or their state dicts; ``extra``
    is any tree of tensors and plain values (hyperparameters, scaler state);
    ``data_position`` plain JSON (epoch, batch). ``rng`` saves every RNG state, plus the
    named ``generators``; ``rng_ranks``, every rank's states (``rng.capture()`` on each,
    gathered: in a job whose ranks draw different dropout masks, a resume restores each
    rank's own, see ``load(rank=)``). Signed with ``key`` (the owner's key) or, without it, with the
    ``ledger``'s run key and certificate; with a ledger, a ``checkpoint.saved`` entry
    records the manifest hash.
    """
    if key is None and ledger is None:
        raise UsageError("sign the checkpoint: pass key= (owner key) or ledger= (run key)")
    _check_target(Path(path))  # a device or a FIFO named as the checkpoint: before any work
    if key is not None:
        private = key if isinstance(key, Ed25519PrivateKey) else signing.load_private(key)
        signer = Signer(private)
    else:
        assert ledger is not None
        signer = Signer(_ledger_key(ledger), ledger.certificate_entry())
    trees = {
        "model": _state(model),
        "optimizer": _state(optimizer),
        "extra": extra,
        "rng": _rng.capture(generators) if rng else None,
        "rng_ranks": list(rng_ranks) if rng and rng_ranks else None,
    }
    tensors: dict[str, Any] = {}
    structures: dict[str, Any] = {}
    for part, tree in trees.items():
        if tree is None:
            continue
        named, structures[part] = encode_tree(tree)
        tensors.update({f"{part}/{name}": t for name, t in named.items()})
    manifest = {
        "step": step,
        "data_position": data_position,
        "parts": structures,
        "run_id": ledger.run_id if ledger is not None else None,
    }
    target = Path(path)
    size, digest = _write(target, tensors, manifest, signer)
    key_id = signing.key_id(signer.key.public_key())
    seq = None
    if ledger is not None:
        seq = ledger.append(
            "checkpoint.saved",
            {
                "path": str(target.resolve()),
                "manifest_blake3": digest,
                "step": step,
                "tensors": len(tensors),
                "bytes": size,
                "key_id": key_id,
            },
        ).seq
    return SavedCheckpoint(str(target), size, len(tensors), digest, key_id, seq)


def _ledger_key(ledger: Ledger) -> Ed25519PrivateKey:
    key = ledger._run_key  # the checkpoint module is the run key's one other user
    if key is None:
        raise UsageError("the ledger was opened read-only or its run is closed; cannot sign")
    return key


def load(
    path: str | os.PathLike[str],
    *,
    model: Any = None,
    optimizer: Any = None,
    public_key: PublicKeyLike | Sequence[PublicKeyLike] | None = None,
    ledger: Ledger | None = None,
    restore_rng: bool = True,
    generators: Mapping[str, Any] | None = None,
    accept: Callable[[LoadedCheckpoint], None] | None = None,
    rank: int | None = None,
) -> LoadedCheckpoint:
    """Verify ``path`` and restore it into ``model``, ``optimizer`` and the RNGs.

    Trusted signers: the owner keys in ``public_key``, and the owner of ``ledger``'s run;
    a run key counts when the checkpoint carries its certificate by a trusted owner.
    Raises a :class:`CheckpointVerificationError` subclass naming what differs (bad
    signature, untrusted key, changed, renamed or missing tensor) before anything is
    restored, and :class:`CheckpointMismatchError` if it does not fit ``model``. With a
    ledger, the outcome is recorded (``checkpoint.loaded`` or ``checkpoint.refused``).
    ``accept`` is shown what was verified (manifest hash, run, step; no state yet) before
    anything is rebuilt or restored, and refuses by raising a CheckpointError. ``rank``:
    restore that rank's own RNG states when the checkpoint holds every rank's (saved with
    ``rng_ranks``); a rank it holds none for gets the common ones (rank 0's).
    """
    trusted = _trusted(public_key, ledger)
    where = str(Path(path))
    try:
        verified = _read(Path(path), trusted)
    except CheckpointVerificationError as refused:
        if ledger is not None:
            ledger.append("checkpoint.refused", {"path": where, "reasons": list(refused.reasons)})
        raise
    if accept is not None:
        try:
            accept(_described(where, verified))
        except CheckpointError as refused:
            if ledger is not None:
                ledger.append("checkpoint.refused", {"path": where, "reasons": [str(refused)]})
            raise
    parts = verified.manifest.get("parts") or {}
    trees: dict[str, Any] = {}
    for part in _PARTS:
        if part in parts:
            prefix = f"{part}/"
            own = {n[len(prefix) :]: t for n, t in verified.tensors.items() if n.startswith(prefix)}
            try:
                trees[part] = decode_structure(parts[part], own)
            except Exception as exc:  # signed, but odd: a device torch does not know, ...
                raise CheckpointError(
                    f"{where}: cannot rebuild {part}: {type(exc).__name__}: {str(exc)[:200]}"
                ) from exc
    ranks = trees.pop("rng_ranks", None)
    if rank is not None and isinstance(ranks, list) and 0 <= rank < len(ranks):
        trees["rng"] = ranks[rank]
    try:
        notes = _fit.restore(
            where,
            trees,
            model=model,
            optimizer=optimizer,
            restore_rng=restore_rng,
            generators=generators,
        )
    except CheckpointError as refused:
        if ledger is not None:
            ledger.append("checkpoint.refused", {"path": where, "reasons": [str(refused)]})
        raise
    result = LoadedCheckpoint(
        path=where,
        step=verified.manifest.get("step"),
        data_position=verified.manifest.get("data_position"),
        extra=trees.get("extra"),
        model_state=trees.get("model"),
        optimizer_state=trees.get("optimizer"),
        manifest_hash=verified.manifest_hash,
        signer_key_id=verified.signer_key_id,
        owner_key_id=verified.owner_key_id,
        run_id=verified.run_id,
        notes=notes,
    )
    if ledger is not None:
        result.ledger_seq = ledger.append(
            "checkpoint.loaded",
            {
                "path": where,
                "manifest_blake3": verified.manifest_hash,
                "step": result.step,
                "signer": verified.signer_key_id,
                "from_run": verified.run_id,
            },
        ).seq
    return result


def _described(where: str, verified: Any) -> LoadedCheckpoint:
    """What the signature vouches for, before anything is rebuilt (for ``accept``)."""
    return LoadedCheckpoint(
        path=where,
        step=verified.manifest.get("step"),
        data_position=verified.manifest.get("data_position"),
        extra=None,
        model_state=None,
        optimizer_state=None,
        manifest_hash=verified.manifest_hash,
        signer_key_id=verified.signer_key_id,
        owner_key_id=verified.owner_key_id,
        run_id=verified.run_id,
    )


def _trusted(
    public_key: PublicKeyLike | Sequence[PublicKeyLike] | None, ledger: Ledger | None
) -> set[str]:
    keys: list[PublicKeyLike] = []
    if public_key is not None:
        single = isinstance(public_key, (str, os.PathLike, Ed25519PublicKey))
        keys = [public_key] if single else list(public_key)  # type: ignore[list-item,arg-type]
    trusted = {
        signing.key_id(k if isinstance(k, Ed25519PublicKey) else signing.load_public(k))
        for k in keys
    }
    if ledger is not None:
        trusted.add(ledger.certificate.owner_key_id)
    if not trusted:
        raise UsageError("say whose signature to trust: pass public_key= or ledger=")
    return trusted
