"""Result rows, the table, and the JSON files."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR


@dataclass
class Row:
    """One line of the table: a figure, its same-run baseline, and the target on the ratio
    (or on the figure itself when there is no baseline)."""

    scenario: str
    figure: str  # what was measured, e.g. "deliveries/s, 1 worker, 1 callback/event"
    value: float | None
    unit: str
    baseline: str = "-"
    baseline_value: float | None = None
    ratio: float | None = None
    target: str = "report"
    ok: bool | None = None
    shown: str = ""  # the value as printed, when not just `value unit`
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if self.ok is None:
            return "-"
        return "PASS" if self.ok else "MISS"


def ratio_row(
    scenario: str,
    figure: str,
    value: float | None,
    unit: str,
    baseline: str,
    baseline_value: float | None,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    target: str = "",
    details: dict[str, Any] | None = None,
) -> Row:
    """A row whose target bounds value / baseline_value."""
    ratio = None
    if value is not None and baseline_value:
        ratio = value / baseline_value
    ok: bool | None = None
    if ratio is not None and minimum is not None:
        ok = ratio >= minimum
    elif ratio is not None and maximum is not None:
        ok = ratio <= maximum
    if not target and minimum is not None:
        target = f">= {minimum:g}x"
    elif not target:
        target = f"<= {maximum:g}x" if maximum is not None else "report"
    return Row(
        scenario, figure, value, unit, baseline, baseline_value, ratio, target, ok,
        details=details or {},
    )  # fmt: skip


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit in {"µs", "ms"}:
        return (
            f"{value:,.0f}{unit}"
            if unit.startswith("/")
            else f"{value:,.0f} {unit}"
            if value >= 100
            else f"{value:,.1f} {unit}"
        )
    if unit == "MiB":
        return f"{value:,.1f} {unit}"
    if unit == "x":
        return f"{value:.2f}x"
    if not unit and value < 100 and value != int(value):  # e.g. commands per delivery
        return f"{value:.1f}"
    return f"{value:,.0f}{unit}" if unit.startswith("/") else f"{value:,.0f} {unit}"


def render(rows: list[Row], title: str) -> None:
    """Print the table (rich when it is there, plain text otherwise)."""
    headers = ["scenario", "figure", "value", "baseline (same run)", "ratio", "target", ""]
    lines = [
        [
            row.scenario,
            row.figure,
            row.shown or _num(row.value, row.unit),
            row.baseline
            if row.baseline_value is None
            else f"{row.baseline}: {_num(row.baseline_value, row.unit)}",
            "-" if row.ratio is None else f"{row.ratio:.2f}x",
            row.target,
            row.verdict,
        ]
        for row in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(title)
        print(" | ".join(headers))
        for line in lines:
            print(" | ".join(line))
        return
    table = Table(title=title, show_lines=False)
    for header in headers:
        table.add_column(header, overflow="fold")
    for line in lines:
        style = {"PASS": "green", "MISS": "red"}.get(line[-1])
        table.add_row(*line[:-1], f"[{style}]{line[-1]}[/{style}]" if style else line[-1])
    Console(width=max(170, Console().width)).print(table)


def markdown(rows: list[Row]) -> str:
    """The table as Markdown (for bench/README.md)."""
    out = [
        "| scenario | figure | value | baseline (same run) | ratio | target | result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        base = (
            row.baseline
            if row.baseline_value is None
            else f"{row.baseline}: {_num(row.baseline_value, row.unit)}"
        )
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        value = row.shown or _num(row.value, row.unit)
        out.append(
            f"| {row.scenario} | {row.figure} | {value} | {base} | {ratio} | {row.target} "
            f"| {row.verdict} |"
        )
    return "\n".join(out)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def write(rows: list[Row], meta: dict[str, Any]) -> Path:
    """bench/results/<timestamp>.json and bench/results/latest.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    payload = {"meta": meta, "rows": [asdict(row) for row in rows], "markdown": markdown(rows)}
    text = json.dumps(payload, indent=2, default=str)
    path = RESULTS_DIR / f"{stamp}{'-quick' if meta.get('quick') else ''}.json"
    path.write_text(text)
    (RESULTS_DIR / "latest.json").write_text(text)
    return path
