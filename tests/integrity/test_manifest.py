"""seal / verify-env MANIFEST: every file of a real venv against a signed manifest."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from tests.integrity import attacks
from trainguard.cli import EXIT_CLEAN, EXIT_ERROR, EXIT_FINDINGS, main
from trainguard.integrity import IntegrityError, seal, verify_environment
from trainguard.integrity.manifest import SCHEMA


@pytest.fixture
def sealed(env, keys, tmp_path):
    out = tmp_path / "env.manifest"
    status = main(
        [
            "seal",
            "--packages",
            "demopkg",
            "--site-packages",
            str(env.site),
            "--key",
            str(keys.private),
            "-o",
            str(out),
        ]
    )
    assert status == EXIT_CLEAN
    return out


def verify(env, manifest, pubkey, **kwargs):
    return verify_environment(
        manifest, public_key=pubkey, site_packages=[env.site], environ={}, **kwargs
    )


def kinds(report):
    return sorted(d.kind for d in report.drift)


def test_manifest_follows_the_documented_schema(sealed, env):
    doc = json.loads(sealed.read_text())
    assert doc["schema"] == SCHEMA
    body = doc["body"]
    assert body["hash"] == "blake3"
    assert set(body["sealed"]) >= {"user", "host", "time"}
    assert body["interpreter"]["version"] == sys.version.split()[0]
    (dist,) = [r for r in body["roots"] if r["kind"] == "distribution"]
    assert (dist["name"], dist["version"]) == ("demopkg", "1.0")
    entry = next(f for f in dist["files"] if f["path"] == "demopkg/core.py")
    assert entry["mode"] == "0644"
    assert len(entry["hash"]) == 64
    assert any(f["path"].endswith(".pyc") for f in dist["files"])  # caches are sealed too
    assert doc["signature"]["algorithm"] == "ed25519"


def test_untouched_environment_is_clean(env, sealed, keys):
    report = verify(env, sealed, keys.public)
    assert report.clean, [d.to_dict() for d in report.drift]
    assert report.signature == "valid"
    assert (
        main(
            [
                "verify-env",
                str(sealed),
                "--pubkey",
                str(keys.public),
                "--site-packages",
                str(env.site),
            ]
        )
        == EXIT_CLEAN
    )


@pytest.mark.parametrize(
    ("attack", "kind"),
    [
        (attacks.edit_source, "modified"),
        (attacks.drop_module, "added"),
        (attacks.swap_pyc, "pyc-mismatch"),
        (attacks.delete_file, "removed"),
        (attacks.make_executable, "mode-changed"),
        (attacks.orphan_pyc, "pyc-orphan"),
    ],
)
@pytest.mark.parametrize("fast", [False, True])
def test_each_attack_lands_in_its_category(env, sealed, keys, attack, kind, fast):
    target = attack(env.pkg)
    report = verify(env, sealed, keys.public, fast=fast)
    assert kind in kinds(report)
    (d,) = [x for x in report.drift if x.kind == kind]
    assert d.path == str(target)
    assert d.root == "demopkg"
    if kind != "removed":
        assert d.owner
        assert d.mtime
        assert d.ctime
    if kind == "mode-changed":
        assert d.mode_before == 0o644
        assert d.mode_after is not None
        assert d.mode_after & stat.S_IXUSR
    assert not report.clean


def test_new_pth_is_a_startup_hook(env, sealed, keys, tmp_path):
    marker = tmp_path / "marker"
    target = attacks.add_pth(env.site, marker)
    report = verify(env, sealed, keys.public)
    (d,) = report.drift
    assert (d.kind, d.path) == ("startup-hook", str(target))
    assert not marker.exists()


def test_rewritten_pyc_with_the_same_code_is_not_drift(env, sealed, keys):
    """Python rewrites caches (a touched source); same code is a note, not an alarm."""
    pyc = next((env.pkg / "__pycache__").glob("util.*.pyc"))
    data = bytearray(pyc.read_bytes())
    data[8:12] = (int.from_bytes(data[8:12], "little") + 7).to_bytes(4, "little")
    pyc.write_bytes(bytes(data))
    report = verify(env, sealed, keys.public)
    assert report.clean, [d.to_dict() for d in report.drift]
    assert any("holds its source's code" in n for n in report.notes)


def _flip_hex(text: str, start: int) -> str:
    i = start
    while text[i] not in "0123456789abcdef":
        i += 1
    flipped = "0" if text[i] != "0" else "1"
    return text[:i] + flipped + text[i + 1 :]


def test_one_changed_byte_in_the_body_exits_1(env, sealed, keys, capsys):
    text = sealed.read_text()
    at = text.index('"hash": "', text.index('"demopkg/core.py"')) + len('"hash": "')
    sealed.write_text(_flip_hex(text, at))
    args = [
        "verify-env",
        str(sealed),
        "--pubkey",
        str(keys.public),
        "--site-packages",
        str(env.site),
    ]
    assert main([*args, "--format", "json"]) == EXIT_FINDINGS
    doc = json.loads(capsys.readouterr().out)
    assert doc["signature"] == "invalid"


def test_one_changed_byte_in_the_signature_exits_1(env, sealed, keys):
    doc = json.loads(sealed.read_text())
    value = doc["signature"]["value"]
    doc["signature"]["value"] = ("B" if value[0] != "B" else "C") + value[1:]
    sealed.write_text(json.dumps(doc))
    report = verify(env, sealed, keys.public)
    assert report.signature == "invalid"
    assert not report.clean
    assert (
        main(
            [
                "verify-env",
                str(sealed),
                "--pubkey",
                str(keys.public),
                "--site-packages",
                str(env.site),
            ]
        )
        == EXIT_FINDINGS
    )


def test_signed_by_another_key_exits_1(env, sealed, other_keys):
    report = verify(env, sealed, other_keys.public)
    assert report.signature == "invalid"
    assert (
        main(
            [
                "verify-env",
                str(sealed),
                "--pubkey",
                str(other_keys.public),
                "--site-packages",
                str(env.site),
            ]
        )
        == EXIT_FINDINGS
    )


def test_missing_signature_exits_1(env, sealed, keys):
    doc = json.loads(sealed.read_text())
    del doc["signature"]
    sealed.write_text(json.dumps(doc))
    assert verify(env, sealed, keys.public).signature == "missing"


def test_no_pubkey_is_a_usage_error(env, sealed):
    assert main(["verify-env", str(sealed), "--site-packages", str(env.site)]) == EXIT_ERROR


def test_seal_refuses_an_environment_that_already_drifted(env, keys, tmp_path):
    attacks.swap_pyc(env.pkg)
    with pytest.raises(IntegrityError, match="refusing to seal"):
        seal(
            [],
            key=keys.private,
            output=tmp_path / "m",
            packages=["demopkg"],
            site_packages=[env.site],
        )


def test_seal_of_plain_paths_and_verify_in_a_subprocess(keys, tmp_path):
    code = tmp_path / "job"
    code.mkdir()
    (code / "train.py").write_text("print('training')\n")
    (code / "config.yaml").write_text("lr: 0.1\n")
    manifest = tmp_path / "job.manifest"
    seal([code], key=keys.private, output=manifest)
    (code / "config.yaml").write_text("lr: 10.0\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainguard",
            "verify-env",
            str(manifest),
            "--pubkey",
            str(keys.public),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == EXIT_FINDINGS, done.stderr
    doc = json.loads(done.stdout)
    assert [(d["kind"], d["path"]) for d in doc["drift"]] == [
        ("modified", str(code / "config.yaml"))
    ]


def test_fast_mode_trusts_stat_but_not_a_restored_mtime(env, keys, tmp_path, monkeypatch):
    """--fast skips unchanged files; same size plus a forged mtime still moves ctime."""
    # The files were copied a moment ago, so sealing would mark them all racy.
    monkeypatch.setattr("trainguard.integrity.manifest.RACY_SECONDS", 0.0)
    manifest = tmp_path / "m"
    seal([], key=keys.private, output=manifest, packages=["demopkg"], site_packages=[env.site])
    quick = verify(env, manifest, keys.public, fast=True)
    assert quick.clean
    assert quick.bytes_hashed == 0
    target = env.pkg / "util.py"
    st = target.stat()
    original = target.read_bytes()
    target.write_bytes(original.replace(b"2 * x", b"3 * x"))  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back
    report = verify(env, manifest, keys.public, fast=True)
    assert [(d.kind, d.path) for d in report.drift] == [("modified", str(target))]


def test_racy_files_are_sealed_without_a_stat(env, keys, tmp_path):
    manifest = tmp_path / "m"
    seal([], key=keys.private, output=manifest, packages=["demopkg"], site_packages=[env.site])
    doc = json.loads(manifest.read_text())
    (dist,) = [r for r in doc["body"]["roots"] if r["kind"] == "distribution"]
    assert all(f["stat"] is None for f in dist["files"])  # all copied within the last second
    assert verify(env, manifest, keys.public, fast=True).bytes_hashed > 0
