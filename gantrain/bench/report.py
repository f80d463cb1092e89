"""Bench reports: the table on the console, the JSON and Markdown files. Shared by the step and loader matrices."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from gantrain.engine import atomic_write_text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], caption: str, left: int = 1) -> str:
    """``rows`` as a Markdown table under ``caption``; the first ``left`` columns are text (left-aligned), the
    rest figures (right-aligned)."""
    align = ["---"] * left + ["---:"] * (len(headers) - left)
    lines = [caption, "", "| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rich_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> Table:
    """``rows`` as a rich table, aligned as :func:`markdown_table` aligns them."""
    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*row)
    return table


def render(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], caption: str,
           left: int = 1) -> tuple[Table, str]:
    """The same rows as a rich table (console) and a Markdown table under ``caption``."""
    return rich_table(title, headers, rows, left), markdown_table(headers, rows, caption, left)


def console_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], caption: str,
                  left: int = 1) -> Table:
    """A narrow rich table for an 80-column terminal: a rule under the header only, one space between columns,
    no cell wrapping (a wrapped figure reads as two), ``caption`` under it. For the reports whose full table is
    wider than a terminal; their Markdown and JSON keep every column."""
    table = rich_table(title, headers, rows, left)
    table.box, table.pad_edge, table.padding, table.caption = box.SIMPLE_HEAD, False, (0, 1, 0, 0), caption
    for column in table.columns:
        column.no_wrap = True
    return table


def publish(report: dict, table: Table, markdown: str, json_path: Path | None, markdown_path: Path | None) -> dict:
    """Prints the table and writes the JSON report and Markdown table where asked."""
    Console().print(table)
    for path, text in ((json_path, json.dumps(report, indent=2)), (markdown_path, markdown)):
        if path:
            atomic_write_text(path, text)
    return report
