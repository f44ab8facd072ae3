"""The signed checkpoint file: one safetensors file whose header carries a signed manifest.

Tensors are named ``<part>/<name>`` (parts: ``model``, ``optimizer``, ``extra``,
``rng``). The header's ``__metadata__`` holds exactly two trainguard keys: the manifest
(canonical JSON: every tensor's dtype, shape and BLAKE3 hash, each part's tagged-JSON
structure, step, data position) and its signature (ed25519 by the owner's key, or by a
run key together with the run certificate the owner's key signed). Since the safetensors
layout admits no gaps or trailing bytes, the tensor hashes plus an exact comparison of
the header cover every byte of the file.

Reading loads the file once into memory, checks the layout, the signature and the
trust in the signer, then every tensor hash, and only then builds tensors as views of
those same bytes: nothing is read twice, so nothing can change between check and use.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from trainguard.artifacts.arrays import TORCH_DTYPES, load_safetensors
from trainguard.artifacts.interface import Analysis, FormatError
from trainguard.artifacts.safetensors_check import check_safetensors
from trainguard.errors import CheckpointError
from trainguard.integrity import signing
from trainguard.ledger.chain import Certificate
from trainguard.ledger.interface import Entry, LedgerError, canonical_json

MANIFEST_KEY = "trainguard.checkpoint"
SIGNATURE_KEY = "trainguard.signature"
FORMAT = "trainguard-checkpoint"
_DOMAIN = b"trainguard.checkpoint.manifest.v1\0"
_PARALLEL_HASH = 16 << 20
_ST_NAMES = {torch_name: st_name for st_name, torch_name in TORCH_DTYPES.items()}


class CheckpointVerificationError(CheckpointError):
    """A checkpoint was refused before anything was loaded; ``reasons`` says why."""

    def __init__(self, path: str, reasons: list[str]) -> None:
        self.path = path
        self.reasons = tuple(reasons)
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        super().__init__(f"{path}: refused: {reasons[0]}{more}")


class CheckpointSignatureError(CheckpointVerificationError):
    """Missing or bad signature, or a signer that is not trusted."""


class CheckpointIntegrityError(CheckpointVerificationError):
    """Tensors differ from the signed manifest: changed, renamed, missing or added."""


@dataclass(frozen=True)
class Signer:
    """A private key and, for a run key, the certificate entry the owner's key signed."""

    key: Ed25519PrivateKey
    certificate: Entry | None = None

    def signature_for(self, manifest: bytes) -> dict[str, Any]:
        public = self.key.public_key()
        return {
            "key": base64.b64encode(signing.raw_public(public)).decode("ascii"),
            "key_id": signing.key_id(public),
            "signature": signing.sign(self.key, _DOMAIN + manifest),
            "certificate": None if self.certificate is None else self.certificate.to_dict(),
        }


def _tensor_bytes(tensor: Any) -> memoryview:
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def write(
    path: Path, tensors: Mapping[str, Any], manifest: dict[str, Any], signer: Signer
) -> tuple[int, str]:
    """Write tensors and the signed manifest atomically; return (bytes, manifest hash).

    The hashes are computed from the same in-memory bytes that are then written.
    """
    views = {name: _tensor_bytes(t) for name, t in tensors.items()}
    # widest elements first, so every tensor's data stays aligned to its element size
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {}
    listing: dict[str, Any] = {}
    offset = 0
    for name in order:
        tensor, raw = tensors[name], views[name]
        dtype = _ST_NAMES.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise CheckpointError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors form")
        shape = list(tensor.shape)
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + raw.nbytes],
        }
        listing[name] = {"dtype": dtype, "shape": shape, "blake3": _digest(raw)}
        offset += raw.nbytes
    body = dict(manifest, format=FORMAT, version=1, tensors=listing)
    manifest_text = canonical_json(body)
    signature = signer.signature_for(manifest_text.encode("utf-8"))
    header["__metadata__"] = {
        "format": "pt",
        MANIFEST_KEY: manifest_text,
        SIGNATURE_KEY: canonical_json(signature),
    }
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(len(head).to_bytes(8, "little"))
            out.write(head)
            for name in order:
                out.write(views[name])
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return 8 + len(head) + offset, blake3.blake3(manifest_text.encode("utf-8")).hexdigest()


def _digest(data: memoryview) -> str:
    # big tensors hash on all cores; small ones are not worth the threads
    threads = blake3.blake3.AUTO if data.nbytes >= _PARALLEL_HASH else 1
    return str(blake3.blake3(data, max_threads=threads).hexdigest())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Verified:
    """A checkpoint whose signature and hashes checked out, with its tensors."""

    manifest: dict[str, Any]
    manifest_hash: str
    signer_key_id: str
    owner_key_id: str
    run_id: str | None
    tensors: dict[str, Any]
    size: int


def read(path: Path, trusted: set[str]) -> Verified:
    """Load ``path`` once, verify it against the owner keys ``trusted`` (key ids)."""
    where = str(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            data = bytearray(size)
            if handle.readinto(data) != size:
                raise CheckpointError(f"{path}: the file changed size while it was read")
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    buf = memoryview(data)
    try:
        infos = check_safetensors(buf, Analysis("safetensors"))
    except FormatError as exc:
        raise CheckpointIntegrityError(where, [f"not a valid safetensors file: {exc}"]) from exc
    header = json.loads(bytes(buf[8 : 8 + int.from_bytes(buf[:8], "little")]))
    metadata = header.get("__metadata__") or {}
    if MANIFEST_KEY not in metadata or SIGNATURE_KEY not in metadata:
        raise CheckpointSignatureError(where, ["no signed trainguard manifest in the file"])
    unsigned = sorted(set(metadata) - {"format", MANIFEST_KEY, SIGNATURE_KEY})
    if unsigned:
        raise CheckpointIntegrityError(where, [f"unsigned metadata added: {', '.join(unsigned)}"])
    manifest_bytes = metadata[MANIFEST_KEY].encode("utf-8")
    signer_id, owner_id, run_id = _check_signature(
        where, manifest_bytes, metadata[SIGNATURE_KEY], trusted
    )
    try:
        manifest = json.loads(manifest_bytes)
        listing: dict[str, Any] = manifest["tensors"]
        if manifest.get("format") != FORMAT or not isinstance(listing, dict):
            raise ValueError("not a trainguard checkpoint manifest")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointIntegrityError(where, [f"unreadable manifest: {exc}"]) from exc
    start = 8 + int.from_bytes(buf[:8], "little")
    reasons = _compare(listing, infos, buf, start)
    if reasons:
        raise CheckpointIntegrityError(where, reasons)
    tensors = load_safetensors(data, buf, None)
    return Verified(
        manifest,
        blake3.blake3(manifest_bytes).hexdigest(),
        signer_id,
        owner_id,
        run_id,
        tensors,
        size,
    )


def _check_signature(
    where: str, manifest: bytes, signature_text: str, trusted: set[str]
) -> tuple[str, str, str | None]:
    """Return (signer key id, owner key id, run id) or raise CheckpointSignatureError."""
    try:
        sig = json.loads(signature_text)
        raw = base64.b64decode(sig["key"], validate=True)
        key = Ed25519PublicKey.from_public_bytes(raw)
        value = str(sig["signature"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointSignatureError(where, [f"malformed signature block: {exc}"]) from exc
    signer_id = signing.key_id(key)
    if not signing.verify(key, _DOMAIN + manifest, value):
        raise CheckpointSignatureError(
            where, [f"bad signature: the manifest was changed after key {signer_id} signed it"]
        )
    if signer_id in trusted:
        return signer_id, signer_id, None
    cert_data = sig.get("certificate")
    if not isinstance(cert_data, dict):
        raise CheckpointSignatureError(
            where,
            [
                f"signed by key {signer_id}, which is not a trusted key "
                f"({', '.join(sorted(trusted))})"
            ],
        )
    try:
        entry = Entry(
            seq=int(cert_data["seq"]),
            time=str(cert_data["time"]),
            kind=str(cert_data["kind"]),
            actor_json=canonical_json(cert_data["actor"]),
            payload_json=canonical_json(cert_data["payload"]),
            prev_hash=str(cert_data["prev_hash"]),
            hash=str(cert_data["hash"]),
            signature=str(cert_data["signature"]),
            key_id=str(cert_data["key_id"]),
        )
        cert = Certificate.from_entry(entry)
    except (LedgerError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointSignatureError(where, [f"invalid run certificate: {exc}"]) from exc
    if cert.run_key_id != signer_id:
        raise CheckpointSignatureError(
            where, [f"signed by key {signer_id}, but the certificate is for {cert.run_key_id}"]
        )
    if cert.owner_key_id not in trusted:
        raise CheckpointSignatureError(
            where,
            [
                f"signed by run {cert.run_id} of owner key {cert.owner_key_id}, "
                f"not by a trusted key ({', '.join(sorted(trusted))})"
            ],
        )
    if not cert.covers(entry.time):
        raise CheckpointSignatureError(where, ["run certificate is outside its validity"])
    return signer_id, cert.owner_key_id, cert.run_id


def _compare(
    listing: dict[str, Any], infos: dict[str, Any], buf: memoryview, start: int
) -> list[str]:
    """Every difference between the signed listing and the file, naming the tensors."""
    reasons: list[str] = []
    missing = sorted(set(listing) - set(infos))
    added = sorted(set(infos) - set(listing))
    for name in list(missing):
        want = listing[name]
        for other in added:
            info = infos[other]
            digest = _digest(buf[start + info.begin : start + info.end])
            if digest == want.get("blake3") and list(info.shape) == want.get("shape"):
                reasons.append(f"tensor {name!r} was renamed to {other!r}")
                missing.remove(name)
                added.remove(other)
                break
    reasons += [f"tensor {name!r} is missing" for name in missing]
    reasons += [f"tensor {name!r} is not in the signed manifest" for name in added]
    for name in sorted(set(listing) & set(infos)):
        want, info = listing[name], infos[name]
        if info.dtype != want.get("dtype") or list(info.shape) != want.get("shape"):
            reasons.append(
                f"tensor {name!r} is {info.dtype}{list(info.shape)}, "
                f"signed as {want.get('dtype')}{want.get('shape')}"
            )
            continue
        digest = _digest(buf[start + info.begin : start + info.end])
        if digest != want.get("blake3"):
            reasons.append(f"tensor {name!r}: content differs from its signed hash")
    return reasons
