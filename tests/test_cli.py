"""The command line's shared contract: version, entry points, exit statuses."""

from __future__ import annotations

import subprocess
import sys

from trainguard import __version__
from trainguard.cli import EXIT_ERROR, main


def test_version_from_main(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_python_dash_m_runs():
    done = subprocess.run(
        [sys.executable, "-m", "trainguard", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    assert __version__ in done.stdout


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["no-such-command"]) == EXIT_ERROR
    assert "no-such-command" in capsys.readouterr().err
