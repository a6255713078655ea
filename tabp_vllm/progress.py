"""Rich progress bars, in one place: counted work (scoring, router fits) and timed load (bench)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


@contextmanager
def progress_bars(out: Console | None = None) -> Iterator[Callable[[str, int], Callable[..., None]]]:
    """Bars for counted work: yields `progress(description, total)`, which adds a bar and returns
    its `advance(n=1)` (the callback `run_scoring` and `fit_router` take)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=out or Console(stderr=True), transient=False) as prog:
        def progress(desc: str, total: int) -> Callable[..., None]:
            tid = prog.add_task(desc, total=total)
            return lambda n=1: prog.advance(tid, n)

        yield progress


def timed_bar(out: Console, *, disable: bool = False) -> Progress:
    """One bar over seconds of planned work with a free `info` field (the bench's load)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeRemainingColumn(), console=out, disable=disable, transient=False)
