"""Progress display: silent unless installed, a bar for long loops, every item still yielded."""

from __future__ import annotations

import io

from rich.console import Console

from graphopt import progress


def test_track_without_display_just_yields() -> None:
    assert list(progress.track(range(10), "work")) == list(range(10))


def test_installed_display_shows_long_loops_only() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    with progress.show(console) as status:
        status.update("running [bold]dce[/]")
        assert list(progress.track(range(2), "short loop")) == [0, 1]
        assert list(progress.track(iter(range(6)), "long loop", total=6)) == list(range(6))
        console.file.flush()
        seen = buffer.getvalue()
    assert "running" in seen and "long loop" in seen and "short loop" not in seen
    assert list(progress.track(range(5), "after")) == list(range(5))  # display uninstalled again
