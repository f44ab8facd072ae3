"""Red team of keygen, seal and verify-env: hostile RECORD, METADATA, site dirs and manifests.

One named test per finding; each reproduced its failure on the code before the fix (a
traceback as "internal error", a hang, or exit 0 for something never read). Site
directories are built by the tests (a dist-info folder with METADATA and RECORD next to
the package folder), and the commands run through the real command line, in process
where permissions do not matter and as a child without file privileges where they do.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unprivileged import drop_file_privileges, permissions_mean_something
from trainguard.cli import main
from trainguard.integrity import keygen, signing
from trainguard.integrity import manifest as _manifest

INFO = "demopkg-1.0.dist-info"
SOURCE = b"VALUE = 1\n"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _site(tmp_path: Path, extra_rows: str = "", *, metadata: bytes | None = None) -> Path:
    """A site directory holding ``demopkg`` 1.0, its RECORD ending in ``extra_rows``."""
    site = tmp_path / "site"
    (site / "demopkg").mkdir(parents=True)
    (site / INFO).mkdir()
    (site / "demopkg" / "__init__.py").write_bytes(SOURCE)
    meta = b"Metadata-Version: 2.1\nName: demopkg\nVersion: 1.0\n" if metadata is None else metadata
    (site / INFO / "METADATA").write_bytes(meta)
    rows = f"demopkg/__init__.py,{_record_hash(SOURCE)},{len(SOURCE)}\n"
    rows += f"{INFO}/METADATA,,\n{INFO}/RECORD,,\n" + extra_rows
    (site / INFO / "RECORD").write_text(rows, encoding="utf-8")
    return site


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``trainguard ARGS`` through the real command line; (status, stdout, stderr)."""
    started = time.monotonic()
    status = main(list(args))
    out, err = capsys.readouterr()
    assert time.monotonic() - started < 10, args
    assert "Traceback" not in err, err
    assert "internal error" not in err, err
    return status, out, err


def _record_check(capsys: pytest.CaptureFixture[str], site: Path) -> tuple[int, str, str]:
    return _run(capsys, "verify-env", "--site-packages", str(site), "--all-packages")


def _one_error(status: int, err: str, *words: str) -> None:
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]


# --- RECORD ------------------------------------------------------------------------------


def test_record_path_with_a_nul_byte(tmp_path, capsys):
    """A RECORD row whose path holds a NUL byte: ``ValueError: embedded null byte`` from the
    hashing thread reached the user as an internal error."""
    site = _site(tmp_path, "demopkg/a\0b.py,sha256=abc,3\n")
    status, _, err = _record_check(capsys, site)
    _one_error(status, err, "RECORD", "line 4", "NUL")


@pytest.mark.parametrize("size", ["\u00b2", "9" * 5000], ids=["superscript-digit", "5000-digits"])
def test_record_size_that_is_no_integer(tmp_path, capsys, size):
    """A RECORD size of ``²`` (``str.isdigit`` says yes, ``int`` says no) or of 5,000 digits
    (over Python's int-conversion limit): ``ValueError`` as an internal error."""
    site = _site(tmp_path, f"demopkg/__init__.py,{_record_hash(SOURCE)},{size}\n")
    status, _, err = _record_check(capsys, site)
    _one_error(status, err, "RECORD", "line 4", "size")


def test_record_field_over_the_csv_limit(tmp_path, capsys):
    """A RECORD field of 200,000 characters: ``csv.Error: field larger than field limit``
    as an internal error."""
    site = _site(tmp_path, '"' + "a" * 200_000 + '",,\n')
    status, _, err = _record_check(capsys, site)
    _one_error(status, err, "RECORD", "line 4")


@pytest.mark.parametrize("digest", ["md5=abc", "=", "nohash"])
def test_record_hash_no_installer_writes_is_not_clean(tmp_path, capsys, digest):
    """A RECORD naming a hash trainguard does not check (``md5=``, none at all) for a file
    that is there: the file went unread, a note was printed, and the exit status was 0."""
    (tmp_path / "x").mkdir()
    site = _site(tmp_path / "x")
    record = site / INFO / "RECORD"
    record.write_text(record.read_text().replace(_record_hash(SOURCE), digest))
    status, out, _ = _run(
        capsys, "verify-env", "--site-packages", str(site), "--all-packages", "--format", "json"
    )
    assert status == 1
    report = json.loads(out)
    assert [d["path"] for d in report["drift"]] == [str(site / "demopkg" / "__init__.py")]
    assert report["drift"][0]["kind"] == "unreadable"


# --- METADATA and the dist-info folder ---------------------------------------------------


def test_dist_info_without_metadata(tmp_path, capsys):
    """A dist-info folder with a RECORD but no METADATA: the distribution was dropped without
    a word and ``--all-packages`` said clean (0 files) while its files went unchecked."""
    site = _site(tmp_path)
    (site / INFO / "METADATA").unlink()
    status, _, err = _record_check(capsys, site)
    _one_error(status, err, "METADATA", INFO)


def test_metadata_without_a_name(tmp_path, capsys):
    """METADATA with no ``Name`` header: dropped in silence, clean with 0 files."""
    site = _site(tmp_path, metadata=b"Metadata-Version: 2.1\nVersion: 1.0\n")
    status, _, err = _record_check(capsys, site)
    _one_error(status, err, "METADATA", "Name")


def test_metadata_not_utf8(tmp_path, capsys):
    """METADATA holding a byte that is not UTF-8: ``UnicodeDecodeError`` as an internal error."""
    site = _site(tmp_path, metadata=b"Metadata-Version: 2.1\nName: demopkg\nVersion: 1\xff\n")
    status, _, err = _record_check(capsys, site)
    _one_error(status, err, "METADATA", "UTF-8")


def test_metadata_larger_than_its_cap(tmp_path, capsys):
    """A 2 GiB (sparse) METADATA was read whole by importlib.metadata: past 20 s and gigabytes
    of memory. It is refused from its size, unread."""
    site = _site(tmp_path)
    with open(site / INFO / "METADATA", "ab") as handle:
        handle.truncate(2 << 30)
    status, _, err = _record_check(capsys, site)
    _one_error(status, err, "METADATA", "limit")


def test_dist_info_that_is_a_file(tmp_path, capsys):
    """``demopkg-1.0.dist-info`` a regular file: skipped in silence, clean with 0 files."""
    site = _site(tmp_path)
    for child in (site / INFO).iterdir():
        child.unlink()
    (site / INFO).rmdir()
    (site / INFO).write_text("not a folder")
    status, _, err = _record_check(capsys, site)
    _one_error(status, err, INFO, "not a folder")


def test_egg_info_with_a_fifo_is_not_read(tmp_path, capsys):
    """An ``.egg-info`` folder (no RECORD: nothing to verify) whose PKG-INFO is a FIFO:
    importlib.metadata opened it to read the name and waited forever for a writer."""
    site = _site(tmp_path)
    (site / "other.egg-info").mkdir()
    os.mkfifo(site / "other.egg-info" / "PKG-INFO")
    status, _, err = _record_check(capsys, site)
    assert status == 0, err


def test_empty_packages_list_is_refused(tmp_path, capsys):
    """``--packages ''`` (or ``,``) named no distribution, checked nothing and said clean."""
    site = _site(tmp_path)
    for names in ("", ",", " , "):
        status, _, err = _run(
            capsys, "verify-env", "--site-packages", str(site), "--packages", names
        )
        _one_error(status, err, "--packages")


# --- permissions (a child without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH) ----------------


def _unprivileged(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """``trainguard ARGS`` (or ``python -c CODE``) in a child bound by permission bits."""
    why = permissions_mean_something()
    if why is not None:
        pytest.skip(why)
    argv = ["-c", code] if code is not None else ["-m", "trainguard", *args]
    done = subprocess.run(
        [sys.executable, *argv],
        preexec_fn=drop_file_privileges,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert "internal error" not in done.stderr, done.stderr
    return done


def test_unlistable_site_directory_is_not_clean(tmp_path):
    """``verify_environment(site_packages=[DIR], all_packages=True)`` on a site directory
    that cannot be listed (mode 000): importlib.metadata swallows the error, so no
    distribution was found and the report was clean. (The command line's option check
    refuses such a folder first; the library, and the launcher that calls it, did not.)"""
    site = _site(tmp_path)
    code = (
        "from trainguard.integrity import verify_environment, IntegrityError\n"
        "try:\n"
        f"    r = verify_environment(site_packages=[{str(site)!r}], all_packages=True)\n"
        "    print('clean' if r.clean else 'drift')\n"
        "except IntegrityError as exc:\n"
        "    print('refused:', exc)\n"
    )
    site.chmod(0)
    try:
        done = _unprivileged(code=code)
    finally:
        site.chmod(0o755)
    assert done.stdout.startswith("refused:"), done.stdout + done.stderr
    assert str(site) in done.stdout
    assert "cannot list" in done.stdout


def test_unreadable_dist_info_folder_is_not_clean(tmp_path):
    """A dist-info folder that cannot be entered (mode 000): METADATA and RECORD looked
    absent, the distribution was dropped and ``--all-packages`` said clean, exit 0."""
    site = _site(tmp_path)
    (site / INFO).chmod(0)
    try:
        done = _unprivileged("verify-env", "--site-packages", str(site), "--all-packages")
    finally:
        (site / INFO).chmod(0o755)
    assert done.returncode == 2, done.stderr
    assert INFO in done.stderr


# --- manifests ---------------------------------------------------------------------------


@pytest.fixture
def sealed(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(manifest, private key, public key, empty site dir) for a sealed folder ``job``."""
    job, site = tmp_path / "job", tmp_path / "site"
    job.mkdir()
    site.mkdir()
    (job / "train.py").write_text("print('hi')\n")
    private, public = keygen(tmp_path / "keys")
    out = tmp_path / "m.json"
    assert (
        main(
            ["seal", str(job), "--site-packages", str(site), "--key", str(private), "-o", str(out)]
        )
        == 0
    )
    return out, private, public, site


def _verify(capsys, manifest: Path, public: Path, site: Path, *extra: str) -> tuple[int, str, str]:
    return _run(
        capsys,
        "verify-env",
        str(manifest),
        "--pubkey",
        str(public),
        "--site-packages",
        str(site),
        *extra,
    )


@pytest.mark.parametrize("field", ["path", "base"])
def test_manifest_name_with_a_lone_surrogate(sealed, capsys, field):
    """An edited manifest whose path or base holds ``\\ud800`` (a JSON escape no file name
    decodes to): ``UnicodeEncodeError`` at the first ``lstat``, an internal error."""
    manifest, _, public, site = sealed
    document = json.loads(manifest.read_text())
    root = document["body"]["roots"][0]
    if field == "path":
        root["files"][0]["path"] = "\ud800.py"
    else:
        root["base"] = "/tmp/\ud800"
    manifest.write_text(json.dumps(document))
    for extra in ((), ("--fast",)):
        status, _, err = _verify(capsys, manifest, public, site, *extra)
        _one_error(status, err, str(manifest), field)


def test_manifest_integer_over_the_conversion_limit(sealed, capsys):
    """A manifest whose ``size`` is a 5,000-digit number: ``json.loads`` raises ValueError
    (Python's int-conversion limit), which reached the user as an internal error."""
    manifest, _, public, site = sealed
    text = manifest.read_text()
    manifest.write_text(text.replace('"size": 12', '"size": ' + "9" * 5000, 1))
    status, _, err = _verify(capsys, manifest, public, site)
    _one_error(status, err, str(manifest), "JSON")


def test_signed_manifest_with_another_hash_is_refused(sealed, capsys):
    """A body signed by the right key but naming ``"hash": "sha256"``: verified as BLAKE3
    anyway and reported clean. Version 1 knows one hash; anything else is refused."""
    manifest, private, public, site = sealed
    body = json.loads(manifest.read_text())["body"]
    body["hash"] = "sha256"
    _manifest.write(manifest, body, signing.load_private(private))
    status, _, err = _verify(capsys, manifest, public, site)
    _one_error(status, err, "hash")


def test_signed_odd_version_string_is_printed(sealed, capsys, tmp_path):
    """A signed distribution root whose version holds ``\\ud800``: printing the
    version-changed line raised UnicodeEncodeError in the text output."""
    manifest, private, public, _ = sealed
    site = _site(tmp_path / "other")
    body = json.loads(manifest.read_text())["body"]
    body["roots"].append(
        {
            "kind": "distribution",
            "name": "demopkg",
            "version": "\ud800",
            "base": str(site),
            "files": [],
        }
    )
    _manifest.write(manifest, body, signing.load_private(private))
    status, _, err = _verify(capsys, manifest, public, site)
    assert status == 1, err
    assert "version-changed" in err


# --- __pycache__ -------------------------------------------------------------------------


def test_pyc_beside_a_source_python_cannot_compile(tmp_path, capsys):
    """A source CPython cannot compile (``x = - - ... 1``, 200,000 unary minuses:
    RecursionError from the compiler) with a pyc whose header matches it, so Python runs
    the pyc's code. The checker process died on the uncaught error and verify-env exited 2
    ("pyc checker exited with status 1") instead of naming the pyc."""
    source = "x = " + "-" * 200_000 + "1\n"
    import importlib.util
    import marshal

    data = source.encode()
    site = _site(tmp_path, f"demopkg/evil.py,{_record_hash(data)},{len(data)}\n")
    evil = site / "demopkg" / "evil.py"
    evil.write_bytes(data)
    st = evil.stat()
    pyc = Path(importlib.util.cache_from_source(str(evil)))
    pyc.parent.mkdir(exist_ok=True)
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little")
    header += (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + st.st_size.to_bytes(
        4, "little"
    )
    pyc.write_bytes(header + marshal.dumps(compile("x = 1\n", str(evil), "exec")))
    status, out, _ = _run(
        capsys, "verify-env", "--site-packages", str(site), "--all-packages", "--format", "json"
    )
    assert status == 1
    kinds = {(d["kind"], d["path"]) for d in json.loads(out)["drift"]}
    assert ("pyc-mismatch", str(pyc)) in kinds
