"""The signed checkpoint file: one safetensors file whose header carries a signed manifest.

Tensors are named ``<part>/<name>`` (parts: ``model``, ``optimizer``, ``extra``,
``rng``). The header's ``__metadata__`` holds exactly two trainguard keys: the manifest
(canonical JSON: every tensor's dtype, shape and BLAKE3 hash, each part's tagged-JSON
structure, step, data position) and its signature (ed25519 by the owner's key, or by a
run key together with the run certificate the owner's key signed). Since the safetensors
layout admits no gaps or trailing bytes, the tensor hashes plus an exact comparison of
the header with the one the signed manifest describes cover every byte of the file.

Format version 2 signs the manifest together with every other field of the signature
block (key, key id, certificate) and the metadata ``format``. Version 1 files (whose
signature covered the manifest alone) are still read: their other fields are checked to
equal what the signature binds (the key id is the signing key's, a certificate is a valid
owner-signed certificate for that key, no other fields, ``format`` is ``pt``).

Reading loads the file once into memory (a regular file only: FIFOs and devices are
refused before anything is read), checks the layout, the signature and the trust in the
signer, then every tensor hash, and only then builds tensors as views of those same
bytes: nothing is read twice, so nothing can change between check and use.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from trainguard import _io
from trainguard.artifacts.arrays import TORCH_DTYPES, load_safetensors
from trainguard.artifacts.interface import Analysis, Format, FormatError
from trainguard.artifacts.safetensors_check import check_safetensors
from trainguard.errors import CheckpointError, InputError, UsageError
from trainguard.integrity import signing
from trainguard.ledger.chain import Certificate
from trainguard.ledger.interface import Entry, LedgerError, canonical_json

MANIFEST_KEY = "trainguard.checkpoint"
SIGNATURE_KEY = "trainguard.signature"
FORMAT = "trainguard-checkpoint"
VERSION = 2
#: the safetensors metadata ``format`` every trainguard checkpoint carries
METADATA_FORMAT = "pt"
_DOMAIN = b"trainguard.checkpoint.manifest.v1\0"
_DOMAIN_V2 = b"trainguard.checkpoint.v2\0"
_BLOCK_FIELDS = frozenset({"key", "key_id", "signature", "certificate"})
_ENTRY_FIELDS = frozenset(
    {"seq", "time", "kind", "actor", "payload", "prev_hash", "hash", "signature", "key_id"}
)
_PARALLEL_HASH = 16 << 20
#: a manifest nests the job's ``extra`` tree (three JSON levels per dict): room for deep
#: configs, far below what the tree decoder's recursion can take
_MANIFEST_DEPTH = 256
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
        """The signature block (format version 2): every field of it is signed."""
        public = self.key.public_key()
        block: dict[str, Any] = {
            "key": base64.b64encode(signing.raw_public(public)).decode("ascii"),
            "key_id": signing.key_id(public),
            "certificate": None if self.certificate is None else self.certificate.to_dict(),
        }
        block["signature"] = signing.sign(self.key, _signed_v2(manifest, block))
        return block


def _signed_v2(manifest: bytes, block: Mapping[str, Any]) -> bytes:
    """What a version 2 signature covers: the manifest, the block and the metadata format."""
    signer = {name: value for name, value in block.items() if name != "signature"}
    bound = {
        "manifest": manifest.decode("utf-8"),
        "metadata_format": METADATA_FORMAT,
        "signer": signer,
    }
    return _DOMAIN_V2 + canonical_json(bound).encode("utf-8")


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
    body = dict(manifest, format=FORMAT, version=VERSION, tensors=listing)
    try:
        manifest_text = canonical_json(body)
        signature = canonical_json(signer.signature_for(manifest_text.encode("utf-8")))
    except LedgerError as exc:  # NaN or a non-JSON value in step / data_position
        raise CheckpointError(f"{_io.display(path)}: cannot write checkpoint: {exc}") from exc
    header["__metadata__"] = {
        "format": METADATA_FORMAT,
        MANIFEST_KEY: manifest_text,
        SIGNATURE_KEY: signature,
    }
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)

    def fill(tmp: str) -> None:
        with open(tmp, "wb") as out:
            out.write(len(head).to_bytes(8, "little"))
            out.write(head)
            for name in order:
                out.write(views[name])
            out.flush()
            os.fsync(out.fileno())

    try:
        _io.write_atomic(path, fill, what="checkpoint")
    except UsageError as exc:  # the target is a device or a FIFO, or it cannot be written
        raise CheckpointError(str(exc)) from exc
    _fsync_dir(path.parent)
    return 8 + len(head) + offset, blake3.blake3(manifest_text.encode("utf-8")).hexdigest()


def check_target(path: Path) -> None:
    """Refuse, before any work, a checkpoint path that cannot or must not be written."""
    try:
        _io.check_output(path, force=True, what="checkpoint")
    except UsageError as exc:
        raise CheckpointError(str(exc)) from exc


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
    where = _io.display(path)
    data = _read_bytes(path)
    buf = memoryview(data)
    try:
        infos = check_safetensors(buf, Analysis(Format.SAFETENSORS))
    except FormatError as exc:
        raise CheckpointIntegrityError(where, [f"not a valid safetensors file: {exc}"]) from exc
    start = 8 + int.from_bytes(buf[:8], "little")
    header = json.loads(bytes(buf[8:start]))  # check_safetensors parsed the same bytes
    metadata = header.get("__metadata__") or {}
    if MANIFEST_KEY not in metadata or SIGNATURE_KEY not in metadata:
        raise CheckpointSignatureError(where, ["no signed trainguard manifest in the file"])
    unsigned = sorted(set(metadata) - {"format", MANIFEST_KEY, SIGNATURE_KEY})
    if unsigned:
        raise CheckpointIntegrityError(where, [f"unsigned metadata added: {', '.join(unsigned)}"])
    if metadata.get("format") != METADATA_FORMAT:
        raise CheckpointIntegrityError(
            where, [f"metadata format is {metadata.get('format')!r}, not {METADATA_FORMAT!r}"]
        )
    manifest_text = metadata[MANIFEST_KEY]
    manifest_bytes = manifest_text.encode("utf-8")
    manifest = _json_object(
        where, manifest_text, "manifest", CheckpointIntegrityError, _MANIFEST_DEPTH
    )
    if not _canonical(manifest, manifest_text):
        raise CheckpointIntegrityError(where, ["the manifest is not in canonical form"])
    version = manifest.get("version")
    if manifest.get("format") != FORMAT or version not in (1, VERSION):
        raise CheckpointIntegrityError(
            where, [f"not a trainguard checkpoint manifest of a known version ({version!r})"]
        )
    block_text = metadata[SIGNATURE_KEY]
    block = _json_object(where, block_text, "signature block", CheckpointSignatureError)
    signer_id, owner_id, run_id = _check_signature(where, manifest_bytes, block, trusted, version)
    if not _canonical(block, block_text):  # checked once the signer is trusted
        raise CheckpointSignatureError(
            where, ["the signature block is not in canonical form (edited after signing)"]
        )
    listing = manifest.get("tensors")
    if not isinstance(listing, dict) or not all(isinstance(v, dict) for v in listing.values()):
        raise CheckpointIntegrityError(where, ["unreadable manifest: no tensor listing"])
    reasons = _compare(listing, infos, buf, start)
    if not reasons and bytes(buf[8:start]) != _expected_header(listing, metadata):
        reasons = ["the header differs from the one the signed manifest describes"]
    if reasons:
        raise CheckpointIntegrityError(where, reasons)
    try:
        tensors = load_safetensors(data, buf, None)
    except CheckpointError as exc:  # a dtype this torch cannot build
        raise CheckpointIntegrityError(where, [str(exc)]) from exc
    return Verified(
        manifest,
        blake3.blake3(manifest_bytes).hexdigest(),
        signer_id,
        owner_id,
        run_id,
        tensors,
        len(data),
    )


def _read_bytes(path: Path) -> bytearray:
    """The whole of a regular file, read once; a FIFO or a device is refused unread."""
    try:
        fd = _io.open_regular(path, "checkpoint")
    except InputError as exc:
        raise CheckpointError(str(exc)) from exc
    try:
        size = os.fstat(fd).st_size
        data = bytearray(size)  # the file's real size, never a size the file declares
        view = memoryview(data)
        done = 0
        while done < size:
            got = os.readv(fd, [view[done:]])
            if got == 0:
                raise CheckpointError(f"{_io.display(path)}: the file shrank while it was read")
            done += got
    except OSError as exc:
        raise CheckpointError(f"{_io.display(path)}: cannot read: {_io.reason(exc)}") from exc
    finally:
        os.close(fd)
    return data


def _json_object(
    where: str,
    text: str,
    what: str,
    error: type[CheckpointVerificationError],
    depth: int = _io.JSON_DEPTH,
) -> dict[str, Any]:
    """A JSON object, its nesting bounded before anything walks it."""
    try:
        value = _io.parse_json(text, what, max_depth=depth)
    except InputError as exc:
        raise error(where, [f"unreadable {exc}"]) from exc
    if not isinstance(value, dict):
        raise error(where, [f"the {what} is not a json object"])
    return value


def _canonical(value: Any, text: str) -> bool:
    """Whether ``text`` is the one spelling :func:`canonical_json` gives ``value``.

    One spelling per value leaves no room for duplicate keys, or for anything else two
    JSON parsers could read differently.
    """
    try:
        return canonical_json(value) == text
    except LedgerError:
        return False


def _expected_header(listing: Mapping[str, Any], metadata: Mapping[str, Any]) -> bytes:
    """The header :func:`write` produces for this listing and metadata, byte for byte."""
    import torch

    def width(name: str) -> int:
        dtype = getattr(torch, TORCH_DTYPES.get(str(listing[name].get("dtype")), ""), None)
        return int(dtype.itemsize) if isinstance(dtype, torch.dtype) else 0

    header: dict[str, Any] = {}
    offset = 0
    for name in sorted(listing, key=lambda n: (-width(n), n)):
        entry = listing[name]
        elements = 1
        for dim in entry.get("shape") or []:
            elements *= int(dim)
        nbytes = elements * width(name)
        header[name] = {
            "dtype": entry.get("dtype"),
            "shape": entry.get("shape"),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {
        "format": metadata.get("format"),
        MANIFEST_KEY: metadata.get(MANIFEST_KEY),
        SIGNATURE_KEY: metadata.get(SIGNATURE_KEY),
    }
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return head + b" " * (-len(head) % 8)


def _check_signature(
    where: str, manifest: bytes, sig: dict[str, Any], trusted: set[str], version: int
) -> tuple[str, str, str | None]:
    """Return (signer key id, owner key id, run id) or raise CheckpointSignatureError.

    Every field of the block is checked: version 2 signs them all; for version 1 the key
    id must be the signing key's and a certificate must certify that key.
    """
    if set(sig) != _BLOCK_FIELDS:
        unknown, missing = sorted(set(sig) - _BLOCK_FIELDS), sorted(_BLOCK_FIELDS - set(sig))
        raise CheckpointSignatureError(
            where, [f"malformed signature block: unknown fields {unknown}, missing {missing}"]
        )
    try:
        raw = base64.b64decode(sig["key"], validate=True)
        key = Ed25519PublicKey.from_public_bytes(raw)
        value = sig["signature"]
        if not isinstance(value, str):
            raise TypeError("the signature is not a string")
    except (ValueError, TypeError) as exc:
        raise CheckpointSignatureError(where, [f"malformed signature block: {exc}"]) from exc
    signer_id = signing.key_id(key)
    message = _DOMAIN + manifest if version == 1 else _signed_v2(manifest, sig)
    if not signing.verify(key, message, value):
        raise CheckpointSignatureError(
            where, [f"bad signature: the manifest was changed after key {signer_id} signed it"]
        )
    if sig["key_id"] != signer_id:
        raise CheckpointSignatureError(
            where, [f"the block names key {sig['key_id']!r}, but key {signer_id} signed it"]
        )
    cert_data = sig["certificate"]
    if cert_data is None and signer_id in trusted:
        return signer_id, signer_id, None
    if cert_data is None:
        raise CheckpointSignatureError(
            where,
            [
                f"signed by key {signer_id}, which is not a trusted key "
                f"({', '.join(sorted(trusted))})"
            ],
        )
    cert, time = _certificate(where, cert_data)
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
    if not cert.covers(time):
        raise CheckpointSignatureError(where, ["run certificate is outside its validity"])
    return signer_id, cert.owner_key_id, cert.run_id


def _certificate(where: str, data: Any) -> tuple[Certificate, str]:
    """The run certificate a block carries: exactly a ledger entry the owner signed."""
    if not isinstance(data, dict) or set(data) != _ENTRY_FIELDS:
        fields = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointSignatureError(where, [f"invalid run certificate: fields {fields}"])
    try:
        entry = Entry(
            seq=int(data["seq"]),
            time=str(data["time"]),
            kind=str(data["kind"]),
            actor_json=canonical_json(data["actor"]),
            payload_json=canonical_json(data["payload"]),
            prev_hash=str(data["prev_hash"]),
            hash=str(data["hash"]),
            signature=str(data["signature"]),
            key_id=str(data["key_id"]),
        )
        cert = Certificate.from_entry(entry)
    except (LedgerError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointSignatureError(where, [f"invalid run certificate: {exc}"]) from exc
    if entry.to_dict() != data:
        raise CheckpointSignatureError(where, ["invalid run certificate: fields were retyped"])
    return cert, entry.time


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
