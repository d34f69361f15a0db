"""ModelScope download progress: per-file byte bars in rich, fed by modelscope-hub's progress_callbacks,
with tqdm's own redraws kept off the terminal."""

from __future__ import annotations

import contextlib
import io
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def modelscope_progress(model: str, *, enabled: bool) -> Iterator[list[Any] | None]:
    """Yield ``progress_callbacks`` for ``snapshot_download`` that drive a rich display on stderr.

    modelscope-hub reports bytes only through ``progress_callbacks`` (large files are fetched in parallel
    ranges with no bar of their own), but also draws its own tqdm bars for the file count and small files.
    Two live displays on one terminal garble each other, so while ours runs tqdm's carriage-return
    redraws are dropped; any other stderr text still reaches the terminal above the bars.
    """
    if not enabled:  # no display at all: also keep modelscope-hub's tqdm bars out of service logs
        with _drop_tqdm_redraws():
            yield None
        return
    from modelscope.hub.callback import ProgressCallback
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    display = Progress(
        TextColumn("[bold]{task.description}", justify="left"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    label = escape(model)
    overall = display.add_task(f"{label} (0 files)", total=None)
    counts = {"files": 0, "bytes": 0}
    lock = threading.Lock()

    class RichCallback(ProgressCallback):  # type: ignore[misc]
        """One instance per file, created by modelscope-hub in its download threads."""

        def __init__(self, filename: str, file_size: int) -> None:
            super().__init__(filename, file_size)
            total = file_size if file_size and file_size > 0 else None
            self.task = display.add_task(f"  {escape(Path(filename).name)}", total=total)
            with lock:  # the grand total grows as files start: the listing's sizes are not exposed
                counts["bytes"] += max(file_size or 0, 0)
                display.update(overall, total=counts["bytes"])
            self.ended = False

        def update(self, size: int) -> None:
            display.advance(self.task, size)
            display.advance(overall, size)

        def end(self) -> None:
            if self.ended:
                return
            self.ended = True
            display.remove_task(self.task)
            with lock:
                counts["files"] += 1
                display.update(overall, description=f"{label} ({counts['files']} files)")

    console.print(f"Downloading [bold]{escape(model)}[/] from ModelScope")
    with display, _drop_tqdm_redraws():
        yield [RichCallback]


class _TqdmFilter(io.TextIOBase):
    """A stderr stand-in that drops tqdm's redraws (``\\r`` lines, bare newlines, cursor moves)."""

    _ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

    def __init__(self, target: Any) -> None:
        self._target = target

    def write(self, text: str) -> int:
        if "\r" not in text and self._ANSI.sub("", text).strip():
            self._target.write(text)
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def fileno(self) -> int:  # lets tqdm measure the terminal width
        fileno = getattr(self._target, "fileno", None)
        if fileno is None:
            raise io.UnsupportedOperation("fileno")
        return int(fileno())

    def isatty(self) -> bool:
        return bool(getattr(self._target, "isatty", lambda: False)())


@contextlib.contextmanager
def _drop_tqdm_redraws() -> Iterator[None]:
    original = sys.stderr
    sys.stderr = _TqdmFilter(original)
    try:
        yield
    finally:
        sys.stderr = original
