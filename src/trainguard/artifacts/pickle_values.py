"""The abstract values the pickle simulator keeps on its stack and in its memo.

What the simulator knows of each value: a constant, a named global, a container and what
it holds, an object a call (or a rebuild) made, a persistent reference. Whether a value is,
or holds, an object rebuilt as data (:func:`tainted`) decides where it may go.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Value:
    """Something on the simulated stack."""

    __slots__ = ()


@dataclass(eq=False, slots=True)
class Const(Value):
    value: object


@dataclass(eq=False, slots=True)
class Global(Value):
    module: str
    name: str
    offset: int
    #: a class outside the allowlist whose uses are judged at STOP
    deferred: bool = False
    #: times popped from the stack (any use), and times rebuilt as data
    uses: int = 0
    rebuilds: int = 0

    @property
    def qualified(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False, slots=True)
class Container(Value):
    kind: str  # tuple list dict set frozenset
    items: list[Value] = field(default_factory=list)
    uses: int = 0
    #: holds (at any depth) an object rebuilt as data, whose class's code a hash or a
    #: call taking it could run
    tainted: bool = False
    #: the containers holding this one, so that an object appended later taints them too
    parents: list[Container] | None = None


@dataclass(eq=False, slots=True)
class Made(Value):
    """The result of calling ``callee`` (an allowed global, or anything when unsafe)."""

    callee: Value
    args: Value
    offset: int
    state: Value | None = None
    #: rebuilt as data from a class outside the allowlist (no call of the class)
    rebuilt: bool = False


@dataclass(eq=False, slots=True)
class Persistent(Value):
    pid: Value
    offset: int


class _Mark:
    __slots__ = ()


MARK = _Mark()
UNKNOWN = Const(None)


def tainted(value: Value | None) -> bool:
    """Is ``value`` an object rebuilt as data, or a container holding one?"""
    if isinstance(value, Made):
        return value.rebuilt
    return isinstance(value, Container) and value.tainted


def _taint(container: Container, items: list[Value]) -> None:
    """``items`` were put into ``container``: it holds them, and what they hold."""
    for item in items:
        if isinstance(item, Container):
            if item.parents is None:
                item.parents = []
            item.parents.append(container)
    if container.tainted or not any(tainted(v) for v in items):
        return
    todo = [container]
    while todo:  # each container is marked once: linear in what the pickle built
        held = todo.pop()
        if not held.tainted:
            held.tainted = True
            todo.extend(held.parents or ())


def _items(value: Value) -> list[Value]:
    return list(value.items) if isinstance(value, Container) else [value]


def _describe(value: Value) -> str:
    if isinstance(value, Global):
        return f"the global {value.qualified}"
    if isinstance(value, Made):
        callee = value.callee.qualified if isinstance(value.callee, Global) else "a computed object"
        return f"an object made by {callee}"
    if isinstance(value, Container):
        return f"a {value.kind}"
    if isinstance(value, Persistent):
        return "a persistent object"
    return "a constant"
