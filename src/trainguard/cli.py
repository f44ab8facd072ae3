"""The command line: a thin skin over the library. Only this module prints or exits.

Exit statuses mean the same for every command: 0 clean, 1 findings (unsafe, drift,
tampered, incidents), 2 usage or operational error. JSON goes to stdout as one
document; human text and progress go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from trainguard import __version__
from trainguard._io import display, reason
from trainguard.errors import Error, Severity, UnsafeCheckpointError

EXIT_CLEAN = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2

F = TypeVar("F", bound=Callable[..., Any])


def _format_option(*choices: str) -> Callable[[F], F]:
    names = choices or ("text", "json")
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(names),
        default="text",
        show_default=True,
        help="Output format: text on stderr, or one document on stdout.",
    )


def _say(line: str = "") -> None:
    """Human text goes to stderr, so stdout stays clean for JSON."""
    click.echo(line, err=True)


def _emit_json(document: object) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trainguard")
@click.option(
    "--debug",
    is_flag=True,
    help="Show the traceback of an internal error (also TRAINGUARD_DEBUG=1); any position.",
)
def cli(debug: bool) -> None:
    """trainguard: protect training jobs from sabotage.

    Each command returns its exit status; see ``main``.
    """


# --- model files: scan, convert --------------------------------------------------------


_VERDICT_STYLE = {
    "SAFE": "green",
    "UNSAFE": "red",
    "UNVERIFIABLE": "yellow",
    "UNSUPPORTED": "yellow",
    "SKIPPED": "bright_black",
}


class _LazyProgress:
    """A rich bar on stderr that appears only on a TTY and once the work passes ``delay`` s."""

    def __init__(self, label: str, delay: float = 1.0, *, counts_bytes: bool = True) -> None:
        import time

        self._clock = time.monotonic
        self._start = self._clock()
        self._label = label
        self._bar: Any = None
        self._task: Any = None
        self._delay = delay
        self._counts_bytes = counts_bytes
        self._on = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self._on:
            return
        if self._bar is None:
            if self._clock() - self._start < self._delay:
                return
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                Progress,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                "{task.description}",
                BarColumn(),
                DownloadColumn() if self._counts_bytes else MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._label, total=total)
        self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


_UNPRINTABLE = {
    c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    for c in [*range(0x20), *range(0x7F, 0xA0), 0x200E, 0x200F, *range(0x202A, 0x202F)]
    + list(range(0x2066, 0x206A))
}


def _shown(text: str) -> str:
    """A name or message as one inert line: control characters, terminal escapes and
    bidirectional overrides in a file name are shown, not obeyed (a name holding
    "\\n" or ESC could otherwise print a fake verdict line)."""
    return (
        text.translate(_UNPRINTABLE)
        .encode("utf-8", "surrogateescape")
        .decode("utf-8", "backslashreplace")
    )


def _emit_json_streamed(document: object) -> None:
    """``_emit_json``'s text, written as it is encoded: ``json.dumps`` with an indent
    builds the whole text and its pieces first (335 MB for a 100,000-file folder)."""
    pending: list[str] = []
    for chunk in json.JSONEncoder(indent=2).iterencode(document):
        pending.append(chunk)
        if len(pending) >= 8192:  # one write per batch: a write per token is slow
            sys.stdout.write("".join(pending))
            pending.clear()
    sys.stdout.write("".join(pending) + "\n")
    sys.stdout.flush()


def _emit_scan_json(report: Any) -> None:
    """The scan's JSON document (the same text as ``_emit_json(report.to_dict())``), one
    file at a time, so its size in memory does not grow with the number of files."""
    head = {"verdict": report.verdict.value, "counts": report.counts(), "excluded": report.excluded}
    text = json.dumps(head, indent=2)
    write = sys.stdout.write
    write(text[: text.rindex("}")].rstrip() + ',\n  "files": [')
    for i, file in enumerate(report.files):
        body = json.dumps(file.to_dict(), indent=2).replace("\n", "\n    ")
        write(("," if i else "") + "\n    " + body)
    write("\n  ]," if report.files else "],")
    errors = json.dumps({"errors": list(report.errors)}, indent=2)
    write("\n" + errors[errors.index("{") + 1 :].lstrip("\n") + "\n")
    sys.stdout.flush()


def _valid_text(value: Any) -> Any:
    """``value`` with every string (keys too) valid Unicode: names from argv and from a
    checkpoint's keys may hold lone surrogates, which strict JSON parsers reject."""
    from trainguard.artifacts.interface import json_text

    if isinstance(value, str):
        return json_text(value)
    if isinstance(value, dict):
        return {_valid_text(k): _valid_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_valid_text(v) for v in value]
    return value


def _scan_text(
    report: Any, verbose: bool, named: Sequence[str] = (), echo: Callable[[str], None] = _say
) -> None:
    """One line per file (skipped files only with -v, or when named), then the summary."""
    for file in report.files:
        skipped = file.verdict.value == "SKIPPED"
        if skipped and not verbose and file.path not in named:
            continue
        verdict = click.style(f"{file.verdict.value:<12}", fg=_VERDICT_STYLE[file.verdict.value])
        reasons = [
            f"{f.message} [{f.location}]" if f.location else f.message
            for f in file.findings
            if f.severity >= (Severity.INFO if verbose else Severity.LOW)
            or file.verdict.value in ("UNSUPPORTED", "SKIPPED")
        ]
        shown = reasons if verbose else reasons[:3]
        more = f"; +{len(reasons) - 3} more" if not verbose and len(reasons) > 3 else ""
        detail = f": {'; '.join(shown)}{more}" if shown else ""
        echo(f"{verdict} {_shown(file.path)} ({file.format}){_shown(detail)}")
    for error in report.errors:
        echo(f"{click.style('ERROR', fg='red'):<12} {_shown(error)}")
    echo(_scan_summary(report, verbose))


def _scan_summary(report: Any, verbose: bool) -> str:
    """``scanned 12 file(s): 3 analysed (2 safe, 1 unsafe), 9 skipped (not model files)``"""
    counts = dict(report.counts())
    skipped = counts.pop("SKIPPED", 0)
    verdicts = ", ".join(f"{n} {v.lower()}" for v, n in counts.items() if n)
    parts = [f"{sum(counts.values())} analysed" + (f" ({verdicts})" if verdicts else "")]
    if skipped:
        parts.append(f"{skipped} skipped (not model files{'' if verbose else '; -v lists them'})")
    if report.excluded:
        parts.append(f"{report.excluded} excluded by --include/--exclude")
    summary = ", ".join(parts) if report.files or report.excluded else "nothing to scan"
    return f"scanned {len(report.files)} file(s): {summary}"


def _emit_scan(
    report: Any, fmt: str, verbose: bool, named: Sequence[str], echo: Callable[[str], None]
) -> None:
    if fmt == "json":
        _emit_scan_json(report)
    elif fmt == "sarif":
        from trainguard.artifacts.sarif import to_sarif

        _emit_json_streamed(to_sarif(report, lazy=True))
    else:
        _scan_text(report, verbose, named, echo)


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """A memory size: bytes, or a number with K, M, G or T (powers of 1024)."""
    from trainguard.artifacts.budget import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


def _max_memory_option(f: F) -> F:
    return click.option(
        "--max-memory",
        metavar="SIZE",
        default="1G",
        callback=_size,
        show_default=True,
        help="The most memory the command may use, this process included (e.g. 512M, 2G). "
        "Whatever a file's headers declare is checked against it before allocating; a file "
        "that would need more is unverifiable.",
    )(f)


def _class_names(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Any:
    from trainguard.artifacts.allowlist import allowing

    try:
        return allowing(value)  # checked now; entered around the work
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


def _allow_classes_option(f: F) -> F:
    return click.option(
        "--allow",
        "allow_classes",
        multiple=True,
        metavar="MODULE.NAME",
        callback=_class_names,
        help="Trust this class (repeatable): a pickle may build and call it like the built-in "
        "allowlist's; MODULE.* trusts every name under MODULE. See docs/scan-policy.md.",
    )(f)


def _rss() -> int:
    from trainguard.artifacts.budget import current_rss

    return current_rss()


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@_format_option("text", "json", "sarif")
@click.option("-v", "--verbose", is_flag=True, help="List every finding, and the files skipped.")
@click.option(
    "--include",
    multiple=True,
    metavar="GLOB",
    help="Read only the files in folders that match (repeatable; relative to the folder "
    "named; ** spans folders, a GLOB without / matches a name at any depth).",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="GLOB",
    help="Leave out the files and folders that match (repeatable; as --include).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Write the report (in --format) to FILE instead of stdout/stderr; replaced if it "
    "is a regular file. The summary line still goes to stderr.",
)
@_max_memory_option
@_allow_classes_option
def scan(
    paths: tuple[str, ...],
    fmt: str,
    verbose: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    output: str | None,
    max_memory: int,
    allow_classes: Any,
) -> int:
    """Statically check model files and folders (recursively); PATH may be - for stdin.

    Files that are not model files (text, JSON, YAML, code, tokenizers: decided by their
    bytes, never their names) are SKIPPED: counted, listed with -v, and they do not
    change the exit status. A file named here that is skipped gets a line saying why.
    Exit status: 0 all safe (or skipped), 1 something unsafe, unverifiable or
    unsupported, 2 a path could not be read. Unreadable files and folders, FIFOs and
    devices are listed as errors, never skipped.
    """
    from trainguard.artifacts.scanner import scan_paths

    target = None
    if output is not None:
        from trainguard._io import check_output

        target = check_output(output, force=True, what="report")
    bar = _LazyProgress("scanning", delay=0.5, counts_bytes=False)
    trusted = contextlib.ExitStack()
    trusted.enter_context(allow_classes)
    try:
        report = scan_paths(
            list(paths),
            progress=bar,
            max_memory=max_memory,
            baseline=_rss(),
            include=include,
            exclude=exclude,
        )
    finally:
        trusted.close()
        bar.close()
    if target is None:
        _emit_scan(report, fmt, verbose, paths, _say)
    else:
        from trainguard._io import write_atomic

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as out:

                def echo(line: str) -> None:
                    click.echo(line, file=out)  # no colours in a file

                with contextlib.redirect_stdout(out):
                    _emit_scan(report, fmt, verbose, paths, echo)

        write_atomic(target, write, what="report")
        _say(_scan_summary(report, verbose) + f"; report written to {_shown(str(target))}")
    if report.errors:
        return EXIT_ERROR
    return EXIT_CLEAN if report.safe else EXIT_FINDINGS


@cli.command()
@click.argument("source", type=click.Path())
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="The .safetensors file to write; for a folder or an index, the folder to write "
    "into (SOURCE itself to write next to the originals).",
)
@click.option("--force", is_flag=True, help="Overwrite existing output files (regular files only).")
@_format_option()
@_max_memory_option
def convert(source: str, output: str, force: bool, fmt: str, max_memory: int) -> int:
    """Load SOURCE with the safe loader and write it as safetensors.

    SOURCE is a checkpoint file, a folder (every pickle checkpoint in it, recursively; other
    files are left alone) or a sharded checkpoint's *.index.json. Non-tensor entries (epoch,
    config, optimizer hyperparameters) are kept as JSON in each file's metadata; tied
    weights are stored once, the dropped names listed. Every output is read back and
    compared with what was loaded before it is put in place. Exit status: 0 written,
    1 something in SOURCE is unsafe or unverifiable (nothing written), 2 error (nothing
    written).
    """
    import torch  # noqa: F401  (loaded first, so the memory budget counts it)

    from trainguard.artifacts.convert import convert as run_convert
    from trainguard.artifacts.convert_folder import (
        INDEX_SUFFIX,
        UnsafeFolderError,
        convert_folder,
        convert_sharded,
    )

    options: dict[str, Any] = {"force": force, "max_memory": max_memory, "baseline": _rss()}
    try:
        if os.path.isdir(source):
            folder = convert_folder(source, output, **options)
        elif source.endswith(INDEX_SUFFIX):
            folder = convert_sharded(source, output, **options)
        else:
            result = run_convert(source, output, **options)
            folder = None
    except UnsafeCheckpointError as refused:
        per_file = (
            refused.refused
            if isinstance(refused, UnsafeFolderError)
            else {source: refused.findings}
        )
        if fmt == "json":
            _emit_json(
                _valid_text(
                    {
                        "input": source,
                        "output": None,
                        "refused": True,
                        "findings": [f.to_dict() for f in refused.findings],
                        "refused_files": {
                            path: [f.to_dict() for f in found] for path, found in per_file.items()
                        },
                    }
                )
            )
        else:
            for path, found in per_file.items():
                _say(f"refused: {_shown(path)} is not safe to load")
                for finding in found:
                    where = f" [{finding.location}]" if finding.location else ""
                    _say(f"  {finding.severity.name:<8} {_shown(finding.message + where)}")
            _say(f"nothing written: {len(per_file)} file(s) in {_shown(source)} refused")
        return EXIT_FINDINGS
    if folder is not None:
        _convert_folder_report(folder, fmt)
        return EXIT_CLEAN
    if fmt == "json":
        _emit_json(_valid_text({"input": source, "refused": False, **_converted(result)}))
    else:
        _say(
            f"wrote {_shown(result.output)}: {result.tensors} tensors, {result.bytes_written} bytes"
        )
        _convert_notes(result, "  ")
    return EXIT_CLEAN


def _converted(result: Any) -> dict[str, Any]:
    return {
        "output": result.output,
        "tensors": result.tensors,
        "aliases": result.aliases,
        "copied_views": result.copied_views,
        "bytes": result.bytes_written,
    }


def _convert_notes(result: Any, indent: str) -> None:
    for alias, target in result.aliases.items():
        _say(
            f"{indent}dropped {_shown(alias)}: an alias of {_shown(target)} (tied weights, "
            f"stored once; restore: state[{_shown(repr(alias))}] = state[{_shown(repr(target))}])"
        )
    if result.aliases:
        _say(
            f"{indent}a model that ties them restores them itself: "
            "model.load_state_dict(load_file(...), strict=False) (see docs/convert.md)"
        )
    for group in result.copied_views:
        _say(f"{indent}{_shown(', '.join(group))} shared one storage: stored as separate copies")


def _convert_folder_report(folder: Any, fmt: str) -> None:
    if fmt == "json":
        _emit_json(
            _valid_text(
                {
                    "input": folder.source,
                    "output": folder.output,
                    "refused": False,
                    "files": [{"input": r.source, **_converted(r)} for r in folder.files],
                    "indexes": [
                        {
                            "input": i.source,
                            "output": i.output,
                            "shards": [{"input": r.source, **_converted(r)} for r in i.shards],
                        }
                        for i in folder.indexes
                    ],
                    "kept": [{"path": path, "reason": why} for path, why in folder.kept],
                    "skipped": folder.skipped,
                }
            )
        )
        return
    for r in folder.files:
        _say(f"wrote {_shown(r.output)} from {_shown(r.source)}: {r.tensors} tensors")
        _convert_notes(r, "  ")
    for index in folder.indexes:
        _say(f"wrote {_shown(index.output)} from {_shown(index.source)}:")
        for r in index.shards:
            _say(f"  {_shown(r.output)} from {_shown(r.source)}: {r.tensors} tensors")
            _convert_notes(r, "    ")
    for path, why in folder.kept:
        _say(f"left as is: {_shown(path)} ({_shown(why)})")
    shards = sum(len(i.shards) for i in folder.indexes)
    alone = f"{len(folder.kept) + len(folder.skipped)} other file(s) left alone"
    if not folder.files and not folder.indexes:
        _say(f"nothing to convert in {_shown(folder.source)}, nothing written; {alone}")
        return
    _say(
        f"converted {len(folder.files)} file(s) and {len(folder.indexes)} sharded checkpoint(s) "
        f"({shards} shards) into {_shown(folder.output)}; {alone}"
    )


# --- environment integrity: keygen, seal, verify-env ----------------------------------


def _split_names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [n.strip() for n in value.split(",") if n.strip()]


_allow_option = click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="GLOB|@FILE",
    help="Known benign difference: a glob on the path or file name, or @FILE of globs. "
    "Allowed entries are still listed, under 'allowed'.",
)
_site_option = click.option(
    "--site-packages",
    "site_packages",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Site directory to check (repeatable); default: this interpreter's.",
)
_packages_option = click.option(
    "--packages", metavar="N,...", help="Distributions to check, comma-separated."
)
_all_packages_option = click.option(
    "--all-packages", is_flag=True, help="Every distribution on the site directories."
)
_workers_option = click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Hashing threads."
)


@cli.command()
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False))
@_format_option()
def keygen(out_dir: str, fmt: str) -> int:
    """Write an ed25519 key pair into DIR (private key mode 0600); never overwrites."""
    from trainguard.integrity import keygen as make_keys

    private, public = make_keys(out_dir)
    if fmt == "json":
        _emit_json({"private_key": str(private), "public_key": str(public)})
    else:
        _say(f"private key: {display(str(private))} (mode 0600, keep it to yourself)")
        _say(f"public key:  {display(str(public))}")
    return EXIT_CLEAN


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path())
@_packages_option
@_all_packages_option
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="Private key.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@_site_option
@_allow_option
@_workers_option
@_format_option()
def seal(
    paths: tuple[str, ...],
    packages: str | None,
    all_packages: bool,
    key: str,
    output: str,
    site_packages: tuple[str, ...],
    allow: tuple[str, ...],
    workers: int | None,
    fmt: str,
) -> int:
    """Write a signed manifest of PATHS and installed distributions."""
    from trainguard.integrity import seal as do_seal

    bar = _LazyProgress("sealing")
    try:
        written = do_seal(
            list(paths),
            key=key,
            output=output,
            packages=_split_names(packages),
            all_packages=all_packages,
            site_packages=list(site_packages) or None,
            allow=allow,
            workers=workers,
            progress=bar,
        )
    finally:
        bar.close()
    if fmt == "json":
        _emit_json({"manifest": str(written)})
    else:
        _say(f"sealed: {display(str(written))}")
    return EXIT_CLEAN


@cli.command("verify-env")
@click.argument("manifest", required=False, type=click.Path(dir_okay=False))
@click.option("--pubkey", type=click.Path(dir_okay=False), help="Public key of the sealer.")
@_packages_option
@_all_packages_option
@_site_option
@_allow_option
@click.option(
    "--fast",
    is_flag=True,
    help="Trust unchanged (device, inode, size, mtime, ctime) instead of re-hashing.",
)
@_workers_option
@_format_option()
def verify_env(
    manifest: str | None,
    pubkey: str | None,
    packages: str | None,
    all_packages: bool,
    site_packages: tuple[str, ...],
    allow: tuple[str, ...],
    fast: bool,
    workers: int | None,
    fmt: str,
) -> int:
    """Drift against MANIFEST, or installed distributions against their RECORD."""
    from trainguard.integrity import verify_environment

    bar = _LazyProgress("verifying")
    try:
        report = verify_environment(
            manifest,
            public_key=pubkey,
            packages=_split_names(packages),
            all_packages=all_packages,
            site_packages=list(site_packages) or None,
            allow=allow,
            fast=fast,
            workers=workers,
            progress=bar,
        )
    finally:
        bar.close()
    if fmt == "json":
        _emit_json(report.to_dict())
    else:
        if report.manifest is not None:
            _say(f"signature: {report.signature} (trusted key {report.signer})")
        for d in report.drift:
            change = f"{d.size_before} -> {d.size_after} bytes" if d.size_before is not None else ""
            _say(f"{d.kind:16} {display(d.path)}")
            _say(
                f"{'':16}   {display(d.detail)}; owner {d.owner}, mtime {d.mtime}, "
                f"ctime {d.ctime} {change}"
            )
        for d in report.allowed:
            _say(f"allowed ({d.allowed_by}): {d.kind} {display(d.path)}")
        for note in report.notes:
            _say(f"note: {display(note)}")
        verdict = "clean" if report.clean else f"{len(report.drift)} drift"
        _say(
            f"{verdict}: {report.files_checked} files in {', '.join(report.distributions) or '-'}"
            f", {report.bytes_hashed / 1e6:.1f} MB hashed in {report.seconds:.2f} s"
        )
    return EXIT_CLEAN if report.clean else EXIT_FINDINGS


# --- ledger: verify, head, show ---


@cli.group()
def ledger() -> None:
    """The run's tamper-evident event log (see docs/ledger.md and docs/keys.md)."""


@ledger.command("init")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="Owner's private key.")
@click.option("--run-id", default=None, help="Run id (default: time and random).")
@click.option("--valid-days", type=click.FloatRange(min=0.001), default=30.0, show_default=True)
@click.option("--postgres", "dsn", default=None, metavar="DSN", help="Use PostgreSQL at DSN.")
@_format_option()
def ledger_init(
    run_dir: str, key: str, run_id: str | None, valid_days: float, dsn: str | None, fmt: str
) -> int:
    """Start (or resume) RUN_DIR: a run key certified by the owner's key.

    Run it in the launcher, where the owner's key is; the training processes then open
    the ledger with the run key only.
    """
    import datetime

    from trainguard.ledger import Ledger

    with Ledger.create(
        run_dir,
        owner_key=key,
        run_id=run_id,
        valid_for=datetime.timedelta(days=valid_days),
        backend="postgres" if dsn else "sqlite",
        dsn=dsn,
    ) as opened:
        cert = opened.certificate
        entry = opened.certificate_entry()
    if fmt == "json":
        _emit_json({"run_id": cert.run_id, "seq": entry.seq, "certificate": cert.to_payload()})
    else:
        _say(f"run {cert.run_id}: run key {cert.run_key_id} certified by {cert.owner_key_id}")
        _say(f"valid until {cert.not_after}; certificate is entry {entry.seq}")
    return EXIT_CLEAN


@ledger.command("verify")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--head",
    "heads",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A head kept elsewhere (repeatable); detects truncation and rewrites.",
)
@click.option("--pubkey", type=click.Path(dir_okay=False), help="The owner's public key.")
@click.option("--require-closed", is_flag=True, help="Exit 1 if the run has no closing entry.")
@_format_option()
def ledger_verify(
    run_dir: str, heads: tuple[str, ...], pubkey: str | None, require_closed: bool, fmt: str
) -> int:
    """Check RUN_DIR's chain, signatures and certificates, and against heads kept elsewhere.

    Exit status: 0 intact (also a run without its closing entry, which is still running
    or crashed; --require-closed makes that 1), 1 tampered, 2 error.
    """
    from trainguard.ledger import verify

    report = verify(run_dir, heads=heads, owner_public_key=pubkey)
    if fmt == "json":
        _emit_json(report.to_dict())
    else:
        for problem in report.problems:
            _say(
                f"{click.style(problem.damage, fg='red'):<18} seq {problem.seq}: {problem.message}"
            )
        if report.problems_omitted:
            _say(f"... and {report.problems_omitted} more problems")
        for note in report.notes:
            _say(f"note: {note}")
        where = f"; first bad entry: {report.first_bad_seq}" if report.tampered else ""
        _say(
            f"{report.verdict.upper()}: run {report.run_id or '?'}, {report.entries} entries, "
            f"last seq {report.last_seq}, {'closed' if report.closed else 'not closed'}{where}"
        )
    if report.tampered or (require_closed and not report.closed):
        return EXIT_FINDINGS
    return EXIT_CLEAN


@ledger.command("head")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also write it to FILE.")
@_format_option()
def ledger_head(run_dir: str, output: str | None, fmt: str) -> int:
    """Print the signed head of RUN_DIR (one line): keep it elsewhere, verify against it.

    Refused (exit 2) for a ledger that does not verify: a head would pin the damage.
    FILE is replaced if it is a regular file; a device or FIFO is refused.
    """
    from trainguard._io import check_output, write_atomic
    from trainguard.ledger.verify import signed_head

    target = check_output(output, force=True, what="head file") if output else None
    head = signed_head(run_dir)
    if target is not None:
        write_atomic(target, (head.to_line() + "\n").encode(), what="head file")
    if fmt == "json":
        _emit_json(head.to_dict())
    else:
        _say(head.to_line())
    return EXIT_CLEAN


@ledger.command("show")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--kind", "kinds", multiple=True, help="Only entries of this kind (repeatable).")
@click.option("--exclude-kind", "excluded", multiple=True, help="Leave out this kind (repeatable).")
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="Also the routine sensor.event entries (hidden unless asked, or named by --kind).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Write the listing (in --format) to FILE; replaced if it is a regular file.",
)
@_format_option()
def ledger_show(
    run_dir: str,
    kinds: tuple[str, ...],
    excluded: tuple[str, ...],
    show_all: bool,
    output: str | None,
    fmt: str,
) -> int:
    """List RUN_DIR's entries, whole (not verified: run `ledger verify` for that).

    In text, routine ``sensor.event`` entries (the job's own code compiling, a DataLoader
    made) are hidden unless --all or --kind sensor.event, and counted; JSON lists every
    entry the kind filters let through.
    """
    from trainguard.ledger import open_backend

    target = None
    if output is not None:
        from trainguard._io import check_output

        target = check_output(output, force=True, what="listing")
    hide = not show_all and fmt == "text" and "sensor.event" not in kinds
    routine = ("sensor.event",) if hide else ()
    hidden = 0
    store = open_backend(run_dir, readonly=True)
    try:
        entries = []
        for e in store.entries():
            if (kinds and e.kind not in kinds) or e.kind in excluded:
                continue
            if e.kind in routine:
                hidden += 1
                continue
            entries.append(e)
    finally:
        store.close()
    if fmt == "json":
        lines = [json.dumps({"entries": [e.to_dict() for e in entries]}, indent=2)]
    else:
        lines = []
        for entry in entries:
            data = entry.to_dict()
            actor = data["actor"]
            who = (
                f"{actor['user']}@{actor['host']} pid {actor['pid']}"
                + (f" rank {actor['rank']}" if actor.get("rank") is not None else "")
                if isinstance(actor, dict)
                else str(actor)
            )
            line = f"{entry.seq:>6}  {entry.time}  {entry.kind:<18} {who}  {entry.payload_json}"
            lines.append(_shown(line))
        lines.append(
            f"{len(entries)} entries"
            + (
                f" ({hidden} routine sensor.event entries hidden: --all shows them)"
                if hidden
                else ""
            )
        )
    if target is not None:
        from trainguard._io import write_atomic

        write_atomic(target, ("\n".join(lines) + "\n").encode("utf-8"), what="listing")
        _say(f"{len(entries)} entries written to {_shown(str(target))}")
    elif fmt == "json":
        sys.stdout.write(lines[0] + "\n")
        sys.stdout.flush()
    else:
        for line in lines:
            _say(line)
    return EXIT_CLEAN


# --- report ---


@cli.command("report")
@click.argument("run_dir", type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "html"]),
    default="text",
    show_default=True,
    help="text on stderr, or one JSON or HTML document on stdout (or FILE).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Write the report (in --format) to FILE; replaced if it is a regular file.",
)
@click.option(
    "--gpus-per-rank",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="GPUs each rank held (for the GPU-hours lost).",
)
@click.option(
    "--cost-per-gpu-hour",
    type=click.FloatRange(min=0),
    default=None,
    help="Price of one GPU-hour: the report adds the cost of the time lost.",
)
@click.option(
    "--head",
    "heads",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A head kept elsewhere (repeatable), as for `ledger verify`.",
)
@click.option("--pubkey", type=click.Path(dir_okay=False), help="The owner's public key.")
@click.option(
    "--replay",
    "replays",
    multiple=True,
    type=click.Path(file_okay=False),
    help="A replay's folder to include (repeatable); those beside RUN_DIR are found anyway.",
)
def report(
    run_dir: str,
    fmt: str,
    output: str | None,
    gpus_per_rank: int,
    cost_per_gpu_hour: float | None,
    heads: tuple[str, ...],
    pubkey: str | None,
    replays: tuple[str, ...],
) -> int:
    """Incidents and damage of RUN_DIR, from its verified ledger (see docs/report.md).

    Exit status: 0 clean run, 1 incidents found or ledger not intact (tampered, cut or
    not closed), 2 error.
    """
    from trainguard.report import build_report, render_html, render_text

    target = None
    if output is not None:
        from trainguard._io import check_output

        target = check_output(output, force=True, what="report")
    built = build_report(
        run_dir,
        heads=heads,
        owner_public_key=pubkey,
        gpus_per_rank=gpus_per_rank,
        cost_per_gpu_hour=cost_per_gpu_hour,
        replays=replays,
    )
    if fmt == "json":
        document = json.dumps(built.to_dict(), indent=2) + "\n"
    elif fmt == "html":
        document = render_html(built)
    else:
        document = render_text(built)
    if target is not None:
        from trainguard._io import write_atomic

        write_atomic(target, document.encode("utf-8"), what="report")
        verdict = render_text(built).rstrip("\n").rsplit("\n", 1)[-1]
        _say(f"{verdict}; report written to {_shown(str(target))}")
    elif fmt == "text":
        for line in document.rstrip("\n").split("\n"):
            _say(_shown(line))
    else:
        sys.stdout.write(document)
        sys.stdout.flush()
    return EXIT_CLEAN if built.clean else EXIT_FINDINGS


# --- replay ---


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--from",
    "checkpoint",
    required=True,
    type=click.Path(dir_okay=False),
    help="A checkpoint the run signed and recorded: the replay starts there.",
)
@click.option("--to", "stop", type=click.IntRange(min=1), help="Stop the job at this step.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="The replay's own run folder (default: RUN_DIR.replay-TIME beside the run).",
)
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="Relative difference allowed per value (0: bit for bit; for GPUs without "
    "deterministic algorithms).",
)
@click.option("-o", "--output", "target", type=click.Path(dir_okay=False), help="Write here.")
@_format_option()
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def replay(
    run_dir: str,
    checkpoint: str,
    stop: int | None,
    out: str | None,
    tolerance: float,
    target: str | None,
    fmt: str,
    command: tuple[str, ...],
) -> int:
    """Re-run the job from a signed checkpoint and find the first step that differs.

    Usage: trainguard replay RUN_DIR --from CKPT [--to STEP] -- COMMAND...

    COMMAND is the job's own command for a resume from CKPT (its Guard finds the replay
    plan in TRAINGUARD_REPLAY). Exit status: 0 the replay reproduces the record, 1 it
    diverges (the verdict names the first step, the ranks and what differs), 2 error.
    """
    from pathlib import Path

    from trainguard import replay as replaying

    verdict, _, plan = replaying.replay(
        Path(run_dir),
        Path(checkpoint),
        command,
        stop=stop,
        out=Path(out) if out else None,
        tolerance=tolerance,
    )
    if fmt == "json":
        document = json.dumps({"replay": plan.folder, **verdict.to_json()}, indent=2) + "\n"
    else:
        document = replaying.text(verdict) + f"\nreplay run: {plan.folder}\n"
    if target is not None:
        from trainguard._io import write_atomic

        write_atomic(target, document.encode("utf-8"), what="replay verdict")
    elif fmt == "json":
        sys.stdout.write(document)
        sys.stdout.flush()
    else:
        for line in document.rstrip("\n").split("\n"):
            _say(_shown(line))
    if verdict.last_step is None:
        return EXIT_ERROR
    return EXIT_FINDINGS if verdict.diverged else EXIT_CLEAN


# --- entry points -------------------------------------------------------------------


def _debug_requested(args: list[str]) -> bool:
    """``--debug`` anywhere before ``--`` (or TRAINGUARD_DEBUG=1): show tracebacks."""
    words = args[: args.index("--")] if "--" in args else args
    return "--debug" in words or os.environ.get("TRAINGUARD_DEBUG", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv``; return the exit status instead of exiting.

    No traceback reaches the user: every failure is one line on stderr and exit status 2
    (never 1, which means findings). ``--debug`` (or ``TRAINGUARD_DEBUG=1``) shows the
    traceback of an unexpected one.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(args)
    if "--debug" in args:
        cut = args.index("--") if "--" in args else len(args)
        args = [a for a in args[:cut] if a != "--debug"] + args[cut:]
    try:
        status = _run(args)
    except Exception as exc:  # the last line of defence: a bug is still one line, exit 2
        if debug:
            traceback.print_exc()
        detail = str(exc).splitlines()[0] if str(exc) else ""
        _say(
            f"trainguard: internal error: {type(exc).__name__}"
            + (f": {detail}" if detail else "")
            + ("" if debug else " (run with --debug for the traceback)")
        )
        return EXIT_ERROR
    return status


def _run(args: list[str]) -> int:
    try:
        status = cli.main(args=args, prog_name="trainguard", standalone_mode=False)
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except click.UsageError as exc:
        exc.show()
        return EXIT_ERROR
    except click.Abort:
        _say("trainguard: aborted")
        return EXIT_ERROR
    except Error as exc:
        _say(f"trainguard: error: {_shown(str(exc))}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say("trainguard: interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    except MemoryError:
        _say("trainguard: error: out of memory")
        return EXIT_ERROR
    except RecursionError:
        _say("trainguard: error: input nested too deeply")
        return EXIT_ERROR
    except OSError as exc:
        where = f"{display(exc.filename)}: " if exc.filename is not None else ""
        _say(f"trainguard: error: {_shown(where + reason(exc))}")
        return EXIT_ERROR
    return status if isinstance(status, int) else EXIT_CLEAN


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
