"""Hostile input and faults for scan, load and convert (issue 10): fail closed, in bounded
time and memory, one line naming the file and the reason, and never a traceback.

Each test reproduces a failure found by the audit (fuzzing, hostile command lines, fault
injection) before it was fixed. Commands run in child processes where the exit status,
the absence of a traceback, a hang or the peak memory is what is being tested; children
that need mode bits to mean something run without the capabilities that let root read
anything (``tests/unprivileged.py``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import trainguard
from tests.unprivileged import drop_file_privileges, permissions_mean_something
from trainguard.artifacts import formats
from trainguard.artifacts.interface import Verdict
from trainguard.cli import main

MiB = 1 << 20
EVIL = b"cos\nsystem\n(S'true'\ntR."  # never run: scanned and refused only

# A child that runs one trainguard call and reports its own peak resident set. VmHWM, not
# ru_maxrss: Linux carries the forking parent's peak (pytest with torch, ~400 MB) into
# the child's ru_maxrss across exec, while VmHWM belongs to the new program alone.
_PEAK = (
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1])\n"
    "    return 0\n"
)
_RUNNER = (
    "import sys\n" + _PEAK + "from trainguard.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "sys.stderr.write('\\n@@maxrss %d\\n' % _peak())\n"
    "sys.exit(rc)\n"
)
_LOADER = (
    "import sys, trainguard\n" + _PEAK + "try:\n"
    "    trainguard.load(sys.argv[1], max_memory=int(sys.argv[2]))\n"
    "    rc = 0\n"
    "except trainguard.Error as exc:\n"
    "    print(type(exc).__name__, exc, file=sys.stderr)\n"
    "    rc = 3\n"
    "sys.stderr.write('\\n@@maxrss %d\\n' % _peak())\n"
    "sys.exit(rc)\n"
)


def _child(
    code: str,
    *args: str,
    stdin: str | None = None,
    timeout: float = 20,
    unprivileged: bool = False,
) -> tuple[int, str, str, int]:
    """(exit status, stdout, stderr, peak RSS in bytes) of ``python -c CODE ARGS``."""
    with open(stdin or os.devnull, "rb") as source:
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            stdin=source,
            capture_output=True,
            timeout=timeout,
            preexec_fn=drop_file_privileges if unprivileged else None,
            cwd="/tmp",
            check=False,
        )
    err = done.stderr.decode("utf-8", "replace")
    lines = err.rstrip().splitlines()
    peak = 0
    if lines and lines[-1].startswith("@@maxrss "):
        peak = int(lines[-1].split()[1]) * 1024
        err = "\n".join(lines[:-1])
    return done.returncode, done.stdout.decode("utf-8", "replace"), err, peak


def _cli(*argv: str, **kwargs: object) -> tuple[int, str, str, int]:
    rc, out, err, peak = _child(_RUNNER, *argv, **kwargs)  # type: ignore[arg-type]
    assert "Traceback" not in err, err
    assert "internal error" not in err, err
    return rc, out, err, peak


def _checkpoint() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(16, dtype=torch.float32), "epoch": 1}, buf)
    return buf.getvalue()


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder an unprivileged child can enter (pytest's tmp_path is under a 0700 folder)."""
    top = Path(tempfile.mkdtemp(prefix="tg-faults-", dir="/tmp"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        for folder, _, _ in os.walk(top):
            os.chmod(folder, 0o755)
        shutil.rmtree(top, ignore_errors=True)


def _unprivileged_or_skip() -> None:
    why = permissions_mean_something()
    if why is not None:
        pytest.skip(why)


# --- 1. tiny and truncated files: FormatError, never struct.error or SystemError -------


def test_end_record_in_a_file_shorter_than_the_record(tmp_path, capsys):
    """A 13-byte file holding the end-of-central-directory signature: the record search
    found it and unpacked 22 bytes from 13 (raw ``struct.error`` from scan and load)."""
    path = tmp_path / "r1.bin"
    path.write_bytes(b"\0\0\0\0PK\5\6\0\0\0\0\0")
    (file,) = trainguard.scan(path).files
    assert file.verdict is not Verdict.SAFE
    with pytest.raises(trainguard.Error):
        trainguard.load(path)
    # no loader reads 13 bytes with no ZIP record whole: skipped (0), or refused (1)
    assert main(["scan", str(path)]) in (0, 1)
    assert "internal error" not in capsys.readouterr().err


def test_tar_header_whose_data_is_missing(tmp_path):
    """A lone 512-byte ustar header declaring 1000 bytes: tarfile seeked past the end and
    read a negative count (``SystemError: Negative size passed to PyBytes_...``)."""
    import tarfile

    info = tarfile.TarInfo("pickle")
    info.size = 1000
    path = tmp_path / "t.tar"
    path.write_bytes(info.tobuf(format=tarfile.USTAR_FORMAT))
    (file,) = trainguard.scan(path).files
    assert file.verdict is not Verdict.SAFE
    with pytest.raises(trainguard.Error):
        trainguard.load(path)


def test_every_prefix_of_tiny_containers_is_handled(tmp_path):
    """Every cut of a zip end record, an npy header, a safetensors header and a tar header
    ends in a verdict, never an exception."""
    import tarfile

    samples = [
        b"PK\5\6" + b"\0" * 18,
        b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'",
        struct.pack("<Q", 40) + b'{"a": {"dtype": "F32"',
        tarfile.TarInfo("pickle").tobuf(format=tarfile.USTAR_FORMAT),
    ]
    path = tmp_path / "cut.bin"
    for sample in samples:
        for cut in range(len(sample) + 1):
            path.write_bytes(sample[:cut])
            (file,) = trainguard.scan(path).files
            assert file.verdict is not Verdict.SAFE, (sample[:8], cut)


def test_joblib_wrapper_with_an_empty_dtype_call(tmp_path):
    """A joblib array wrapper whose dtype was made with no arguments: the hook indexed
    ``args[0]`` (``IndexError`` out of the analyser, killing the folder scan)."""
    data = (
        b"\x80\x02cjoblib.numpy_pickle\nNumpyArrayWrapper\n)\x81"
        b"}(U\x05dtypecnumpy\ndtype\n)\x81U\x05shape)ub."
    )
    path = tmp_path / "wrapper.pkl"
    path.write_bytes(data)
    (file,) = trainguard.scan(path).files
    assert file.verdict is Verdict.UNVERIFIABLE


# --- 2. every path is read or refused ---------------------------------------------------


def test_unreadable_subfolder_is_an_error_not_skipped(shared_tmp):
    """Mode-000 subfolder holding an unsafe pickle, scanned as a user bound by permissions:
    ``scan t`` said ``1 safe`` with exit 0, ``scan t/locked`` said ``nothing to scan``."""
    _unprivileged_or_skip()
    (shared_tmp / "good.pt").write_bytes(_checkpoint())
    locked = shared_tmp / "locked"
    locked.mkdir()
    (locked / "evil.pkl").write_bytes(EVIL)
    locked.chmod(0)
    rc, _, err, _ = _cli("scan", str(shared_tmp), unprivileged=True)
    assert rc == 2, err
    assert "locked" in err
    assert "permission denied" in err.lower()
    rc, out, err, _ = _cli("scan", "--format", "json", str(locked), unprivileged=True)
    assert rc == 2, err
    assert json.loads(out)["errors"], out


def test_unreadable_file_in_a_folder_is_an_error(shared_tmp):
    _unprivileged_or_skip()
    (shared_tmp / "good.pt").write_bytes(_checkpoint())
    (shared_tmp / "locked.pt").write_bytes(_checkpoint())
    (shared_tmp / "locked.pt").chmod(0)
    rc, _, err, _ = _cli("scan", str(shared_tmp), unprivileged=True)
    assert rc == 2
    assert "locked.pt" in err


def test_special_files_named_or_inside_a_folder_are_errors(tmp_path):
    """A FIFO, a device and a socket: refused from their stat, never opened or hung on."""
    folder = tmp_path / "dir"
    folder.mkdir()
    os.mkfifo(folder / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock"))
    try:
        (folder / "good.pt").write_bytes(_checkpoint())
        for target in (folder / "pipe", "/dev/zero", folder / "sock"):
            rc, _, err, _ = _cli("scan", str(target), timeout=10)
            assert rc == 2, (target, err)
            assert str(target) in err
        rc, out, err, _ = _cli("scan", "--format", "json", str(folder), timeout=10)
        assert rc == 2
        report = json.loads(out)
        assert [Path(f["path"]).name for f in report["files"]] == ["good.pt"]
        assert any("FIFO" in e for e in report["errors"])
        assert any("socket" in e for e in report["errors"])
    finally:
        sock.close()


def test_broken_link_and_link_loops_are_listed(tmp_path):
    (tmp_path / "good.pt").write_bytes(_checkpoint())
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    os.symlink("self", tmp_path / "self")
    os.symlink(tmp_path, tmp_path / "up")
    report = trainguard.scan(tmp_path)
    assert [Path(f.path).name for f in report.files] == ["good.pt"]
    assert any("dangling" in e for e in report.errors)
    assert any("self" in e and "symbolic links" in e for e in report.errors)
    rc, _, err, _ = _cli("scan", str(tmp_path / "self"), timeout=10)
    assert rc == 2


# --- 3. a folder scan keeps going past a bad file ---------------------------------------


class _Exploding:
    """A handler that fails the way an analyser bug would (fault injection)."""

    name = "exploding"

    def sniff(self, head: bytes, size: int) -> bool:
        return head.startswith(b"EXPLODE")

    def analyse(self, buf: memoryview, analysis: object) -> None:
        raise KeyError("injected fault")


@pytest.mark.parametrize("fmt", ["json", "sarif"])
def test_an_analyser_failure_does_not_end_the_folder_scan(tmp_path, capsys, monkeypatch, fmt):
    """Next to an unsafe pickle, a file that makes an analyser raise: the scan printed a
    traceback and no JSON. Now the file is UNVERIFIABLE with the reason and the document
    is whole."""
    monkeypatch.setattr(formats, "HANDLERS", [_Exploding(), *formats.HANDLERS])
    (tmp_path / "a-evil.pkl").write_bytes(EVIL)
    (tmp_path / "b-boom.bin").write_bytes(b"EXPLODE" + b"\0" * 64)
    (tmp_path / "c-good.pt").write_bytes(_checkpoint())
    assert main(["scan", "--format", fmt, str(tmp_path)]) == 1
    document = json.loads(capsys.readouterr().out)
    if fmt == "json":
        verdicts = {Path(f["path"]).name: f["verdict"] for f in document["files"]}
        assert verdicts == {
            "a-evil.pkl": "UNSAFE",
            "b-boom.bin": "UNVERIFIABLE",
            "c-good.pt": "SAFE",
        }
        boom = next(f for f in document["files"] if f["path"].endswith("b-boom.bin"))
        assert any("KeyError" in f["message"] for f in boom["findings"])
    else:
        assert document["runs"][0]["results"]


# --- 4. bounded memory -----------------------------------------------------------------


def _zip_bomb(path: Path, inflated: int, *, honest: bool = True) -> None:
    """A torch-style zip whose data.pkl is a valid pickle of ``inflated`` bytes (a
    BINBYTES8 of zeros), deflated to about 1/1000 of that; ``honest`` declares the size."""
    body = b"\x80\x04\x8e" + struct.pack("<Q", inflated - 12)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [compressor.compress(body)]
    crc = zlib.crc32(body)
    zeros = b"\0" * (16 * MiB)
    left = inflated - 12
    while left:
        piece = zeros[: min(left, len(zeros))]
        parts.append(compressor.compress(piece))
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    parts.append(compressor.compress(b"."))
    crc = zlib.crc32(b".", crc)
    parts.append(compressor.flush())
    data = b"".join(parts)
    name = b"bomb/data.pkl"
    declared = inflated if honest else 1000
    fields = (crc, len(data), declared, len(name))
    local = b"PK\3\4" + struct.pack("<HHHHHIIIHH", 20, 0, 8, 0, 0, *fields, 0) + name
    central = (
        b"PK\1\2"
        + struct.pack("<HHHHHHIIIHHHHHII", 20, 20, 0, 8, 0, 0, *fields, 0, 0, 0, 0, 0, 0)
        + name
    )
    end = b"PK\5\6" + struct.pack("<HHHHIIH", 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    path.write_bytes(local + data + central + end)


@pytest.fixture(scope="module")
def bombs() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="tg-bombs-", dir="/tmp"))
    try:
        _zip_bomb(top / "honest.pt", 512 * MiB)
        _zip_bomb(top / "lying.pt", 512 * MiB, honest=False)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_zip_bomb_scan_stays_under_max_memory(bombs):
    """1/2 MB zip whose data.pkl honestly declares 512 MiB: the scan inflated it whole (and
    copied it: 2x). Under --max-memory 256M it is UNVERIFIABLE, and the process's peak
    resident set stays under 256 MiB."""
    for name in ("honest.pt", "lying.pt"):
        rc, out, err, peak = _cli(
            "scan", "--format", "json", "--max-memory", "256M", str(bombs / name)
        )
        assert rc == 1, err
        (file,) = json.loads(out)["files"]
        assert file["verdict"] == "UNVERIFIABLE"
        assert peak < 256 * MiB, f"scan {name}: peak {peak / MiB:.0f} MiB"


@pytest.mark.slow
def test_zip_bomb_within_the_budget_is_analysed_in_one_copy(bombs):
    """Under the default 1 GiB, the 512 MiB pickle fits: it is inflated once (the declared
    size, never more) and analysed; peak is the member plus the interpreter."""
    rc, out, err, peak = _cli("scan", "--format", "json", str(bombs / "honest.pt"), timeout=60)
    (file,) = json.loads(out)["files"]
    assert file["format"] == "torch-zip"
    assert peak < 512 * MiB + 128 * MiB, f"peak {peak / MiB:.0f} MiB"


def test_zip_bomb_load_is_refused_under_its_budget(bombs):
    """``trainguard.load`` inflated the member, then copied it for the unpickler (2.3 GB
    for a 1 GB member). With max_memory=256 MiB it is refused, peak near the interpreter's."""
    for name in ("honest.pt", "lying.pt"):
        rc, _, err, peak = _child(_LOADER, str(bombs / name), str(256 * MiB))
        assert rc == 3, err
        assert "UnsafeCheckpointError" in err or "CheckpointError" in err
        # the library's budget counts what the load allocates, not torch's own ~400 MiB
        assert peak < 256 * MiB + 512 * MiB, f"load {name}: peak {peak / MiB:.0f} MiB"


def test_convert_of_a_zip_bomb_is_bounded_and_leaves_nothing(bombs, tmp_path):
    """convert aborted at 6.8 GB (SIGABRT), leaving a .tmp. Now the pickle passes analysis
    (512 MiB of zero bytes is harmless) but rebuilding it does not fit the default 1 GiB:
    refused (exit 2), peak under --max-memory, and the folder holds no temporary file."""
    out = tmp_path / "out.safetensors"
    rc, _, err, peak = _cli("convert", str(bombs / "honest.pt"), "-o", str(out))
    assert rc == 2, err
    assert "max-memory" in err
    assert peak < 1 << 30, f"peak {peak / MiB:.0f} MiB"
    assert list(tmp_path.iterdir()) == []


def test_convert_of_a_stride_zero_view_is_refused_before_copying(tmp_path):
    """A 4-byte storage seen as 10**10 elements through a stride-0 view: valid to load (the
    view stays in its storage), but ``.contiguous()`` allocated 40 GB in convert."""
    src = tmp_path / "wide.pt"
    torch.save({"w": torch.zeros(1).expand(10**10)}, src)
    out = tmp_path / "out.safetensors"
    rc, _, err, peak = _cli("convert", str(src), "-o", str(out))
    assert rc == 2, err
    assert "memory limit" in err
    assert "max-memory" in err
    assert peak < 1 << 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.pt"]


def test_stdin_is_read_within_the_budget():
    """``scan - < /dev/zero`` read until the machine ran out of memory."""
    rc, _, err, peak = _cli("scan", "--max-memory", "64M", "-", stdin="/dev/zero", timeout=20)
    assert rc == 2
    assert "limit" in err
    assert peak < 64 * MiB + 16 * MiB


def test_pax_header_declaring_a_gigabyte(tmp_path):
    """A tar whose pax header claims 1 GiB of records: tarfile's read allocated the declared
    size before reading what the file holds."""
    import tarfile

    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 1 << 30
    path = tmp_path / "pax.tar"
    path.write_bytes(header.tobuf(format=tarfile.USTAR_FORMAT) + b"10 a=bcdef\n")
    rc, _, err, peak = _cli("scan", str(path))
    assert rc == 1, err
    assert peak < 256 * MiB


def test_a_pickle_of_many_small_values_is_bounded(tmp_path):
    """8 MB of EMPTY_LIST/APPEND: each byte pair makes an object (about 100x the file's
    size in the simulation and in a real unpickler). The opcode count is held to the
    budget."""
    path = tmp_path / "lists.pkl"
    path.write_bytes(b"\x80\x02]" + b"]a" * (4 * MiB) + b".")
    rc, out, err, peak = _cli("scan", "--format", "json", "--max-memory", "128M", str(path))
    assert rc == 1, err
    (file,) = json.loads(out)["files"]
    assert file["verdict"] == "UNVERIFIABLE"
    assert any("max-memory" in f["message"] for f in file["findings"])
    assert peak < 128 * MiB


def test_max_memory_must_be_a_size(capsys):
    assert main(["scan", "--max-memory", "lots", "x"]) == 2
    assert "lots" in capsys.readouterr().err


# --- 5. convert: inputs and outputs refused up front -----------------------------------


def test_convert_refuses_a_fifo_or_device_input(tmp_path):
    """A FIFO with no writer made convert wait forever on the open."""
    os.mkfifo(tmp_path / "pipe")
    for source in (tmp_path / "pipe", Path("/dev/zero")):
        rc, _, err, _ = _cli("convert", str(source), "-o", str(tmp_path / "o.st"), timeout=10)
        assert rc == 2, err
        assert str(source) in err
    assert not (tmp_path / "o.st").exists()


def test_convert_symlink_loop_input_is_one_line(tmp_path):
    """``Path.resolve`` raised ``RuntimeError: Symlink loop``."""
    os.symlink("loop", tmp_path / "loop")
    rc, _, err, _ = _cli("convert", str(tmp_path / "loop"), "-o", str(tmp_path / "o.st"))
    assert rc == 2
    assert "symbolic links" in err
    assert len(err.strip().splitlines()) == 1


def test_convert_refuses_a_long_output_name_before_loading(tmp_path):
    """``OSError: File name too long`` came after the whole load; now before it: an unsafe
    input is not even read (exit 2 for the name, not 1 for the input)."""
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(EVIL)
    rc, _, err, _ = _cli("convert", str(evil), "-o", str(tmp_path / ("x" * 300)))
    assert rc == 2
    assert "too long" in err


def test_convert_never_replaces_a_device(tmp_path):
    """``convert good.pt -o /dev/full --force`` renamed a regular file over the device.

    The test makes its own node for /dev/full's device (1, 7) in a temporary folder, so
    code that still has the bug replaces that node, not the system's."""
    good = tmp_path / "good.pt"
    good.write_bytes(_checkpoint())
    full = tmp_path / "full"
    try:
        os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except OSError as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    rc, _, err, _ = _cli("convert", str(good), "-o", str(full), "--force")
    assert rc == 2
    assert "character device" in err
    after = os.stat(full)
    assert stat.S_ISCHR(after.st_mode)
    assert after.st_rdev == os.makedev(1, 7)


def test_convert_to_an_unwritable_folder_leaves_nothing(shared_tmp):
    _unprivileged_or_skip()
    good = shared_tmp / "good.pt"
    good.write_bytes(_checkpoint())
    shared_tmp.chmod(0o555)  # the child is uid 0 without DAC override: owner bits apply
    rc, _, err, _ = _cli(
        "convert", str(good), "-o", str(shared_tmp / "o.safetensors"), unprivileged=True
    )
    assert rc == 2
    assert "permission denied" in err.lower()
    assert sorted(p.name for p in shared_tmp.iterdir()) == ["good.pt"]


def test_convert_still_writes_a_good_checkpoint(tmp_path):
    good = tmp_path / "good.pt"
    good.write_bytes(_checkpoint())
    rc, _, err, _ = _cli("convert", str(good), "-o", str(tmp_path / "o.safetensors"))
    assert rc == 0, err
    loaded = trainguard.load(tmp_path / "o.safetensors")
    assert torch.equal(loaded["w"], torch.arange(16, dtype=torch.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pt", "o.safetensors"]
