"""The format handlers, in the order they are tried on a file's first bytes.

The handler that recognises a file analyses it and, for ``trainguard.load``, rebuilds it:
one class per format scans and loads, so the two can never read the bytes differently.

The order matters only where magic numbers could overlap: compressed joblib streams
(whose first byte could also be read as a pickle opcode) come before plain pickles.
"""

from __future__ import annotations

from trainguard.artifacts.formats.archives import ZipFormat
from trainguard.artifacts.formats.numpy_files import NpyFormat
from trainguard.artifacts.formats.other import (
    UNSUPPORTED,
    SafetensorsFormat,
    TorchTarFormat,
)
from trainguard.artifacts.formats.pickles import CompressedPickleFormat, PickleFormat
from trainguard.artifacts.interface import FormatHandler

HANDLERS: list[FormatHandler] = [
    ZipFormat(),
    NpyFormat(),
    SafetensorsFormat(),
    TorchTarFormat(),
    *UNSUPPORTED,
    CompressedPickleFormat(),
    PickleFormat(),
]

#: How many leading bytes the handlers need to recognise a file.
HEAD_SIZE = 1024


def identify(head: bytes, size: int) -> FormatHandler | None:
    """The handler for a file whose first bytes are ``head``, if any recognises it."""
    for handler in HANDLERS:
        if handler.sniff(head, size):
            return handler
    return None
