"""SARIF 2.1.0 output for a scan, for code-scanning dashboards."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from urllib.parse import quote

from trainguard import __version__
from trainguard.artifacts.interface import FileReport, ScanReport, Verdict, json_text
from trainguard.errors import Severity

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"

_LEVEL = {
    Severity.CRITICAL: "error",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "note",
    Severity.INFO: "note",
}
_SCORE = {
    Severity.CRITICAL: "9.5",
    Severity.HIGH: "8.0",
    Severity.MEDIUM: "5.0",
    Severity.LOW: "2.0",
    Severity.INFO: "0.0",
}
_VERDICT_RULE = {
    Verdict.UNVERIFIABLE: ("unverifiable", "the file could not be fully parsed: fail closed"),
    Verdict.UNSUPPORTED: ("unsupported", "the file's format is not analysed"),
}


class _Results(list[dict[str, object]]):
    """The results, made again each time they are iterated, never held all at once.

    ``json`` encodes a list by iterating it (with an indent, in pure Python), so the CLI
    writes a 100,000-file scan's SARIF in bounded memory. Only iteration, ``len`` and
    truth are supported.
    """

    def __init__(self, make: Callable[[], Iterator[dict[str, object]]], count: int) -> None:
        super().__init__()
        self._make = make
        self._count = count

    def __iter__(self) -> Iterator[dict[str, object]]:
        return self._make()

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0


def to_sarif(report: ScanReport, *, lazy: bool = False) -> dict[str, object]:
    """The scan as one SARIF log: a rule per detector, a result per finding.

    ``lazy``: the results list is made while it is encoded (see :class:`_Results`).
    """
    rules: dict[str, dict[str, object]] = {}

    def rule(rule_id: str, text: str) -> int:
        if rule_id not in rules:
            rules[rule_id] = {
                "id": rule_id,
                "name": rule_id.replace("-", " ").title().replace(" ", ""),
                "shortDescription": {"text": text},
            }
        return list(rules).index(rule_id)

    def make() -> Iterator[dict[str, object]]:
        for file in report.files:
            if file.verdict is not Verdict.SKIPPED:  # not model files: no result, one note
                yield from _file_results(file, rule)

    count = sum(1 for _ in make())  # registers every rule, in order
    results: list[dict[str, object]] = _Results(make, count) if lazy else list(make())
    return {
        "$schema": SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "trainguard",
                        "version": __version__,
                        "rules": list(rules.values()),
                    }
                },
                "results": results,
                "invocations": [
                    {
                        "executionSuccessful": not report.errors,
                        "toolExecutionNotifications": [
                            {"level": "error", "message": {"text": e}} for e in report.errors
                        ]
                        + _skipped_note(report),
                    }
                ],
            }
        ],
    }


def _skipped_note(report: ScanReport) -> list[dict[str, object]]:
    """One note-level notification counting the files that are not model files."""
    skipped = report.counts().get(Verdict.SKIPPED.value, 0)
    if not skipped:
        return []
    text = (
        f"{skipped} file(s) skipped: not model files (no pickle, PyTorch, NumPy, joblib "
        "or safetensors loader reads them)"
    )
    return [{"level": "note", "message": {"text": text}}]


def _file_results(file: FileReport, rule: Callable[[str, str], int]) -> Iterator[dict[str, object]]:
    # a URI reference: percent-encoded bytes, so any name (spaces, '#', newlines, bytes
    # that are not UTF-8) is valid and decodes back to the exact path
    uri = quote(os.fsencode(file.path), safe="/")
    location = {"physicalLocation": {"artifactLocation": {"uri": uri}}}
    for finding in file.findings:
        if finding.severity < Severity.LOW:
            continue
        rule_id = f"trainguard/{finding.detector}"
        index = rule(rule_id, f"findings of the {finding.detector} analyser")
        where = f" ({finding.location})" if finding.location else ""
        yield {
            "ruleId": rule_id,
            "ruleIndex": index,
            "level": _LEVEL[finding.severity],
            "message": {"text": json_text(f"{finding.message}{where}")},
            "locations": [location],
            "properties": {
                "severity": finding.severity.name,
                "security-severity": _SCORE[finding.severity],
                "member": None if finding.member is None else json_text(finding.member),
                "offset": finding.offset,
                "verdict": file.verdict.value,
            },
        }
    if file.verdict in _VERDICT_RULE:
        rule_id, text = _VERDICT_RULE[file.verdict]
        index = rule(f"trainguard/{rule_id}", text)
        yield {
            "ruleId": f"trainguard/{rule_id}",
            "ruleIndex": index,
            "level": "error",
            "message": {"text": f"{file.verdict.value}: {file.format}"},
            "locations": [location],
        }
