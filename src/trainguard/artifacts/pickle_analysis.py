"""Static analysis of a pickle by simulating its opcode stream against the allowlist.

The simulator keeps an abstract stack and memo, so a global's name is resolved however
it was assembled (STACK_GLOBAL over memoised strings, DUP, GET tricks), and it checks
every operation that makes the unpickler run code: calls (REDUCE, NEWOBJ, NEWOBJ_EX,
OBJ, INST), BUILD (``__setstate__``), item and append opcodes on non-containers,
extension codes, and persistent ids. Nothing is imported and nothing is executed.

A class outside the allowlist that :func:`~trainguard.artifacts.allowlist.reconstructible`
admits is judged by its uses (:mod:`~trainguard.artifacts.pickle_data`): rebuilt as data
(NEWOBJ with no arguments, or copyreg's reconstructors, then one BUILD with a dict of plain
attributes) it is listed in a LOW note; any other use is a finding.
"""

from __future__ import annotations

import _compat_pickle
from collections.abc import Callable
from dataclasses import dataclass

from trainguard.artifacts.allowlist import (
    NN_MODULE,
    RECONSTRUCTORS,
    Rule,
    argument_findings,
    reconstructible,
    rule_for,
    severity_of,
)
from trainguard.artifacts.budget import BudgetExceeded
from trainguard.artifacts.interface import Analysis, FormatError
from trainguard.artifacts.pickle_data import DataRules
from trainguard.artifacts.pickle_ops import Blob, OpReader
from trainguard.artifacts.pickle_values import (
    MARK,
    UNKNOWN,
    Const,
    Container,
    Global,
    Made,
    Persistent,
    Value,
    _describe,
    _items,
    _Mark,
    _taint,
    tainted,
)
from trainguard.errors import Severity

__all__ = [
    "DETECTOR",
    "BuildHook",
    "Const",
    "Container",
    "Global",
    "Made",
    "Persistent",
    "PickleAnalyser",
    "PickleResult",
    "Value",
    "analyse_pickle",
]

DETECTOR = "pickle"


@dataclass
class PickleResult:
    """What one pickle turned out to be, for the format handlers."""

    start: int
    end: int
    protocol: int
    root: Value
    persistent_ids: list[Persistent]
    globals: list[Global]


#: Called on BUILD of a joblib array wrapper; returns the offset to resume at.
BuildHook = Callable[[Made, int], int]


class PickleAnalyser(DataRules):
    """Simulates one pickle. Findings go to ``analysis``; parse failures raise FormatError."""

    def __init__(
        self,
        buf: memoryview,
        start: int,
        analysis: Analysis,
        *,
        member: str | None = None,
        allow_persistent: bool = False,
        build_hook: BuildHook | None = None,
    ) -> None:
        self.reader = OpReader(buf, start, member=member)
        self.start = start
        self.analysis = analysis
        self.member = member
        self.allow_persistent = allow_persistent
        self.build_hook = build_hook
        self.stack: list[Value | _Mark] = []
        self.memo: dict[int, Value | _Mark] = {}
        self.protocol = 0
        self.persistent: list[Persistent] = []
        self.globals: list[Global] = []
        self._ops = 0
        # every opcode makes at most one value: bounding opcodes bounds the simulation's
        # memory (and the real unpickler's) by the budget, whatever the stream repeats
        self._max_ops = analysis.budget.max_values()
        self._reported: set[str] = set()
        self.deferred: list[Global] = []
        #: argument tuples of copyreg reconstructors, and how often each was one
        self._recon_args: dict[int, tuple[Container, int]] = {}
        #: classes from outside the standard library and torch/numpy the pickle names
        self.outside: set[str] = set()

    # --- findings ---

    def finding(self, severity: Severity, message: str, offset: int, key: str = "") -> None:
        """Record a finding; a ``key`` reports that kind of finding once per pickle."""
        if key:
            if key in self._reported:
                return
            self._reported.add(key)
        self.analysis.add(severity, DETECTOR, message, member=self.member, offset=offset)

    # --- stack helpers ---

    def pop(self, offset: int) -> Value:
        if not self.stack:
            raise FormatError("stack underflow", member=self.member, offset=offset)
        item = self.stack.pop()
        if isinstance(item, _Mark):
            raise FormatError("unexpected MARK on the stack", member=self.member, offset=offset)
        if isinstance(item, (Global, Container)):
            item.uses += 1
        return item

    def top(self, offset: int) -> Value:
        if not self.stack or isinstance(self.stack[-1], _Mark):
            raise FormatError("stack underflow", member=self.member, offset=offset)
        return self.stack[-1]

    def pop_mark(self, offset: int) -> list[Value]:
        items: list[Value] = []
        while True:
            if not self.stack:
                raise FormatError("no MARK to pop to", member=self.member, offset=offset)
            item = self.stack.pop()
            if isinstance(item, _Mark):
                items.reverse()
                return items
            if isinstance(item, (Global, Container)):
                item.uses += 1
            items.append(item)

    # --- the run ---

    def run(self) -> PickleResult:
        handlers = _HANDLERS
        for op in self.reader:
            self._ops += 1
            if self._ops > self._max_ops:
                raise BudgetExceeded(
                    f"pickle runs more than {self._max_ops} opcodes, more values than the "
                    "memory budget holds (--max-memory)",
                    member=self.member,
                    offset=op.offset,
                )
            if op.name == "STOP":
                root = self.pop(op.offset)
                self.settle(op.offset)
                if self.stack:
                    self.finding(
                        Severity.LOW, "values left on the stack at STOP", op.offset, "stop-left"
                    )
                return PickleResult(
                    self.start, op.end, self.protocol, root, self.persistent, self.globals
                )
            handler = handlers.get(op.name)
            if handler is None:
                raise FormatError(
                    f"unhandled opcode {op.name}", member=self.member, offset=op.offset
                )
            handler(self, op.arg, op.offset)
        raise AssertionError("unreachable")  # pragma: no cover - the reader raises first

    # --- globals ---

    def resolve(self, module: str, name: str, offset: int) -> Global:
        if self.protocol < 3:
            # The unpickler maps Python 2 names (fix_imports) before importing.
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        ref = Global(module, name, offset)
        self.globals.append(ref)
        rule = rule_for(ref.qualified)
        if rule is None and reconstructible(ref.qualified):
            ref.deferred = True  # judged by its uses, at STOP
            self.deferred.append(ref)
        elif rule is None:
            self.finding(
                severity_of(ref.qualified),
                f"imports {ref.qualified} (not in the allowlist)",
                offset,
            )
        return ref

    # --- the operations that run code ---

    def call(
        self, callee: Value, args: Value, offset: int, how: str, kwargs: Value | None = None
    ) -> Made:
        made = Made(callee, args, offset)
        if isinstance(callee, Global) and (
            (how.startswith("NEWOBJ") and callee.deferred) or callee.qualified in RECONSTRUCTORS
        ):
            return self.rebuild(callee, args, kwargs, offset, how)
        if isinstance(kwargs, Container) and kwargs.items:
            # NEWOBJ_EX: the keywords reach the class's __new__ like the arguments do
            args = Container("tuple", [*_items(args), *kwargs.items[1::2]])
        if tainted(args) or tainted(kwargs):
            self.finding(
                Severity.HIGH,
                f"{how} passes an object rebuilt as data to {_describe(callee)} (the callee "
                "could run its class's code: __hash__, __index__, __iter__)",
                offset,
            )
        if not isinstance(callee, Global):
            self.finding(
                Severity.CRITICAL,
                f"{how} calls a computed object, not a named global",
                offset,
            )
            return made
        rule = rule_for(callee.qualified)
        if rule is None:
            self.finding(severity_of(callee.qualified), f"{how} calls {callee.qualified}", offset)
        elif not rule.call:
            self.finding(
                Severity.HIGH,
                f"{how} calls {callee.qualified}, which is allowed only as a value",
                offset,
            )
        else:
            self.check_arguments(callee.qualified, args, offset, rule)
        return made

    def check_arguments(self, qualified: str, args: Value, offset: int, rule: Rule) -> None:
        for severity, message in argument_findings(qualified, args, rule):
            self.finding(severity, message, offset)

    def build(self, offset: int) -> None:
        state = self.pop(offset)
        target = self.top(offset)
        if isinstance(target, Made) and target.rebuilt:
            self.build_data(target, state, offset)
            return
        rule = None
        if isinstance(target, Made) and isinstance(target.callee, Global):
            rule = rule_for(target.callee.qualified)
        if rule is None or not rule.build:
            what = _describe(target)
            self.finding(Severity.HIGH, f"BUILD (__setstate__) on {what}", offset)
            return
        assert isinstance(target, Made)
        assert isinstance(target.callee, Global)
        if target.state is not None:
            # a first BUILD can plant an instance __setstate__ that a second one calls
            self.finding(Severity.HIGH, f"second BUILD on {_describe(target)}", offset)
        if (rule.setstate or rule is NN_MODULE) and tainted(state):
            # a module calls what its state holds (forward, hooks, submodules)
            self.finding(
                Severity.HIGH,
                f"BUILD gives {_describe(target)} an object rebuilt as data in its state",
                offset,
            )
        is_dict = isinstance(state, Container) and state.kind == "dict"
        if (
            not rule.setstate
            and not is_dict
            and not (isinstance(state, Const) and state.value is None)
        ):
            self.finding(
                Severity.HIGH,
                f"BUILD with a non-dict state on {_describe(target)} (sets attributes)",
                offset,
            )
        if is_dict and not rule.setstate:
            assert isinstance(state, Container)
            keys = [const for const in state.items[::2] if isinstance(const, Const)]
            if any(isinstance(k.value, str) and k.value.startswith("__") for k in keys):
                self.finding(
                    Severity.HIGH, f"BUILD sets a special attribute on {_describe(target)}", offset
                )
        target.state = state
        if self.build_hook is not None and target.callee.module == "joblib.numpy_pickle":
            self.reader.pos = self.build_hook(target, self.reader.pos)

    def set_items(
        self, target: Value, offset: int, opname: str, values: list[Value] | None = None
    ) -> None:
        if isinstance(target, Container) and target.kind == "dict":
            return
        if isinstance(target, Made) and any(tainted(v) for v in values or ()):
            # an OrderedDict of hooks: torch calls its values (forward and backward hooks)
            self.finding(
                Severity.HIGH,
                f"{opname} puts an object rebuilt as data into {_describe(target)}",
                offset,
            )
        if isinstance(target, Made) and isinstance(target.callee, Global):
            rule = rule_for(target.callee.qualified)
            if rule is not None and rule.items:
                return
        self.finding(
            Severity.HIGH, f"{opname} on {_describe(target)} (calls its __setitem__)", offset
        )

    def add_items(self, target: Value, items: list[Value], offset: int, opname: str) -> None:
        kinds = {"APPEND": "list", "APPENDS": "list", "ADDITEMS": "set"}
        if isinstance(target, Container) and target.kind == kinds[opname]:
            target.items.extend(items)
            _taint(target, items)
            if opname == "ADDITEMS":
                self.hashed(items, offset)
            return
        method = "add" if opname == "ADDITEMS" else "append/extend"
        self.finding(Severity.HIGH, f"{opname} on {_describe(target)} (calls its {method})", offset)

    def memo_index(self, index: object, offset: int) -> int:
        if not isinstance(index, int) or index < 0:
            raise FormatError("invalid memo index", member=self.member, offset=offset)
        # Picklers number memo entries in order; a far larger index only makes the
        # C unpickler allocate (and zero) a huge memo table.
        if index > self._ops + 1024:
            self.finding(
                Severity.MEDIUM,
                f"memo index {index} far beyond the {self._ops} opcodes read (memory exhaustion)",
                offset,
                "memo-huge",
            )
        return index


# --- opcode handlers ---------------------------------------------------------------

Handler = Callable[[PickleAnalyser, object, int], None]
_HANDLERS: dict[str, Handler] = {}


def _on(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            _HANDLERS[name] = fn
        return fn

    return register


_CONSTS = (
    "INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT STRING BINSTRING "
    "SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8 UNICODE SHORT_BINUNICODE "
    "BINUNICODE BINUNICODE8 BYTEARRAY8"
).split()


@_on(*_CONSTS)
def _const(a: PickleAnalyser, arg: object, offset: int) -> None:
    a.stack.append(Const(None if isinstance(arg, Blob) else arg))


@_on("NONE")
def _none(a: PickleAnalyser, arg: object, offset: int) -> None:
    a.stack.append(Const(None))


@_on("NEWTRUE")
def _true(a: PickleAnalyser, arg: object, offset: int) -> None:
    a.stack.append(Const(True))


@_on("NEWFALSE")
def _false(a: PickleAnalyser, arg: object, offset: int) -> None:
    a.stack.append(Const(False))


@_on("PROTO")
def _proto(a: PickleAnalyser, arg: object, offset: int) -> None:
    assert isinstance(arg, int)
    if arg > 5:
        raise FormatError(f"unsupported pickle protocol {arg}", member=a.member, offset=offset)
    a.protocol = arg


@_on("FRAME")
def _frame(a: PickleAnalyser, arg: object, offset: int) -> None:
    assert isinstance(arg, int)
    left = len(a.reader.buf) - a.reader.pos
    if arg > left:
        raise FormatError(
            f"frame of {arg} bytes runs past the end ({left} remain)",
            member=a.member,
            offset=offset,
        )


@_on("MARK")
def _mark(a: PickleAnalyser, arg: object, offset: int) -> None:
    a.stack.append(MARK)


@_on("POP")
def _pop(a: PickleAnalyser, arg: object, offset: int) -> None:
    if a.stack and isinstance(a.stack[-1], _Mark):
        a.stack.pop()
    else:
        a.pop(offset)


@_on("POP_MARK")
def _pop_mark(a: PickleAnalyser, arg: object, offset: int) -> None:
    a.pop_mark(offset)


@_on("DUP")
def _dup(a: PickleAnalyser, arg: object, offset: int) -> None:
    a.stack.append(a.top(offset))


def _tuple_of(n: int) -> Handler:
    def handler(a: PickleAnalyser, arg: object, offset: int) -> None:
        items = [a.pop(offset) for _ in range(n)]
        items.reverse()
        made = Container("tuple", items)
        _taint(made, items)
        a.stack.append(made)

    return handler


_HANDLERS.update({"TUPLE1": _tuple_of(1), "TUPLE2": _tuple_of(2), "TUPLE3": _tuple_of(3)})


def _empty(kind: str) -> Handler:
    def handler(a: PickleAnalyser, arg: object, offset: int) -> None:
        a.stack.append(Container(kind))

    return handler


def _from_mark(kind: str) -> Handler:
    def handler(a: PickleAnalyser, arg: object, offset: int) -> None:
        made = Container(kind, a.pop_mark(offset))
        _taint(made, made.items)
        if kind == "frozenset":
            a.hashed(made.items, offset)
        a.stack.append(made)

    return handler


_HANDLERS.update(
    {
        "EMPTY_TUPLE": _empty("tuple"),
        "EMPTY_LIST": _empty("list"),
        "EMPTY_DICT": _empty("dict"),
        "EMPTY_SET": _empty("set"),
        "TUPLE": _from_mark("tuple"),
        "LIST": _from_mark("list"),
        "FROZENSET": _from_mark("frozenset"),
    }
)


@_on("DICT")
def _dict(a: PickleAnalyser, arg: object, offset: int) -> None:
    items = a.pop_mark(offset)
    if len(items) % 2:
        raise FormatError("odd number of items for DICT", member=a.member, offset=offset)
    made = Container("dict", items)
    _taint(made, items)
    a.hashed(items[::2], offset)
    a.stack.append(made)


@_on("APPEND")
def _append(a: PickleAnalyser, arg: object, offset: int) -> None:
    value = a.pop(offset)
    a.add_items(a.top(offset), [value], offset, "APPEND")


def _extend(opname: str) -> Handler:
    def handler(a: PickleAnalyser, arg: object, offset: int) -> None:
        items = a.pop_mark(offset)
        a.add_items(a.top(offset), items, offset, opname)

    return handler


_HANDLERS.update({"APPENDS": _extend("APPENDS"), "ADDITEMS": _extend("ADDITEMS")})


@_on("SETITEM")
def _setitem(a: PickleAnalyser, arg: object, offset: int) -> None:
    value = a.pop(offset)
    key = a.pop(offset)
    target = a.top(offset)
    a.set_items(target, offset, "SETITEM", [value])
    a.hashed([key], offset)
    if isinstance(target, Container):
        target.items += [key, value]
        _taint(target, [key, value])


@_on("SETITEMS")
def _setitems(a: PickleAnalyser, arg: object, offset: int) -> None:
    items = a.pop_mark(offset)
    if len(items) % 2:
        raise FormatError("odd number of items for SETITEMS", member=a.member, offset=offset)
    target = a.top(offset)
    a.set_items(target, offset, "SETITEMS", items[1::2])
    a.hashed(items[::2], offset)
    if isinstance(target, Container):
        target.items += items
        _taint(target, items)


@_on("PUT", "BINPUT", "LONG_BINPUT")
def _put(a: PickleAnalyser, arg: object, offset: int) -> None:
    a.memo[a.memo_index(arg, offset)] = a.top(offset)


@_on("MEMOIZE")
def _memoize(a: PickleAnalyser, arg: object, offset: int) -> None:
    a.memo[len(a.memo)] = a.top(offset)


@_on("GET", "BINGET", "LONG_BINGET")
def _get(a: PickleAnalyser, arg: object, offset: int) -> None:
    index = a.memo_index(arg, offset)
    if index not in a.memo:
        raise FormatError(f"memo key {index} was never stored", member=a.member, offset=offset)
    a.stack.append(a.memo[index])


@_on("GLOBAL")
def _global(a: PickleAnalyser, arg: object, offset: int) -> None:
    assert isinstance(arg, tuple)
    a.stack.append(a.resolve(arg[0], arg[1], offset))


@_on("STACK_GLOBAL")
def _stack_global(a: PickleAnalyser, arg: object, offset: int) -> None:
    name = a.pop(offset)
    module = a.pop(offset)
    if not (
        isinstance(module, Const)
        and isinstance(name, Const)
        and isinstance(module.value, str)
        and isinstance(name.value, str)
    ):
        a.finding(
            Severity.CRITICAL,
            "STACK_GLOBAL with a name that is not a constant string (cannot be resolved)",
            offset,
        )
        a.stack.append(Global("<unresolved>", "<unresolved>", offset))
        return
    a.stack.append(a.resolve(module.value, name.value, offset))


@_on("INST")
def _inst(a: PickleAnalyser, arg: object, offset: int) -> None:
    assert isinstance(arg, tuple)
    args = Container("tuple", a.pop_mark(offset))
    a.stack.append(a.call(a.resolve(arg[0], arg[1], offset), args, offset, "INST"))


@_on("OBJ")
def _obj(a: PickleAnalyser, arg: object, offset: int) -> None:
    items = a.pop_mark(offset)
    if not items:
        raise FormatError("OBJ without a class", member=a.member, offset=offset)
    a.stack.append(a.call(items[0], Container("tuple", items[1:]), offset, "OBJ"))


@_on("NEWOBJ")
def _newobj(a: PickleAnalyser, arg: object, offset: int) -> None:
    args = a.pop(offset)
    cls = a.pop(offset)
    a.stack.append(a.call(cls, args, offset, "NEWOBJ"))


@_on("NEWOBJ_EX")
def _newobj_ex(a: PickleAnalyser, arg: object, offset: int) -> None:
    kwargs = a.pop(offset)
    args = a.pop(offset)
    cls = a.pop(offset)
    a.stack.append(a.call(cls, args, offset, "NEWOBJ_EX", kwargs))


@_on("REDUCE")
def _reduce(a: PickleAnalyser, arg: object, offset: int) -> None:
    args = a.pop(offset)
    callee = a.pop(offset)
    a.stack.append(a.call(callee, args, offset, "REDUCE"))


@_on("BUILD")
def _build(a: PickleAnalyser, arg: object, offset: int) -> None:
    a.build(offset)


@_on("EXT1", "EXT2", "EXT4")
def _ext(a: PickleAnalyser, arg: object, offset: int) -> None:
    a.finding(
        Severity.HIGH,
        f"extension code {arg} (resolves to whatever global copyreg registered)",
        offset,
    )
    a.stack.append(Global("<extension>", str(arg), offset))


@_on("PERSID", "BINPERSID")
def _persid(a: PickleAnalyser, arg: object, offset: int) -> None:
    pid: Value = Const(arg) if arg is not None else a.pop(offset)
    ref = Persistent(pid, offset)
    if tainted(pid):
        a.finding(Severity.HIGH, "persistent id holds an object rebuilt as data", offset)
    if not a.allow_persistent:
        a.finding(
            Severity.MEDIUM,
            "persistent id in a format that does not use them",
            offset,
            "persid",
        )
    a.persistent.append(ref)
    a.stack.append(ref)


@_on("NEXT_BUFFER")
def _next_buffer(a: PickleAnalyser, arg: object, offset: int) -> None:
    a.finding(
        Severity.LOW,
        "out-of-band buffer (protocol 5): not loadable without the buffers",
        offset,
        "oob",
    )
    a.stack.append(UNKNOWN)


@_on("READONLY_BUFFER")
def _readonly_buffer(a: PickleAnalyser, arg: object, offset: int) -> None:
    a.top(offset)


def analyse_pickle(
    buf: memoryview,
    start: int,
    analysis: Analysis,
    *,
    member: str | None = None,
    allow_persistent: bool = False,
    build_hook: BuildHook | None = None,
) -> PickleResult:
    """Simulate the pickle at ``buf[start:]``; findings go to ``analysis``.

    Raises :class:`FormatError` where the stream stops parsing; findings recorded up to
    that point stay in ``analysis``.
    """
    analyser = PickleAnalyser(
        buf,
        start,
        analysis,
        member=member,
        allow_persistent=allow_persistent,
        build_hook=build_hook,
    )
    return analyser.run()
