"""Service logs: tails, interleaving by timestamp, following several files, and one printer with
name-padded coloured prefixes for all of them."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path


def tail_file(path: Path, lines: int) -> str:
    """The last `lines` lines of a (possibly large) file, read from the end."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            block = min(size, max(4096, lines * 400))
            fh.seek(size - block)
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[,.]\d+)?)")


def line_time(line: str) -> str | None:
    """The leading timestamp of a log line (as written by the services), sortable as text."""
    m = _STAMP.match(line)
    return m.group(1).replace("T", " ").replace(".", ",") if m else None


def merge_logs(sources: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Interleave per-service lines by timestamp; lines without one (tracebacks) keep their place after
    the line before them."""
    keyed: list[tuple[str, int, int, str, str]] = []
    for order, (name, lines) in enumerate(sources.items()):
        current = ""
        for i, line in enumerate(lines):
            current = line_time(line) or current
            keyed.append((current, order, i, name, line))
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    return [(name, line) for _, _, _, name, line in keyed]


class LogFollower:
    """Follows several log files (by offset), yielding complete new lines; survives truncation."""

    def __init__(self, paths: dict[str, Path], from_end: bool = True) -> None:
        self.paths = paths
        self.offsets: dict[str, int] = {}
        self.partial: dict[str, bytes] = {}
        for name, path in paths.items():
            self.offsets[name] = path.stat().st_size if from_end and path.exists() else 0

    def add(self, name: str, path: Path) -> None:
        if name not in self.paths:
            self.paths[name] = path
            self.offsets[name] = 0

    def poll(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for name, path in self.paths.items():
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size < self.offsets[name]:
                self.offsets[name] = 0  # rotated or truncated
            if size == self.offsets[name]:
                continue
            with path.open("rb") as fh:
                fh.seek(self.offsets[name])
                data = self.partial.pop(name, b"") + fh.read(size - self.offsets[name])
            self.offsets[name] = size
            *complete, rest = data.split(b"\n")
            if rest:
                self.partial[name] = rest
            out.extend((name, line.decode("utf-8", errors="replace")) for line in complete)
        return out


COLORS = ("cyan", "green", "magenta", "yellow", "blue", "bright_red", "bright_cyan", "bright_green")


class PrefixPrinter:
    """Name-padded, coloured prefixes (`api        | ...`) on a rich console: one printer for all sources."""

    def __init__(self, names: Iterable[str], console: object | None = None) -> None:
        from rich.console import Console

        self.console = console or Console(highlight=False, soft_wrap=True)
        self.names: list[str] = []
        self.width = 0
        for name in names:
            self._add(name)

    def _add(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)
            self.width = max(self.width, len(name))

    def __call__(self, name: str, line: str) -> None:
        from rich.text import Text

        self._add(name)
        style = "bold red" if name == "supervisor" else COLORS[self.names.index(name) % len(COLORS)]
        text = Text(f"{name:<{self.width}} | ", style=style)
        text.append(line)
        self.console.print(text, soft_wrap=True)  # type: ignore[attr-defined]


class ForegroundEcho:
    """Foreground `up`: supervisor events and every service's new log lines through one printer."""

    def __init__(self, printer: PrefixPrinter, follower: LogFollower) -> None:
        self.printer = printer
        self.follower = follower

    def __call__(self, name: str, line: str) -> None:
        self.pump()
        for part in line.splitlines() or [""]:
            self.printer(name, part)

    def pump(self) -> None:
        for name, line in self.follower.poll():
            self.printer(name, line)
