"""The HTML report: one self-contained file (nothing fetched, no script), every plot
present, ledger text escaped; opened in headless Chromium when it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.report.test_incidents import alert, write_run
from trainguard.cli import EXIT_FINDINGS, main

PLOTS = ("loss-plot", "step-time-plot", "agreement-plot")


def html_report(run_dir: Path, out: Path) -> str:
    assert main(["report", str(run_dir), "--format", "html", "-o", str(out)]) == EXIT_FINDINGS
    return out.read_text()


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of style elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.style += data


def assert_self_contained(page: str) -> None:
    """Nothing the browser would fetch or run: no script, frame, image, link or object
    element, no attribute naming a resource or a handler, no url() or @import in CSS."""
    parser = _Tags()
    parser.feed(page)
    names = {tag for tag, _ in parser.tags}
    assert not names & {"script", "iframe", "img", "link", "object", "embed", "image", "use"}
    for tag, attrs in parser.tags:
        for name, value in attrs.items():
            assert name not in ("src", "href", "xlink:href", "action", "srcset"), (tag, name)
            assert not name.startswith("on"), (tag, name)
            assert not re.search(r"url\(|https?:|javascript:", value or "", re.I), (tag, value)
    assert not re.search(r"url\(|@import", parser.style, re.I)


def test_html_is_self_contained_with_every_plot(sabotage_run, tmp_path):
    page = html_report(sabotage_run, tmp_path / "report.html")
    assert_self_contained(page)
    for plot in PLOTS:
        assert f'<svg id="{plot}"' in page
    loss = page[page.index('<svg id="loss-plot"') :]
    loss = loss[: loss.index("</svg>")]
    assert 'class="incident"' in loss  # the lr change is marked on the loss plot
    assert "#1</text>" in loss
    assert "lr-schedule" in page
    assert "last clean checkpoint" in page


def test_ledger_text_is_escaped(tmp_path, owner_key):
    """An alert message holding markup (a file name, a command line an attacker chose)
    is shown as text, never run or fetched."""
    hostile = "<script>alert(1)</script><img src=https://example.invalid/x.png>"
    message = alert(3, None, "sensor:exec")
    message["message"] = hostile
    write_run(tmp_path / "run", owner_key, [("alert", message, 0)])
    page = html_report(tmp_path / "run", tmp_path / "report.html")
    assert hostile not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert_self_contained(page)


def _chromium() -> str | None:
    return next((p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None)


def test_html_opens_in_headless_chromium(sabotage_run, tmp_path):
    """Loaded in a real browser: no console error, every plot in the DOM, a screenshot."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package)")
    page = tmp_path / "report.html"
    html_report(sabotage_run, page)
    common = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    for plot in PLOTS:
        assert f'id="{plot}"' in dom.stdout
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1100,1600", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.stat().st_size > 10_000
