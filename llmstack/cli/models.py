"""`llmstack models`: the models of a running stack (state, memory, last use), and loading or unloading
one, through the supervisor's admin API."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmstack.cli.common import EXIT_CONFIG, EXIT_ENV, EXIT_FAILED, ConfigOpt, JsonOpt, RunDirOpt, console, fail
from llmstack.common.errors import LLMStackError, NotFound
from llmstack.stack.adminclient import AdminClient, AdminUnavailable
from llmstack.stack.config import DEFAULT_CONFIG, ConfigError, load_config
from llmstack.stack.lifecycle import ModelRow
from llmstack.stack.rundir import RunDir, run_dir_for
from llmstack.stack.units import format_size

models_app = typer.Typer(
    help="Models of the running stack: list them, load or unload one.",
    invoke_without_command=True,
    epilog="Examples: llmstack models; llmstack models --json; llmstack models load qwen; llmstack models unload qwen",
)

NameArg = Annotated[str, typer.Argument(help="A model's served name (any of its names).")]


def _client(config: Path, run_dir: Path | None) -> AdminClient:
    if run_dir is None:
        try:
            run_dir = run_dir_for(load_config(config))
        except ConfigError as exc:
            fail(str(exc), EXIT_CONFIG)
    try:
        return AdminClient.for_run_dir(RunDir(run_dir).root)
    except AdminUnavailable as exc:
        fail(str(exc), EXIT_ENV)


def _ago(wall: float | None) -> str:
    if wall is None:
        return "-"
    s = max(0, int(time.time() - wall))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def models_table(rows: list[ModelRow]) -> Table:
    t = Table(title="models", title_justify="left")
    for col in ("model", "state", "load", "memory", "last use", "in flight", "note"):
        t.add_column(col)
    style = {"loaded": "green", "loading": "yellow", "failed": "red", "unloading": "yellow"}
    for r in rows:
        load = r.load + (", pinned" if r.pinned else "") + (f", keep {r.keep_alive_s:g}s" if r.keep_alive_s else "")
        memory = f"{format_size(r.memory_bytes)} ({r.memory_source})" if r.memory_bytes else "-"
        state = f"[{style.get(r.state.value, 'white')}]{r.state.value}[/]"
        t.add_row(", ".join(r.names), state, load, memory, _ago(r.last_used), str(r.inflight), r.message or "")
    return t


def _call(action: str, fn) -> None:  # noqa: ANN001
    try:
        return fn()
    except AdminUnavailable as exc:
        fail(str(exc), EXIT_ENV)
    except NotFound as exc:
        fail(exc.message, EXIT_CONFIG)
    except LLMStackError as exc:
        fail(f"{action}: {exc.message}", EXIT_FAILED)


@models_app.callback()
def models(
    ctx: typer.Context,
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    as_json: JsonOpt = False,
    run_dir: RunDirOpt = None,
) -> None:
    """List the stack's models: state (loaded, loading, unloaded, failed), memory, last use, requests in flight."""
    if ctx.invoked_subcommand is not None:
        return
    client = _client(config, run_dir)
    rows = _call("list", client.models)
    if as_json:
        console.print_json(json.dumps([r.model_dump(mode="json") for r in rows]))
    else:
        console.print(models_table(rows))


@models_app.command("load")
def load(
    name: NameArg,
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Return once it is loaded (or failed).")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.", min=1)] = 900.0,
    as_json: JsonOpt = False,
    run_dir: RunDirOpt = None,
) -> None:
    """Load a model now (unloading the least recently used idle ones if the memory budget needs room)."""
    t0 = time.monotonic()
    reply = _call(f"load {name}", lambda: _client(config, run_dir).load(name, wait=wait, timeout=timeout))
    if as_json:
        console.print_json(reply.model_dump_json())
        return
    row = reply.model
    if not reply.done:
        console.print(f"{row.name}: {row.state.value}" + (f" ({row.message})" if row.message else ""))
        return
    console.print(f"[green]✓[/] {row.name} loaded in {time.monotonic() - t0:.1f}s ({format_size(row.memory_bytes)})")


@models_app.command("unload")
def unload(
    name: NameArg,
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Return once its workers are gone.")] = True,
    as_json: JsonOpt = False,
    run_dir: RunDirOpt = None,
) -> None:
    """Unload a model: its workers finish the requests under way, then stop."""
    reply = _call(f"unload {name}", lambda: _client(config, run_dir).unload(name, wait=wait))
    if as_json:
        console.print_json(reply.model_dump_json())
        return
    console.print(f"[green]✓[/] {reply.model.name} {reply.model.state.value}")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
