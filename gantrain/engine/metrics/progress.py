"""Progress bars for the long metric jobs (fitting, feature extraction), silent where nobody watches."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Advance = Callable[..., None]
"""``advance(steps=1, **fields)``: moves the bar and updates its text fields (e.g. ``info="loss 0.31"``)."""


def resolve_quiet(quiet: bool | None) -> bool:
    """An explicit flag wins; otherwise quiet off the main thread and inside Ray (tune workers log elsewhere)."""
    if quiet is not None:
        return quiet
    if threading.current_thread() is not threading.main_thread():
        return True
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


@contextlib.contextmanager
def task_bar(description: str, total: int, *, console: Console | None = None, quiet: bool = False) -> Iterator[Advance]:
    """A one-task progress bar; yields its ``advance`` function (a no-op when quiet)."""
    if quiet:
        yield lambda steps=1, **fields: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total, info="")
        yield lambda steps=1, **fields: bar.update(task, advance=steps, **fields)
