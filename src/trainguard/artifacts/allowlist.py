"""The globals a model file's pickle may name, and what it may do with each.

This is an allowlist: anything not listed here is a finding. The set is the one that
PyTorch's ``weights_only`` loader needs for real checkpoints (tensors, storages, dtypes,
``OrderedDict``, plain containers and scalars), plus the few NumPy and joblib names
that plain array files need. Each entry says whether the global may be *called*
(REDUCE, NEWOBJ, OBJ, INST) and whether BUILD or item-setting opcodes may run on the
objects it returns; a global allowed as a value (a dtype, a storage class) is unsafe
to call; :func:`argument_findings` says which arguments the callables may take.

It also holds the rule for data that is not code (docs/scan-policy.md): a short table of
classes known to be inert when rebuilt (``argparse.Namespace``, ``pathlib``, ``datetime``,
``torch.nn`` modules, the enums a ``TrainingArguments`` holds), and
:func:`reconstructible`, the classes outside the allowlist that a pickle may rebuild as
data (a new instance and its attribute dict, no call) with a note rather than a finding.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from trainguard.artifacts.pickle_values import UNKNOWN, Const, Container, Global, Value
from trainguard.errors import Severity


@dataclass(frozen=True)
class Rule:
    """What a pickle may do with one allowed global."""

    call: bool = False
    #: BUILD with a dict state may set plain attributes on the objects the call returns
    build: bool = False
    #: the returned objects' own __setstate__ accepts any state safely (arrays, tensors)
    setstate: bool = False
    #: SETITEM(S) may run on the objects the call returns
    items: bool = False
    #: what a call may pass: anything ("any"), nothing ("empty"), constant strings
    #: ("strings"), or one constant ("one": an enum member looked up by its value)
    args: str = "any"
    #: a class of a module outside the standard library and torch/numpy: the safe loader
    #: returns an :class:`~trainguard.artifacts.loader.InertObject` instead of importing it
    record: bool = False


VALUE = Rule()
CALL = Rule(call=True)

_TORCH_DTYPES = (
    "bfloat16 bits16 bits1x8 bits2x4 bits4x2 bits8 bool complex128 complex32 complex64 "
    "float16 float32 float4_e2m1fn_x2 float64 float8_e4m3fn float8_e4m3fnuz float8_e5m2 "
    "float8_e5m2fnuz float8_e8m0fnu int1 int16 int2 int3 int32 int4 int5 int6 int64 int7 "
    "int8 qint32 qint8 quint2x4 quint4x2 quint8 uint1 uint16 uint2 uint3 uint32 uint4 uint5 "
    "uint6 uint64 uint7 uint8 half float double long int short cfloat cdouble"
).split()
_QSCHEMES = (
    "per_channel_affine per_channel_affine_float_qparams per_channel_symmetric "
    "per_tensor_affine per_tensor_symmetric"
).split()
_TYPED = "BFloat16 Bool Byte Char Double Float Half Int Long Short".split()
_STORAGE_ONLY = "ComplexDouble ComplexFloat QInt32 QInt8 QUInt2x4 QUInt4x2 QUInt8".split()
_REBUILD = (
    "_rebuild_tensor _rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_parameter "
    "_rebuild_parameter_with_state _rebuild_qtensor _rebuild_sparse_tensor "
    "_rebuild_nested_tensor _rebuild_meta_tensor_no_storage "
    "_rebuild_device_tensor_from_cpu_tensor _rebuild_device_tensor_from_numpy "
    "_rebuild_wrapper_subclass"
).split()

TENSOR_RESULT = Rule(call=True, build=True, setstate=True)


def _torch_rules() -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    for name in _TORCH_DTYPES + _QSCHEMES:
        rules[f"torch.{name}"] = VALUE
    for prefix in ("torch", "torch.cuda"):
        for kind in _TYPED:
            rules[f"{prefix}.{kind}Storage"] = VALUE
            rules[f"{prefix}.{kind}Tensor"] = VALUE
    for kind in _STORAGE_ONLY:
        rules[f"torch.{kind}Storage"] = VALUE
    for prefix in ("torch.sparse", "torch.cuda.sparse"):
        for kind in _TYPED:
            if kind != "Bool":
                rules[f"{prefix}.{kind}Tensor"] = VALUE
    for name in _REBUILD:
        rules[f"torch._utils.{name}"] = TENSOR_RESULT
    rules.update(
        {
            "torch._tensor._rebuild_from_type_v2": TENSOR_RESULT,
            "torch.Tensor": VALUE,
            "torch.nn.parameter.Parameter": VALUE,
            "torch.storage.TypedStorage": VALUE,
            "torch.storage.UntypedStorage": VALUE,
            "torch.Size": CALL,
            "torch.device": CALL,
            "torch.serialization._get_layout": CALL,
        }
    )
    return rules


def _numpy_rules() -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    for core in ("numpy.core", "numpy._core"):
        rules[f"{core}.multiarray._reconstruct"] = Rule(call=True, build=True, setstate=True)
        rules[f"{core}.multiarray.scalar"] = CALL
        rules[f"{core}.numeric._frombuffer"] = CALL
    rules["numpy.ndarray"] = VALUE
    rules["numpy.dtype"] = Rule(call=True, build=True, setstate=True)
    return rules


def _inert_rules() -> dict[str, Rule]:
    """Classes whose rebuilding runs none of their code, or only code known to be inert.

    Each claim is checked against the installed classes by tests/artifacts/test_inert.py.
    """
    rules: dict[str, Rule] = {
        # no __new__, __init__ takes keywords only, no __setstate__: BUILD updates __dict__
        "argparse.Namespace": Rule(call=True, build=True),
        "types.SimpleNamespace": Rule(call=True, build=True),
        # built from constant strings: pure path arithmetic, no file system access
        **{
            f"{mod}.{name}": Rule(call=True, args="strings")
            for mod in ("pathlib", "pathlib._local")
            for name in "PurePath PurePosixPath PureWindowsPath Path PosixPath WindowsPath".split()
        },
        # C types whose constructors only validate numbers and bytes
        **{f"datetime.{n}": CALL for n in "datetime date time timedelta timezone".split()},
        # the base copyreg._reconstructor names for an object rebuilt as data
        "builtins.object": VALUE,
    }
    for module, names in _THIRD_PARTY_ENUMS.items():
        for name in names.split():
            rules[f"{module}.{name}"] = Rule(call=True, args="one", record=True)
    return rules


#: Enums a Trainer's ``TrainingArguments`` (and accelerate's state in it) pickles by value:
#: ``Enum(value)`` on a plain ``enum.Enum`` only looks the member up (their ``_missing_``
#: raises). A class the table does not name is not called: ``--allow`` it.
_THIRD_PARTY_ENUMS = {
    "transformers.trainer_utils": (
        "IntervalStrategy SaveStrategy HubStrategy SchedulerType EvaluationStrategy FSDPOption"
    ),
    "transformers.training_args": "OptimizerNames",
    "transformers.utils.generic": "PaddingStrategy TensorType",
    "accelerate.utils.dataclasses": "DistributedType PrecisionType DynamoBackend",
}

#: How ``copyreg`` rebuilds an object without calling its class (protocols 0 and 1, and
#: hand-written reduce values); the analyser checks their arguments.
RECONSTRUCTORS = frozenset(
    {"copyreg._reconstructor", "copyreg.__newobj__", "copyreg.__newobj_ex__"}
)

#: torch's own ``nn`` modules: rebuilt with no arguments, then ``Module.__setstate__``
#: (torch's) takes a dict of plain attributes.
NN_MODULE = Rule(call=True, build=True, args="empty")
_NN_PREFIX = "torch.nn.modules."

ALLOWED: dict[str, Rule] = {
    "collections.OrderedDict": Rule(call=True, build=True, items=True),
    "collections.Counter": Rule(call=True, items=True),
    "builtins.set": CALL,
    "builtins.frozenset": CALL,
    "builtins.bytearray": CALL,
    "builtins.complex": CALL,
    "builtins.slice": CALL,
    "_codecs.encode": CALL,
    # joblib writes arrays as this placeholder followed by the raw bytes; its BUILD
    # is handled by the analyser, which skips (or parses) the array data.
    "joblib.numpy_pickle.NumpyArrayWrapper": Rule(call=True, build=True),
    **_torch_rules(),
    **_numpy_rules(),
    **_inert_rules(),
    **dict.fromkeys(RECONSTRUCTORS, CALL),
}

#: The types `_rebuild_from_type_v2` and `_rebuild_wrapper_subclass` may produce.
TENSOR_TYPES = frozenset({"torch.Tensor", "torch.nn.parameter.Parameter"})

#: Modules whose globals run code, spawn processes or reach the network: their
#: presence is CRITICAL rather than HIGH. Severity only; everything not in
#: ALLOWED is a finding whatever its module.
_CRITICAL_ROOTS = frozenset(
    """os posix nt subprocess _posixsubprocess builtins sys runpy importlib pty socket
    shutil pickle _pickle marshal types ctypes code codeop pdb bdb webbrowser pip
    setuptools pkg_resources timeit cProfile profile pydoc trace operator functools
    multiprocessing asyncio threading _thread signal dill cloudpickle joblib commands
    doctest inspect ssl http urllib requests ftplib smtplib telnetlib zipimport linecache
    tempfile io _io glob ensurepip venv distutils site sysconfig copyreg _operator
    _functools cgi xmlrpc socketserver selectors mmap fcntl resource ptrace gc weakref
    idlelib lib2to3 tkinter turtle unittest""".split()
)
_CRITICAL_NAMES = frozenset(
    """torch.load torch.hub torch.jit torch._C torch.ops torch.classes torch.package
    torch.serialization.load torch.utils.cpp_extension torch._dynamo torch.compile
    torch.distributed torch.multiprocessing numpy.load numpy.testing numpy.f2py
    numpy.distutils numpy.ctypeslib numpy.lib.format torch.fx""".split()
)


def severity_of(qualified: str) -> Severity:
    """How dangerous a non-allowlisted global is: CRITICAL for known code execution."""
    root = qualified.split(".", 1)[0]
    if root in _CRITICAL_ROOTS:
        return Severity.CRITICAL
    if any(qualified == n or qualified.startswith(n + ".") for n in _CRITICAL_NAMES):
        return Severity.CRITICAL
    return Severity.HIGH


def argument_findings(qualified: str, args: Value, rule: Rule) -> list[tuple[Severity, str]]:
    """What is wrong with the arguments a pickle passes to the allowed callable
    ``qualified`` (the simulated ``args``): its rule's argument form, and the checks of the
    few callables that call or rebuild what they are given. Empty when they are fine."""
    found: list[tuple[Severity, str]] = []
    items = args.items if isinstance(args, Container) else None
    if rule.args != "any":
        values = items if items is not None else [UNKNOWN]
        consts = [v.value for v in values if isinstance(v, Const)]
        plain = len(consts) == len(values)
        ok = {
            "empty": not values,
            "strings": plain and all(isinstance(v, str) for v in consts),
            "one": len(values) == 1 and plain,
        }[rule.args]
        if not ok:
            found.append(
                (
                    Severity.HIGH,
                    f"{qualified} called with arguments other than its known-inert form "
                    f"({rule.args})",
                )
            )
    if qualified == "_codecs.encode":
        encoding = items[1] if items and len(items) == 2 else None
        if not (isinstance(encoding, Const) and encoding.value in ("latin1", "latin-1")):
            found.append((Severity.MEDIUM, "_codecs.encode with an unexpected codec"))
    elif qualified == "torch._tensor._rebuild_from_type_v2":
        func = items[0] if items and len(items) == 4 else None
        kind = items[1] if items and len(items) == 4 else None
        fn = rule_for(func.qualified) if isinstance(func, Global) else None
        if (
            not isinstance(func, Global)
            or fn is None
            or not fn.call
            or func.qualified in RECONSTRUCTORS  # their arguments are checked in rebuild
        ):
            found.append((Severity.HIGH, "_rebuild_from_type_v2 with a disallowed function"))
        elif items:  # it calls func(*args): the same argument rules as a direct call
            found.extend(argument_findings(func.qualified, items[2], fn))
        if not (isinstance(kind, Global) and kind.qualified in TENSOR_TYPES):
            found.append((Severity.HIGH, "_rebuild_from_type_v2 with a non-tensor type"))
    elif qualified == "torch._utils._rebuild_wrapper_subclass":
        cls = items[0] if items else None
        if not (isinstance(cls, Global) and cls.qualified in TENSOR_TYPES):
            found.append((Severity.HIGH, "_rebuild_wrapper_subclass of a non-tensor type"))
    return found


#: Classes the caller trusts (``allow=[...]``, ``--allow``): rebuilt and called for real.
TRUSTED = Rule(call=True, build=True, setstate=True, items=True)
_caller_allows: ContextVar[frozenset[str]] = ContextVar("trainguard_allow", default=frozenset())


def allowing(names: Iterable[str] | None) -> contextlib.AbstractContextManager[frozenset[str]]:
    """Within the block, ``names`` (``module.Class``, or ``module.*`` for every name under
    ``module``) are trusted: called and rebuilt like the allowlist's own.

    Raises ValueError at once for a name that is not ``MODULE.NAME`` or ``MODULE.*``.
    """
    allowed = frozenset([names] if isinstance(names, str) else names or ())
    for name in allowed:
        module, _, attr = name.rpartition(".")
        parts = [*module.split("."), attr.replace("*", "_") if attr == "*" else attr]
        if not (module and all(p.isidentifier() for p in parts)):
            raise ValueError(f"{name!r} is not MODULE.NAME or MODULE.*")
    return _allowing(allowed)


@contextlib.contextmanager
def _allowing(allowed: frozenset[str]) -> Iterator[frozenset[str]]:
    token = _caller_allows.set(_caller_allows.get() | allowed)
    try:
        yield allowed
    finally:
        _caller_allows.reset(token)


def caller_allows(qualified: str) -> bool:
    allowed = _caller_allows.get()
    if not allowed:
        return False
    if qualified in allowed:
        return True
    parts = qualified.split(".")
    return any(".".join(parts[:i]) + ".*" in allowed for i in range(1, len(parts)))


def rule_for(qualified: str) -> Rule | None:
    if caller_allows(qualified):
        return TRUSTED
    rule = ALLOWED.get(qualified)
    if rule is None and qualified.startswith(_NN_PREFIX):
        module, _, name = qualified.rpartition(".")
        if name[:1].isupper() and name.isidentifier() and module.count(".") == 3:
            return NN_MODULE
    return rule


#: Roots whose classes are never rebuilt as unknown data: the standard library (see
#: ``sys.stdlib_module_names``) and these hold classes whose ``__del__``, ``__setstate__``
#: or ``__getattr__`` act on attributes the pickle would set (``tempfile`` deletes
#: ``self.name`` when collected, ``filelock`` its lock file, shared memory closes
#: ``self._fd``); from them only the table above is allowed.
_NEVER_DATA = frozenset({"torch", "numpy", "joblib", "scipy", "filelock", "__torch__"})


def reconstructible(qualified: str) -> bool:
    """May a pickle rebuild this class outside the allowlist as data (note, not finding)?

    Only an importable-looking public class name of a module outside the standard
    library, torch, numpy and :data:`_NEVER_DATA`; the analyser further requires that it
    is rebuilt with no arguments and given a plain attribute dict. Its module's import-time
    code still runs under ``pickle.load``: the module must come from the verified
    environment (``trainguard verify-env``).
    """
    module, _, name = qualified.rpartition(".")
    parts = module.split(".")
    root = parts[0]
    return (
        bool(module)
        and name.isidentifier()
        and not name.startswith("_")
        and all(p.isidentifier() for p in parts)
        and root not in sys.stdlib_module_names
        and root not in _NEVER_DATA
        and root not in _CRITICAL_ROOTS
        and severity_of(qualified) is not Severity.CRITICAL
    )
