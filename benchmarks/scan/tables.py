"""The Markdown tables of ``summary.md``, from the ``results.json`` document of one run.

Every table reads only ``results``: detection on the regression corpus and on the
differential samples, false alarms on the benign corpus and on the real-world folders,
the samples some tool got wrong, the real-world and differential samples one by one,
throughput on the corpus folder and on the real folder, and scan time against size.
"""

from __future__ import annotations

from typing import Any

#: how a cell of the per-sample tables reads, on malicious and on benign samples
_ON_MALICIOUS = {"flagged": "caught", "failed_closed": "fail-closed", "clean": "**missed**"}
_ON_MALICIOUS |= {"skipped": "**missed** (skipped)", "error": "error"}
_ON_BENIGN = {"flagged": "**false alarm**", "failed_closed": "**false alarm** (fail-closed)"}
_ON_BENIGN |= {"clean": "ok", "skipped": "ok (skipped)", "error": "error"}
_CAUGHT = {"flagged", "failed_closed"}


def _caught_cells(m: dict[str, Any]) -> str:
    return (
        f"{m['caught']}/{m['total']} | {m['failed_closed']} "
        f"| {m['missed']} ({m['missed_skipped']}) | {m['errors']}"
    )


def detection_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| tool | regression corpus caught | live ones caught | of which fail-closed "
        "| missed (of which skipped) | errors | differential caught | of which fail-closed "
        "| missed (of which skipped) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in results["tools"]:
        d = results["detection"][t]
        m, x = d["malicious"], d["differential"]
        lines.append(
            f"| {t} | {m['caught']}/{m['total']} | {m['caught_live']}/{m['total_live']} "
            f"| {m['failed_closed']} | {m['missed']} ({m['missed_skipped']}) | {m['errors']} "
            f"| {_caught_cells(x)} |"
        )
    return lines


def false_alarm_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| tool | benign corpus: false alarms (of which fail-closed) | errors "
        "| real-world files: false alarms (of which fail-closed) | skipped as non-model "
        "| passed as clean | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in results["tools"]:
        b, r = results["detection"][t]["benign"], results["detection"][t]["real"]
        lines.append(
            f"| {t} | {b['false_alarms']}/{b['total']} ({b['false_alarms_failed_closed']}) "
            f"| {b['errors']} "
            f"| {r['false_alarms']}/{r['total']} ({r['false_alarms_failed_closed']}) "
            f"| {r['passed_skipped']} | {r['passed'] - r['passed_skipped']} | {r['errors']} |"
        )
    return lines


def sample_table(results: dict[str, Any], malicious: bool) -> list[str]:
    """Regression-corpus samples some tool got wrong (the extra parts have their own)."""
    tools = results["tools"]
    marks, right = (_ON_MALICIOUS, _CAUGHT) if malicious else (_ON_BENIGN, {"clean", "skipped"})
    lines = ["| sample | format | " + " | ".join(tools) + " |", "|---|---|" + "---|" * len(tools)]
    for s in results["samples"]:
        if s["malicious"] != malicious or s["part"] != "core":
            continue
        cells = [s["verdicts"][t]["outcome"] for t in tools]
        if all(c in right for c in cells):
            continue
        live = "" if s["live"] else " (not live)"
        row = " | ".join(marks[c] for c in cells)
        lines.append(f"| `{s['name']}`{live} | {s['format']} | {row} |")
    return lines


def part_table(results: dict[str, Any], part: str) -> list[str]:
    """Every sample of one extra part, every tool: real-world files or differentials."""
    tools = results["tools"]
    real = part == "real"
    marks = _ON_BENIGN if real else _ON_MALICIOUS
    extra = "trainguard expected" if real else "loader that runs it"
    lines = [
        f"| file | format | {extra} | " + " | ".join(tools) + " |",
        "|---|---|---|" + "---|" * len(tools),
    ]
    for s in results["samples"]:
        if s.get("part") != part:
            continue
        cells = " | ".join(marks[s["verdicts"][t]["outcome"]] for t in tools)
        label = s["expected"] if real else f"`{s['loader']}`"
        lines.append(f"| `{s['name']}` | {s['format']} | {label} | {cells} |")
    return lines


def speed_table(results: dict[str, Any], key: str, base_tool: str) -> list[str]:
    speed = results[key]
    base = speed.get(base_tool)
    lines = [
        "| tool | files/s | wall s | start-up s | files/s after start-up "
        f"| time ÷ {base_tool} | files analysed (not skipped) | exit status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in results["tools"]:
        e = speed[t]
        ratio = f"{e['median_s'] / base['median_s']:.2f}x" if base else "-"
        net = e["files_per_s_after_startup"] or "-"
        lines.append(
            f"| {t} | {e['files_per_s']} | {e['median_s']:.3f} | {e['startup_s']:.3f} | {net} "
            f"| {ratio} | {e['examined']}/{e['files']} | {e['exit_codes']} |"
        )
    return lines


def folder_outcome_table(results: dict[str, Any]) -> list[str]:
    """What each tool said about the files of the real folder (all benign)."""
    outcomes = ("flagged", "failed_closed", "clean", "skipped", "error")
    lines = ["| tool | " + " | ".join(outcomes) + " |", "|---|" + "---|" * len(outcomes)]
    for t in results["tools"]:
        counts = results["folder_throughput"][t]["outcomes"]
        lines.append(f"| {t} | " + " | ".join(str(counts.get(o, 0)) for o in outcomes) + " |")
    return lines


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def size_table(results: dict[str, Any]) -> list[str]:
    sizes = results["size_scaling"]
    labels = list(sizes)
    heads = [f"{label} ({_size(sizes[label]['bytes'])})" for label in labels]
    lines = ["| tool | " + " | ".join(heads) + f" | {labels[-1]} / {labels[1]} |"]
    lines.append("|---|" + "---|" * (len(labels) + 1))
    for t in results["tools"]:
        cells = [sizes[label]["tools"][t] for label in labels]
        text = [f"{c['median_s']:.3f} s ({c['outcome']})" for c in cells]
        growth = cells[-1]["median_s"] / cells[1]["median_s"]
        lines.append(f"| {t} | " + " | ".join(text) + f" | {growth:.2f}x |")
    reads = [sizes[label]["read_all_s"] for label in labels]
    text = [f"{r:.3f} s" for r in reads]
    lines.append(
        "| *reference: read every byte* | " + " | ".join(text) + f" | {reads[-1] / reads[1]:.2f}x |"
    )
    return lines


def markdown(results: dict[str, Any]) -> str:
    """``summary.md``: every table of the run, in the order the README quotes them."""
    folder = results["folder"]
    base = "picklescan" if "picklescan" in results["tools"] else results["tools"][0]
    parts = [
        ["## Detection", ""] + detection_table(results),
        ["## False alarms", ""] + false_alarm_table(results),
        ["## Regression-corpus malicious samples some tool did not catch", ""]
        + sample_table(results, True),
        ["## Benign corpus samples some tool alarmed or failed on", ""]
        + sample_table(results, False),
        ["## Real-world files, every tool", ""] + part_table(results, "real"),
        ["## Differential samples, every tool", ""] + part_table(results, "differential"),
        ["## Throughput (one process, whole corpus folder)", ""]
        + speed_table(results, "throughput", "trainguard"),
        [
            f"## Folder throughput (real folder: {folder['files']} files, "
            f"{_size(folder['bytes'])}, {folder['copies']} copies of the real-world part)",
            "",
        ]
        + speed_table(results, "folder_throughput", base)
        + ["", "What each tool reported on the real folder's files (all benign):", ""]
        + folder_outcome_table(results),
        ["## Scan time vs checkpoint size (median, warm cache)", ""] + size_table(results),
    ]
    return "\n\n".join("\n".join(p) for p in parts) + "\n"
