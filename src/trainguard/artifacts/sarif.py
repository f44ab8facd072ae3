"""SARIF 2.1.0 output for a scan, for code-scanning dashboards."""

from __future__ import annotations

from trainguard import __version__
from trainguard.artifacts.interface import ScanReport, Verdict
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


def to_sarif(report: ScanReport) -> dict[str, object]:
    """The scan as one SARIF log: a rule per detector, a result per finding."""
    rules: dict[str, dict[str, object]] = {}
    results: list[dict[str, object]] = []

    def rule(rule_id: str, text: str) -> int:
        if rule_id not in rules:
            rules[rule_id] = {
                "id": rule_id,
                "name": rule_id.replace("-", " ").title().replace(" ", ""),
                "shortDescription": {"text": text},
            }
        return list(rules).index(rule_id)

    for file in report.files:
        location = {"physicalLocation": {"artifactLocation": {"uri": file.path}}}
        for finding in file.findings:
            if finding.severity < Severity.LOW:
                continue
            rule_id = f"trainguard/{finding.detector}"
            index = rule(rule_id, f"findings of the {finding.detector} analyser")
            where = f" ({finding.location})" if finding.location else ""
            results.append(
                {
                    "ruleId": rule_id,
                    "ruleIndex": index,
                    "level": _LEVEL[finding.severity],
                    "message": {"text": f"{finding.message}{where}"},
                    "locations": [location],
                    "properties": {
                        "severity": finding.severity.name,
                        "security-severity": _SCORE[finding.severity],
                        "member": finding.member,
                        "offset": finding.offset,
                        "verdict": file.verdict.value,
                    },
                }
            )
        if file.verdict in _VERDICT_RULE:
            rule_id, text = _VERDICT_RULE[file.verdict]
            index = rule(f"trainguard/{rule_id}", text)
            results.append(
                {
                    "ruleId": f"trainguard/{rule_id}",
                    "ruleIndex": index,
                    "level": "error",
                    "message": {"text": f"{file.verdict.value}: {file.format}"},
                    "locations": [location],
                }
            )
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
                        ],
                    }
                ],
            }
        ],
    }
