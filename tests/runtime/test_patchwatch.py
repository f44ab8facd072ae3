"""The patch watch's quick comparison (``runtime/patchwatch.py``): it decides only that
nothing changed; every kind of change still reaches the exact scan, which reports it.

Each test watches a real module written to ``tmp_path`` and imported, shows that checks
take the quick path (``scans``, the exact scans at checks, stays 0), then changes one
thing and checks again.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainguard.runtime.patchwatch import PatchWatch

_TARGET = """
import functools

def plain(x):
    return x

def other(x):
    return -x

def with_defaults(a=1, *, b=2):
    return a + b

def _wrap(func):
    @functools.wraps(func)
    def wrapper(*args):
        return func(*args)
    return wrapper

@_wrap
def decorated(x):
    return x

def _holding(value):
    def inner():
        return value
    return inner

first = _holding(plain)
second = _holding(plain)

def _unset():
    def inner():
        return never  # noqa: F821
    return inner
    never = None

third = _unset()

class Base:
    def inherited(self):
        return 1

class Target(Base):
    def method(self):
        return 2

    @classmethod
    def build(cls):
        return cls()

    @staticmethod
    def helper():
        return 3
"""

_names = itertools.count()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[types.ModuleType]:
    """A real module, imported from a file and registered under a name of its own."""
    name = f"patchwatch_target_{next(_names)}"
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(_TARGET))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        del sys.modules[name]


def watched(module: types.ModuleType) -> PatchWatch:
    """A watch over ``module`` and its ``Target`` class, past two checks that took the
    quick path."""
    watch = PatchWatch((module.Target,), modules=(module.__name__,), classes=(), reexports={})
    assert list(watch.changes()) == []
    assert list(watch.changes()) == []
    assert watch.scans == 0
    return watch


def messages(watch: PatchWatch) -> list[str]:
    return [message for message, _ in watch.changes()]


def test_nothing_changed_takes_the_quick_path(target):
    watch = watched(target)
    for _ in range(3):
        assert messages(watch) == []
    assert watch.scans == 0


def test_a_change_before_the_first_check(target):
    watch = PatchWatch((target.Target,), modules=(target.__name__,), classes=(), reexports={})
    target.with_defaults.__defaults__ = (5,)
    assert messages(watch) == [
        f"{target.__name__}.with_defaults had its defaults or closure replaced"
    ]


def test_a_replaced_function(target):
    watch = watched(target)
    target.plain = target.other
    assert messages(watch) == [f"{target.__name__}.plain was replaced"]
    assert messages(watch) == []  # once


def test_a_swapped_code_object(target):
    watch = watched(target)
    target.plain.__code__ = target.other.__code__
    assert messages(watch) == [f"{target.__name__}.plain had its code replaced"]


def test_replaced_defaults(target):
    watch = watched(target)
    target.with_defaults.__defaults__ = (5,)
    assert messages(watch) == [
        f"{target.__name__}.with_defaults had its defaults or closure replaced"
    ]


def test_replaced_keyword_defaults(target):
    watch = watched(target)
    target.with_defaults.__kwdefaults__ = {"b": 5}
    assert messages(watch) == [
        f"{target.__name__}.with_defaults had its defaults or closure replaced"
    ]


def test_defaults_that_claim_to_equal_the_old_ones(target):
    """A tuple whose ``__eq__`` says it equals anything: a comparison with ``==`` would
    take it for the defaults it replaced."""
    watch = watched(target)

    class Agreeable(tuple):
        __hash__ = tuple.__hash__

        def __eq__(self, other: object) -> bool:
            return True

    target.with_defaults.__defaults__ = Agreeable((5,))
    assert messages(watch) == [
        f"{target.__name__}.with_defaults had its defaults or closure replaced"
    ]


def test_a_decorators_cell_pointed_elsewhere(target):
    watch = watched(target)
    target.decorated.__closure__[0].cell_contents = target.other
    assert messages(watch) == [f"{target.__name__}.decorated had its defaults or closure replaced"]


def test_a_cell_emptied_and_another_filled_with_the_same_object(target):
    """``first``'s cell emptied and ``third``'s (empty) cell given what it held: the cells'
    contents, laid end to end, read the same as before; each function's do not."""
    watch = watched(target)
    held = target.first.__closure__[0].cell_contents
    del target.first.__closure__[0].cell_contents
    target.third.__closure__[0].cell_contents = held
    found = sorted(messages(watch))
    assert found == [
        f"{target.__name__}.first had its defaults or closure replaced",
        f"{target.__name__}.third had its defaults or closure replaced",
    ]


def test_a_method_replaced_on_the_class(target):
    watch = watched(target)
    target.Target.method = lambda self: 0
    assert messages(watch) == ["Target.method was replaced"]


def test_a_method_added_over_an_inherited_one(target):
    watch = watched(target)
    target.Target.inherited = lambda self: 0
    assert messages(watch) == ["Target.inherited was added, overriding what it inherited"]


def test_a_classmethods_function_code_swapped(target):
    watch = watched(target)
    vars(target.Target)["build"].__func__.__code__ = target.other.__code__
    assert messages(watch) == ["Target.build had its code replaced"]


def test_a_deleted_name(target):
    watch = watched(target)
    del target.plain
    assert messages(watch) == [f"{target.__name__}.plain was replaced"]
    assert messages(watch) == []


def test_a_module_class_that_answers_getattr_with_something_else(target):
    """The module's class swapped for one whose ``__getattribute__`` hands out another
    function: its ``__dict__`` still holds the original."""
    watch = watched(target)
    other = target.other

    class Lying(types.ModuleType):
        def __getattribute__(self, name: str) -> object:
            if name == "plain":
                return other
            return super().__getattribute__(name)

    target.__class__ = Lying
    try:
        assert messages(watch) == [f"{target.__name__}.plain was replaced"]
    finally:
        target.__class__ = types.ModuleType


def test_a_harmless_annotations_read_is_no_change(target):
    """Reading ``__annotations__`` creates the function's annotations dict: the quick
    comparison sees a difference, the exact scan finds none, and the quick path
    resumes from the new state."""
    watch = watched(target)
    assert target.plain.__annotations__ == {}
    assert messages(watch) == []
    assert watch.scans == 1
    assert messages(watch) == []
    assert watch.scans == 1


def test_the_quick_path_reads_no_function_attribute(target):
    """Each ``__code__``/``__defaults__`` read is an audited event that runs every audit
    hook in the process: the quick path makes none."""
    watch = watched(target)
    seen: list[str] = []
    counting = [True]

    def hook(event: str, args: tuple[object, ...]) -> None:
        if counting[0] and event == "object.__getattr__":
            seen.append(str(args[1]))

    sys.addaudithook(hook)  # cannot be removed: switched off below
    try:
        assert messages(watch) == []
    finally:
        counting[0] = False
    assert seen == []
    assert watch.scans == 0
