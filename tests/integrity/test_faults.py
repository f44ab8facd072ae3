"""keygen, seal and verify-env against hostile paths and faults: every path is read or refused.

Each test reproduces a failure found by the issue 10 audit (fail open on unreadable
folders, hangs on FIFOs and devices, device outputs replaced, crashes on non-UTF-8 names
and full disks) with real files, real FIFOs and device nodes, real subprocesses, and an
unprivileged user (``nobody``) where permissions must mean something: root reads every
mode 000 folder.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import trainguard
from tests.integrity.conftest import Env
from trainguard.integrity import keygen

NOBODY = 65534
TIMEOUT = 20.0
SRC = str(Path(trainguard.__file__).resolve().parents[1])


def _drop() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@functools.lru_cache(maxsize=1)
def _nobody_python() -> tuple[str, dict[str, str]] | None:
    """An interpreter ``nobody`` can run with trainguard importable, and its environment.

    This interpreter may live where ``nobody`` cannot enter (a pyenv under /root); then a
    system Python of the same version is given this one's packages through PYTHONPATH.
    """
    paths = [SRC, *site.getsitepackages()]
    base = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}", shutil.which(version)):
        if not candidate:
            continue
        try:
            done = subprocess.run(
                [candidate, "-c", "import trainguard.cli, blake3, cryptography"],
                env=base,
                preexec_fn=_drop,
                cwd="/",
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )
        except OSError:
            continue
        if done.returncode == 0:
            return candidate, base
    return None


def _cli(
    *args: str,
    nobody: bool = False,
    preexec: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``trainguard ARGS`` in a subprocess; as ``nobody`` (when root) if asked."""
    python, environ = sys.executable, dict(os.environ)
    hooks = [h for h in (preexec,) if h is not None]
    if nobody and os.getuid() == 0:
        found = _nobody_python()
        if found is None:
            pytest.skip("no interpreter the unprivileged user can run trainguard with")
        python, environ = found
        hooks.append(_drop)

    def before() -> None:
        for hook in hooks:
            hook()

    try:
        done = subprocess.run(
            [python, "-m", "trainguard", *args],
            env=environ,
            preexec_fn=before,
            cwd="/tmp",
            capture_output=True,
            text=True,
            errors="backslashreplace",
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"trainguard {' '.join(args)}: still running after {TIMEOUT} s")
    assert "Traceback" not in done.stderr, done.stderr
    assert "internal error" not in done.stderr, done.stderr
    return done


def _one_error(done: subprocess.CompletedProcess[str], *names: str) -> str:
    """Exit 2 with one line naming each of ``names``."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def top() -> Iterator[Path]:
    """A folder ``nobody`` can enter (pytest's tmp_path is under a 0700 folder)."""
    folder = Path(tempfile.mkdtemp(prefix="tg-faults-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for here, dirs, _ in os.walk(folder):  # top-down: unlock a folder before entering it
            for name in dirs:
                path = os.path.join(here, name)
                if not os.path.islink(path):
                    os.chmod(path, 0o755)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pair(top: Path) -> tuple[Path, Path]:
    """A key pair owned by whoever runs the commands (``nobody`` when we are root)."""
    private, public = keygen(top / "keys")
    if os.getuid() == 0:
        for path in (top / "keys", private, public):
            os.chown(path, NOBODY, NOBODY)
    return private, public


@pytest.fixture
def empty_site(top: Path) -> Path:
    """A site directory with nothing installed, so only the sealed paths are checked."""
    folder = top / "site"
    folder.mkdir()
    return folder


@pytest.fixture
def outdir(top: Path) -> Path:
    folder = top / "out"
    folder.mkdir()
    folder.chmod(0o777)
    return folder


def _project(top: Path) -> Path:
    code = top / "job"
    (code / "pkg").mkdir(parents=True)
    (code / "train.py").write_text("print('train')\n")
    (code / "pkg" / "model.py").write_text("LAYERS = 2\n")
    return code


def _seal(paths: list[Path], pair: tuple[Path, Path], out: Path, site_dir: Path, **kw: bool):
    return _cli(
        "seal",
        *map(str, paths),
        "--key",
        str(pair[0]),
        "-o",
        str(out),
        "--site-packages",
        str(site_dir),
        **kw,
    )


def _verify(manifest: Path, pair: tuple[Path, Path], site_dir: Path, *extra: str, **kw: bool):
    return _cli(
        "verify-env",
        str(manifest),
        "--pubkey",
        str(pair[1]),
        "--site-packages",
        str(site_dir),
        "--format",
        "json",
        *extra,
        **kw,
    )


# --- 1. unreadable files and folders: read or refused, never left out -----------------


def test_seal_refuses_a_folder_with_an_unreadable_subfolder(top, pair, empty_site, outdir):
    """Audit: ``seal`` left a mode 000 subfolder out of the manifest and exited 0."""
    code = _project(top)
    locked = code / "locked"
    locked.mkdir()
    (locked / "evil.py").write_text("import os\n")
    locked.chmod(0)
    out = outdir / "m.json"
    done = _seal([code], pair, out, empty_site, nobody=True)
    _one_error(done, str(locked))
    assert not out.exists()


def test_seal_refuses_an_unreadable_file(top, pair, empty_site, outdir):
    code = _project(top)
    (code / "pkg" / "model.py").chmod(0)
    out = outdir / "m.json"
    _one_error(_seal([code], pair, out, empty_site, nobody=True), "model.py")
    assert not out.exists()


def test_verify_env_lists_an_unreadable_folder_and_file(top, pair, empty_site, outdir):
    """A sealed folder that became unreadable is drift, never clean."""
    code = _project(top)
    out = outdir / "m.json"
    assert _seal([code], pair, out, empty_site, nobody=True).returncode == 0
    assert _verify(out, pair, empty_site, nobody=True).returncode == 0
    (code / "train.py").chmod(0)
    (code / "pkg").chmod(0)
    done = _verify(out, pair, empty_site, nobody=True)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    listed = {(d["kind"], d["path"]) for d in report["drift"]}
    assert ("unreadable", str(code / "pkg")) in listed
    assert ("unreadable", str(code / "train.py")) in listed


@pytest.fixture
def shared_env(base_env: Env, top: Path) -> Env:
    """The session venv copied where ``nobody`` can read it."""
    root = top / "venv"
    shutil.copytree(base_env.root, root, symlinks=True)
    site_dir = root / base_env.site.relative_to(base_env.root)
    return Env(root, root / "bin" / "python", site_dir)


def test_verify_env_record_mode_lists_an_unreadable_folder(shared_env):
    """RECORD mode walked past a mode 000 folder of unrecorded files: it said clean."""
    extra = shared_env.pkg / "extra"
    extra.mkdir()
    (extra / "payload.py").write_text("import os\n")
    args = ("verify-env", "--packages", "demopkg", "--site-packages", str(shared_env.site))
    assert _cli(*args, "--format", "json", nobody=True).returncode == 1  # added: payload.py
    extra.chmod(0)
    done = _cli(*args, "--format", "json", nobody=True)
    assert done.returncode == 1, done.stderr
    drift = json.loads(done.stdout)["drift"]
    assert ("unreadable", str(extra)) in {(d["kind"], d["path"]) for d in drift}


def test_verify_env_record_mode_refuses_an_unreadable_record(shared_env):
    """A distribution whose RECORD cannot be read was silently left out of --all-packages."""
    record = next(shared_env.site.glob("demopkg-*.dist-info")) / "RECORD"
    record.chmod(0)
    args = ("verify-env", "--all-packages", "--site-packages", str(shared_env.site))
    _one_error(_cli(*args, nobody=True), str(record))


# --- 2. special files: refused up front, never read ------------------------------------


@pytest.fixture
def fifo(top: Path) -> Path:
    path = top / "pipe"
    os.mkfifo(path)
    path.chmod(0o666)
    return path


def test_seal_refuses_a_fifo_and_a_device_as_paths(fifo, pair, empty_site, outdir):
    """Audit: ``seal FIFO`` waited for a writer forever; ``seal /dev/zero`` hashed forever."""
    out = outdir / "m.json"
    _one_error(_seal([fifo], pair, out, empty_site), str(fifo), "FIFO")
    _one_error(_seal([Path("/dev/zero")], pair, out, empty_site), "/dev/zero", "device")
    assert not out.exists()


def test_seal_refuses_a_fifo_as_key_and_allow_file(top, fifo, pair, empty_site, outdir):
    code = _project(top)
    out = outdir / "m.json"
    args = ("seal", str(code), "-o", str(out), "--site-packages", str(empty_site))
    _one_error(_cli(*args, "--key", str(fifo)), str(fifo))
    _one_error(_cli(*args, "--key", str(pair[0]), "--allow", f"@{fifo}"), str(fifo))
    _one_error(_cli(*args, "--key", "/dev/zero"), "/dev/zero")
    assert not out.exists()


def test_verify_env_refuses_fifo_manifest_pubkey_and_allow_file(top, fifo, pair, empty_site):
    code = _project(top)
    out = top / "m.json"
    assert _seal([code], pair, out, empty_site).returncode == 0
    verify = ("verify-env", "--site-packages", str(empty_site))
    _one_error(_cli(*verify, str(fifo), "--pubkey", str(pair[1])), str(fifo))
    _one_error(_cli(*verify, str(out), "--pubkey", str(fifo)), str(fifo))
    _one_error(_cli(*verify, str(out), "--pubkey", "/dev/zero"), "/dev/zero")
    _one_error(_cli(*verify, str(out), "--pubkey", str(pair[1]), "--allow", f"@{fifo}"), str(fifo))


def test_special_files_inside_a_sealed_folder_are_recorded_not_read(top, pair, empty_site):
    """A FIFO and a device node in a sealed folder are sealed as what they are, unread."""
    code = _project(top)
    os.mkfifo(code / "pkg" / "pipe")
    device = code / "zero"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 5))  # like /dev/zero
    except PermissionError:
        device = None
    out = top / "m.json"
    assert _seal([code], pair, out, empty_site).returncode == 0
    files = {f["path"]: f for f in json.loads(out.read_text())["body"]["roots"][0]["files"]}
    assert files["pkg/pipe"]["hash"] == "special:fifo"
    if device is not None:
        assert files["zero"]["hash"] == "special:char-device"
    assert _verify(out, pair, empty_site).returncode == 0
    (code / "pkg" / "pipe").unlink()
    (code / "pkg" / "pipe").write_text("import os\n")
    done = _verify(out, pair, empty_site)
    assert done.returncode == 1
    assert [d["path"] for d in json.loads(done.stdout)["drift"]] == [str(code / "pkg" / "pipe")]


def test_verify_env_refuses_deeply_nested_and_malformed_manifests(top, pair, empty_site):
    """Audit: a manifest of nested brackets raised RecursionError."""
    nested = top / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    verify = ("verify-env", "--pubkey", str(pair[1]), "--site-packages", str(empty_site))
    _one_error(_cli(*verify, str(nested)), str(nested), "nested")
    code = _project(top)
    out = top / "m.json"
    assert _seal([code], pair, out, empty_site).returncode == 0
    document = json.loads(out.read_text())
    for broken in (
        {"path": 5},
        {"path": "train.py", "size": "big", "mode": "0644", "hash": "x", "stat": None},
        "not an entry",
    ):
        document["body"]["roots"][0]["files"] = [broken]
        bad = top / "bad.json"
        bad.write_text(json.dumps(document))
        _one_error(_cli(*verify, str(bad)), str(bad))
    document["body"]["roots"] = [{"kind": "path"}]
    bad.write_text(json.dumps(document))
    _one_error(_cli(*verify, str(bad)), str(bad))


# --- 3. outputs: never replace a device or a FIFO ---------------------------------------


def test_seal_never_replaces_a_device_or_fifo_output(top, fifo, pair, empty_site):
    """Audit: ``seal -o <device>`` renamed a regular file over the device node."""
    code = _project(top)
    outputs = [fifo]
    device = top / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # like /dev/null
        outputs.append(device)
    except PermissionError:
        pass
    for target in outputs:
        kind = stat.S_IFMT(os.lstat(target).st_mode)
        _one_error(_seal([code], pair, target, empty_site), str(target))
        assert stat.S_IFMT(os.lstat(target).st_mode) == kind
    assert not [p.name for p in top.iterdir() if p.name.endswith(".tmp")]


def test_seal_still_overwrites_a_regular_manifest(top, pair, empty_site):
    code = _project(top)
    out = top / "m.json"
    assert _seal([code], pair, out, empty_site).returncode == 0
    first = out.read_text()
    assert _seal([code], pair, out, empty_site).returncode == 0
    assert out.read_text() != first  # sealed again (new time), not refused
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert sorted(p.name for p in top.iterdir()) == ["job", "keys", "m.json", "site"]


# --- 4. any bytes in a file name ----------------------------------------------------------


def test_non_utf8_names_are_sealed_verified_and_printed(top, pair, empty_site):
    """Audit: ``seal`` of a folder holding ``caf\\xe9.py`` raised UnicodeEncodeError."""
    code = _project(top)
    odd = os.fsencode(code) + b"/caf\xe9.py"
    with open(odd, "wb") as handle:
        handle.write(b"print('genuine')\n")
    out = top / "m.json"
    done = _seal([code], pair, out, empty_site)
    assert done.returncode == 0, done.stderr
    out.read_text("utf-8")  # the manifest itself is valid UTF-8
    assert _verify(out, pair, empty_site).returncode == 0
    with open(odd, "wb") as handle:
        handle.write(b"print('tampered')\n")
    done = _verify(out, pair, empty_site)
    assert done.returncode == 1
    (drift,) = json.loads(done.stdout)["drift"]
    assert os.fsencode(drift["path"]) == odd
    text = _cli(
        "verify-env", str(out), "--pubkey", str(pair[1]), "--site-packages", str(empty_site)
    )
    assert text.returncode == 1
    assert "caf\\xe9.py" in text.stderr


# --- 5. keygen on a full disk ------------------------------------------------------------


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("limit", [0, 60])
def test_keygen_on_a_full_disk_leaves_no_half_key(top, limit):
    """Audit: ``keygen`` on a full disk raised OSError (or wrote a truncated key, exit 0).

    RLIMIT_FSIZE makes writes past ``limit`` bytes fail with EFBIG, as a full disk fails
    them with ENOSPC; a partial key left behind would block the next keygen.
    """
    keys = top / "keys"
    done = _cli("keygen", "-o", str(keys), preexec=_file_size_limit(limit))
    _one_error(done, "trainguard.key")
    assert list(keys.iterdir()) == []
    assert _cli("keygen", "-o", str(keys)).returncode == 0


# --- 6. symlink loops ---------------------------------------------------------------------


def test_seal_refuses_a_symlink_loop(top, pair, empty_site):
    loop = top / "loop"
    os.symlink("loop", loop)
    out = top / "m.json"
    _one_error(_seal([loop], pair, out, empty_site), str(loop))
    assert not out.exists()


def test_fifo_start_up_hook_and_cache_file_are_not_read(env, keys, tmp_path):
    """A FIFO named ``*.pth`` in site-packages, or put where a ``.pyc`` was, hung verify-env."""
    cache = next((env.pkg / "__pycache__").glob("core.*.pyc"))
    manifest = tmp_path / "m.json"
    site_args = ("--site-packages", str(env.site))
    sealed = _cli(
        "seal", "--packages", "demopkg", *site_args, "--key", str(keys.private), "-o", str(manifest)
    )
    assert sealed.returncode == 0, sealed.stderr
    cache.unlink()
    os.mkfifo(cache)
    os.mkfifo(env.site / "zz_hook.pth")
    record = _cli("verify-env", "--packages", "demopkg", *site_args, "--format", "json")
    assert record.returncode == 1, record.stderr
    listed = {d["path"]: d["kind"] for d in json.loads(record.stdout)["drift"]}
    assert str(cache) in listed
    assert str(env.site / "zz_hook.pth") in listed
    sealed_check = _cli(
        "verify-env", str(manifest), "--pubkey", str(keys.public), *site_args, "--format", "json"
    )
    assert sealed_check.returncode == 1, sealed_check.stderr
    listed = {d["path"]: d["kind"] for d in json.loads(sealed_check.stdout)["drift"]}
    assert str(cache) in listed
    assert str(env.site / "zz_hook.pth") in listed


def test_allow_file_with_an_absurd_glob_is_refused(top, pair, empty_site):
    """A 400 kB line of brackets is no glob: refused, not matched against every entry."""
    code = _project(top)
    out = top / "m.json"
    assert _seal([code], pair, out, empty_site).returncode == 0
    allow = top / "allow.txt"
    allow.write_text("# benign\n*.log\n" + "[" * 200_000 + "]" * 200_000 + "\n")
    done = _cli(
        "verify-env",
        str(out),
        "--pubkey",
        str(pair[1]),
        "--site-packages",
        str(empty_site),
        "--allow",
        f"@{allow}",
    )
    _one_error(done, f"{allow}: line 3")
