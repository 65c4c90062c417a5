"""Progress of long work (onnxruntime runs over many samples, per-layer searches), shown by the CLI.

Library code calls :func:`track` around its loops and knows nothing about terminals; nothing is
shown unless a caller installed a display with :func:`show` (the CLI does, on an interactive
stderr, with a rich progress bar under the pass spinner). Short loops don't flicker: a bar
appears only for loops of at least ``min_total`` steps.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

T = TypeVar("T")

_display: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("graphopt_progress", default=None)


def track(items: Iterable[T], description: str, *, total: int | None = None, min_total: int = 4) -> Iterator[T]:
    """Yield ``items``, advancing a bar named ``description`` on the installed display (if any)."""
    display = _display.get()
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    if display is None or (total is not None and total < min_total):
        yield from items
        return
    task = display.add_task(description, total=total)
    display.refresh()  # shown at once, not at the next tick
    try:
        for item in items:
            yield item
            display.advance(task)
    finally:
        display.remove_task(task)


@contextlib.contextmanager
def show(console: Console) -> Iterator[StatusLine]:
    """Install a progress display on ``console`` for the duration; yields the top status line."""
    display = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=console, transient=True)  # fmt: skip
    token = _display.set(display)
    try:
        with display:
            yield StatusLine(display, display.add_task("loading", total=None))
    finally:
        _display.reset(token)


class StatusLine:
    """The first line of the display: what the pipeline is doing now."""

    def __init__(self, display: Progress, task: TaskID) -> None:
        self._display, self._task = display, task

    def update(self, text: str) -> None:
        self._display.update(self._task, description=text)
