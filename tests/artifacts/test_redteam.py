"""Red-team findings against ``scan``, ``load`` and ``convert`` (after issue 10).

One test per finding; each docstring says what the input is and what went wrong before
the fix. Payloads would only create the session's marker file, which must never appear.
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import pickletools
import struct
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest
import torch

import trainguard
from trainguard.artifacts import scanner
from trainguard.artifacts.interface import Verdict
from trainguard.cli import main

# In a child: scan ARGV[1] with the CLI, cutting the file to 100 bytes once it is open
# (what another process truncating a checkpoint during a scan does).
_TRUNCATE_WHILE_SCANNING = """
import os, sys
from trainguard.artifacts import scanner
original = scanner.report_for
def cut_short(path, buf, budget=None):
    os.truncate(path, 100)
    return original(path, buf, budget)
scanner.report_for = cut_short
from trainguard.cli import main
sys.exit(main(["scan", "--format", "json", sys.argv[1]]))
"""


def test_file_truncated_while_mapped_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """A large checkpoint cut short by another process while ``scan`` has it mapped.

    Before: touching the mapped pages past the new end raised SIGBUS and killed the whole
    scan (exit -7, no JSON, no verdict for the other files). Now a large file is mapped
    only in a forked child, and the file is listed as an error (exit 2).
    """
    path = tmp_path / "big.pt"
    size = 24 << 20
    assert size > getattr(scanner, "SNAPSHOT_MAX", 0)  # mapped, not read
    torch.save({"w": torch.zeros(size, dtype=torch.uint8)}, path)
    done = subprocess.run(
        [sys.executable, "-c", _TRUNCATE_WHILE_SCANNING, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    document = json.loads(done.stdout)
    assert document["files"] == []
    assert "big.pt" in document["errors"][0]
    assert "cut short" in document["errors"][0]
    assert "Traceback" not in done.stderr


def test_file_changed_while_read_is_an_error(tmp_path: Path) -> None:
    """A small file rewritten (a longer payload appended) while it is being scanned.

    Before: the scan judged the bytes of the old version and could say SAFE for a file
    that no longer held them. Now a size or mtime change during the scan is an error.
    """
    path = tmp_path / "small.pt"
    torch.save({"w": torch.zeros(4)}, path)
    code = _TRUNCATE_WHILE_SCANNING.replace(
        "os.truncate(path, 100)", "open(path, 'ab').write(b'more')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "changed while it was scanned" in json.loads(done.stdout)["errors"][0]


def test_very_deep_folder_is_scanned_not_a_recursion_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder tree deeper than the recursion limit, with an unsafe pickle at the bottom.

    Before: ``os.walk`` recursed once per level and raised RecursionError: ``scan
    --format json`` printed no document at all ("input nested too deeply", exit 2), so
    the pickle at the bottom was never reported. Now the walk keeps its own stack.
    (The limit is lowered to 400 levels above this frame, so the tree can stay small: a
    1,100-level tree takes seconds to delete.)
    """
    here = tmp_path / "deep"
    here.mkdir()
    monkeypatch.chdir(here)  # short relative names keep the path under PATH_MAX
    for _ in range(500):
        os.mkdir("d")
        os.chdir("d")
    Path("evil.pkl").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    os.chdir(tmp_path)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + 400)
    try:
        status = main(["scan", "--format", "json", "deep"])
    finally:
        sys.setrecursionlimit(limit)
    assert status == 1
    document = json.loads(capsys.readouterr().out)
    assert [f["verdict"] for f in document["files"]] == ["UNSAFE"]
    assert document["files"][0]["path"].endswith("/d/evil.pkl")


def test_folder_link_out_of_the_scanned_folder_is_refused_not_walked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint folder holding ``escape -> /`` (a link to the root of the machine).

    Before: folder links were followed wherever they led, so ``scan ckpt`` walked the
    whole file system (/proc, /sys, every mount): still running after 60 s. Now a folder
    link that leaves the folders named is listed as an error (exit 2) and not followed;
    links that stay inside (``latest -> step_2``) are still walked.
    """
    ckpt = tmp_path / "ckpt"
    (ckpt / "step_2").mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, ckpt / "step_2" / "model.pt")
    (ckpt / "latest").symlink_to("step_2")
    (ckpt / "escape").symlink_to("/")
    assert main(["scan", "--format", "json", str(ckpt)]) == 2
    document = json.loads(capsys.readouterr().out)
    assert [f["path"] for f in document["files"]] == [str(ckpt / "latest" / "model.pt")]
    assert len(document["errors"]) == 1
    assert "escape: a folder link to /, outside the folders scanned" in document["errors"][0]
    assert main(["scan", str(ckpt / "latest")]) == 0


def test_pickle_opening_with_a_protocol_4_opcode_is_recognised(tmp_path: Path) -> None:
    """A pickle with no PROTO that starts with FRAME (or SHORT_BINUNICODE, EMPTY_SET...).

    The unpickler does not check opcodes against a protocol, so ``pickle.load`` runs such
    a stream; before, the scanner's sniffing only knew protocol 0/1 first opcodes and
    called the file "unknown" (UNSUPPORTED), never analysing it.
    """
    body = b"\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R."
    for name, data in {
        "frame.pkl": b"\x95" + struct.pack("<Q", len(body)) + body,
        "short_binunicode.pkl": body,
        "empty_set.pkl": b"\x8f0" + body,
    }.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert any(op.name == "STACK_GLOBAL" for op, _, _ in pickletools.genops(data))
        report = trainguard.scan(path).files[0]
        assert (report.format, report.verdict) == ("pickle", Verdict.UNSAFE), name


def _safetensors_pickle_polyglot(marker: Path) -> bytes:
    # The 8-byte header length 0x2253 reads as the pickle opcode S (a string up to the
    # next newline) and its quote; the JSON ends a string at a newline, '}}' push two
    # dicts, and the tensor's bytes hold the rest of the pickle.
    payload = f"00cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    length = 0x2253
    n = len(payload)
    head = f'{{"t":{{"dtype":"U8","shape":[{n}],"data_offsets":[0,{n}]}},"__metadata__":{{"k":"'
    tail = '"\n}}'
    header = (head + "v" * (length - len(head) - len(tail)) + tail).encode()
    data = b'S"' + b"\x00" * 6 + header + payload
    assert struct.unpack("<Q", data[:8])[0] == len(header)
    return data


def test_safetensors_that_is_also_a_pickle_is_unsafe(tmp_path: Path, marker: Path) -> None:
    """A valid safetensors file whose first bytes are also a pickle calling os.system.

    ``safetensors`` loads it as one uint8 tensor, but ``pickle.load`` and
    ``torch.load(weights_only=False)`` (which unpickle from byte 0 anything that is not
    a ZIP, e.g. a ``pytorch_model.bin``) run the payload. Before: ``scan`` said SAFE (exit
    0) and ``trainguard.load`` loaded it. Now the file is UNSAFE as a polyglot.
    """
    from safetensors.torch import load_file

    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(_safetensors_pickle_polyglot(marker))
    assert list(load_file(path)) == ["t"]  # a real safetensors file
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(path.read_bytes())]
    assert ("GLOBAL", "os system") in ops  # and a real pickle
    assert ops[-1][0] == "STOP"

    report = trainguard.scan(path).files[0]
    assert report.verdict is Verdict.UNSAFE
    assert any(f.detector == "polyglot" for f in report.findings)
    assert main(["scan", str(path)]) == 1
    with pytest.raises(trainguard.UnsafeCheckpointError):
        trainguard.load(path)
    assert not marker.exists()


def test_ordinary_safetensors_are_not_polyglots(tmp_path: Path) -> None:
    """The polyglot check stays quiet on safetensors whose length byte is an opcode."""
    from safetensors.torch import save_file

    for n in (1, 7, 40, 300):
        path = tmp_path / f"m{n}.safetensors"
        save_file({f"layer.{i}": torch.zeros(i + 1) for i in range(n)}, path)
        assert trainguard.scan(path).files[0].verdict is Verdict.SAFE


def _name_with(tmp_path: Path, raw: bytes) -> Path:
    folder = os.fsencode(tmp_path)
    with open(folder + b"/" + raw, "wb") as f:
        f.write(b"cos\nsystem\n(S'true'\ntR.")
    return tmp_path


def test_json_and_sarif_names_are_valid_and_recoverable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unsafe pickle whose name holds bytes that are not UTF-8 (``evil\\xff.pkl``).

    Before: the JSON held a lone surrogate (``"evil\\udcff.pkl"``), which strict parsers
    reject and others turn into U+FFFD (the name was lost), and the SARIF ``uri`` was the
    raw name, not a URI. Now ``path`` is valid text, ``path_base64`` holds the exact
    bytes, and the SARIF uri is percent-encoded.
    """
    raw = b"evil\xff #%.pkl"
    _name_with(tmp_path, raw)
    assert main(["scan", "--format", "json", str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert "\\udc" not in text
    file = json.loads(text)["files"][0]
    assert file["path"].encode("utf-8")  # valid Unicode
    assert base64.b64decode(file["path_base64"]) == os.fsencode(tmp_path) + b"/" + raw

    assert main(["scan", "--format", "sarif", str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert "\\udc" not in text
    uri = json.loads(text)["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    uri = uri["artifactLocation"]["uri"]
    assert " " not in uri
    assert "#" not in uri
    assert unquote_to_bytes(uri) == os.fsencode(tmp_path) + b"/" + raw


def test_text_output_shows_control_characters_in_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unsafe pickle named ``x\\n\\x1b[2KSAFE  all-good.pt (torch-zip)``.

    Before: the text report printed the name as is: the newline and the terminal escape
    (erase line) made a fake ``SAFE`` line appear on its own. Now control characters,
    escapes and bidi overrides in names and messages are shown escaped.
    """
    _name_with(tmp_path, b"x\n\x1b[2KSAFE         all-good.pt (torch-zip)\xe2\x80\xae")
    assert main(["scan", str(tmp_path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2  # one line for the file, one summary
    assert lines[0].startswith("UNSAFE")
    assert "\\x0a\\x1b[2KSAFE" in lines[0]
    assert "\x1b[2K" not in lines[0]
    assert "\\u202e" in lines[0]


_PEAK_OF_SCAN = """
import sys
from trainguard.cli import main
rc = main(sys.argv[1:])
peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]
sys.stderr.write('@@peak %s\\n' % peak)
sys.exit(rc)
"""


@pytest.mark.slow
def test_json_and_sarif_of_a_huge_folder_stay_under_max_memory(tmp_path: Path) -> None:
    """A folder of 20,000 (empty) files scanned with ``--max-memory 48M``.

    Before: the JSON and SARIF documents were built whole (a dict per file, then
    ``json.dumps`` with an indent, which holds every piece): peak 88 MB / 100 MB for 20,000
    files, 357 MB for 100,000, whatever ``--max-memory`` said. Now they are written one
    file (one result) at a time, with the same text.
    """
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(20_000):
        (folder / f"f{i}").touch()
    for fmt in ("json", "sarif"):
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_OF_SCAN, "scan", str(folder), "--format", fmt]
            + ["--max-memory", "48M"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr  # empty files are not model files: skipped
        document = json.loads(done.stdout)
        if fmt == "json":
            assert len(document["files"]) == 20_000
        else:
            assert len(document["runs"][0]["results"]) == 0  # skipped files are no results
        peak_kb = int(done.stderr.rsplit("@@peak ", 1)[1].split()[0])
        assert peak_kb * 1024 < 48 << 20, (fmt, peak_kb)


def test_convert_output_gets_the_umask_mode_not_0600(tmp_path: Path) -> None:
    """``convert model.pt -o model.safetensors`` under the usual umask 022.

    Before: the output was always mode 0600 (``safetensors.save_file`` and the temporary
    file both make it so), unlike every other way of writing a model: colleagues who
    read the checkpoint could not read the converted file. Now it is 0666 less the umask.
    """
    from trainguard.artifacts.convert import convert

    source = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, source)
    old = os.umask(0o022)
    try:
        convert(source, tmp_path / "a.safetensors")
        os.umask(0o077)
        convert(source, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.safetensors").stat().st_mode & 0o777 == 0o600


def test_convert_json_names_are_valid_unicode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``convert --format json`` of ``model\\xff.pt`` (a name that is not UTF-8).

    Before: ``"input"`` held a lone surrogate (``"model\\udcff.pt"``), which strict JSON
    parsers reject. Now every string in the document is valid Unicode.
    """
    source = os.fsencode(tmp_path) + b"/model\xff.pt"
    torch.save({"w": torch.zeros(2)}, os.fsdecode(source))
    out = tmp_path / "out.safetensors"
    assert main(["convert", os.fsdecode(source), "-o", str(out), "--format", "json"]) == 0
    text = capsys.readouterr().out
    assert "\\udc" not in text
    assert json.loads(text)["input"].endswith("model\\xff.pt")
