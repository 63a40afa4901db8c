"""A progress bar over bytes, for long reads and writes (hashing, merging, checking a base)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(description: str, total_bytes: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over bytes; yields ``advance(n)``. Disabled: a no-op."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=total_bytes)
        yield lambda n: bar.advance(task, n)
