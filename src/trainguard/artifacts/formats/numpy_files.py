"""NumPy ``.npy`` files: a header, then raw data, or a pickle for object arrays."""

from __future__ import annotations

from typing import Any

from trainguard.artifacts.formats.pickles import analyse_tail
from trainguard.artifacts.interface import Analysis, Format, FormatError
from trainguard.artifacts.npy import is_npy, npy_data_size, parse_npy_header
from trainguard.artifacts.pickle_analysis import analyse_pickle
from trainguard.errors import Severity


class NeedsWhole(Exception):
    """An object array seen through a prefix: its pickle needs the whole member."""


class NpyFormat:
    name = Format.NPY

    def sniff(self, head: bytes, size: int) -> bool:
        return is_npy(head)

    def analyse(self, buf: memoryview, analysis: Analysis) -> None:
        analyse_npy(buf, analysis, member=None, size=len(buf), full=True)

    def load(self, data: bytearray, analysis: Analysis, map_location: Any) -> Any:
        from trainguard.artifacts import arrays

        return arrays.load_npy(data, 0, len(data))


def analyse_npy(
    buf: memoryview, analysis: Analysis, *, member: str | None, size: int, full: bool
) -> None:
    """Check one array; ``buf`` is the whole array if ``full``, else a prefix of ``size`` bytes."""
    header = parse_npy_header(buf, 0, member=member)
    data_size = npy_data_size(header)
    if data_size is None:
        if not full:
            raise NeedsWhole
        analysis.add(
            Severity.INFO,
            "npy",
            "object array: its data is a pickle (numpy.load needs allow_pickle=True)",
            member=member,
        )
        result = analyse_pickle(buf, header.data_offset, analysis, member=member)
        analyse_tail(buf, result.end, analysis, member=member)
        return
    end = header.data_offset + data_size
    if end > size:
        raise FormatError(
            f"array data truncated: {size - header.data_offset} of {data_size} bytes",
            member=member,
            offset=header.data_offset,
        )
    if end < size:
        analysis.add(
            Severity.LOW,
            "npy",
            f"{size - end} bytes after the array data (ignored by numpy.load)",
            member=member,
            offset=end,
        )
