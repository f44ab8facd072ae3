"""Ed25519 keys and signatures (the ``cryptography`` package).

Keys are PEM files: ``trainguard.key`` (PKCS#8, unencrypted, mode 0600) and
``trainguard.pub`` (SubjectPublicKeyInfo). The private key is created with
``O_EXCL`` and mode 0600 in one step, so it is never readable by others, not even for
an instant, and an existing key is never overwritten. Loading refuses a private key
file that group or others can read: a key others could have copied signs nothing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from trainguard._io import KEY_CAP, display, read_capped, reason, write_all
from trainguard.errors import InputError
from trainguard.integrity.interface import KeyFileError

PRIVATE_NAME = "trainguard.key"
PUBLIC_NAME = "trainguard.pub"


def keygen(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new key pair into ``directory``; return (private, public) paths."""
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError as exc:  # something that is not a folder: a device, a FIFO, a file
        raise KeyFileError(f"{display(folder)}: exists and is not a folder") from exc
    except OSError as exc:
        raise KeyFileError(f"{display(folder)}: cannot create folder: {reason(exc)}") from exc
    private, public = folder / PRIVATE_NAME, folder / PUBLIC_NAME
    for path in (private, public):
        if os.path.lexists(path):
            raise KeyFileError(f"{display(path)} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private, private_pem, 0o600)
    try:
        _write_new(public, public_pem, 0o644)
    except KeyFileError:
        with contextlib.suppress(OSError):
            private.unlink()
        raise
    return private, public


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never an existing one) holding exactly ``data``, or leave nothing.

    A write that fails part-way (a full disk, a file size limit) removes the file: a
    truncated key would sign nothing and block the next keygen as "already exists".
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise KeyFileError(f"{display(path)} already exists; refusing to overwrite a key") from exc
    except OSError as exc:
        raise KeyFileError(f"{display(path)}: cannot create: {reason(exc)}") from exc
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits; set exactly what we mean
            write_all(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise KeyFileError(f"{display(path)}: cannot write key: {reason(exc)}") from exc


def load_private(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    p = Path(path)
    data = _read_key(p, "private key")
    try:
        st = p.stat()
    except OSError as exc:
        raise KeyFileError(f"{display(p)}: cannot read private key: {reason(exc)}") from exc
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KeyFileError(
            f"private key {display(p)} is accessible by group or others; run chmod 600 on it "
            "and make a new key if anyone else could have read it"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{display(p)} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{display(p)} is not an ed25519 private key")
    return key


def load_public(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    p = Path(path)
    data = _read_key(p, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{display(p)} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{display(p)} is not an ed25519 public key")
    return key


def _read_key(path: Path, what: str) -> bytes:
    """A key file's bytes: a regular file of at most KEY_CAP bytes (never a FIFO or device)."""
    try:
        return read_capped(path, KEY_CAP, what)
    except InputError as exc:
        raise KeyFileError(str(exc)) from exc


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message)).decode("ascii")


def verify(key: Ed25519PublicKey, message: bytes, signature_b64: str) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        key.verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
