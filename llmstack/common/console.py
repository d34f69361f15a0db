"""Output for people: rich consoles that stay wide when piped, the one way an error line looks, and the
exit codes every command shares.

Exit codes: 0 success / healthy; 1 a start, download or health failure; 2 an invalid stack.toml or usage;
3 the machine is not ready for it (port in use, stack still starting or unsupervised, not running).
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.text import Text

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_ENV = 0, 1, 2, 3
EXIT_USAGE = EXIT_CONFIG


def make_console(stderr: bool = False) -> Console:
    """Rich output; when piped (CI logs, scripts) wide enough that tables and URLs are not cut."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(stderr=stderr, highlight=False, width=width)


console = make_console()
err = make_console(stderr=True)


def print_error(message: str) -> None:
    """One error on stderr: `error: ...` (red on a terminal), the message verbatim (it may quote logs)."""
    err.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)
