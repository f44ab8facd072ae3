"""Where a folder conversion writes: a staging folder, put in place only when all is done.

A new output folder is built beside its final name and renamed into place; an existing
one gets a hidden staging folder inside it, whose files are renamed over their targets.
Either way a failure (or an unsafe input) discards the staging folder and leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from trainguard._io import check_output, display, reason
from trainguard.artifacts.convert import _new_file_mode
from trainguard.errors import UsageError

STAGING_PREFIX = ".trainguard-convert-"


class Staging:
    """The folder outputs are written into before any is put in place.

    A new output folder is built beside it and renamed into place; an existing one gets a
    hidden staging folder inside it, whose files are renamed over their targets.
    """

    def __init__(self, output: str | os.PathLike[str]) -> None:
        self.output = Path(output)
        self.existing = self.output.is_dir()
        if self.output.exists() and not self.existing:
            raise UsageError(f"{display(self.output)}: exists and is not a folder")
        parent = self.output if self.existing else self.output.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(
                tempfile.mkdtemp(
                    prefix=STAGING_PREFIX if self.existing else f".{self.output.name[:100]}.",
                    dir=parent,
                )
            )
        except OSError as exc:
            raise UsageError(f"{display(self.output)}: cannot write: {reason(exc)}") from exc

    def file(self, rel: PurePosixPath) -> Path:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(self, written: Iterable[PurePosixPath], force: bool) -> None:
        try:
            if not self.existing:
                # mkdtemp made it 0700; a folder made with mkdir would have the umask's mode
                mode = _new_file_mode()
                os.chmod(self.path, mode | (mode & 0o444) >> 2)
                os.rename(self.path, self.output)
                return
            for rel in written:
                target = self.output / rel
                check_output(target, force=force)  # again: it may have appeared meanwhile
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.path / rel, target)
        except OSError as exc:
            raise UsageError(f"{display(self.output)}: cannot write: {reason(exc)}") from exc
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def check_outputs(
    output: str | os.PathLike[str],
    units: list[tuple[str, PurePosixPath]],
    force: bool,
) -> None:
    """Refuse, before any work, two inputs with one output, an output that exists (without
    ``force``) or is not a regular file, and an output that is one of the inputs."""
    seen: dict[PurePosixPath, str] = {}
    sources = {os.path.realpath(src) for src, _ in units}
    out_root = Path(output)
    for src, rel in units:
        if rel in seen:
            raise UsageError(
                f"{display(seen[rel])} and {display(src)} would both be written as {rel}"
            )
        seen[rel] = src
        if out_root.is_dir():
            target = out_root / rel
            check_output(target, force=force)
            if os.path.realpath(target) in sources:
                raise UsageError(f"{display(target)}: the output would overwrite an input")
