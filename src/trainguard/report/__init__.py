"""The incident and damage report of a run, read from its ledger (and nothing live).

    report = build_report("runs/42", gpus_per_rank=8, cost_per_gpu_hour=2.5)
    print(render_text(report))          # or report.to_dict(), render_html(report)

See docs/report.md for what each part says and the rules behind it.
"""

from __future__ import annotations

from trainguard.report.core import Report, build_report, render_text
from trainguard.report.html import render_html
from trainguard.report.model import ReportError

__all__ = ["Report", "ReportError", "build_report", "render_html", "render_text"]
