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
