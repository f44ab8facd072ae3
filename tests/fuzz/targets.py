"""Fuzz targets: one ``target(data: bytes) -> None`` per reader, each asserting the contract.

Whatever the bytes, every target checks that

- the only exception is a :class:`trainguard.Error` subclass (inside scanning, a format
  problem is an UNVERIFIABLE verdict, not an exception);
- no payload runs (seeds carry one that would create :data:`MARKER`);
- the input is handled within the target's time bound;
- memory traced by ``tracemalloc`` stays under :data:`MEMORY_CAP` (when tracing is on);

and adds what its reader promises: a load that succeeds was scanned SAFE; ``convert``
never leaves a temporary file; a signed checkpoint that loads holds exactly what was
signed, and a refused one leaves the model as it was; a ledger that verifies as intact
holds exactly the entries written, and an edited row is reported as tampered.

A broken contract raises :class:`ContractViolation`. The same targets run briefly under
hypothesis in ``test_fuzz_targets.py`` and for longer under ``scripts/fuzz.py``.
Seeds are real files made here: ``torch.save`` output, a sealed manifest, a SQLite
ledger, a signed checkpoint. Everything is built once per process in a temporary folder.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle
import shutil
import sqlite3
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

import trainguard

MARKER = Path(tempfile.gettempdir()) / "trainguard-fuzz-targets-PAYLOAD-RAN"
#: traced peak allowed per input; the seeds are a few KB, so anything near this is a bomb
MEMORY_CAP = 256 << 20
COLUMNS = ("seq", "time", "kind", "actor", "payload", "prev_hash", "hash", "signature", "key_id")


class ContractViolation(AssertionError):
    """A target saw something its reader promises never happens."""


class _Touch:
    """A pickle payload that, if it ever ran, would create the marker file."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(MARKER), "w"))


@dataclass
class Workspace:
    """Real artifacts, built once per process, that the targets start from."""

    root: Path
    private: Path
    public: Path
    site: Path
    run_dir: Path
    head: Path
    entries: list[tuple[Any, ...]]
    checkpoint_states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    checkpoint_metadata: list[dict[str, Any]] = field(default_factory=list)
    seeds: dict[str, list[bytes]] = field(default_factory=dict)

    def scratch(self, name: str) -> Path:
        """A fresh, empty folder for one input."""
        folder = self.root / "scratch" / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return folder


def _torch_bytes(obj: object, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _npy_bytes(arr: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return bytes(save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}))


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt


def _raw_rows(db: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        conn.text_factory = bytes  # compare the stored bytes, whatever their encoding
        cols = ", ".join(f"typeof({c}), {c}" for c in COLUMNS)
        return conn.execute(f"SELECT {cols} FROM entries ORDER BY seq").fetchall()
    finally:
        conn.close()


def _header_metadata(data: bytes) -> dict[str, Any] | None:
    """The parsed ``__metadata__`` of a safetensors file (its JSON strings parsed too)."""
    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + size])["__metadata__"]
        return {k: json.loads(v) if k != "format" else v for k, v in meta.items()}
    except (ValueError, KeyError, TypeError):
        return None


@cache
def workspace() -> Workspace:
    """Build every seed for real: keys, a sealed manifest, a ledger, signed checkpoints."""
    from trainguard import checkpoint
    from trainguard.integrity import keygen, seal
    from trainguard.ledger import Ledger

    root = Path(tempfile.mkdtemp(prefix="trainguard-fuzz-"))
    private, public = keygen(root / "keys")
    site = root / "site"
    site.mkdir()
    tree = root / "tree"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (tree / "pkg" / "mod.py").write_text("def f():\n    return 2\n")
    (tree / "data.txt").write_bytes(b"\x00\x01 training data\n")
    manifest = seal([tree], key=private, output=root / "manifest.json")

    run_dir = root / "run"
    with Ledger.create(run_dir, owner_key=private, run_id="fuzz-run") as ledger:
        for i in range(3):
            ledger.append("step", {"step": i, "loss": 1.0 / (i + 1)}, rank=i % 2)
        model, opt = _model()
        signed_by_run = root / "ckpt-run.safetensors"
        checkpoint.save(signed_by_run, model=model, optimizer=opt, step=3, ledger=ledger, rng=False)
        ledger.close_run({"steps": 3})
        head = root / "head.json"
        head.write_text(json.dumps(ledger.head().to_dict(), indent=1) + "\n")
    signed_by_owner = root / "ckpt-owner.safetensors"
    checkpoint.save(
        signed_by_owner, model=model, optimizer=opt, step=3, key=private, extra={"lr": 0.1}
    )
    config = {"backend": "postgres", "dsn": "host=127.0.0.1 port=1 dbname=x", "run_id": "r"}

    ws = Workspace(root, private, public, site, run_dir, head, _raw_rows(run_dir / "ledger.db"))
    ws.checkpoint_states = [{k: v.clone() for k, v in model.state_dict().items()}]
    ckpts = [signed_by_owner.read_bytes(), signed_by_run.read_bytes()]
    ws.checkpoint_metadata = [m for m in map(_header_metadata, ckpts) if m is not None]
    models = [
        _torch_bytes({"w": torch.arange(8.0), "b": torch.ones(2, dtype=torch.bfloat16), "e": 1}),
        _torch_bytes({"w": torch.arange(4.0), "epoch": 3}, legacy=True),
        _torch_bytes({"x": _Touch()}),
        _torch_bytes(model.state_dict()),
        pickle.dumps({"a": [1, 2.0, "x"], "b": (None, True)}, protocol=2),
        pickle.dumps(_Touch(), protocol=4),
        _npy_bytes(np.arange(6, dtype=np.float32)),
        _npy_bytes(np.array([1, "x"], dtype=object)),
        _safetensors_bytes(),
    ]
    ws.seeds = {
        "scan": models,
        "load": models,
        "convert": models,
        "manifest": [manifest.read_bytes()],
        "head": [head.read_bytes()],
        "ledger_json": [json.dumps(config).encode()],
        "ledger_db": [(run_dir / "ledger.db").read_bytes()],
        # an edit program (see _apply_edits): row, column, kind, then the value's bytes
        "ledger_rows": [
            b"\x01\x04\x06\x00",  # one character of entry 2's payload
            b"\x02\x04\x01\x02{}",  # entry 3's payload replaced
            b"\x02\x08\x06\x00",  # entry 3's key id
            b"\x03\x00\x07\x00",  # entry 4 deleted
            b"\x04\x00\x08\x00",  # entries 5 and 1 swapped
        ],
        "checkpoint": ckpts,
    }
    return ws


@contextlib.contextmanager
def _bounded(name: str, seconds: float) -> Iterator[None]:
    """Check time, memory and the marker around one input."""
    tracing = tracemalloc.is_tracing()
    if tracing:
        tracemalloc.reset_peak()
    started = time.monotonic()
    try:
        yield
    finally:
        if MARKER.exists():
            MARKER.unlink()
            raise ContractViolation(f"{name}: a payload ran")
    elapsed = time.monotonic() - started
    if elapsed > seconds:
        raise ContractViolation(f"{name}: took {elapsed:.1f} s, above the {seconds} s bound")
    if tracing:
        peak = tracemalloc.get_traced_memory()[1]
        if peak > MEMORY_CAP:
            raise ContractViolation(f"{name}: traced peak {peak >> 20} MiB above the cap")


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# --- model files ------------------------------------------------------------------------


def scan_target(data: bytes) -> None:
    """``scan_bytes`` and ``trainguard.scan`` on a file agree, and never raise for content."""
    from trainguard.artifacts.scanner import scan_bytes

    ws = workspace()
    with _bounded("scan", 5.0):
        report = scan_bytes(data, "fuzz")
        path = _write(ws.scratch("scan"), "input.bin", data)
        on_disk = trainguard.scan(path)
    if on_disk.errors or len(on_disk.files) != 1:
        raise ContractViolation(f"scan: a readable file was reported as {on_disk.errors}")
    if on_disk.files[0].verdict is not report.verdict:
        raise ContractViolation(
            f"scan: {report.verdict} from bytes but {on_disk.files[0].verdict} from the file"
        )


def load_target(data: bytes) -> None:
    """``trainguard.load`` either refuses (an Error) or returns what a SAFE scan allowed."""
    from trainguard.artifacts.interface import Verdict
    from trainguard.artifacts.scanner import scan_bytes

    ws = workspace()
    path = _write(ws.scratch("load"), "input.bin", data)
    with _bounded("load", 5.0):
        try:
            trainguard.load(path)
        except trainguard.Error:
            return
    verdict = scan_bytes(data, "fuzz").verdict
    if verdict is not Verdict.SAFE:
        raise ContractViolation(f"load: loaded a file the scan calls {verdict}")


def convert_target(data: bytes) -> None:
    """``convert`` writes a SAFE safetensors file or nothing, and never leaves a temp file."""
    from trainguard.artifacts.convert import convert
    from trainguard.artifacts.interface import Verdict

    folder = workspace().scratch("convert")
    source = _write(folder, "input.bin", data)
    out_dir = folder / "out"
    out_dir.mkdir()
    out = out_dir / "model.safetensors"
    done = False
    with _bounded("convert", 10.0), contextlib.suppress(trainguard.Error):
        convert(source, out)
        done = True
    left = sorted(p.name for p in out_dir.iterdir() if p != out)
    if left:
        raise ContractViolation(f"convert: left {left} behind")
    if done != out.exists():
        raise ContractViolation(f"convert: returned={done} but output exists={out.exists()}")
    if done:
        written = trainguard.scan(out).files[0]
        if written.format != "safetensors" or written.verdict is not Verdict.SAFE:
            raise ContractViolation(f"convert: wrote a {written.format} file, {written.verdict}")


# --- manifests ---------------------------------------------------------------------------


def manifest_target(data: bytes) -> None:
    """The manifest reader and ``verify_environment``: a valid signature means the body sealed."""
    from trainguard.integrity import manifest as _manifest
    from trainguard.integrity import verify_environment

    ws = workspace()
    path = _write(ws.scratch("manifest"), "manifest.json", data)
    with _bounded("manifest", 10.0):
        with contextlib.suppress(trainguard.Error):
            _manifest.read(path)
        try:
            report = verify_environment(path, public_key=ws.public, site_packages=[ws.site])
        except trainguard.Error:
            return
    if report.signature == "valid":
        sealed = json.loads(ws.seeds["manifest"][0])["body"]
        if json.loads(data)["body"] != sealed:
            raise ContractViolation("manifest: a changed body verified as validly signed")


# --- the ledger --------------------------------------------------------------------------


def _pristine_run(ws: Workspace, name: str) -> Path:
    run = ws.scratch(name) / "run"
    shutil.copytree(ws.run_dir, run)
    return run


def head_target(data: bytes) -> None:
    """A head file, as ``ledger verify --head`` reads it."""
    from trainguard.ledger import read_head, verify

    ws = workspace()
    folder = ws.scratch("head")
    path = _write(folder, "head.json", data)
    with _bounded("head", 5.0):
        with contextlib.suppress(trainguard.Error):
            read_head(path)
        with contextlib.suppress(trainguard.Error):
            verify(ws.run_dir, heads=[path])


def ledger_json_target(data: bytes) -> None:
    """``RUN_DIR/ledger.json``, the PostgreSQL ledger configuration, next to a good ledger."""
    from trainguard.ledger import verify
    from trainguard.ledger.core import head_of, open_backend

    ws = workspace()
    run = _pristine_run(ws, "ledger_json")
    _write(run, "ledger.json", data)
    with _bounded("ledger_json", 10.0):
        with contextlib.suppress(trainguard.Error):
            verify(run)
        with contextlib.suppress(trainguard.Error):
            store = open_backend(run, readonly=True)
            try:
                head_of(store)
            finally:
                store.close()


def _verify_and_compare(name: str, ws: Workspace, run: Path, *, strict: bool) -> None:
    """Verify ``run`` against the pristine head; intact must mean unchanged.

    ``strict``: the rows were edited on purpose and readable, so a changed ledger must
    verify as tampered rather than fail to be read.
    """
    from trainguard.ledger import verify
    from trainguard.ledger.core import head_of, open_backend

    with _bounded(name, 10.0):
        try:
            report = verify(run, heads=[ws.head])
        except trainguard.Error as exc:
            if strict:
                raise ContractViolation(f"{name}: an edited row was not verified: {exc}") from exc
            return
        with contextlib.suppress(trainguard.Error):
            store = open_backend(run, readonly=True)
            try:
                head_of(store)
            finally:
                store.close()
    try:
        rows = _raw_rows(run / "ledger.db")
    except sqlite3.DatabaseError:
        rows = None
    if not report.tampered and rows != ws.entries:
        raise ContractViolation(f"{name}: changed entries verified as {report.verdict}")


def ledger_db_target(data: bytes) -> None:
    """``RUN_DIR/ledger.db`` with any bytes: verify (and ``ledger head``) fail closed."""
    ws = workspace()
    run = ws.scratch("ledger_db") / "run"
    run.mkdir()
    _write(run, "ledger.db", data)
    _verify_and_compare("ledger_db", ws, run, strict=False)


def _value(kind: int, raw: bytes, original: Any) -> tuple[str, Any]:
    """(SQL expression, parameter) for one edited field."""
    if kind == 0:
        return "?", raw  # a blob where text was
    if kind == 1:
        return "?", raw.decode("latin-1")
    if kind == 2:
        return "CAST(? AS TEXT)", raw  # text that is not UTF-8
    if kind == 3:
        return "?", int.from_bytes(raw[:8] or b"\x01", "little", signed=True)
    if kind == 4:
        return "?", float(len(raw)) + 0.5
    text = original.decode("utf-8", "surrogateescape") if isinstance(original, bytes) else ""
    if kind == 5:
        return "?", text + raw.decode("latin-1")  # appended
    at = int.from_bytes(raw[:2] or b"\x00", "little") % max(1, len(text))
    if kind == 6 and text:  # one character changed
        return "?", text[:at] + chr((ord(text[at]) + 1) % 0x110000 or 1) + text[at + 1 :]
    return "?", text[:at]  # cut short


def _apply_edits(db: Path, program: bytes, ws: Workspace) -> None:
    """Edit rows as an attacker with write access to ``ledger.db`` would.

    Each edit is 4+ bytes: row, column, kind (see :func:`_value`; 7 deletes the row,
    8 swaps two rows' sequence numbers), value length, then the value.
    """
    conn = sqlite3.connect(db, isolation_level=None)
    conn.text_factory = bytes
    conn.execute("PRAGMA synchronous = OFF")  # a scratch copy: no fsync per edit
    try:
        at = 0
        while at + 3 <= len(program):
            row, col, kind = program[at], program[at + 1] % len(COLUMNS), program[at + 2] % 9
            size = program[at + 3] if at + 3 < len(program) else 0
            raw = program[at + 4 : at + 4 + size]
            at += 4 + size
            seqs = [r[0] for r in conn.execute("SELECT seq FROM entries ORDER BY seq")]
            if not seqs:
                break
            seq = seqs[row % len(seqs)]
            with contextlib.suppress(sqlite3.IntegrityError, sqlite3.OperationalError):
                if kind == 7:
                    conn.execute("DELETE FROM entries WHERE seq = ?", (seq,))
                elif kind == 8:
                    other = seqs[(row + 1) % len(seqs)]
                    conn.execute("UPDATE entries SET seq = -1 WHERE seq = ?", (seq,))
                    conn.execute("UPDATE entries SET seq = ? WHERE seq = ?", (seq, other))
                    conn.execute("UPDATE entries SET seq = ? WHERE seq = -1", (other,))
                else:
                    name = COLUMNS[col]
                    (original,) = conn.execute(
                        f"SELECT {name} FROM entries WHERE seq = ?", (seq,)
                    ).fetchone()
                    expr, value = _value(kind, raw, original)
                    conn.execute(f"UPDATE entries SET {name} = {expr} WHERE seq = ?", (value, seq))
    finally:
        conn.close()


def ledger_rows_target(data: bytes) -> None:
    """Row fields of a real SQLite ledger edited (``data`` is an edit program)."""
    ws = workspace()
    run = _pristine_run(ws, "ledger_rows")
    _apply_edits(run / "ledger.db", data, ws)
    _verify_and_compare("ledger_rows", ws, run, strict=True)


# --- signed checkpoints ------------------------------------------------------------------


def checkpoint_target(data: bytes) -> None:
    """``checkpoint.load``: what loads is what was signed; a refusal leaves the model as it was."""
    from trainguard import checkpoint

    ws = workspace()
    path = _write(ws.scratch("checkpoint"), "ckpt.safetensors", data)
    model, opt = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    before_opt = copy.deepcopy(opt.state_dict())
    with _bounded("checkpoint", 5.0):
        try:
            checkpoint.load(
                path, model=model, optimizer=opt, public_key=ws.public, restore_rng=False
            )
        except trainguard.Error:
            if any(bool(t.any()) for t in model.state_dict().values()):
                raise ContractViolation("checkpoint: a refused load changed the model") from None
            if not _same(opt.state_dict(), before_opt):
                raise ContractViolation(
                    "checkpoint: a refused load changed the optimizer"
                ) from None
            return
    state = model.state_dict()
    if not any(all(torch.equal(state[k], s[k]) for k in s) for s in ws.checkpoint_states):
        raise ContractViolation("checkpoint: loaded weights that were never signed")
    if _header_metadata(data) not in ws.checkpoint_metadata:
        raise ContractViolation(
            "checkpoint: loaded a file whose metadata differs from what was signed"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "scan": scan_target,
    "load": load_target,
    "convert": convert_target,
    "manifest": manifest_target,
    "head": head_target,
    "ledger_json": ledger_json_target,
    "ledger_db": ledger_db_target,
    "ledger_rows": ledger_rows_target,
    "checkpoint": checkpoint_target,
}

#: targets whose inputs are JSON text: mutations also edit the parsed document
JSON_TARGETS = frozenset({"manifest", "head", "ledger_json"})


def seeds(name: str) -> list[bytes]:
    return workspace().seeds[name]


def run(name: str, data: bytes) -> None:
    """Run one target; anything but a trainguard.Error or a clean return is a violation."""
    with contextlib.suppress(trainguard.Error):
        TARGETS[name](data)


# --- mutations, shared by hypothesis (tests) and the random engine (scripts/fuzz.py) ------

#: ``choose(n)`` returns an int in ``[0, n)``: hypothesis draws it, or ``random`` picks it
Choose = Callable[[int], int]
_BYTES = (0, 1, 0x7F, 0x80, 0xFF, ord("."), ord("R"), ord("c"), ord("{"), ord('"'))
_INTS = (0, 1, -1, 7, 0x7FFF_FFFF, 0xFFFF_FFFF, 1 << 40, (1 << 63) - 1)
_JSON_VALUES: tuple[Any, ...] = (
    None,
    True,
    0,
    -1,
    1.5,
    1 << 64,
    "",
    "x" * 4096,
    "../../etc/passwd",
    "\udcff",
    [],
    {},
    [[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]],
    {"a": {"b": {"c": None}}},
)


def _interesting_int(choose: Choose, size: int) -> int:
    if choose(2):
        return _INTS[choose(len(_INTS))] % (1 << (8 * size))
    return choose(1 << min(16, 8 * size))


def mutate_bytes(data: bytes, choose: Choose, others: list[bytes]) -> bytes:
    """1 to 4 byte-level edits: flips, cuts, inserts, duplicates, splices, length fields."""
    out = bytearray(data)
    for _ in range(1 + choose(4)):
        kind = choose(8)
        at = choose(len(out) + 1)
        if kind == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << choose(8)
        elif kind == 1 and out:
            out[min(at, len(out) - 1)] = _BYTES[choose(len(_BYTES))]
        elif kind == 2:
            del out[at:]
        elif kind == 3:
            out[at:at] = bytes(choose(256) for _ in range(1 + choose(16)))
        elif kind == 4:
            width = 1 + choose(64)
            out[at:at] = out[at : at + width]
        elif kind == 5:
            del out[at : at + 1 + choose(64)]
        elif kind == 6 and others:  # splice: this input's head, another seed's tail
            other = others[choose(len(others))]
            out[at:] = other[choose(len(other) + 1) :]
        elif kind == 7 and out:  # a length field: 1, 2, 4 or 8 bytes, either byte order
            size = 1 << choose(4)
            at = min(at, max(0, len(out) - size))
            value = _interesting_int(choose, size)
            out[at : at + size] = value.to_bytes(size, "little" if choose(2) else "big")
    return bytes(out)


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nodes(v, (*path, i))


def mutate_json(data: bytes, choose: Choose) -> bytes | None:
    """Parse ``data`` and edit one node (replace, delete, add a key, nest); None if not JSON."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    paths = list(_nodes(doc))
    path = paths[choose(len(paths))]
    kind = choose(5)
    if not path:
        doc = _JSON_VALUES[choose(len(_JSON_VALUES))] if kind == 0 else [doc]
    else:
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        old = parent[last]
        if kind == 0:
            parent[last] = _JSON_VALUES[choose(len(_JSON_VALUES))]
        elif kind == 1:
            del parent[last]
        elif kind == 2 and isinstance(old, str) and old:
            cut = choose(len(old))
            parent[last] = old[:cut] + chr(32 + choose(95)) + old[cut + 1 :]
        elif kind == 3 and isinstance(old, dict):
            old[f"k{choose(4)}"] = _JSON_VALUES[choose(len(_JSON_VALUES))]
        else:
            parent[last] = [old] if choose(2) else {"v": old}
    text = json.dumps(doc, ensure_ascii=bool(choose(2)), indent=None if choose(2) else 1)
    return text.encode("utf-8", "surrogatepass")


def mutate(name: str, data: bytes, choose: Choose) -> bytes:
    """One mutant of ``data`` for target ``name``."""
    if name in JSON_TARGETS and choose(2):
        edited = mutate_json(data, choose)
        if edited is not None:
            return edited
    return mutate_bytes(data, choose, seeds(name))
