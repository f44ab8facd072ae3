"""The report as one self-contained HTML file: inline CSS and inline SVG plots, no
script, nothing fetched. Every text from the ledger is escaped (a message is data, never
markup). The plots: loss per rank with the incidents marked, step time per rank, and
the agreement of the compared fingerprint fields over the checks."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from trainguard.report.core import Report, render_text
from trainguard.report.metrics import Agreement, Series

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")
_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.bad{background:#fde8e8;border-left:4px solid #c00;padding:.5em 1em}
.ok{background:#e8f6e8;border-left:4px solid #2a2;padding:.5em 1em}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;
vertical-align:top}pre{white-space:pre-wrap;background:#f6f6f6;padding:1em;font-size:12px}
svg text{font:11px system-ui,sans-serif}
"""
_W, _H, _PAD = 900, 260, 48


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def render_html(report: Report) -> str:
    m = report.model
    body: list[str] = [f"<h1>trainguard report: run {_e(m.run_id or '?')}</h1>"]
    cls = "ok" if report.clean else "bad"
    body.append(f'<div class="{cls}">' + "<br>".join(_e(h) for h in report.headline()) + "</div>")
    body.append("<h2>Incidents</h2>")
    if not report.incidents:
        body.append("<p>None.</p>")
    else:
        rows = [
            "<tr><th>#</th><th>severity</th><th>detector</th><th>first step</th>"
            "<th>rank</th><th>what</th><th>actor (as the ledger records)</th></tr>"
        ]
        for inc in report.incidents:
            actors = [w.describe() for w in inc.writers()]
            actors += [
                f"signal {s['signal']} sender pid {s['pid']} uid {s['uid']}: {s['command']}"
                for s in inc.senders()
            ]
            rows.append(
                f"<tr><td>{inc.number}</td><td>{_e(inc.severity)}</td>"
                f"<td>{_e(', '.join(inc.detectors))}</td>"
                f"<td>{_e(inc.first_step)}</td><td>{_e(inc.rank_text())}</td>"
                f"<td>{_e(inc.message)}</td><td>{'<br>'.join(_e(a) for a in actors)}</td></tr>"
            )
        body.append("<table>" + "".join(rows) + "</table>")
    body.append("<h2>Loss per rank</h2>")
    marks = [(i.first_step, f"#{i.number}") for i in report.incidents if i.first_step is not None]
    body.append(_chart(report.loss, marks, "loss-plot", _saved(report)))
    body.append("<h2>Step time per rank</h2>")
    body.append(_chart(report.step_time, marks, "step-time-plot"))
    body.append("<h2>Fingerprint agreement over the checks</h2>")
    body.append(_grid(report.agreement))
    body.append("<h2>Full report</h2>")
    body.append(f"<pre>{_e(render_text(report))}</pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>trainguard report {_e(m.run_id or '')}</title><style>{_STYLE}</style>"
        "</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _saved(report: Report) -> list[tuple[int, str, str]]:
    """Checkpoints to mark: (step, label, colour): the last clean one green, those not to
    resume red, others grey."""
    damage = report.damage
    clean = damage.last_clean.record.seq if damage and damage.last_clean else None
    bad = {v.record.seq for v in damage.not_to_resume} if damage else set()
    out = []
    for c in report.model.checkpoints:
        if c.action != "saved" or c.step is None:
            continue
        colour = "#2a2" if c.seq == clean else "#c00" if c.seq in bad else "#888"
        out.append((c.step, "ckpt", colour))
    return out


def _chart(
    series: Series | None,
    marks: list[tuple[int, str]],
    ident: str,
    saved: Sequence[tuple[int, str, str]] = (),
) -> str:
    if series is None or not any(series.by_rank.values()):
        return f'<p id="{ident}">Not recorded by this run (no check records or metrics files).</p>'
    points = [p for pts in series.by_rank.values() for p in pts]
    xs = [p[0] for p in points] + [s for s, _ in marks]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + (abs(y0) or 1.0)

    def sx(x: float) -> float:
        return _PAD + (x - x0) / (x1 - x0) * (_W - 2 * _PAD)

    def sy(y: float) -> float:
        return _H - _PAD + (y - y0) / (y1 - y0) * (2 * _PAD - _H)

    parts = [
        f'<svg id="{ident}" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{_e(series.name)} per rank">',
        f'<rect width="{_W}" height="{_H}" fill="#fff"/>',
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#888"/>',
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#888"/>',
        f'<text x="{_PAD}" y="{_H - _PAD + 16}">step {x0}</text>',
        f'<text x="{_W - _PAD}" y="{_H - _PAD + 16}" text-anchor="end">step {x1}</text>',
        f'<text x="4" y="{_PAD - 6}">{_e(f"{y1:.4g}")} {_e(series.unit)}</text>',
        f'<text x="4" y="{_H - _PAD}">{_e(f"{y0:.4g}")}</text>',
        f'<text x="{_W / 2}" y="{_H - 8}" text-anchor="middle">{_e(series.source)}</text>',
    ]
    for step, label in marks:
        x = sx(step)
        parts.append(
            f'<line class="incident" x1="{x:.1f}" y1="{_PAD}" x2="{x:.1f}" y2="{_H - _PAD}" '
            'stroke="#c00" stroke-dasharray="4 3"/>'
            f'<text x="{x + 3:.1f}" y="{_PAD + 10}" fill="#c00">{_e(label)}</text>'
        )
    for step, label, colour in saved:
        if x0 <= step <= x1:
            x = sx(step)
            parts.append(
                f'<path class="checkpoint" d="M{x:.1f},{_H - _PAD} l-5,9 h10 z" fill="{colour}">'
                f"<title>{_e(label)} at step {step}</title></path>"
            )
    for index, (rank, pts) in enumerate(sorted(series.by_rank.items())):
        colour = _COLOURS[index % len(_COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(
            f'<polyline class="rank" fill="none" stroke="{colour}" stroke-width="1.5" '
            f'points="{path}"/>'
            f'<text x="{_W - _PAD + 4}" y="{_PAD + 14 * index}" fill="{colour}">rank {rank}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _grid(agreement: Agreement | None) -> str:
    if agreement is None or not agreement.steps:
        return '<p id="agreement-plot">Not recorded by this run (no check records).</p>'
    names = list(agreement.fields)
    cell, left, top = 14, 150, 30
    width = max(520, left + cell * len(agreement.steps) + 10)
    height = top + cell * len(names) + 10
    parts = [
        f'<svg id="agreement-plot" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="fingerprint agreement">',
        f'<text x="{left}" y="12">checks at steps {agreement.steps[0]} to '
        f"{agreement.steps[-1]}: green agreed, red differed</text>",
    ]
    for row, name in enumerate(names):
        y = top + row * cell
        parts.append(f'<text x="{left - 6}" y="{y + cell - 3}" text-anchor="end">{_e(name)}</text>')
        for col, ok in enumerate(agreement.fields[name]):
            colour = "#4caf50" if ok else "#d32f2f"
            step = agreement.steps[col]
            parts.append(
                f'<rect x="{left + col * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                f'fill="{colour}"><title>{_e(name)} at step {step}: '
                f"{'agreed' if ok else 'differed'}</title></rect>"
            )
    parts.append("</svg>")
    return "".join(parts)
