"""Proves the scanner corpus is real, so detection tests on it cannot pass vacuously.

Every live malicious sample, opened with its naive loader in a fresh subprocess,
creates its own marker file; every benign sample loads with its naive loader and,
for torch formats, with ``torch.load(weights_only=True)``; and the catalogue covers
the techniques and formats the scanner must handle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from benchmarks.scan.corpus import FORMATS, LOADERS, Sample, build_benign, build_malicious, describe

ROOT = Path(__file__).resolve().parents[2]
RESULT = "CORPUS-RESULT:"

# Runs in a fresh interpreter: builds the corpus once per task, each with its own
# marker, and loads only that task's sample, so a marker proves which sample ran.
LOAD_MALICIOUS = f"""
import json, sys, warnings
from pathlib import Path
from benchmarks.scan.corpus import build_malicious, naive_load
warnings.simplefilter("ignore")
premature = []
for name, workdir, marker in json.loads(sys.argv[1]):
    sample = next(s for s in build_malicious(Path(workdir), Path(marker)) if s.name == name)
    if Path(marker).exists():
        premature.append(name)
    try:
        naive_load(sample)
    except (Exception, SystemExit):
        pass  # many payloads run before the loader trips over what follows them
print({RESULT!r} + json.dumps(premature))
"""

LOAD_BENIGN = f"""
import json, sys, warnings
from pathlib import Path
import torch
from benchmarks.scan.corpus import Sample, naive_load
warnings.simplefilter("ignore")
failures = {{}}
for fields in json.loads(sys.argv[1]):
    sample = Sample(**{{**fields, "path": Path(fields["path"])}})
    try:
        if naive_load(sample) is None:
            raise ValueError("loaded None")
        if sample.format.startswith("torch"):
            torch.load(sample.path, map_location="cpu", weights_only=True)
    except Exception as error:
        failures[sample.name] = f"{{type(error).__name__}}: {{error}}"
print({RESULT!r} + json.dumps(failures))
"""

#: Techniques the brief names; losing one is a coverage regression.
REQUIRED = {
    *(f"os_system_proto{n}" for n in range(6)),
    "posix_system", "nt_system", "builtin_py2_exec", "subprocess_popen_wait",
    "subprocess_run", "builtins_exec", "builtins_eval", "compile_exec",
    "import_getattr_chain", "operator_attrgetter", "operator_methodcaller",
    "functools_partial", "functools_reduce", "importlib_import_module", "runpy_run_path",
    "runpy_run_module", "pydoc_locate", "timeit_stmt", "cprofile_run", "profile_run",
    "code_interactive_interpreter", "entry_point_load", "build_setstate_inject",
    "build_module_monkeypatch", "inst_opcode", "obj_opcode", "newobj_tuple_map",
    "newobj_ex_tuple_map", "ext1_os_system", "ext2_builtins_exec", "ext4_subprocess_run",
    "stack_global_memo", "memo_put_memoize_confusion", "stack_global_dup",
    "torchzip_data_pkl", "torchzip_ext_bin", "torchzip_ext_pth", "torchzip_ext_ckpt",
    "torchzip_ext_safetensors", "torchzip_ext_none", "torchzip_ext_txt", "torchzip_folder_x",
    "torchzip_extra_pkl_member", "torchzip_duplicate_data_pkl", "pickle_after_pickle",
    "legacy_main_patched", "legacy_assembled", "legacy_tar", "npy_object_array",
    "npz_object_array", "joblib_payload", "joblib_object_array",
    "torch_nested_load_pickle_module", "torch_rebuild_from_type_v2", "torch_hub_load_local",
    "numpy_runstring", "numpy_load_nested", "statedict_deep_payload",
}  # fmt: skip


def _clean_env() -> dict[str, str]:
    """The environment minus switches that would make torch.load refuse to be naive."""
    env = dict(os.environ)
    for key in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        env.pop(key, None)
    return env


def _run_parallel(script: str, batches: Sequence[Sequence[object]]) -> list[object]:
    """Run ``script`` once per batch, all at once, each in a fresh interpreter."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(batch)],
            cwd=ROOT,
            env=_clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for batch in batches
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=240)
        lines = [line for line in stdout.splitlines() if line.startswith(RESULT)]
        assert process.returncode == 0, f"loader subprocess failed:\n{stderr[-4000:]}"
        assert lines, f"loader subprocess printed no result:\n{stderr[-4000:]}"
        results.append(json.loads(lines[-1][len(RESULT) :]))
    return results


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Sample], list[Sample], Path]:
    root = tmp_path_factory.mktemp("corpus")
    marker = root / "marker"
    return build_malicious(root / "malicious", marker), build_benign(root / "benign"), marker


def test_every_live_malicious_sample_runs_its_payload(
    corpus: tuple[list[Sample], list[Sample], Path], tmp_path: Path
) -> None:
    malicious, _, _ = corpus
    live = [s.name for s in malicious if s.live]
    tasks = [[n, str(tmp_path / "work" / n), str(tmp_path / "markers" / n)] for n in live]
    (tmp_path / "markers").mkdir()

    premature = _run_parallel(LOAD_MALICIOUS, [tasks[0::2], tasks[1::2]])

    assert premature == [[], []], "building the corpus ran a payload"
    silent = [name for name in live if not (tmp_path / "markers" / name).exists()]
    assert silent == [], f"live samples whose naive load did not run the payload: {silent}"


def test_every_benign_sample_loads(corpus: tuple[list[Sample], list[Sample], Path]) -> None:
    _, benign, _ = corpus
    fields = describe(benign)

    failures = _run_parallel(LOAD_BENIGN, [fields[0::2], fields[1::2]])

    assert failures == [{}, {}]


def test_catalogue_covers_the_techniques_and_formats(
    corpus: tuple[list[Sample], list[Sample], Path],
) -> None:
    malicious, benign, marker = corpus
    names = [s.name for s in malicious + benign]

    assert len(names) == len(set(names)), "sample names must be unique"
    assert not marker.exists(), "building the corpus ran a payload"
    assert len({s.technique for s in malicious}) >= 35
    assert REQUIRED - {s.name for s in malicious} == set()
    assert {s.format for s in malicious + benign} == set(FORMATS)
    assert {s.format for s in benign} >= {"torch-zip", "torch-legacy", "npy", "npz", "pickle"}
    assert all(s.malicious for s in malicious)
    assert not any(s.malicious for s in benign)
    assert all("not live" in s.technique for s in malicious if not s.live)
    for sample in malicious + benign:
        assert sample.path.is_file(), sample.name
        assert 0 < sample.path.stat().st_size < 2_000_000, sample.name
        assert sample.loader in LOADERS, sample.name


def test_each_build_targets_its_own_marker(tmp_path: Path) -> None:
    """Two builds with different markers differ exactly where the payloads name them."""
    first = build_malicious(tmp_path / "a", tmp_path / "marker-a")
    second = build_malicious(tmp_path / "b", tmp_path / "marker-b")
    plain = {s.name: s.path.read_bytes() for s in first if s.format == "pickle"}

    assert b"marker-a" in plain["os_system_proto2"]
    assert all(b"marker-b" not in data for data in plain.values())
    assert [s.name for s in first] == [s.name for s in second]
