"""Bench reports: the table on the console, the JSON and Markdown files. Shared by the step and loader matrices."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gantrain.engine.files import atomic_write_text


def render(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], caption: str,
           left: int = 1) -> tuple[Table, str]:
    """The same rows as a rich table (console) and a Markdown table under ``caption``; the first ``left``
    columns are text (left-aligned), the rest figures."""
    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*row)
    align = ["---"] * left + ["---:"] * (len(headers) - left)
    lines = [caption, "", "| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return table, "\n".join(lines) + "\n"


def publish(report: dict, table: Table, markdown: str, json_path: Path | None, markdown_path: Path | None) -> dict:
    """Prints the table and writes the JSON report and Markdown table where asked."""
    Console().print(table)
    for path, text in ((json_path, json.dumps(report, indent=2)), (markdown_path, markdown)):
        if path:
            atomic_write_text(path, text)
    return report
