"""The globals a model file's pickle may name, and what it may do with each.

This is an allowlist: anything not listed here is a finding. The set is the one that
PyTorch's ``weights_only`` loader needs for real checkpoints (tensors, storages, dtypes,
``OrderedDict``, plain containers and scalars), plus the few NumPy and joblib names
that plain array files need. Each entry says whether the global may be *called*
(REDUCE, NEWOBJ, OBJ, INST) and whether BUILD or item-setting opcodes may run on the
objects it returns; a global allowed as a value (a dtype, a storage class) is unsafe
to call.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def rule_for(qualified: str) -> Rule | None:
    return ALLOWED.get(qualified)
