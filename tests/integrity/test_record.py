"""verify-env without a manifest: a real venv's distribution against its RECORD,
its ``__pycache__`` against its sources, and its start-up hooks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.integrity import attacks
from trainguard.cli import EXIT_CLEAN, EXIT_ERROR, EXIT_FINDINGS, main
from trainguard.integrity import verify_environment


def check(env, **kwargs):
    return verify_environment(packages=["demopkg"], site_packages=[env.site], environ={}, **kwargs)


def only(report, kind):
    hits = [d for d in report.drift if d.kind == kind]
    assert hits, f"no {kind} in {[d.to_dict() for d in report.drift]}"
    return hits


def assert_attributed(d):
    """Every drift entry points at who and when."""
    assert d.owner  # a user name
    assert str(d.mtime).endswith("+00:00")
    assert str(d.ctime).endswith("+00:00")


def test_untouched_environment_is_clean(env, capsys):
    report = check(env)
    assert report.clean, [d.to_dict() for d in report.drift]
    assert report.distributions == ("demopkg",)
    assert report.files_checked >= len(attacks_files := list(env.pkg.rglob("*.py")))
    assert attacks_files
    status = main(
        [
            "verify-env",
            "--packages",
            "demopkg",
            "--site-packages",
            str(env.site),
            "--format",
            "json",
        ]
    )
    assert status == EXIT_CLEAN
    assert json.loads(capsys.readouterr().out)["clean"] is True


def test_edited_source_is_modified(env):
    target = attacks.edit_source(env.pkg)
    report = check(env)
    (d,) = only(report, "modified")
    assert d.path == str(target)
    assert d.root == "demopkg"
    assert d.size_before == len(b"def double(x):\n    return 2 * x\n")
    assert d.size_after == target.stat().st_size
    assert_attributed(d)


def test_dropped_module_is_added(env):
    target = attacks.drop_module(env.pkg)
    (d,) = only(check(env), "added")
    assert d.path == str(target)
    assert_attributed(d)


def test_pth_with_import_line_is_a_startup_hook(env, tmp_path):
    marker = tmp_path / "marker"
    target = attacks.add_pth(env.site, marker)
    (d,) = only(check(env), "startup-hook")
    assert d.path == str(target)
    assert "import pathlib" in d.detail
    assert_attributed(d)
    assert not marker.exists()


def test_swapped_pyc_with_genuine_header_is_caught(env):
    pyc = attacks.swap_pyc(env.pkg)
    # The attack is live: the venv's Python runs the swapped code, source untouched.
    ran = subprocess.run(
        [str(env.python), "-c", "import demopkg.core as c; print(c.VALUE)"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ.get("PATH", "")},
    )
    assert ran.stdout.strip() == "tampered"
    report = check(env)
    (d,) = only(report, "pyc-mismatch")
    assert d.path == str(pyc)
    assert "header matches" in d.detail
    assert_attributed(d)
    assert not [x for x in report.drift if x.kind == "modified"]  # core.py itself is intact


def test_deleted_file_is_removed(env):
    target = attacks.delete_file(env.pkg)
    (d,) = only(check(env), "removed")
    assert d.path == str(target)
    assert d.size_before == len(b"DEPTH = 2\n")
    assert d.size_after is None


def test_pyc_without_source_is_reported(env):
    target = attacks.orphan_pyc(env.pkg)
    (d,) = only(check(env), "pyc-orphan")
    assert d.path == str(target)


def test_stale_pyc_after_a_source_edit_is_not_double_counted(env):
    """Editing a .py leaves its .pyc stale; Python would recompile, so only the .py counts."""
    attacks.edit_source(env.pkg)
    kinds = [d.kind for d in check(env).drift]
    assert kinds == ["modified"]


def test_allowlist_moves_drift_to_allowed_and_keeps_it_visible(env, tmp_path, capsys):
    attacks.edit_source(env.pkg)
    allow_file = tmp_path / "allow.txt"
    allow_file.write_text("# the vendor patches util.py\n*/demopkg/util.py\n")
    report = check(env, allow=[f"@{allow_file}"])
    assert report.clean
    (d,) = report.allowed
    assert d.allowed_by == "*/demopkg/util.py"
    status = main(
        [
            "verify-env",
            "--packages",
            "demopkg",
            "--site-packages",
            str(env.site),
            "--allow",
            "util.py",
            "--format",
            "json",
        ]
    )
    assert status == EXIT_CLEAN
    doc = json.loads(capsys.readouterr().out)
    assert doc["allowed"][0]["allowed_by"] == "util.py"


def test_pythonpath_into_a_world_writable_place_is_a_startup_hook(env, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    report = verify_environment(
        packages=["demopkg"], site_packages=[env.site], environ={"PYTHONPATH": str(shared)}
    )
    (d,) = only(report, "startup-hook")
    assert d.root == "PYTHONPATH"
    assert "writable" in d.detail


def test_cli_exits_1_on_drift_and_prints_who_and_when(env, capsys):
    attacks.drop_module(env.pkg)
    status = main(["verify-env", "--packages", "demopkg", "--site-packages", str(env.site)])
    assert status == EXIT_FINDINGS
    err = capsys.readouterr().err
    assert "added" in err
    assert "owner" in err
    assert "injected.py" in err


def test_unknown_distribution_is_an_error(env):
    status = main(["verify-env", "--packages", "nope", "--site-packages", str(env.site)])
    assert status == EXIT_ERROR


def test_real_subprocess_json_document(env):
    attacks.delete_file(env.pkg)
    done = subprocess.run(
        [
            sys_python(),
            "-m",
            "trainguard",
            "verify-env",
            "--packages",
            "demopkg",
            "--site-packages",
            str(env.site),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == EXIT_FINDINGS, done.stderr
    doc = json.loads(done.stdout)
    # The deleted module's cache file is left behind without a source.
    assert sorted(d["kind"] for d in doc["drift"]) == ["pyc-orphan", "removed"]


def sys_python():
    return sys.executable


def test_real_torch_is_clean_and_quick():
    """The torch in this project's venv is untouched: RECORD and every .pyc agree."""
    pytest.importorskip("torch")
    started = time.perf_counter()
    report = verify_environment(packages=["torch"], environ={})
    assert report.clean, [d.to_dict() for d in report.drift[:5]]
    assert report.files_checked > 5000
    assert time.perf_counter() - started < 40
