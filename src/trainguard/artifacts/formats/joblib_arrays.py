"""joblib's array wrappers, read as joblib reads them, and the same stream read as a plain pickle.

A joblib dump is a pickle interrupted, after each ``NumpyArrayWrapper``'s BUILD, by the
array's raw bytes (or, for object arrays, by a nested pickle). Which bytes are skipped
is decided by the wrapper's fields exactly as joblib decides it; and since
``pickle.load``, ``torch.load`` and ``numpy.load(allow_pickle=True)`` know nothing of
wrappers, the same stream is read again as they read it, the array bytes as opcodes.
The worst reading wins.
"""

from __future__ import annotations

import contextlib
from typing import Any

from trainguard.artifacts.interface import Analysis, Format, FormatError
from trainguard.artifacts.pickle_analysis import (
    Const,
    Container,
    Global,
    Made,
    Persistent,
    PickleAnalyser,
    Value,
    analyse_pickle,
)
from trainguard.errors import Severity


def _dict_items(value: Value | None) -> dict[object, Value]:
    """The constant-keyed entries of a simulated dict (later keys win, as in Python)."""
    if not isinstance(value, Container) or value.kind != "dict":
        return {}
    items = value.items
    return {_const(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _const(value: Value | None) -> object:
    return value.value if isinstance(value, Const) else None


class JoblibReader:
    """The BUILD hook that reads a joblib array wrapper's fields as joblib itself does.

    joblib (``NumpyArrayWrapper.read``) trusts the attributes the BUILD state set: the
    real ``numpy.dtype`` they rebuild (its item size and its object flag, which numpy
    takes from the state of a copied dtype and ignores for a builtin one), the shape
    multiplied in int64, and the alignment padding, read whenever that attribute is not
    None. The same dtype is rebuilt here with numpy from the pickle's constants, so the
    bytes skipped are the bytes joblib skips. An object array's data is a nested pickle
    that joblib reads with a plain unpickler: no wrapper in it is followed by array bytes.
    """

    def __init__(self, buf: memoryview, analysis: Analysis, member: str | None) -> None:
        self.buf, self.analysis, self.member = buf, analysis, member
        #: True once array bytes were skipped: a plain unpickler would read them as opcodes
        self.skipped = False

    def fail(self, message: str, offset: int | None = None) -> FormatError:
        return FormatError(f"joblib array wrapper: {message}", member=self.member, offset=offset)

    def __call__(self, wrapper: Made, pos: int) -> int:
        if isinstance(wrapper.args, Container) and wrapper.args.items:
            # called with arguments (REDUCE), __init__ sets attributes the state may not
            raise self.fail("made with constructor arguments, which set fields too", pos)
        state = _dict_items(wrapper.state)
        shape = state.get("shape")
        if not isinstance(shape, Container) or shape.kind not in ("tuple", "list"):
            raise self.fail("no shape")
        hasobject, itemsize = self.dtype(state.get("dtype"))
        if hasobject:
            nested = analyse_pickle(self.buf, pos, self.analysis, member=self.member)
            return nested.end
        count = 1
        for dim in shape.items:
            n = _const(dim)
            if not isinstance(n, int) or not -(2**63) <= n < 2**63:
                raise self.fail("a dimension that is not an int64")
            count = (count * n + 2**63) % 2**64 - 2**63  # numpy's int64 product wraps
        if count < 0:
            raise self.fail("a negative element count")
        alignment = state.get("numpy_array_alignment_bytes")
        padded = alignment is not None and not (
            isinstance(alignment, Const) and alignment.value is None
        )
        if padded and pos < len(self.buf):
            pos += 1 + self.buf[pos]
        end = pos + count * itemsize
        if end > len(self.buf):
            raise self.fail("array data runs past the end", pos)
        self.skipped = True
        return end

    def dtype(self, value: Value | None) -> tuple[bool, int]:
        """(hasobject, itemsize) of the dtype joblib would rebuild from ``value``."""
        import numpy

        if not isinstance(value, Made) or not (
            isinstance(value.callee, Global) and value.callee.qualified == "numpy.dtype"
        ):
            raise self.fail("a dtype that is not a numpy.dtype")
        try:
            dtype = _realize(value, numpy, [0])
            return bool(dtype.hasobject), int(dtype.itemsize)
        except FormatError:
            raise
        except Exception as exc:  # numpy refuses the descriptor: so would joblib
            raise self.fail(f"a dtype numpy refuses ({type(exc).__name__})") from None


#: values rebuilt for one dtype at most: memo references could make a small stream
#: stand for an exponentially large tree
_MAX_REALIZED = 10_000


def _realize(value: Value | None, numpy: Any, seen: list[int], depth: int = 0) -> Any:
    """The constant, container or numpy dtype ``value`` stands for, rebuilt for real.

    Only numpy.dtype is ever called (as the unpickler would: ``dtype(*args)`` then
    ``__setstate__(state)``); anything else that is not plain data is refused.
    ``seen`` counts the values rebuilt so far.
    """
    seen[0] += 1
    if depth > 32 or seen[0] > _MAX_REALIZED:
        raise FormatError("joblib dtype too large or nested too deeply")
    if isinstance(value, Const):
        if isinstance(value.value, str) and len(value.value) > 4096:
            raise FormatError("joblib dtype description too long")
        return value.value
    if isinstance(value, Container):
        items = [_realize(v, numpy, seen, depth + 1) for v in value.items]
        if value.kind == "dict":
            return dict(zip(items[::2], items[1::2], strict=False))
        return {"tuple": tuple, "list": list, "set": set, "frozenset": frozenset}[value.kind](items)
    if (
        isinstance(value, Made)
        and isinstance(value.callee, Global)
        and value.callee.qualified == "numpy.dtype"
    ):
        args = _realize(value.args, numpy, seen, depth + 1)
        dtype = numpy.dtype(*args)
        if value.state is not None:
            dtype.__setstate__(_realize(value.state, numpy, seen, depth + 1))
        return dtype
    raise FormatError("joblib dtype built from something other than constants")


def joblib_hook(buf: memoryview, analysis: Analysis, member: str | None) -> JoblibReader:
    """Skip (or analyse, for object arrays) the array bytes joblib reads after BUILD."""
    return JoblibReader(buf, analysis, member)


class _PlainReading(PickleAnalyser):
    """A plain unpickler's view of a joblib stream, stopping where every unpickler stops.

    Past a wrapper the bytes are array data: read as opcodes they often form some
    operation before the stream breaks. Only what could run code may count, so the
    simulation ends (no finding) where a real unpickler certainly raises having run
    nothing: a call of a constant or container (TypeError), APPENDS or ADDITEMS on a
    value with no append or add (AttributeError), an import of a name that is not a
    dotted identifier (no module of the environment has it), an extension code (the
    registry is empty unless the loading program fills it) and a persistent id (no
    plain loader gives the pickle at byte 0 a ``persistent_load``). A huge memo index is
    memory, not code: it is not reported here. Random array bytes otherwise read as a
    stream of findings (measured: 17 benign joblib dumps in 300 without these stops).
    """

    def __init__(self, buf: memoryview, analysis: Analysis, member: str | None) -> None:
        super().__init__(buf, 0, analysis, member=member)
        self.popped: list[Value] = []

    def pop(self, offset: int) -> Value:
        item = super().pop(offset)
        self.popped = [*self.popped[-1:], item]
        return item

    def build(self, offset: int) -> None:
        # BUILD on a builtin value: a state that is not empty sets attributes it lacks
        state, target = self.stack[-1:], self.stack[-2:-1]
        if target and isinstance(target[0], Const | Container) and not _maybe_falsy(state[0]):
            raise FormatError("BUILD on a value without attributes", offset=offset)
        super().build(offset)

    def resolve(self, module: str, name: str, offset: int) -> Global:
        if not all(part.isidentifier() for part in module.split(".")):
            raise FormatError("imports a module no import can name", offset=offset)
        return super().resolve(module, name, offset)

    def add_items(self, target: Value, items: list[Value], offset: int, opname: str) -> None:
        kind = "set" if opname == "ADDITEMS" else "list"
        if isinstance(target, Const) or (isinstance(target, Container) and target.kind != kind):
            raise FormatError(f"{opname} on a value without that method", offset=offset)
        super().add_items(target, items, offset, opname)

    def call(
        self, callee: Value, args: Value, offset: int, how: str, kwargs: Value | None = None
    ) -> Made:
        if isinstance(callee, Const | Container | Persistent):
            raise FormatError("calls a value that is not callable", offset=offset)
        return super().call(callee, args, offset, how, kwargs)

    def finding(self, severity: Severity, message: str, offset: int, key: str = "") -> None:
        if key == "persid":
            raise FormatError("persistent id without a persistent_load", offset=offset)
        if message.startswith("extension code"):  # the EXT opcodes' finding
            raise FormatError("unregistered extension code", offset=offset)
        if message.startswith("STACK_GLOBAL") and any(
            isinstance(v, Container | Persistent | Global)
            or (isinstance(v, Const) and not isinstance(v.value, str))
            or (isinstance(v, Made) and _never_str(v))
            for v in self.popped
        ):  # its finding for names that are not constant strings: these are no str at all
            raise FormatError("STACK_GLOBAL of values that are not strings", offset=offset)
        if key != "memo-huge":
            super().finding(severity, message, offset, key)


def _never_str(made: Made) -> bool:
    """Made by a library class or function that returns no str (arrays, tensors, dicts)."""
    callee = made.callee
    return isinstance(callee, Global) and callee.module.split(".")[0] in (
        "joblib", "numpy", "torch", "collections"
    )  # fmt: skip


def _maybe_falsy(state: object) -> bool:
    """Could BUILD's state be empty (then BUILD does nothing, even on a builtin value)?"""
    if isinstance(state, Const):
        return not state.value
    if isinstance(state, Container):
        if state.kind == "tuple" and len(state.items) == 2:
            return all(_maybe_falsy(item) for item in state.items)
        return not state.items
    return not isinstance(state, Persistent)


def plain_reading(buf: memoryview, analysis: Analysis, member: str | None) -> None:
    """What ``pickle.load`` (and torch.load, numpy.load) would run in a joblib stream.

    They know nothing of array wrappers and read the bytes joblib skips as opcodes.
    Code runs as soon as its opcode is reached, so findings before the stream stops
    parsing count; a stream that stops parsing is only what joblib reads.
    """
    side = Analysis(Format.PICKLE, budget=analysis.budget)
    with contextlib.suppress(FormatError, RecursionError, MemoryError):
        _PlainReading(buf, side, member).run()
    seen = {(f.detector, f.location, f.message) for f in analysis.findings}
    for f in side.findings:
        if f.severity >= Severity.MEDIUM and f.detector != "parse":
            if (f.detector, f.location, f.message) in seen:
                continue
            analysis.add(
                f.severity,
                f.detector,
                f"read as a plain pickle (pickle.load, torch.load, numpy.load), past the "
                f"bytes joblib reads as array data: {f.message}",
                member=member,
                offset=f.offset,
            )
