"""Data that is not code: objects rebuilt without a call of their class.

The rules of docs/scan-policy.md section 2, as the simulator applies them: a class outside
the allowlist that :func:`~trainguard.artifacts.allowlist.reconstructible` admits may be
rebuilt (NEWOBJ with no arguments, or copyreg's reconstructors) and given one dict of
plain attributes; its uses are counted, and at STOP any other use is a finding, the class
is read from its installed source (:func:`~trainguard.artifacts.classdefs.class_risk`),
and the classes that pass are listed in one LOW note.
"""

from __future__ import annotations

from trainguard.artifacts.allowlist import RECONSTRUCTORS, caller_allows, rule_for, severity_of
from trainguard.artifacts.classdefs import class_risk
from trainguard.artifacts.pickle_values import (
    UNKNOWN,
    Const,
    Container,
    Global,
    Made,
    Value,
    _describe,
    _items,
    tainted,
)
from trainguard.errors import Severity


class DataRules:
    """The part of the simulator that judges objects rebuilt as data (a mixin)."""

    globals: list[Global]
    deferred: list[Global]
    #: argument tuples of copyreg reconstructors, and how often each was one
    _recon_args: dict[int, tuple[Container, int]]
    #: classes from outside the standard library and torch/numpy the pickle names
    outside: set[str]

    def finding(self, severity: Severity, message: str, offset: int, key: str = "") -> None:
        raise NotImplementedError

    def rebuild(
        self, callee: Global, args: Value, kwargs: Value | None, offset: int, how: str
    ) -> Made:
        """NEWOBJ on a deferred class, or copyreg's reconstructors: an object made without
        calling its class. Only with no arguments; the class is then rebuilt as data."""
        cls: Value = callee
        rest = _items(args)
        if callee.qualified in RECONSTRUCTORS:
            if not isinstance(args, Container):
                rest = [UNKNOWN, UNKNOWN]
            cls, rest = (rest[0], rest[1:]) if rest else (UNKNOWN, [])
            name = callee.name
            if name == "_reconstructor" and len(rest) == 2:
                base, state = rest
                if (
                    isinstance(base, Global)
                    and base.qualified == "builtins.object"
                    and isinstance(state, Const)
                    and state.value is None
                ):
                    rest = []  # object.__new__(cls): no code of cls runs
            elif name == "__newobj_ex__" and len(rest) == 2:
                kwargs, rest = rest[1], _items(rest[0])
            if isinstance(args, Container) and isinstance(cls, Global):
                seen = self._recon_args.get(id(args), (args, 0))[1]
                self._recon_args[id(args)] = (args, seen + 1)
        empty = not rest and not (isinstance(kwargs, Container) and kwargs.items)
        if isinstance(cls, Global) and cls.deferred and empty:
            cls.rebuilds += 1
            return Made(cls, Container("tuple"), offset, rebuilt=True)
        rule = rule_for(cls.qualified) if isinstance(cls, Global) else None
        if isinstance(cls, Global) and rule is not None and rule.call and rule.build and empty:
            return Made(cls, Container("tuple"), offset)  # a known class, rebuilt bare
        what = _describe(cls) if not isinstance(cls, Global) else cls.qualified
        severity = severity_of(cls.qualified) if isinstance(cls, Global) else Severity.CRITICAL
        self.finding(
            severity,
            f"{how} {'via ' + callee.qualified + ' ' if cls is not callee else ''}creates "
            f"{what} with arguments its __new__ receives",
            offset,
        )
        return Made(cls, args, offset)

    def settle(self, offset: int) -> None:
        """At STOP: deferred classes used other than as rebuilt data are findings."""
        for args, rebuilt in self._recon_args.values():
            if args.uses > rebuilt:  # the (class, base, state) tuple was used as data too
                for item in args.items[:1]:
                    if isinstance(item, Global):
                        item.rebuilds = 0
        for ref in self.deferred:
            if ref.uses > ref.rebuilds:
                self.finding(
                    severity_of(ref.qualified),
                    f"imports {ref.qualified} (not in the allowlist; used other than as a "
                    "class rebuilt as data)",
                    ref.offset,
                )
            elif ref.rebuilds and (why := class_risk(ref.qualified)) is not None:
                self.finding(
                    Severity.HIGH,
                    f"rebuilds {ref.qualified} as data (pickle.load imports its module), but {why}",
                    ref.offset,
                )
            elif ref.rebuilds:
                self.outside.add(ref.qualified)
        for ref in self.globals:
            rule = rule_for(ref.qualified)
            if rule is not None and rule.record and not caller_allows(ref.qualified):
                self.outside.add(ref.qualified)
        if self.outside:
            self.finding(
                Severity.LOW,
                "data objects of classes outside the allowlist, rebuilt without a call (or "
                f"enum members looked up by value): {', '.join(sorted(self.outside))} "
                "(pickle.load imports their installed modules: verify the environment; "
                "trainguard.load returns inert records unless allowed)",
                offset,
                "outside",
            )

    def build_data(self, target: Made, state: Value, offset: int) -> None:
        """BUILD on an object rebuilt as data: only one, with a dict of plain attribute
        names (a dict updates ``__dict__``; slot state would call ``__setattr__``)."""
        what = _describe(target)
        keys = _items(state)[::2] if isinstance(state, Container) and state.kind == "dict" else None
        if target.state is not None:
            self.finding(Severity.HIGH, f"second BUILD on {what}", offset)
        elif keys is None:
            self.finding(
                Severity.HIGH,
                f"BUILD with a state that is not an attribute dict on {what} (calls its "
                "__setstate__ or __setattr__)",
                offset,
            )
        elif not all(
            isinstance(k, Const) and isinstance(k.value, str) and not k.value.startswith("__")
            for k in keys
        ):
            self.finding(
                Severity.HIGH, f"BUILD sets a special or non-string attribute on {what}", offset
            )
        target.state = state

    def hashed(self, keys: list[Value], offset: int) -> None:
        """Dict keys and set members are hashed: a rebuilt object's class code would run."""
        if any(tainted(k) for k in keys):
            self.finding(
                Severity.HIGH,
                "an object rebuilt as data is hashed as a dict key or set member (runs its "
                "class's __hash__)",
                offset,
            )
