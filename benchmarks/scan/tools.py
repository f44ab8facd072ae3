"""One adapter per scanner the benchmark compares: how to run it and how to read its verdicts.

Every tool runs as a subprocess so that all of them pay the same costs (interpreter start,
imports) and so that the competitors, installed in their own virtual environment
(``.venv-bench``), cannot change the versions trainguard is tested with. Each adapter turns
the tool's own report into one :class:`FileResult` per file, in five outcomes:

- ``flagged``: the tool reports the file as unsafe because of something it found in it;
- ``failed_closed``: the tool could not analyse the file and refuses it for that reason
  (trainguard UNVERIFIABLE / UNSUPPORTED, fickling's parse errors raised to SUSPICIOUS);
- ``clean``: the tool looked at the file and reports nothing wrong;
- ``skipped``: the tool did not look at the file (unknown extension, unsupported format),
  so a gate built on it lets the file through;
- ``error``: the tool crashed or reported an error with no verdict for the file.

picklescan and fickling print no per-file verdicts on their command lines, so their
adapters run a small driver with ``python -c`` that calls the tool's own library functions
(the ones its command line and folder walk call) and writes one verdict per file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Outcome = Literal["flagged", "failed_closed", "clean", "skipped", "error"]
OUTCOMES: tuple[Outcome, ...] = ("flagged", "failed_closed", "clean", "skipped", "error")

BENCH_PACKAGES = ("picklescan", "modelscan", "fickling", "torch", "numpy")


@dataclass(frozen=True)
class FileResult:
    """One tool's verdict on one file: the normalised outcome and the tool's own words."""

    outcome: Outcome
    verdict: str
    detail: str = ""


@dataclass(frozen=True)
class Run:
    """One timed process: its per-file results (when read), wall time and exit status."""

    results: dict[Path, FileResult]
    seconds: float
    exit_code: int
    stderr_tail: str = ""
    #: set when the tool left no readable report: every file counts as an error then
    failure: str = ""


def _env() -> dict[str, str]:
    # A clean environment: no PYTHONPATH from the caller (pytest sets one), no colours,
    # wide lines so nothing a tool prints is wrapped.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env.update({"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "250"})
    return env


def timed(
    argv: Sequence[str], workdir: Path, *, keep_stdout: bool = False, timeout: float = 900.0
) -> tuple[float, int, str, str]:
    """Run ``argv`` in ``workdir``: wall seconds, exit status, stdout (if kept), stderr tail."""
    start = time.perf_counter()
    proc = subprocess.run(
        list(argv),
        cwd=workdir,
        env=_env(),
        stdout=subprocess.PIPE if keep_stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
        check=False,
    )
    seconds = time.perf_counter() - start
    out = proc.stdout.decode(errors="replace") if keep_stdout else ""
    return seconds, proc.returncode, out, proc.stderr.decode(errors="replace")[-2000:]


class Tool:
    """A scanner under test. ``scan`` reads per-file verdicts; ``timing_argv`` is timed."""

    name = ""

    def __init__(self, bench_venv: Path) -> None:
        self.bench_venv = bench_venv.absolute()

    def unavailable(self) -> str | None:
        """Why the tool cannot run here, or None."""
        python = self.bench_venv / "bin" / "python"
        if not python.exists():
            return f"{python} is missing: run `make bench-scan` to create .venv-bench"
        return None

    def scan_argv(self, target: Path, report: Path) -> list[str]:
        """The command whose output gives one verdict per file under ``target``."""
        raise NotImplementedError

    def timing_argv(self, target: Path, report: Path) -> list[str]:
        """The command a user would run to scan ``target`` in one process (timed)."""
        return self.scan_argv(target, report)

    def startup_argv(self) -> list[str]:
        """A command that starts the tool and exits without scanning (its start-up cost)."""
        raise NotImplementedError

    def parse(self, target: Path, report: Path, stdout: str) -> dict[Path, FileResult]:
        """Per-file results from what ``scan_argv`` wrote to ``report`` or ``stdout``."""
        raise NotImplementedError

    def scan(self, target: Path, workdir: Path) -> Run:
        """Scan ``target`` once and read the verdict on every file the tool reported."""
        report = workdir / f"{self.name}-report.json"
        report.unlink(missing_ok=True)
        seconds, code, out, err = timed(self.scan_argv(target, report), workdir, keep_stdout=True)
        try:
            results = self.parse(target, report, out)
        except (OSError, ValueError, KeyError) as exc:
            failure = f"no readable report (exit {code}): {exc}; {err[-300:]}"
            return Run({}, seconds, code, err, failure)
        return Run(results, seconds, code, err)

    def time_once(self, target: Path | None, workdir: Path) -> Run:
        """Time the user-facing command on ``target`` (None: start-up only), results unread."""
        report = workdir / f"{self.name}-timing.json"
        argv = self.startup_argv() if target is None else self.timing_argv(target, report)
        seconds, code, _, err = timed(argv, workdir)
        return Run({}, seconds, code, err)


_TRAINGUARD_OUTCOMES: dict[str, Outcome] = {
    "SAFE": "clean",
    "UNSAFE": "flagged",
    "UNVERIFIABLE": "failed_closed",  # fail closed: the file could not be fully checked
    "UNSUPPORTED": "failed_closed",  # not a format it knows; `scan` exits 1 on it too
    "SKIPPED": "skipped",  # no loader reads it: not a model file, `scan` exits 0 on it
}


class Trainguard(Tool):
    """``trainguard scan PATH --format json``: one document listing every file."""

    name = "trainguard"

    def unavailable(self) -> str | None:
        return None  # the runner itself runs in trainguard's environment

    def scan_argv(self, target: Path, report: Path) -> list[str]:
        return [sys.executable, "-m", "trainguard", "scan", str(target), "--format", "json"]

    def startup_argv(self) -> list[str]:
        return [sys.executable, "-m", "trainguard", "--version"]

    def parse(self, target: Path, report: Path, stdout: str) -> dict[Path, FileResult]:
        document = json.loads(stdout)
        results: dict[Path, FileResult] = {}
        for file in document["files"]:
            verdict = file["verdict"]
            reasons = [f["message"] for f in file["findings"] if f["severity"] != "INFO"]
            results[Path(file["path"]).resolve()] = FileResult(
                _TRAINGUARD_OUTCOMES[verdict], verdict, "; ".join(reasons[:3])[:300]
            )
        for error in document["errors"]:
            path = Path(error.rsplit(": ", 1)[0]).resolve()
            results[path] = FileResult("error", "ERROR", error[:300])
        return results


# picklescan: its own folder walk (scan_directory_path), with scan_bytes wrapped so each
# file's ScanResult is kept. An exception from scan_bytes aborts picklescan's CLI for the
# whole folder; here it is recorded for that file and the walk goes on.
_PICKLESCAN_DRIVER = r"""
import json, logging, os, sys
from picklescan import scanner
logging.getLogger("picklescan").setLevel(logging.CRITICAL)
target, out_path, strict = sys.argv[1], sys.argv[2], sys.argv[3] == "strict"
out = {}
original = scanner.scan_bytes
def wrapped(data, file_id, file_ext=None, strict=False):
    try:
        result = original(data, file_id, file_ext, strict=strict)
    except Exception as exc:
        out[file_id] = ["error", type(exc).__name__, str(exc)[:300]]
        return scanner.ScanResult([], scanned_files=1, scan_err=True)
    bad = sorted({g.module + "." + g.name for g in result.globals
                  if g.safety == scanner.SafetyLevel.Dangerous})
    odd = sorted({g.module + "." + g.name for g in result.globals
                  if g.safety == scanner.SafetyLevel.Suspicious})
    if result.issues_count:
        out[file_id] = ["flagged", "dangerous", ", ".join(bad)[:300]]
    elif result.scan_err:
        out[file_id] = ["error", "scan_err", ""]
    else:
        out[file_id] = ["clean", "suspicious" if odd else "clean", ", ".join(odd)[:300]]
    return result
scanner.scan_bytes = wrapped
if os.path.isdir(target):
    scanner.scan_directory_path(target, strict=strict)
else:
    scanner.scan_file_path(target, strict=strict)
with open(out_path, "w") as stream:
    json.dump(out, stream)
"""


class Picklescan(Tool):
    """picklescan: verdicts from its library, timing from ``picklescan -p PATH``."""

    name = "picklescan"
    strict = False

    def scan_argv(self, target: Path, report: Path) -> list[str]:
        mode = "strict" if self.strict else "default"
        python = str(self.bench_venv / "bin" / "python")
        return [python, "-c", _PICKLESCAN_DRIVER, str(target), str(report), mode]

    def timing_argv(self, target: Path, report: Path) -> list[str]:
        argv = [str(self.bench_venv / "bin" / "picklescan"), "-p", str(target)]
        return [*argv, "--strict"] if self.strict else argv

    def startup_argv(self) -> list[str]:
        return [str(self.bench_venv / "bin" / "picklescan"), "--help"]  # it has no --version

    def parse(self, target: Path, report: Path, stdout: str) -> dict[Path, FileResult]:
        raw = json.loads(report.read_text())
        return {
            Path(path).resolve(): FileResult(outcome, verdict, detail)
            for path, (outcome, verdict, detail) in raw.items()
        }


class PicklescanStrict(Picklescan):
    """``picklescan --strict``: every global not on its safe list counts as dangerous."""

    name = "picklescan-strict"
    strict = True


class Modelscan(Tool):
    """``modelscan -p PATH -r json -o REPORT --show-skipped``: issues, errors, skipped."""

    name = "modelscan"

    def scan_argv(self, target: Path, report: Path) -> list[str]:
        binary = str(self.bench_venv / "bin" / "modelscan")
        return [binary, "-p", str(target), "-r", "json", "-o", str(report), "--show-skipped"]

    def startup_argv(self) -> list[str]:
        return [str(self.bench_venv / "bin" / "modelscan"), "--version"]

    def parse(self, target: Path, report: Path, stdout: str) -> dict[Path, FileResult]:
        document = json.loads(report.read_text())
        base = target.resolve() if target.is_dir() else target.resolve().parent
        summary = document["summary"]

        def owner(source: str) -> Path:
            # zip members are reported as "file:member"
            return (base / source.split(":", 1)[0]).resolve()

        found: dict[Path, list[str]] = {}
        for issue in document.get("issues", []):
            key = f"{issue['severity']} {issue['module']}.{issue['operator']}"
            found.setdefault(owner(issue["source"]), []).append(key)
        errors: dict[Path, list[str]] = {}
        for error in document.get("errors", []):
            if "source" in error:
                errors.setdefault(owner(error["source"]), []).append(
                    f"{error['category']}: {error['description']}"
                )
        scanned = {owner(s) for s in summary["scanned"].get("scanned_files", [])}
        skipped = {owner(s["source"]) for s in summary["skipped"].get("skipped_files", [])}
        results: dict[Path, FileResult] = {}
        for path in skipped:
            results[path] = FileResult("skipped", "skipped", "not scanned")
        for path in scanned:
            results[path] = FileResult("clean", "no issues")
        for path, messages in errors.items():
            results[path] = FileResult("error", "error", "; ".join(messages)[:300])
        for path, keys in found.items():
            results[path] = FileResult("flagged", keys[0].split()[0], ", ".join(sorted(set(keys))))
        return results


# fickling has no folder scan and its CLI reads every file as one raw pickle stream. This
# driver walks the folder and dispatches each file as fickling's own Hugging Face scanner
# (fickling.cli._scan_huggingface) does: zips to scan_zip_archive, pickles to scan_file,
# tar and numpy files not scanned. It sniffs the content first (zip magic, then
# fickling's own pickle parser, as polyglot.check_pickle does) and falls back on the
# extension; it does not import fickling.polyglot, which imports torch (~1.5 s per start).
_FICKLING_DRIVER = r"""
import json, os, sys, zipfile
from pathlib import PurePosixPath
from fickling.analysis import Severity
from fickling.fickle import Pickled, StackedPickle
from fickling.loader import scan_file, scan_zip_archive
target, out_path = sys.argv[1], sys.argv[2]
ZIP_EXT, RAW_EXT = {".pt", ".pth"}, {".bin", ".pkl", ".pickle"}
def is_pickle(path):
    with open(path, "rb") as stream:
        for parse in (Pickled.load, lambda s: StackedPickle.load(s).pickled[0]):
            stream.seek(0)
            try:
                return len(parse(stream)) > 2
            except Exception:
                pass
    return False
def dispatch(path):
    ext = PurePosixPath(path).suffix.lower()
    with open(path, "rb") as stream:
        head = stream.read(6)
    if head.startswith(b"PK") and zipfile.is_zipfile(path):
        return "zip"
    if head.startswith(b"\x93NUMPY"):
        return None
    if is_pickle(path):
        return "pickle"
    return "zip" if ext in ZIP_EXT else "pickle" if ext in RAW_EXT else None
if os.path.isdir(target):
    paths = sorted(os.path.join(b, f) for b, _, files in os.walk(target) for f in files)
else:
    paths = [target]
out = {}
for path in paths:
    try:
        kind = dispatch(path)
        if kind is None:
            out[path] = ["skipped", "not scanned", "not a zip or pickle"]
            continue
        if kind == "zip":
            results = list(scan_zip_archive(path, graceful=True).values())
        else:
            results = [scan_file(path, graceful=True)]
    except Exception as exc:
        out[path] = ["error", type(exc).__name__, str(exc)[:300]]
        continue
    unsafe = [r for r in results if not r.is_safe]
    found = [a for r in unsafe for a in r.results if a.severity > Severity.LIKELY_SAFE]
    if found:
        worst = max((a.severity for a in found), key=lambda s: s.value[0])
        text = "; ".join(a.to_string() for a in found if a.to_string())
        out[path] = ["flagged", worst.name, text[:300]]
    elif unsafe:
        worst = max((r.severity for r in unsafe), key=lambda s: s.value[0])
        errors = "; ".join(e for r in unsafe for e in r.errors)
        out[path] = ["failed_closed", worst.name, errors[:300]]
    else:
        out[path] = ["clean", "LIKELY_SAFE", "no pickle members" if not results else ""]
with open(out_path, "w") as stream:
    json.dump(out, stream)
outcomes = {v[0] for v in out.values()}
# fickling's own exit codes (fickling.constants): 2 error, 1 unsafe, 0 clean
sys.exit(2 if "error" in outcomes else 1 if outcomes & {"flagged", "failed_closed"} else 0)
"""


class Fickling(Tool):
    """fickling's scan_file / scan_zip_archive over every file (its CLI reads one pickle)."""

    name = "fickling"

    def scan_argv(self, target: Path, report: Path) -> list[str]:
        python = str(self.bench_venv / "bin" / "python")
        return [python, "-c", _FICKLING_DRIVER, str(target), str(report)]

    def startup_argv(self) -> list[str]:
        return [str(self.bench_venv / "bin" / "fickling"), "--version"]

    def parse(self, target: Path, report: Path, stdout: str) -> dict[Path, FileResult]:
        raw = json.loads(report.read_text())
        return {
            Path(path).resolve(): FileResult(outcome, verdict, detail)
            for path, (outcome, verdict, detail) in raw.items()
        }


TOOLS: dict[str, type[Tool]] = {
    cls.name: cls for cls in (Trainguard, Picklescan, PicklescanStrict, Modelscan, Fickling)
}


def versions(bench_venv: Path, names: Sequence[str]) -> dict[str, str]:
    """Installed versions of trainguard (this environment) and the bench tools."""
    from importlib.metadata import version

    found = {"trainguard": version("trainguard"), "python": sys.version.split()[0]}
    found["torch (trainguard env)"] = version("torch")
    python = bench_venv / "bin" / "python"
    if any(n != "trainguard" for n in names) and python.exists():
        script = (
            "import json, sys, importlib.metadata as m\n"
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
        )
        proc = subprocess.run(
            [str(python), "-c", script, *BENCH_PACKAGES],
            capture_output=True,
            text=True,
            check=True,
            env=_env(),
        )
        for package, number in json.loads(proc.stdout).items():
            key = f"{package} (bench env)" if package in {"torch", "numpy"} else package
            found[key] = number
    return found
