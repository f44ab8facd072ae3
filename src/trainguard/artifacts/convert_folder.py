"""Converting a model folder, or a sharded checkpoint and its index, to safetensors.

A folder is walked as ``scan`` walks it (:func:`trainguard.artifacts.scanner.collect`)
and every file is scanned first, as ``scan`` scans it. A PyTorch checkpoint or a plain
pickle that the scan finds SAFE is then read once into private memory, loaded from those
bytes by the safe loader (which analyses them again) and converted; every other file is
left alone (not copied). A ``*.index.json`` holding a ``weight_map`` makes its shards one
unit: shard ``i`` of ``n`` becomes ``<prefix>-0000i-of-0000n.safetensors`` and the index
``<prefix>.safetensors.index.json``, with the same tensor-to-shard mapping (less tied
duplicates) and the index's metadata (``total_size`` recomputed); ``pytorch_model``
becomes ``model`` as Hugging Face names it.

All or nothing: every output is written under a staging folder and checked (read back,
tensor by tensor, against what was loaded) before the first one is put in place. One
unsafe or unverifiable file anywhere refuses the whole folder (:class:`UnsafeFolderError`,
every such file named, nothing written); an error (a shard missing, an index entry
missing, an output that exists) writes nothing either. The only checkpoints left out
without failing are safe ones whose content has no safetensors form (``kept``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from trainguard._io import (
    display,
    open_regular,
    parse_json,
    read_capped,
    reason,
)
from trainguard.artifacts._staging import Staging, check_outputs
from trainguard.artifacts.budget import DEFAULT_MAX_MEMORY, MemoryBudget
from trainguard.artifacts.convert import (
    ALIASES_KEY,
    ConvertResult,
    Encoded,
    _new_file_mode,
    encode_file,
    write_verified,
)
from trainguard.artifacts.interface import UNSAFE_AT, Format, Verdict
from trainguard.errors import (
    CheckpointError,
    Finding,
    InputError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    UsageError,
)

#: Formats (as the analysis names them) that are converted: pickle-bearing checkpoints.
CONVERTED_FORMATS = frozenset({Format.TORCH_ZIP, Format.TORCH_LEGACY, Format.PICKLE})
#: Handlers whose files may be such a checkpoint; files of any other kind are left alone.
_CANDIDATE_HANDLERS = frozenset({"zip", "pickle"})
INDEX_SUFFIX = ".index.json"
INDEX_CAP = 64 << 20


@dataclass
class IndexResult:
    """A sharded checkpoint converted: its new index and one result per shard."""

    source: str
    output: str
    shards: list[ConvertResult] = field(default_factory=list)


@dataclass
class FolderResult:
    """What a folder (or sharded) conversion wrote, and what it left alone and why."""

    source: str
    output: str
    files: list[ConvertResult] = field(default_factory=list)
    indexes: list[IndexResult] = field(default_factory=list)
    #: safe files whose content has no safetensors form, with the reason: not converted
    kept: list[tuple[str, str]] = field(default_factory=list)
    #: files that are not pickle checkpoints (text, safetensors, numpy, ...): left alone
    skipped: list[str] = field(default_factory=list)


class UnsafeFolderError(UnsafeCheckpointError):
    """Files of the folder that the safe loader refuses; nothing was written."""

    def __init__(self, folder: str, refused: dict[str, tuple[Finding, ...]]) -> None:
        self.refused = refused
        super().__init__(folder, [f for found in refused.values() for f in found])
        names = ", ".join(refused)
        self.args = (f"{folder}: refused: {len(refused)} file(s) not safe to load ({names})",)


@dataclass
class _Shard:
    source: str
    name: str
    out: PurePosixPath


@dataclass
class _ShardSet:
    index: str
    out: PurePosixPath
    metadata: dict[str, Any]
    weight_map: dict[str, str]
    shards: list[_Shard]


def convert_folder(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    force: bool = False,
    max_memory: int | None = None,
    baseline: int = 0,
) -> FolderResult:
    """Convert every pickle checkpoint under ``source`` (recursively) into ``output``.

    ``output`` is a folder: a new one (built aside and renamed into place), or an existing
    one (``source`` itself to write next to the originals), where an existing output file
    is replaced only with ``force``. The layout under ``source`` is kept. ``max_memory``
    bounds each file's conversion (see :func:`trainguard.artifacts.convert.convert`).
    """
    from trainguard.artifacts.scanner import collect

    root = os.fspath(source)
    if not os.path.isdir(root):
        raise InputError(f"{display(root)}: is not a folder")
    paths, errors = collect([root])
    if errors:
        raise InputError(errors[0])
    sets: list[_ShardSet] = []
    singles: list[tuple[str, PurePosixPath]] = []
    result = FolderResult(root, os.fspath(output))
    claimed: set[str] = set()
    for path in paths:
        if path.endswith(INDEX_SUFFIX):
            shard_set = _read_index(path, PurePosixPath(_relative(path, root)).parent)
            if shard_set is None:
                result.skipped.append(path)
                continue
            sets.append(shard_set)
            claimed.update(os.path.normpath(s.source) for s in shard_set.shards)
    for path in paths:
        if path.endswith(INDEX_SUFFIX) or os.path.normpath(path) in claimed:
            continue
        rel = PurePosixPath(_relative(path, root))
        singles.append((path, rel.parent / output_name(rel.name)))
    return _run(root, output, singles, sets, result, force, max_memory, baseline)


def convert_sharded(
    index: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    force: bool = False,
    max_memory: int | None = None,
    baseline: int = 0,
) -> FolderResult:
    """Convert the sharded checkpoint that ``index`` describes into the folder ``output``."""
    path = os.fspath(index)
    shard_set = _read_index(path, PurePosixPath("."))
    if shard_set is None:
        raise InputError(f"{display(path)}: its shards are safetensors already")
    result = FolderResult(path, os.fspath(output))
    return _run(path, output, [], [shard_set], result, force, max_memory, baseline)


def output_name(name: str) -> str:
    """The safetensors name for a checkpoint file: ``pytorch_model.bin`` becomes
    ``model.safetensors`` (as Hugging Face names it), ``x.pt`` becomes ``x.safetensors``."""
    stem = name.rsplit(".", 1)[0] if "." in name[1:] else name
    return "model.safetensors" if stem == "pytorch_model" else f"{stem}.safetensors"


def _prefix(index_name: str) -> str:
    stem = index_name[: -len(INDEX_SUFFIX)]
    for ext in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        stem = stem.removesuffix(ext)
    return "model" if stem in ("pytorch_model", "") else stem


def _relative(path: str, root: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _sniff(path: str) -> str | None:
    """The name of the format handler that recognises the file's first bytes, if any."""
    from trainguard.artifacts.formats import HEAD_SIZE, identify

    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = os.read(fd, HEAD_SIZE)
    except OSError as exc:
        raise InputError(f"{display(path)}: cannot read: {reason(exc)}") from exc
    finally:
        os.close(fd)
    handler = identify(head, size)
    return handler.name if handler is not None else None


def _read_index(path: str, where: PurePosixPath) -> _ShardSet | None:
    """The shard set an index describes; None if its shards are all safetensors already."""
    shown = display(path)
    doc = parse_json(read_capped(path, INDEX_CAP, "checkpoint index"), shown)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(f"{shown}: not a checkpoint index (no weight_map of names to shards)")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{shown}: not a checkpoint index (its metadata is not an object)")
    folder = os.path.dirname(path)
    names = sorted(set(weight_map.values()))
    kinds: dict[str, str | None] = {}
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise InputError(f"{shown}: shard {name!r} is not a file name in the index's folder")
        shard = os.path.join(folder, name)
        if not os.path.lexists(shard):
            raise InputError(f"{shown}: shard {display(name)} is listed but missing")
        kinds[name] = _sniff(shard)
    if names and all(kind == "safetensors" for kind in kinds.values()):
        return None
    for name, kind in kinds.items():
        if kind not in _CANDIDATE_HANDLERS:
            raise InputError(
                f"{shown}: shard {display(name)} is not a pickle checkpoint ({kind or 'unknown'})"
            )
    prefix = _prefix(os.path.basename(path))
    n = len(names)
    shards = [
        _Shard(os.path.join(folder, name), name, where / f"{prefix}-{i:05d}-of-{n:05d}.safetensors")
        for i, name in enumerate(names, 1)
    ]
    return _ShardSet(
        path, where / f"{prefix}.safetensors{INDEX_SUFFIX}", metadata, weight_map, shards
    )


def _run(
    root: str,
    output: str | os.PathLike[str],
    singles: list[tuple[str, PurePosixPath]],
    sets: list[_ShardSet],
    result: FolderResult,
    force: bool,
    max_memory: int | None,
    baseline: int,
) -> FolderResult:
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{display(out)}: exists and is not a folder (a folder is written)")
    if not out.exists() and out.name.endswith(".safetensors"):
        raise UsageError(
            f"{display(out)}: {display(root)} converts into a folder of files; name a folder"
        )
    limit = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    converter = _Converter(limit, baseline)
    # first every file is scanned: all refusals are known before any work is done
    chosen: list[tuple[str, PurePosixPath]] = []
    for path, rel in singles:
        decided = converter.classify(path)
        if isinstance(decided, _LeftAlone):
            result.skipped.append(path)
        elif decided:
            chosen.append((path, rel))
    for shard_set in sets:
        for shard in shard_set.shards:
            decided = converter.classify(shard.source)
            if isinstance(decided, _LeftAlone):
                raise InputError(
                    f"{display(shard_set.index)}: shard {display(shard.name)}: {decided.reason}"
                )
    if converter.refused:
        raise UnsafeFolderError(display(root), converter.refused)
    units = [*chosen]
    for shard_set in sets:
        units.append((shard_set.index, shard_set.out))
        units.extend((s.source, s.out) for s in shard_set.shards)
    check_outputs(out, units, force)
    if not units:
        return result
    staging = Staging(out)
    try:
        for path, rel in chosen:
            done = converter.file(path, staging, rel)
            if isinstance(done, ConvertResult):
                result.files.append(done)
            elif isinstance(done, _LeftAlone) and done.not_model:
                result.skipped.append(path)
            elif isinstance(done, _LeftAlone):
                result.kept.append((path, done.reason))
        for shard_set in sets:
            indexed = converter.shard_set(shard_set, staging)
            if indexed is not None:
                result.indexes.append(indexed)
        if converter.refused:  # a file changed since it was scanned, and is unsafe now
            raise UnsafeFolderError(display(root), converter.refused)
        written = [PurePosixPath(r.output) for r in result.files]
        for indexed in result.indexes:
            written.append(PurePosixPath(indexed.output))
            written.extend(PurePosixPath(s.output) for s in indexed.shards)
        staging.commit(written, force)
    except BaseException:
        staging.discard()
        raise
    for item in [*result.files, *(s for i in result.indexes for s in i.shards)]:
        item.output = str(out / item.output)
    for indexed in result.indexes:
        indexed.output = str(out / indexed.output)
    return result


@dataclass(frozen=True)
class _LeftAlone:
    """Why a file is not converted: not a pickle checkpoint (``not_model``: what ``scan``
    skips, or another format), or a safe one whose content has no safetensors form."""

    reason: str
    not_model: bool


class _Converter:
    """Scans, then loads each checkpoint safely and writes it into the staging folder."""

    def __init__(self, limit: int, baseline: int) -> None:
        self.limit = limit
        self.baseline = baseline
        self.refused: dict[str, tuple[Finding, ...]] = {}

    def classify(self, path: str) -> _LeftAlone | bool:
        """Scan the file as ``scan`` does (by content; a large file is mapped, not read):
        True to convert it, why it is left alone, or False when it is refused (recorded in
        ``refused``)."""
        from trainguard.artifacts.scanner import scan_file

        report = scan_file(path, budget=MemoryBudget(self.limit, baseline=self.baseline))
        verdict = report.verdict
        if verdict is Verdict.SKIPPED:
            return _LeftAlone("not a model file", not_model=True)
        if verdict in (Verdict.UNSAFE, Verdict.UNVERIFIABLE):
            worst = [f for f in report.findings if f.severity >= UNSAFE_AT]
            self.refused[path] = tuple(worst or report.findings)
            return False
        if verdict is Verdict.UNSUPPORTED or report.format not in CONVERTED_FORMATS:
            return _LeftAlone(f"a {report.format} file, not a pickle checkpoint", not_model=True)
        return True

    def load(self, path: str) -> tuple[Any, MemoryBudget] | _LeftAlone | None:
        """(tree, budget) for a checkpoint, read once and loaded from those bytes (which
        ``load_bytes`` analyses again: the file may have changed since it was scanned);
        None when it is refused now (recorded in ``refused``)."""
        from trainguard.artifacts.loader import load_bytes, read_private

        shown = display(path)
        budget = MemoryBudget(self.limit, baseline=self.baseline)
        data = read_private(path, budget)
        try:
            return load_bytes(data, shown, map_location="cpu", budget=budget), budget
        except UnsafeCheckpointError as exc:
            self.refused[path] = exc.findings
            return None
        except UnsupportedFormatError as exc:
            return _LeftAlone(str(exc).removeprefix(f"{shown}: "), not_model=True)

    def file(
        self, path: str, staging: Staging, rel: PurePosixPath
    ) -> ConvertResult | _LeftAlone | None:
        """Convert one file into the staging folder: its result, why it was left alone, or
        None when it was refused."""
        loaded = self.load(path)
        if loaded is None or isinstance(loaded, _LeftAlone):
            return loaded
        obj, budget = loaded
        try:
            encoded = encode_file(obj, display(path), budget)
        except CheckpointError as exc:
            why = str(exc).removeprefix(display(path) + ": ")
            return _LeftAlone(f"no safetensors form: {why}", not_model=False)
        return self.write(path, encoded, staging, rel, budget)

    def write(
        self,
        path: str,
        encoded: Encoded,
        staging: Staging,
        rel: PurePosixPath,
        budget: MemoryBudget,
    ) -> ConvertResult:
        target = staging.file(rel)
        write_verified(encoded, target, display(path), budget)
        return ConvertResult(
            str(rel),
            len(encoded.tensors),
            encoded.aliases,
            encoded.copied_views,
            target.stat().st_size,
            source=path,
        )

    def shard_set(self, shard_set: _ShardSet, staging: Staging) -> IndexResult | None:
        shown = display(shard_set.index)
        expected: dict[str, set[str]] = {}
        for tensor, shard_name in shard_set.weight_map.items():
            expected.setdefault(shard_name, set()).add(tensor)
        indexed = IndexResult(shard_set.index, str(shard_set.out))
        weight_map: dict[str, str] = {}
        aliases: dict[str, str] = {}
        total = 0
        for shard in shard_set.shards:
            loaded = self.load(shard.source)
            if loaded is None:
                continue
            if isinstance(loaded, _LeftAlone):
                raise InputError(f"{shown}: shard {display(shard.name)}: {loaded.reason}")
            obj, budget = loaded
            _check_shard(obj, expected[shard.name], shown, shard.name)
            encoded = encode_file(obj, display(shard.source), budget)
            indexed.shards.append(self.write(shard.source, encoded, staging, shard.out, budget))
            weight_map.update(dict.fromkeys(encoded.tensors, shard.out.name))
            aliases.update(encoded.aliases)
            total += encoded.nbytes
            del obj, encoded, loaded
        if self.refused:
            return None
        metadata = {**shard_set.metadata, "total_size": total}
        if aliases:
            metadata[ALIASES_KEY] = aliases
        document = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        target = staging.file(shard_set.out)
        target.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        with contextlib.suppress(OSError):
            os.chmod(target, _new_file_mode())
        return indexed


def _check_shard(obj: Any, listed: set[str], index: str, shard: str) -> None:
    """A shard is a flat state dict holding exactly the tensors the index puts in it."""
    import torch

    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise InputError(f"{index}: shard {display(shard)} is not a state dict of named tensors")
    missing = sorted(listed - obj.keys())
    if missing:
        raise InputError(
            f"{index}: lists {missing[0]!r} in shard {display(shard)}, which does not hold it"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unlisted = sorted(obj.keys() - listed)
    if unlisted:
        raise InputError(
            f"{index}: has no entry for {unlisted[0]!r}, held in shard {display(shard)}"
            + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else "")
        )
