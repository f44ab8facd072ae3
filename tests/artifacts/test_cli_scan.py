"""The scan command's contract: exit statuses, JSON on stdout, SARIF 2.1.0, stdin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainguard.cli import main

EVIL = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00echoq\x01\x85q\x02Rq\x03."
SAFE = b"\x80\x02}q\x00X\x05\x00\x00\x00epochq\x01K\x03s."


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "evil.bin").write_bytes(EVIL)
    (tmp_path / "models" / "state.pkl").write_bytes(SAFE)
    (tmp_path / "models" / "truncated.pkl").write_bytes(SAFE[:-4])
    (tmp_path / "models" / "config.json").write_text('{"hidden_size": 32}\n')  # skipped
    return tmp_path


def test_exit_statuses(folder, capsys):
    assert main(["scan", "models/state.pkl"]) == 0
    assert main(["scan", "models"]) == 1
    assert main(["scan", "models/truncated.pkl"]) == 1
    assert main(["scan", "models/missing.pt"]) == 2
    assert main(["scan"]) == 2
    assert main(["scan", "--format", "xml", "models"]) == 2


def test_text_goes_to_stderr_one_line_per_file(folder, capsys):
    main(["scan", "models"])
    out, err = capsys.readouterr()
    assert out == ""
    lines = [line for line in err.splitlines() if line.startswith(("SAFE", "UNSAFE", "UNVERIF"))]
    assert len(lines) == 3
    assert any(line.startswith("UNSAFE") and "os.system" in line for line in lines)


def test_json_golden(folder, capsys, golden):
    assert main(["scan", "--format", "json", "models"]) == 1
    golden(json.loads(capsys.readouterr().out), "scan.json")


def test_sarif_golden(folder, capsys, golden):
    assert main(["scan", "--format", "sarif", "models"]) == 1
    log = json.loads(capsys.readouterr().out)
    assert log["version"] == "2.1.0"
    run = log["runs"][0]
    assert run["tool"]["driver"]["name"] == "trainguard"
    for result in run["results"]:
        assert result["ruleId"] == run["tool"]["driver"]["rules"][result["ruleIndex"]]["id"]
        assert result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    run["tool"]["driver"]["version"] = "<version>"
    golden(log, "scan.sarif.json")


def test_stdin_in_a_real_subprocess(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    for data, status in ((path.read_bytes(), 0), (EVIL, 1)):
        done = subprocess.run(
            [sys.executable, "-m", "trainguard", "scan", "--format", "json", "-"],
            input=data,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == status, done.stderr
        assert json.loads(done.stdout)["files"][0]["path"] == "-"


# --- folders as they are: skipped files, --include/--exclude, -o, the summary ------------


def test_summary_counts_analysed_and_skipped_and_lists_skipped_files_with_v(folder, capsys):
    assert main(["scan", "models"]) == 1
    err = capsys.readouterr().err
    assert "config.json" not in err
    assert err.splitlines()[-1] == (
        "scanned 4 file(s): 3 analysed (1 safe, 1 unsafe, 1 unverifiable), "
        "1 skipped (not model files; -v lists them)"
    )
    assert main(["scan", "-v", "models"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("SKIPPED") and "models/config.json" in line for line in lines)


def test_a_text_file_named_alone_is_skipped_with_a_line_saying_why(folder, capsys):
    """Exit 0 (nothing unsafe was found), never a SAFE line: the line says it was skipped
    and why, and the JSON verdict is SKIPPED, not SAFE."""
    assert main(["scan", "models/config.json"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("SKIPPED")
    assert "not a model file" in err
    assert "SAFE " not in err
    assert main(["scan", "--format", "json", "models/config.json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["verdict"] == "SKIPPED"
    assert document["files"][0]["verdict"] == "SKIPPED"


def test_include_and_exclude_globs(folder, capsys):
    (folder / "models" / "sub" / "deep").mkdir(parents=True)
    (folder / "models" / "sub" / "deep" / "evil.pt").write_bytes(EVIL)
    (folder / "models" / "sub" / "state.pt").write_bytes(SAFE)

    def scanned(*options: str) -> tuple[int, list[str], int]:
        status = main(["scan", "--format", "json", *options, "models"])
        document = json.loads(capsys.readouterr().out)
        return status, sorted(f["path"] for f in document["files"]), document["excluded"]

    assert scanned("--exclude", "evil.*", "--exclude", "truncated.pkl")[:2] == (
        0,
        ["models/config.json", "models/state.pkl", "models/sub/state.pt"],
    )
    # ** spans folders, none included; a pattern with / is anchored at the folder named
    assert scanned("--include", "**/*.pt") == (
        1,
        ["models/sub/deep/evil.pt", "models/sub/state.pt"],
        4,
    )
    assert scanned("--include", "sub/*.pt")[1] == ["models/sub/state.pt"]
    assert scanned("--include", "*.pt", "--exclude", "deep")[1] == ["models/sub/state.pt"]
    # a file named on the command line is read whatever the globs say
    assert main(["scan", "--exclude", "*", "models/evil.bin"]) == 1
    capsys.readouterr()
    assert main(["scan", "--exclude", "*", "models"]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == (
        "scanned 0 file(s): 0 analysed, 4 excluded by --include/--exclude"  # sub/ not entered
    )


@pytest.mark.parametrize("fmt", ["text", "json", "sarif"])
def test_output_file_holds_the_report(folder, capsys, fmt):
    assert main(["scan", "--format", fmt, "-o", "out/report", "models"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("scanned 4 file(s): 3 analysed")
    assert "report written to out/report" in err
    text = (folder / "out" / "report").read_text()
    if fmt == "text":
        assert "\x1b[" not in text  # no colours in a file
        assert text.splitlines()[-1].startswith("scanned 4 file(s)")
        assert any(line.startswith("UNSAFE") and "evil.bin" in line for line in text.splitlines())
    else:
        main(["scan", "--format", fmt, "models"])
        assert json.loads(text) == json.loads(capsys.readouterr().out)
    (folder / "pipe").mkdir()
    assert main(["scan", "-o", "pipe", "models"]) == 2  # a folder is refused before the scan


def test_sarif_lists_no_skipped_file_as_a_result(folder, capsys):
    for name in ("notes.txt", "train.py", "LICENSE", "config.yaml"):
        (folder / "models" / name).write_text(
            {"notes.txt": "This is a note\n", "train.py": "import torch\nx = 1\n"}.get(
                name, "config: x\nlr: 0.1\n"
            )
        )
    assert main(["scan", "--format", "sarif", "models"]) == 1
    run = json.loads(capsys.readouterr().out)["runs"][0]
    uris = {
        r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in run["results"]
    }
    assert uris == {"models/evil.bin", "models/truncated.pkl"}
    notes = run["invocations"][0]["toolExecutionNotifications"]
    assert [n["level"] for n in notes] == ["note"]
    assert notes[0]["message"]["text"].startswith("5 file(s) skipped")
