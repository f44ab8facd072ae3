"""The opcode simulator: named regressions for each way a pickle can reach code.

These build minimal pickles by hand so each test isolates one rule of the analyser.
"""

from __future__ import annotations

import pickle

import pytest

from trainguard.artifacts.interface import Analysis, FormatError, Verdict
from trainguard.artifacts.pickle_analysis import analyse_pickle
from trainguard.errors import Severity


def analyse(data: bytes) -> Analysis:
    analysis = Analysis("pickle")
    try:
        analyse_pickle(memoryview(data), 0, analysis)
    except FormatError as exc:
        analysis.fail(exc)
    return analysis


def messages(analysis: Analysis) -> str:
    return " | ".join(f.message for f in analysis.findings)


def test_global_outside_allowlist_is_named_with_offset():
    data = b"\x80\x02cos\nsystem\nq\x00."
    analysis = analyse(data)
    (finding,) = [f for f in analysis.findings if "imports" in f.message]
    assert "os.system" in finding.message
    assert finding.offset == 2
    assert finding.severity is Severity.CRITICAL


def test_harmless_looking_name_is_still_refused_when_called():
    """An allowlist, not a denylist: any unknown callable is unsafe (e.g. ``collections.deque``)."""
    data = b"\x80\x02ccollections\ndeque\n)R."
    analysis = analyse(data)
    assert analysis.verdict is Verdict.UNSAFE
    assert "collections.deque" in messages(analysis)


def test_stack_global_through_memo():
    """Names assembled from memoised strings (a trick against scanners that read
    only the two strings right before STACK_GLOBAL)."""
    data = (
        b"\x80\x04\x8c\x02os\x94\x8c\x05dummy\x94\x8c\x06system\x94"
        b"0h\x00h\x02\x93\x8c\x04echo\x85R."
    )
    analysis = analyse(data)
    assert "os.system" in messages(analysis)
    assert analysis.verdict is Verdict.UNSAFE


def test_stack_global_from_a_computed_value_is_critical():
    data = b"\x80\x04\x8c\x02os\x8c\x06system\x86\x94\x8c\x01x\x93."
    analysis = analyse(data)
    assert "not a constant string" in messages(analysis)


def test_dup_of_module_name():
    data = b"\x80\x04\x8c\x08builtins2\x8c\x04eval\x93\x8c\x011\x85R."
    assert analyse(data).verdict is Verdict.UNSAFE


def test_compat_mapping_of_python2_names():
    """Protocol < 3 maps ``__builtin__`` to ``builtins`` before importing."""
    data = b"\x80\x02c__builtin__\neval\nX\x01\x00\x00\x001\x85R."
    assert "builtins.eval" in messages(analyse(data))


def test_value_only_global_cannot_be_called():
    data = b"\x80\x02ctorch\nFloatStorage\nK\x10\x85R."
    analysis = analyse(data)
    assert "allowed only as a value" in messages(analysis)
    assert analysis.verdict is Verdict.UNSAFE


def test_calling_the_result_of_a_call():
    """getattr-style chains call an object computed by an earlier call."""
    data = b"\x80\x02ctorch\nSize\n)R)R."
    assert "computed object" in messages(analyse(data))


def test_build_on_a_global_sets_attributes_on_a_real_class():
    data = b"\x80\x02ctorch\nTensor\nN}\x86b."
    assert "BUILD" in messages(analyse(data))


def test_setitems_on_a_non_dict_calls_setitem():
    data = b"\x80\x02ctorch\nSize\n)R(K\x01K\x02u."
    assert "SETITEMS" in messages(analyse(data))


def test_appends_on_a_non_list_calls_extend():
    data = b"\x80\x02ctorch\nSize\n)R(K\x01e."
    assert "APPENDS" in messages(analyse(data))


@pytest.mark.parametrize("opcode", [b"\x82\x01", b"\x83\x01\x00", b"\x84\x01\x00\x00\x00"])
def test_extension_codes_are_refused(opcode):
    analysis = analyse(b"\x80\x02" + opcode + b")R.")
    assert analysis.verdict is Verdict.UNSAFE


def test_inst_and_obj_are_calls():
    assert analyse(b"(S'echo'\nios\nsystem\n.").verdict is Verdict.UNSAFE
    assert analyse(b"(cos\nsystem\nS'echo'\no.").verdict is Verdict.UNSAFE


def test_newobj_ex_is_a_call():
    data = b"\x80\x04\x8c\x0asubprocess\x8c\x05Popen\x93)}\x92."
    assert analyse(data).verdict is Verdict.UNSAFE


def test_huge_memo_index_is_memory_exhaustion():
    data = b"\x80\x02K\x01r\xff\xff\xff\x7f."
    analysis = analyse(data)
    assert "memo index" in messages(analysis)
    assert analysis.verdict is Verdict.UNSAFE


def test_findings_before_a_parse_error_are_kept():
    data = b"\x80\x02cos\nsystem\n(\xff"
    analysis = analyse(data)
    assert "os.system" in messages(analysis)
    assert analysis.parse_error is not None
    assert analysis.verdict is Verdict.UNSAFE


def test_truncated_plain_pickle_is_unverifiable():
    data = pickle.dumps({"a": [1, 2, 3]}, protocol=4)[:-3]
    assert analyse(data).verdict is Verdict.UNVERIFIABLE


def test_multi_gigabyte_length_field_is_bounded():
    data = b"\x80\x04\x8e" + (1 << 62).to_bytes(8, "little") + b"xx."
    analysis = analyse(data)
    assert analysis.verdict is Verdict.UNVERIFIABLE
    assert "past the end" in messages(analysis)


def test_deep_nesting_is_linear():
    depth = 200_000
    data = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    assert analyse(data).verdict is Verdict.SAFE


def test_deep_marks_unbalanced():
    data = b"\x80\x02" + b"(" * 100_000 + b"."
    assert analyse(data).verdict is Verdict.UNVERIFIABLE


@pytest.mark.parametrize("protocol", range(6))
def test_plain_containers_are_safe_in_every_protocol(protocol):
    value = {"a": [1, 2.5, None, True], "b": ("x", b"y"), "c": {3}, "d": frozenset({4}), 5: 1j}
    assert analyse(pickle.dumps(value, protocol=protocol)).verdict is Verdict.SAFE


def test_build_planting_setstate_then_calling_it():
    """Two BUILDs on one OrderedDict: the first stores an instance ``__setstate__`` (an
    allowlisted callable), the second calls it with arbitrary arguments, bypassing the
    argument checks (the shape of fickling's ``__setstate__`` injection)."""
    data = (
        b"\x80\x02ccollections\nOrderedDict\n)R"
        b"}X\x0c\x00\x00\x00__setstate__c_codecs\nencode\nsb"
        b"X\x04\x00\x00\x00textb."
    )
    found = messages(analyse(data))
    assert "special attribute" in found
    assert "second BUILD" in found


def test_build_with_slot_state_on_an_ordered_dict():
    data = b"\x80\x02ccollections\nOrderedDict\n)RN}X\x01\x00\x00\x00aK\x01s\x86b."
    assert "non-dict state" in messages(analyse(data))
