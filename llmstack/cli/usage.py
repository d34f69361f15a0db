"""`llmstack usage`: what each API key used, per model and day, from the API server's usage file (read
directly, so it works while the stack runs and after it stopped)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmstack.cli.common import ConfigOpt, JsonOpt, RunDirOpt, console, err, fail, load_stack
from llmstack.stack.config import DEFAULT_CONFIG
from llmstack.stack.rundir import run_dir_for

EPILOG = """Examples:

  llmstack usage                         # everything, for the stack in ./stack.toml

  llmstack usage --since 7d --key alice  # the last 7 days (today included) of one key

  llmstack usage --since 2026-03-01 --json | jq '.totals'

  llmstack usage --run-dir /srv/llm/state   # a standalone `llmstack api --state-dir /srv/llm/state`
"""


def parse_since(value: str | None, today: dt.date | None = None) -> str | None:
    """YYYY-MM-DD, `today`, or Nd (the last N days, today included) as a UTC day."""
    if value is None:
        return None
    today = today or dt.datetime.now(dt.UTC).date()
    text = value.strip().lower()
    if text == "today":
        return today.isoformat()
    match = re.fullmatch(r"(\d{1,5})d", text)
    if match:
        days = int(match.group(1))
        if days < 1:
            raise ValueError("--since Nd needs N >= 1 (1d is today)")
        return (today - dt.timedelta(days=days - 1)).isoformat()
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise ValueError(f"--since {value!r}: use a day (2026-03-01), 'today', or a number of days (7d)") from None


def usage(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    run_dir: RunDirOpt = None,
    since: Annotated[
        str | None, typer.Option("--since", help="From this UTC day: YYYY-MM-DD, 'today', or Nd (last N days).")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only this key (its name).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Requests, errors and tokens per API key, model and day (UTC), as recorded by the API server."""
    from llmstack.services.api.keys.usage import COUNTS, USAGE_FILE, read_usage

    try:
        first_day = parse_since(since)
    except ValueError as exc:
        fail(str(exc))
    path = (run_dir if run_dir is not None else run_dir_for(load_stack(config))) / USAGE_FILE
    rows = read_usage(path, since=first_day, key=key) if path.is_file() else []
    if not path.is_file():
        err.print(f"no usage recorded at {path} yet (the API server records it in its --state-dir)", markup=False)
    totals = {c: sum(r[c] for r in rows) for c in COUNTS}
    if as_json:
        console.print_json(json.dumps({"file": str(path), "since": first_day, "rows": rows, "totals": totals}))
        return
    table = Table(title=f"usage from {path}", title_justify="left")
    for col in ("day (UTC)", "key", "model", "requests", "errors", "prompt tokens", "completion tokens", "total"):
        table.add_column(col, justify="right" if col not in ("day (UTC)", "key", "model") else "left")

    def counts(r: dict) -> list[str]:
        return [f"{r[c]:,}" for c in COUNTS] + [f"{r['prompt_tokens'] + r['completion_tokens']:,}"]

    for r in rows:
        table.add_row(r["day"], r["key"], r["model"], *counts(r))
    if len(rows) > 1:
        table.add_section()
        table.add_row("total", "", "", *counts(totals), style="bold")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(usage)
