"""The benchmark's differential samples are real: each runs its payload under its loader.

A differential sample that no loader runs would count a refusal as a catch for nothing,
so each one is built with its own marker and opened by the naive loader it names
(``Sample.loader``), all in one fresh interpreter; every marker must appear, and none
before its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.scan.corpus import LOADERS, build_differential

REPO = Path(__file__).resolve().parents[2]
RESULT = "DIFFERENTIAL-RESULT:"

LOAD_EACH = f"""
import json, sys, warnings
from pathlib import Path
from benchmarks.scan.corpus import build_differential, naive_load
warnings.simplefilter("ignore")
root = Path(sys.argv[1])
premature, ran = [], []
for name in json.loads(sys.argv[2]):
    marker = root / "markers" / name
    sample = next(s for s in build_differential(root / name, marker) if s.name == name)
    if marker.exists():
        premature.append(name)
    try:
        naive_load(sample)
    except Exception:
        pass  # many payloads run before the loader trips over what follows them
    if marker.exists():
        ran.append(name)
print({RESULT!r} + json.dumps([premature, ran]))
"""


def test_every_differential_sample_runs_its_payload_under_its_loader(tmp_path: Path) -> None:
    samples = build_differential(tmp_path / "catalogue", tmp_path / "marker")
    names = [s.name for s in samples]
    assert len(names) == len(set(names)) >= 12
    assert not (tmp_path / "marker").exists(), "building the samples ran a payload"
    assert all(s.malicious and s.part == "differential" and s.loader in LOADERS for s in samples)
    assert all(0 < s.path.stat().st_size < 100_000 for s in samples)
    (tmp_path / "markers").mkdir()

    proc = subprocess.run(
        [sys.executable, "-c", LOAD_EACH, str(tmp_path), json.dumps(names)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines, proc.stderr[-3000:]
    premature, ran = json.loads(lines[-1][len(RESULT) :])
    assert premature == []
    assert sorted(set(names) - set(ran)) == [], "samples whose loader did not run the payload"
