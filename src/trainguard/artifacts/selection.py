"""Which files of a scanned folder are read: the ``--include`` / ``--exclude`` globs.

A pattern is matched against a file's path relative to the folder named on the command
line, with ``/`` between parts, and against the path of every folder it is in:

- ``*`` matches any run of characters within one part (never a ``/``), ``?`` one
  character, ``[abc]`` one of a set; a leading dot is matched like any other character;
- ``**`` as a whole part matches any number of parts, none included
  (``runs/**/optimizer.pt``, ``**/*.bin``);
- a pattern without ``/`` matches a name at any depth (``*.md``, ``.git``), as in
  ``.gitignore``.

A file is read if it matches an ``--include`` pattern (or none is given) and no
``--exclude`` pattern; a folder that matches an ``--exclude`` pattern is not entered.
Files named on the command line are always read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field


def _part(pattern: str) -> str:
    """One part's pattern as a regular expression that never matches a ``/``."""
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        i += 1
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[" and (end := _set_end(pattern, i)) > 0:
            # a part holds no "/" (the pattern is split on it), so only a negated set
            # could match one: it is kept out
            body = pattern[i:end].replace("\\", "\\\\").replace("^", "\\^")
            out += f"[^/{body[1:]}]" if body.startswith("!") else f"[{body}]"
            i = end + 1
        else:
            out += re.escape(c)
    return out


def _set_end(pattern: str, i: int) -> int:
    """Where the bracket set opened before ``i`` closes, or -1 (then "[" is literal)."""
    j = i + 1 if pattern[i : i + 1] == "!" else i
    j = j + 1 if pattern[j : j + 1] == "]" else j
    return pattern.find("]", j)


def compile_glob(pattern: str) -> re.Pattern[str]:
    """The regular expression for one pattern (see the module's rules)."""
    parts = [p for p in pattern.strip("/").split("/") if p] or [""]
    if len(parts) == 1 and "/" not in pattern.strip("/"):
        parts = ["**", parts[0]]
    regex = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
        else:
            regex += _part(part) + ("" if last else "/")
    return re.compile(f"(?s:{regex})\\Z")


@dataclass(frozen=True)
class Selection:
    """The --include and --exclude patterns of one scan."""

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    _inc: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _exc: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inc", tuple(compile_glob(p) for p in self.include))
        object.__setattr__(self, "_exc", tuple(compile_glob(p) for p in self.exclude))

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def enters(self, relative: str) -> bool:
        """False for a folder (path relative to the scanned folder) that is excluded."""
        return not any(_matches(p, relative) for p in self._exc)

    def reads(self, relative: str) -> bool:
        """True for a file (path relative to the scanned folder) the scan reads."""
        if any(_matches(p, relative) for p in self._exc):
            return False
        return not self._inc or any(_matches(p, relative) for p in self._inc)


def _matches(pattern: re.Pattern[str], relative: str) -> bool:
    """The pattern matches the path or one of the folders it is in."""
    parts = relative.split("/")
    return any(pattern.match("/".join(parts[:n])) for n in range(len(parts), 0, -1))
