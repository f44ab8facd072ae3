"""What a class's source says about rebuilding it as data, read without importing it.

``pickle.load`` rebuilds a plain object as ``cls.__new__(cls)``, looks ``__setstate__``
up on it (through ``__getattribute__``, then ``__getattr__``), and either calls it or
updates ``__dict__``; the object's ``__del__`` runs when it is collected. A class whose
source defines none of those (nor inherits them from a base it names), has no metaclass
and no decorator that could replace it, runs none of its own code when rebuilt. This
module checks that on the class statement in the installed source file, with ``ast``,
following its bases through the module's imports; anything it cannot see (a compiled
module, a class made by a function, a base it cannot find) is a reason to refuse.
"""

from __future__ import annotations

import ast
import functools
import os
from collections.abc import Iterator

from trainguard.artifacts.installed import vouched_source

#: What rebuilding and collecting an object may call on its class.
DANGEROUS = frozenset(
    {"__new__", "__setstate__", "__getattr__", "__getattribute__", "__dict__", "__del__"}
)
#: Bases whose own code takes no part in rebuilding an instance.
SAFE_BASES = frozenset({"builtins.object", "abc.ABC", "typing.Generic", "typing.Protocol"})
#: Decorators that return the class they are given, with dataclass methods added at most.
SAFE_DECORATORS = frozenset(
    {
        "dataclasses.dataclass",
        "functools.total_ordering",
        "typing.final",
        # transformers' docstring helpers set __doc__ and return the class
        "transformers.utils.add_start_docstrings",
        "transformers.utils.doc.add_start_docstrings",
    }
)
#: Classes whose source defines a special method the check refuses, read and found inert
#: (tests/artifacts/test_inert.py checks the claim against the installed class).
TOLERATED: dict[str, frozenset[str]] = {
    # its __getattr__ only raises AttributeError, with a friendlier message
    "accelerate.state.PartialState": frozenset({"__getattr__"}),
}
_MAX_DEPTH = 8


@functools.lru_cache(maxsize=256)
def _parse(path: str, size: int, mtime: int) -> ast.Module | None:
    try:
        with open(path, "rb") as f:
            return ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import, through if/try/with blocks (not into functions)."""
    out: list[ast.stmt] = []
    for stmt in body:
        out.append(stmt)
        if isinstance(stmt, ast.If):
            out += _top_level(stmt.body) + _top_level(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            out += _top_level(stmt.body) + _top_level(stmt.orelse) + _top_level(stmt.finalbody)
            for handler in stmt.handlers:
                out += _top_level(handler.body)
        elif isinstance(stmt, ast.With):
            out += _top_level(stmt.body)
    return out


def _absolute(module: str, is_package: bool, target: str | None, level: int) -> str:
    if not level:
        return target or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, target] if target else base)


class _Module:
    """The names a module's import-time statements bind, as far as ``ast`` shows them."""

    def __init__(self, name: str, path: str, tree: ast.Module) -> None:
        self.name = name
        self.bindings: dict[str, list[ast.stmt | tuple[str, str]]] = {}
        #: ``from x import *``: a name not bound here may come from anywhere
        self.star = False
        package = os.path.basename(path) == "__init__.py"
        for stmt in _top_level(tree.body):
            if isinstance(stmt, ast.ImportFrom):
                source = _absolute(name, package, stmt.module, stmt.level)
                self.star |= any(alias.name == "*" for alias in stmt.names)
                for alias in stmt.names:
                    local = alias.asname or alias.name
                    self.bindings.setdefault(local, []).append((source, alias.name))
            elif isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    local = alias.asname or alias.name.split(".")[0]
                    target = alias.name if alias.asname else local
                    self.bindings.setdefault(local, []).append((target, ""))
            elif isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                self.bindings.setdefault(stmt.name, []).append(stmt)
                for node in ast.walk(stmt):  # ``global X`` in code the import may run
                    if isinstance(node, ast.Global):
                        for target in node.names:
                            self.bindings.setdefault(target, []).append(stmt)
            else:
                # a class, def or import in a loop, ``match`` or ``except*`` (not
                # flattened above) binds its name at import too
                nested = not isinstance(stmt, (ast.If, ast.Try, ast.With))
                for node in ast.walk(stmt):
                    if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                        self.bindings.setdefault(node.id, []).append(stmt)
                    elif nested:
                        for bound in _bound(node):
                            self.bindings.setdefault(bound, []).append(stmt)

    def dotted(self, expr: ast.expr) -> str | None:
        """``a.b.C`` in this module as an absolute ``module.Name``, through its imports."""
        parts: list[str] = []
        while isinstance(expr, ast.Attribute):
            parts.insert(0, expr.attr)
            expr = expr.value
        if not isinstance(expr, ast.Name):
            return None
        bound = self.bindings.get(expr.id)
        if bound is None:
            return None if self.star else ".".join(["builtins", expr.id, *parts])
        if len(bound) == 1 and isinstance(bound[0], tuple):
            source, attr = bound[0]
            return ".".join([source, *([attr] if attr else []), *parts])
        return ".".join([self.name, expr.id, *parts])


def _load(module: str) -> tuple[_Module | None, str | None]:
    why, path = vouched_source(module)
    if why is not None:
        return None, why
    if path is None or not path.endswith(".py"):
        return None, f"module {module} has no Python source to read (compiled or a namespace)"
    info = os.stat(path)
    tree = _parse(path, info.st_size, info.st_mtime_ns)
    if tree is None:
        return None, f"{path} does not parse"
    return _Module(module, path, tree), None


def class_risk(qualified: str, depth: int = 0) -> str | None:
    """None if rebuilding ``qualified`` as data runs none of its class's code; else why."""
    if qualified in SAFE_BASES:
        return None
    if depth > _MAX_DEPTH:
        return f"{qualified}: bases nested too deeply to check"
    module, _, name = qualified.rpartition(".")
    if module == "builtins" or module.split(".")[0] in ("abc", "typing", "dataclasses"):
        return f"{qualified}: a base whose rebuilding is not known"
    mod, why = _load(module)
    if mod is None:
        return why
    bound = mod.bindings.get(name)
    if not bound:
        return f"{qualified}: no class statement binds it"
    for binding in bound:
        if isinstance(binding, tuple):  # re-exported: check the class where it is defined
            source, attr = binding
            why = class_risk(f"{source}.{attr}" if attr else source, depth + 1)
        elif isinstance(binding, ast.ClassDef):
            why = _check_class(mod, binding, qualified, depth)
        else:
            why = f"{qualified}: bound by a statement other than a class (line {binding.lineno})"
        if why is not None:
            return why
    return None


def _check_class(mod: _Module, cls: ast.ClassDef, qualified: str, depth: int) -> str | None:
    where = f"{qualified} (line {cls.lineno})"
    if any(k.arg == "metaclass" for k in cls.keywords):
        return f"{where}: has a metaclass"
    for decorator in cls.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if (mod.dotted(target) or "?") not in SAFE_DECORATORS:
            return f"{where}: decorated by {ast.unparse(target)[:60]} (it could replace the class)"
    tolerated = TOLERATED.get(qualified, frozenset())
    for node in _class_scope(cls.body):
        if (
            isinstance(node, ast.Name)
            and isinstance(node.ctx, ast.Load)
            and node.id in _NAMESPACE_ACCESS
        ):
            return f"{where}: its body uses {node.id} (it can bind any name in the class)"
        if isinstance(node, ast.Attribute) and node.attr in _NAMESPACE_ACCESS:
            return f"{where}: its body uses .{node.attr} (it can bind any name in the class)"
        for found in set(_bound(node)) & (DANGEROUS - tolerated):
            return f"{where}: defines {found}, which runs when it is rebuilt or collected"
    for base in cls.bases:
        expr = base.value if isinstance(base, ast.Subscript) else base
        name = mod.dotted(expr)
        if name is None:
            return f"{where}: a base that cannot be resolved ({ast.unparse(base)[:60]})"
        why = class_risk(name, depth + 1)
        if why is not None:
            return why
    return None


#: Names through which a class body reaches its own namespace without naming what it binds
#: (``locals()['__setstate__'] = f``, ``exec``, a frame's ``f_locals``).
_NAMESPACE_ACCESS = frozenset(
    {"locals", "vars", "exec", "eval", "getattr", "__builtins__"}
    | {"_getframe", "currentframe", "f_locals", "__dict__"}
)


def _class_scope(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """Every node the class body runs in the class's own namespace, at any depth (in if,
    for, try, with blocks and expressions), but not the bodies of its functions, lambdas
    or nested classes (whose names, decorators, defaults and bases it does run)."""
    todo: list[ast.AST] = list(body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            todo += [*args.defaults, *(d for d in args.kw_defaults if d is not None)]
            if not isinstance(node, ast.Lambda):  # annotations run unless postponed
                every = [*args.posonlyargs, *args.args, *args.kwonlyargs]
                every += [a for a in (args.vararg, args.kwarg) if a is not None]
                todo += [a.annotation for a in every if a.annotation is not None]
                todo += [*node.decorator_list, *([node.returns] if node.returns else [])]
        elif isinstance(node, ast.ClassDef):
            todo += [*node.decorator_list, *node.bases, *node.keywords]
        else:
            todo += ast.iter_child_nodes(node)


def _bound(node: ast.AST) -> list[str]:
    """The names ``node`` binds in the scope it runs in."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
        return [node.id]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [alias.asname or alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ExceptHandler) and node.name:
        return [node.name]
    if isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
        return [node.name]
    if isinstance(node, ast.MatchMapping) and node.rest:
        return [node.rest]
    return []
