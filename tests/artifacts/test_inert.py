"""Data that is not code: objects rebuilt without a call (docs/scan-policy.md).

Real files from real objects (a Trainer's ``training_args.bin``, ``argparse.Namespace``,
``pathlib``, ``datetime``, NumPy scalars, a whole ``nn.Sequential``, the legacy format)
scan with exit 0 and load (as inert records where their classes are not imported). Then
the attempts to smuggle code through the rule: each payload runs under the real
``pickle.load`` (the test proves it), and trainguard refuses it without running it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime
import enum
import gc
import hashlib
import io
import pathlib
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import trainguard
from trainguard.artifacts import allowlist
from trainguard.artifacts.loader import InertObject
from trainguard.cli import main
from trainguard.errors import Severity, UnsafeCheckpointError


@dataclasses.dataclass
class Config:
    lr: float = 0.1
    name: str = "run"


class Color(enum.Enum):
    RED = 1


def _notes(path: Path) -> list[str]:
    report = trainguard.scan(path)
    assert report.files[0].verdict.value == "SAFE", report.files[0].findings
    return [f.message for f in report.files[0].findings if f.severity >= Severity.LOW]


def _unsafe(path: Path) -> list[str]:
    report = trainguard.scan(path)
    assert report.files[0].verdict.value == "UNSAFE", report.files[0].findings
    return [f.message for f in report.files[0].findings]


# --- what real training code writes -------------------------------------------------

VALUES = {
    "args": argparse.Namespace(lr=0.1, epochs=3, out=pathlib.PurePosixPath("/runs/a")),
    "ns": types.SimpleNamespace(a=1),
    "path": pathlib.Path("/data/train"),
    "when": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
    "day": datetime.date(2024, 1, 2),
    "took": datetime.timedelta(seconds=3),
    "f32": np.float32(1.5),
    "i64": np.int64(7),
}


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_stdlib_and_numpy_values_are_safe_and_load_as_themselves(
    tmp_path: Path, protocol: int
) -> None:
    """Protocol 0 rebuilds a Namespace through copyreg._reconstructor, 2+ with NEWOBJ."""
    path = tmp_path / "values.pkl"
    path.write_bytes(pickle.dumps(VALUES, protocol=protocol))
    assert _notes(path) == []
    assert trainguard.load(path) == VALUES


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inert")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.LayerNorm(4), torch.nn.Dropout(0.1)
    )
    files = {"model": root / "model.pt", "legacy": root / "legacy.pt", "user": root / "user.pt"}
    torch.save(model, files["model"])
    ckpt = {"model": model.state_dict(), "args": VALUES["args"], "step": 3}
    torch.save(ckpt, files["legacy"], _use_new_zipfile_serialization=False)
    torch.save({"cfg": Config(), "color": Color.RED}, files["user"])
    return files


def test_whole_nn_module_is_rebuilt_from_torch_classes(checkpoints: dict[str, Path]) -> None:
    """``torch.save(model)``: NEWOBJ on torch.nn classes, BUILD through Module.__setstate__."""
    path = checkpoints["model"]
    assert _notes(path) == []
    loaded = trainguard.load(path)
    original = torch.load(path, weights_only=False)
    assert isinstance(loaded, torch.nn.Sequential)
    assert [type(m) for m in loaded] == [type(m) for m in original]
    x = torch.randn(2, 4)
    assert torch.equal(loaded.eval()(x), original.eval()(x))


def test_legacy_format_checkpoint_scans_and_loads(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["legacy"]
    assert trainguard.scan(path).files[0].format == "torch-legacy"
    assert _notes(path) == []
    loaded = trainguard.load(path)
    assert loaded["args"] == VALUES["args"]
    for key, value in torch.load(path, weights_only=False)["model"].items():
        assert torch.equal(loaded["model"][key], value)


def test_classes_outside_any_distribution_need_allow(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A dataclass and an enum of this test module: no installed distribution vouches for
    the module, and an enum lookup is a call of the class: refused until allowed."""
    path = checkpoints["user"]
    messages = " ".join(_unsafe(path))
    assert "not a file of an installed distribution" in messages
    assert f"REDUCE calls {__name__}.Color" in messages
    with pytest.raises(UnsafeCheckpointError):
        trainguard.load(path)
    assert main(["scan", str(path)]) == 1
    assert main(["scan", str(path), "--allow", f"{__name__}.*"]) == 0
    assert trainguard.load(path, allow=[f"{__name__}.*"]) == {"cfg": Config(), "color": Color.RED}
    capsys.readouterr()


def test_training_args_bin_is_a_note_and_loads_as_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Trainer's training_args.bin: a dataclass (and accelerate's state) rebuilt as data,
    the enums it holds looked up by value. Before: UNSAFE with 21 findings."""
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[])
    path = tmp_path / "training_args.bin"
    torch.save(args, path)
    (note,) = _notes(path)
    assert "transformers.training_args.TrainingArguments" in note
    assert "transformers.trainer_utils.IntervalStrategy" in note
    assert main(["scan", str(path)]) == 0
    assert "TrainingArguments" in capsys.readouterr().err

    record = trainguard.load(path)
    assert isinstance(record, InertObject)
    assert record.cls == "transformers.training_args.TrainingArguments"
    assert record.state["learning_rate"] == args.learning_rate
    assert record.state["eval_strategy"] == InertObject(
        "transformers.trainer_utils.IntervalStrategy", ("no",)
    )
    real = trainguard.load(path, allow=["transformers.*", "accelerate.*"])
    assert type(real) is type(args)
    assert real.eval_strategy == args.eval_strategy
    assert real.learning_rate == args.learning_rate
    allowed = ["--allow", "transformers.*", "--allow", "accelerate.*"]
    assert main(["scan", str(path), *allowed]) == 0
    assert "TrainingArguments" not in capsys.readouterr().err  # trusted: no note


# --- the allowlist's claims, checked against the installed classes -----------------

_SPECIAL = ("__new__", "__setstate__", "__getattr__", "__getattribute__", "__setattr__")


def _owner(cls: type, name: str) -> str:
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass.__module__
    return "-"


def test_nn_rule_admits_only_classes_whose_rebuild_runs_torch_code() -> None:
    """Every name the ``torch.nn.modules.*.Name`` rule admits: a class whose special
    methods used by NEWOBJ and BUILD are torch's or Python's own, and no ``__del__``."""
    import importlib
    import pkgutil

    import torch.nn.modules as modules

    checked = 0
    for info in pkgutil.iter_modules(modules.__path__):
        module = importlib.import_module(f"torch.nn.modules.{info.name}")
        for name, value in vars(module).items():
            if allowlist.rule_for(f"{module.__name__}.{name}") is not allowlist.NN_MODULE:
                continue
            if not isinstance(value, type):
                continue  # NEWOBJ on a function or module fails; the rule allows no call
            checked += 1
            owners = {_owner(value, n) for n in _SPECIAL}
            assert all(o.split(".")[0] in ("torch", "builtins", "typing", "-") for o in owners), (
                name,
                owners,
            )
            assert _owner(value, "__del__") == "-", name
    assert checked > 100


def test_third_party_enum_table_names_plain_enums() -> None:
    """``Enum(value)`` only looks the member up: the metaclass's ``__call__`` and the
    ``__new__`` are Enum's, ``_missing_`` Enum's or ExplicitEnum's (which raises)."""
    import importlib

    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    seen = 0
    for qualified, rule in allowlist.ALLOWED.items():
        if not rule.record:
            continue
        module, _, name = qualified.rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
        if cls is None:
            continue  # an older or newer release: the name is then never resolved
        seen += 1
        assert issubclass(cls, enum.Enum), qualified
        assert type(cls).__call__ is enum.EnumType.__call__, qualified  # metaclass's call
        assert cls.__new__ is enum.Enum.__new__, qualified
        assert cls.__hash__ in (enum.Enum.__hash__, str.__hash__, int.__hash__), qualified
        missing = cls._missing_.__func__.__qualname__
        assert missing in ("Enum._missing_", "ExplicitEnum._missing_"), qualified
        if missing == "ExplicitEnum._missing_":
            with pytest.raises(ValueError, match="no such value"):
                cls("no such value")
    assert seen >= 6


# --- smuggling code through the rule: each payload runs under the real loader --------


def _op(*parts: bytes | str) -> bytes:
    return b"".join(p.encode() if isinstance(p, str) else p for p in parts)


def _s(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _global(module: str, name: str) -> bytes:
    return _op("c", module, "\n", name, "\n")


def _rebuilt(module: str, name: str, state: bytes = b"}") -> bytes:
    """NEWOBJ with no arguments, then BUILD: how pickle writes a plain object."""
    return _global(module, name) + b")\x81" + state + b"b"


def _attrs(**values: bytes) -> bytes:
    return b"}(" + b"".join(_s(k) + v for k, v in values.items()) + b"u"


def test_stdlib_class_rebuilt_as_data_deletes_a_file_when_collected(tmp_path: Path) -> None:
    """tempfile._TemporaryFileCloser rebuilt with no call and a plain attribute dict: its
    ``__del__`` unlinks ``self.name``. Why the standard library is never "data" outside
    the table: the rebuild is inert, the object is not."""
    victim = tmp_path / "victim.txt"
    inner = _rebuilt("tempfile", "_TemporaryFileCloser")
    state = _attrs(file=inner, name=_s(str(victim)), delete=b"\x88")
    data = b"\x80\x02" + _rebuilt("tempfile", "_TemporaryFileCloser", state) + b"."
    victim.write_text("keep")
    pickle.loads(data)
    gc.collect()
    assert not victim.exists()  # the real loader ran it

    victim.write_text("keep")
    path = tmp_path / "closer.pkl"
    path.write_bytes(data)
    assert "imports tempfile._TemporaryFileCloser" in " ".join(_unsafe(path))
    with pytest.raises(UnsafeCheckpointError):
        trainguard.load(path)
    gc.collect()
    assert victim.exists()


_GADGET = '''
import dataclasses
import pathlib
MARKER = pathlib.Path({marker!r})

@dataclasses.dataclass
class Settings:
    lr: float = 0.1
    tags: tuple = ()

class Config:
    """Inert when rebuilt as data; every other use runs the payload."""
    def __init__(self, *args):
        MARKER.write_text("__init__")
    def __setattr__(self, name, value):
        MARKER.write_text("__setattr__")
    def __hash__(self):
        MARKER.write_text("__hash__")
        return 0
    def __fspath__(self):
        MARKER.write_text("__fspath__")
        return "/x"
{extra}
'''


def _record(site: Path, files: list[str]) -> None:
    lines = []
    for name in files:
        digest = hashlib.sha256((site / name).read_bytes()).digest()
        encoded = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        lines.append(f"{name},sha256={encoded},{(site / name).stat().st_size}")
    info = site / "tgfake-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tgfake\nVersion: 1.0\n")
    (info / "RECORD").write_text("\n".join([*lines, "tgfake-1.0.dist-info/RECORD,,"]) + "\n")


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A package installed with a RECORD (``tgfake.config``), and the marker its code
    writes; the module is forgotten afterwards so each test imports its own."""
    site = tmp_path / "site"
    (site / "tgfake").mkdir(parents=True)
    (site / "tgfake" / "__init__.py").write_text("")
    marker = tmp_path / "PAYLOAD-RAN"
    source = site / "tgfake" / "config.py"
    source.write_text(_GADGET.format(marker=str(marker), extra=""))
    _record(site, ["tgfake/__init__.py", "tgfake/config.py"])
    monkeypatch.syspath_prepend(str(site))
    yield site, source, marker
    _forget()


def _forget() -> None:
    for name in [n for n in sys.modules if n == "tgfake" or n.startswith("tgfake.")]:
        del sys.modules[name]


def _victim_runs(data: bytes, marker: Path) -> None:
    """The real loader runs the payload (else the test proves nothing)."""
    _forget()
    assert not marker.exists()
    with contextlib.suppress(Exception):  # the payload runs before the loader fails
        pickle.loads(data)
    assert marker.exists(), "the real loader did not run the payload"
    marker.unlink()


def _refused(tmp_path: Path, data: bytes, marker: Path, expected: str) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    messages = " ".join(_unsafe(path))
    assert expected in messages, messages
    with pytest.raises(UnsafeCheckpointError):
        trainguard.load(path)
    assert not marker.exists()


def test_installed_class_rebuilt_as_data_is_a_note_and_runs_nothing(
    tmp_path: Path, installed
) -> None:
    _site, _source, marker = installed
    data = b"\x80\x02" + _rebuilt("tgfake.config", "Config", _attrs(lr=b"K\x03")) + b"."
    pickle.loads(data)
    assert not marker.exists()  # dict update: no __init__, no __setattr__
    path = tmp_path / "cfg.pkl"
    path.write_bytes(data)
    (note,) = _notes(path)
    assert "tgfake.config.Config" in note
    assert trainguard.load(path) == InertObject("tgfake.config.Config", (), {"lr": 3})
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_installed_dataclass_pickled_for_real_is_a_note(
    tmp_path: Path, installed, protocol: int
) -> None:
    """``pickle.dumps`` of a dataclass from an installed package (protocol 0 writes
    copyreg._reconstructor, 2+ NEWOBJ): SAFE with a note; a record, or the real object."""
    import tgfake.config  # type: ignore[import-not-found]

    path = tmp_path / "settings.pkl"
    value = tgfake.config.Settings(lr=0.5, tags=("a",))
    path.write_bytes(pickle.dumps({"cfg": value}, protocol=protocol))
    _forget()
    (note,) = _notes(path)
    assert "tgfake.config.Settings" in note
    record = trainguard.load(path)["cfg"]
    assert record == InertObject("tgfake.config.Settings", (), {"lr": 0.5, "tags": ("a",)})
    assert "tgfake.config" not in sys.modules  # never imported
    real = trainguard.load(path, allow=["tgfake.config.Settings"])["cfg"]
    assert type(real) is sys.modules["tgfake.config"].Settings  # imported now: allowed
    assert vars(real) == {"lr": 0.5, "tags": ("a",)}


_SMUGGLED = {
    # calling the class runs __init__
    "call": (_global("tgfake.config", "Config") + b")R", "REDUCE calls tgfake.config.Config"),
    # state that is not an attribute dict: pickle sets slot state with setattr
    "slot-state": (
        _rebuilt("tgfake.config", "Config", b"N" + _attrs(lr=b"K\x01") + b"\x86"),
        "not an attribute dict",
    ),
    # a dict key is hashed
    "dict-key": (b"}" + _rebuilt("tgfake.config", "Config") + b"K\x01s", "is hashed"),
    # set() hashes its members
    "set-member": (
        _global("builtins", "set") + _rebuilt("tgfake.config", "Config") + b"\x85\x85R",
        "passes an object rebuilt as data",
    ),
    # a path built from an object calls its __fspath__
    "fspath": (
        _global("pathlib", "PurePosixPath") + _rebuilt("tgfake.config", "Config") + b"\x85R",
        "other than its known-inert form",
    ),
    # taken by set() through a list it was appended to after the list joined the arguments
    "appended-later": (
        _global("builtins", "set") + b"]q\x00\x85h\x00" + _rebuilt("tgfake.config", "Config")
        + b"a0R",
        "passes an object rebuilt as data",
    ),
    # an OrderedDict's values can be hooks torch calls: Config() would run __init__... here
    # the hashing of a key shows the OrderedDict path is checked too
    "ordered-dict-key": (
        _global("collections", "OrderedDict") + b")R" + _rebuilt("tgfake.config", "Config")
        + b"K\x01s",
        "is hashed",
    ),
    # a class kept as a value (a hook a module would call later) is not data
    "class-as-value": (
        b"(" + _global("tgfake.config", "Config") + b"l" + _rebuilt("tgfake.config", "Config")
        + b"\x86",
        "used other than as a class rebuilt as data",
    ),
}  # fmt: skip


@pytest.mark.parametrize("attempt", sorted(_SMUGGLED))
def test_code_smuggled_through_an_installed_class_is_refused(
    tmp_path: Path, installed, attempt: str
) -> None:
    _site, _source, marker = installed
    body, expected = _SMUGGLED[attempt]
    data = b"\x80\x02" + body + b"."
    if attempt != "class-as-value":  # a class in a list runs nothing until someone calls it
        _victim_runs(data, marker)
    _refused(tmp_path, data, marker, expected)


def test_planted_or_edited_module_is_refused(tmp_path: Path, installed) -> None:
    """The class's module must be a file of an installed distribution, as RECORD has it:
    an edited file (a ``__setstate__`` added) or a module dropped on sys.path is refused."""
    site, source, marker = installed
    setstate = "    def __setstate__(self, state):\n        MARKER.write_text('setstate')\n"
    source.write_text(_GADGET.format(marker=str(marker), extra=setstate))
    data = b"\x80\x02" + _rebuilt("tgfake.config", "Config", _attrs(lr=b"K\x03")) + b"."
    _victim_runs(data, marker)
    _refused(tmp_path, data, marker, "differs from its distribution's RECORD")

    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "tgplanted.py").write_text(_GADGET.format(marker=str(marker), extra=setstate))
    sys.path.insert(0, str(planted))
    try:
        data = b"\x80\x02" + _rebuilt("tgplanted", "Config", _attrs(lr=b"K\x03")) + b"."
        pickle.loads(data)
        assert marker.exists()
        marker.unlink()
        _refused(tmp_path, data, marker, "not a file of an installed distribution")
    finally:
        sys.path.remove(str(planted))
        sys.modules.pop("tgplanted", None)


_CLASSES = {
    "setstate": ("class Config:\n    def __setstate__(self, s):\n        MARK()\n", "__setstate__"),
    "new": ("class Config:\n    def __new__(cls):\n        MARK()\n", "defines __new__"),
    "getattr": ("class Config:\n    def __getattr__(self, name):\n        MARK()\n", "__getattr__"),
    "del": ("class Config:\n    def __del__(self):\n        MARK()\n", "defines __del__"),
    "metaclass": ("class Config(metaclass=Meta):\n    pass\n", "has a metaclass"),
    "decorator": ("@swap\nclass Config:\n    pass\n", "decorated by swap"),
    "base": ("from tgfake.base import Base\nclass Config(Base):\n    pass\n", "__setstate__"),
    "assigned": ("Config = make()\n", "other than a class"),
    "star-base": ("from tgfake.base import *\nclass Config(Base):\n    pass\n", "resolved"),
}
_PRELUDE = """import pathlib
MARKER = pathlib.Path({marker!r})
def MARK():
    MARKER.write_text("ran")
class Meta(type):
    def __call__(cls, *a):
        MARK()
def swap(cls):
    return Swapped
def make():
    return Swapped
class Swapped:
    def __setstate__(self, s):
        MARK()
"""


@pytest.mark.parametrize("kind", sorted(_CLASSES))
def test_installed_class_whose_source_runs_code_on_rebuild_is_refused(
    tmp_path: Path, installed, kind: str
) -> None:
    """A distribution that RECORD vouches for, whose class runs code when rebuilt as data
    (a gadget in a genuine library, or an attacker's installed package): read from its
    source, without importing it."""
    site, source, marker = installed
    body, expected = _CLASSES[kind]
    source.write_text(_PRELUDE.format(marker=str(marker)) + body)
    (site / "tgfake" / "base.py").write_text(
        _PRELUDE.format(marker=str(marker)) + _CLASSES["setstate"][0].replace("Config", "Base")
    )
    _record(site, ["tgfake/__init__.py", "tgfake/config.py", "tgfake/base.py"])
    data = b"\x80\x02" + _rebuilt("tgfake.config", "Config", _attrs(lr=b"K\x03")) + b"."
    if kind != "metaclass":  # NEWOBJ does not call the metaclass: nothing runs (yet)
        _victim_runs(data, marker)
    _refused(tmp_path, data, marker, expected)


def test_tolerated_and_decorated_library_classes_are_what_the_tables_say() -> None:
    """PartialState's __getattr__ only raises; add_start_docstrings returns its class."""
    state = pytest.importorskip("accelerate.state")
    doc = pytest.importorskip("transformers.utils.doc")
    from trainguard.artifacts import classdefs

    bare = object.__new__(state.PartialState)
    with pytest.raises(AttributeError):
        bare.__setstate__  # noqa: B018  (the lookup pickle's BUILD makes)
    for qualified, methods in classdefs.TOLERATED.items():
        module, _, name = qualified.rpartition(".")
        cls = getattr(__import__(module, fromlist=[name]), name)
        defined = {
            m
            for m in classdefs.DANGEROUS
            for k in cls.__mro__[:-1]
            if m in vars(k) and not isinstance(vars(k)[m], types.GetSetDescriptorType)
        }
        assert defined == methods, qualified

    class Plain:
        pass

    assert doc.add_start_docstrings("docs")(Plain) is Plain


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # copyreg's reconstructor with a base other than object calls the base's __init__
        (
            _global("copyreg", "_reconstructor")
            + _global("tgfake.config", "Config")
            + _global("builtins", "dict")
            + b"}\x87R",
            "with arguments its __new__ receives",
        ),
        (
            _global("copyreg", "__newobj__") + _global("tgfake.config", "Config") + b"K\x01\x86R",
            "with arguments its __new__ receives",
        ),
        # OBJ reaches copyreg.__newobj__ too
        (
            b"(" + _global("copyreg", "__newobj__") + _global("tgfake.config", "Config")
            + b"K\x01o",
            "with arguments its __new__ receives",
        ),
        (_global("tgfake.config", "Config") + b"K\x01\x85\x81", "with arguments its __new__"),
        (_rebuilt("tgfake.config", "Config", _attrs(__class__=b"N")), "special"),
        (_rebuilt("tgfake.config", "Config") + b"}b", "second BUILD"),
        (
            _global("collections", "OrderedDict") + b")RK\x00" + _rebuilt("tgfake.config", "Config")
            + b"s",
            "puts an object rebuilt as data into",
        ),
        (_global("torch.nn.modules.linear", "Linear") + b"J\x00\x00\x01\x00\x85R", "(empty)"),
        # torch's _rebuild_from_type_v2 calls its first argument: not a way around the
        # reconstructors' and the table's argument rules (this would allocate 1 TiB)
        (
            _global("torch._tensor", "_rebuild_from_type_v2") + b"("
            + _global("copyreg", "__newobj__") + _global("torch", "Tensor")
            + _global("torch.storage", "UntypedStorage") + b"\x8a\x06\x00\x00\x00\x00\x00\x01"
            + b"\x86}tR",
            "_rebuild_from_type_v2 with a disallowed function",
        ),
        (
            _global("torch._tensor", "_rebuild_from_type_v2") + b"("
            + _global("torch.nn.modules.linear", "Linear") + _global("torch", "Tensor")
            + b"J\x00\x00\x01\x00J\x00\x00\x01\x00\x86}tR",
            "(empty)",
        ),
        # an instance attribute named forward: model(x) would call the rebuilt object
        (
            _rebuilt(
                "torch.nn.modules.container", "Sequential",
                _attrs(forward=_rebuilt("tgfake.config", "Config")),
            ),
            "object rebuilt as data in its state",
        ),
        (_global("transformers.trainer_utils", "IntervalStrategy") + b")R", "(one)"),
    ],
    ids=["reconstructor-base", "newobj-args", "obj-newobj", "newobj", "dunder", "build-twice",
         "hook-value", "nn-args", "type-v2-newobj", "type-v2-nn", "nn-forward",
         "enum-no-value"],
)  # fmt: skip
def test_reconstruction_forms_outside_the_rule_are_findings(
    tmp_path: Path, installed, body: bytes, expected: str
) -> None:
    path = tmp_path / "form.pkl"
    path.write_bytes(b"\x80\x02" + body + b".")
    assert expected in " ".join(_unsafe(path))


def test_allow_rejects_what_is_not_a_class_name(tmp_path: Path) -> None:
    path = tmp_path / "one.pkl"
    path.write_bytes(pickle.dumps(1))
    with pytest.raises(trainguard.UsageError):
        trainguard.load(path, allow=["os.system; rm"])
    assert trainguard.load(path, allow=["os.system"]) == 1


# --- legacy tar and TorchScript archives -----------------------------------------------


def _tar_checkpoint(path: Path, tensors: dict[str, torch.Tensor], extra: dict[str, object]):
    """The pre-1.0 ``torch.save`` tar format, written the way old torch wrote it."""
    import struct
    import tarfile

    class Ref:
        def __init__(self, index: int) -> None:
            self.index = index

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> str | None:
            return str(100 + obj.index) if isinstance(obj, Ref) else None

    storages, records, main = io.BytesIO(), io.BytesIO(), io.BytesIO()
    pickle.dump(len(tensors), storages, protocol=2)
    pickle.dump(len(tensors), records, protocol=2)
    for i, t in enumerate(tensors.values()):
        pickle.dump((i, "cpu", torch.FloatStorage), storages, protocol=2)
        storages.write(struct.pack("<q", t.numel()) + t.contiguous().numpy().tobytes())
        pickle.dump((100 + i, i, torch.FloatTensor), records, protocol=2)
        dims = struct.pack(f"<{t.dim()}q", *t.shape) + struct.pack(f"<{t.dim()}q", *t.stride())
        records.write(struct.pack("<ii", t.dim(), 0) + dims + struct.pack("<q", 0))
    pickle.dump([], storages, protocol=2)
    Pickler(main, protocol=2).dump({**{k: Ref(i) for i, k in enumerate(tensors)}, **extra})
    info = pickle.dumps({"protocol_version": 1000, "little_endian": True}, protocol=2)
    parts = {"sys_info": info, "pickle": main.getvalue()}
    parts |= {"storages": storages.getvalue(), "tensors": records.getvalue()}
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, blob in parts.items():
            member = tarfile.TarInfo(name)
            member.size = len(blob)
            tar.addfile(member, io.BytesIO(blob))


def test_legacy_tar_checkpoint_scans_and_loads(tmp_path: Path) -> None:
    """The pre-1.0 tar format: its pickle's persistent ids name the tensors. Before: UNSAFE
    ("persistent id in a format that does not use them"), and not loadable."""
    path = tmp_path / "old.pt"
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    _tar_checkpoint(path, tensors, {"epoch": 3, "args": VALUES["args"]})
    original = torch.load(path, weights_only=False)  # the real reader takes it
    assert trainguard.scan(path).files[0].format == "torch-tar"
    assert _notes(path) == []
    loaded = trainguard.load(path)
    assert loaded["epoch"] == 3
    assert loaded["args"] == original["args"]
    for key in tensors:
        assert torch.equal(loaded[key], original[key])


class _Scripted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * self.scale

    @torch.jit.export
    def __getstate__(self) -> tuple[float, bool]:
        return (self.scale, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[float, bool]) -> None:
        self.scale = state[0] * 1.0
        self.training = state[1]


def test_torchscript_archive_is_code_and_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch.jit.load compiles the archive's code and runs its __setstate__ while loading:
    UNSAFE, with what each code member defines and calls shown by -v."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_Scripted()), path)
    messages = _unsafe(path)
    assert any(m.startswith("TorchScript archive") for m in messages)
    assert any("__setstate__: torch.jit.load runs it" in m for m in messages)
    assert main(["scan", "-v", str(path)]) == 1
    shown = capsys.readouterr().err
    assert "TorchScript code: defines _Scripted(forward, __getstate__, __setstate__)" in shown
    assert "calls torch.mul, torch.relu" in shown
