"""What the code in a TorchScript archive (``torch.jit.save``) does, shown without running it.

A TorchScript archive carries its program as source under ``code/``: TorchScript, a
typed subset of Python that ``torch.jit.load`` compiles for its own interpreter (and
``torch.load`` hands such archives to ``torch.jit.load``). That code cannot import Python
modules or call Python functions, but it can call every operator registered with torch
(``torch.*``, ``ops.aten.*``, and those of any extension the process loaded), some of
which read or write files (``aten::from_file``, ``aten::save``), and a class's
``__setstate__`` runs while the archive loads. So an archive is code, not data: its
verdict stays UNSAFE (a MEDIUM finding), and each code member is summarised here (the
classes and methods it defines, the operators it calls) so a reader can judge it.
"""

from __future__ import annotations

import ast
import re

from trainguard.artifacts.interface import Analysis, FormatError
from trainguard.artifacts.zipcheck import ZipMember, read_member
from trainguard.errors import Severity

#: A code member larger than this is named, not summarised.
MAX_CODE = 1 << 20
_MAX_NAMES = 24
_CALL = re.compile(r"(?<![\w.])(?:torch|ops)(?:\.\w+)+(?=\s*\()")


def is_code(member: ZipMember) -> bool:
    name = member.name.lower()
    return "/code/" in f"/{name}" and name.endswith(".py")


def summarise(text: str) -> tuple[str, bool]:
    """One line: the classes and methods defined, the operators called; and whether a
    ``__setstate__`` (run by ``torch.jit.load`` while loading) is among them."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        tree = None
    defined: list[str] = []
    calls: set[str] = set(_CALL.findall(text)) if tree is None else set()
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.ClassDef):
            methods = [s.name for s in node.body if isinstance(s, ast.FunctionDef)]
            defined.append(f"{node.name}({', '.join(methods)})")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name and name.split(".")[0] in ("torch", "ops"):
                calls.add(name)
    setstate = "__setstate__" in text
    shown = sorted(calls)
    more = f" +{len(shown) - _MAX_NAMES} more" if len(shown) > _MAX_NAMES else ""
    parts = [
        f"defines {'; '.join(defined)[:400]}" if defined else "defines no class",
        f"calls {', '.join(shown[:_MAX_NAMES])}{more}" if shown else "calls no operator",
    ]
    return ", ".join(parts), setstate


def _dotted(expr: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(expr, ast.Attribute):
        parts.insert(0, expr.attr)
        expr = expr.value
    return ".".join([expr.id, *parts]) if isinstance(expr, ast.Name) else None


def describe_code(buf: memoryview, members: list[ZipMember], analysis: Analysis) -> None:
    """An INFO finding per code member (what it defines and calls); HIGH for a
    ``__setstate__``, which runs at load, before any method is called."""
    for member in members:
        if not is_code(member):
            continue
        if member.size > MAX_CODE:
            analysis.add(
                Severity.INFO,
                "torchscript",
                f"TorchScript code of {member.size} bytes: too large to summarise",
                member=member.name,
            )
            continue
        try:
            with analysis.budget.hold(member.size, "the code member", member=member.name):
                text = bytes(read_member(buf, member, limit=MAX_CODE)).decode("utf-8", "replace")
        except FormatError as exc:
            analysis.add(
                Severity.INFO,
                "torchscript",
                f"TorchScript code unreadable: {exc}",
                member=member.name,
            )
            continue
        summary, setstate = summarise(text)
        analysis.add(
            Severity.INFO, "torchscript", f"TorchScript code: {summary}", member=member.name
        )
        if setstate:
            analysis.add(
                Severity.HIGH,
                "torchscript",
                "TorchScript __setstate__: torch.jit.load runs it while loading the archive",
                member=member.name,
            )
