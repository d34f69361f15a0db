"""`llmstack worker`'s flags, generated from the worker option schema (`services/worker/options.py`).

`with_worker_options` gives a command one typer option per schema field (its flag, help, envvar and help
panel), checks the values with the schema, and hands the command a `WorkerOptions`.  Command-line shapes:
a list is comma-separated (`--model-names a,b`), a table is a JSON object (`--engine-args '{...}'`).
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from llmstack.cli.common import fail
from llmstack.services.worker.options import (
    OPTIONS,
    VLLM_PANEL,
    OptionProblem,
    WorkerOptions,
    flag_of,
    off_flag_of,
)

_KW = inspect.Parameter.KEYWORD_ONLY


def _cli_type(annotation: Any) -> Any:
    """What typer parses: a literal as text (the schema checks it), a list or a table as text too."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str
    if origin in (list, dict):
        return str | None
    return annotation


def worker_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per worker option, `Annotated[type, typer.Option(...)]`."""
    params = []
    for name, opt in OPTIONS.items():
        field = WorkerOptions.model_fields[name]
        default = inspect.Parameter.empty if field.is_required() else field.default
        if isinstance(default, list | dict):
            default = None  # parsed from text; empty means the schema's default
        flag = flag_of(name)
        if field.annotation is bool and default is True:  # on by default: --the-name/--no-the-name
            flag = f"{flag}/{off_flag_of(name)}"
        info = typer.Option(
            flag,
            help=opt.help,
            envvar=opt.envvar,
            rich_help_panel=VLLM_PANEL if opt.backend == "vllm" else None,
        )
        params.append(
            inspect.Parameter(name, _KW, default=default, annotation=Annotated[_cli_type(field.annotation), info])
        )
    return params


def parse_worker_options(values: dict[str, Any]) -> WorkerOptions:
    """The flags' values as `WorkerOptions`, or exit 2 naming the flag and the problem."""
    data = dict(values)
    for name, value in values.items():
        origin = typing.get_origin(WorkerOptions.model_fields[name].annotation)
        if origin is list:
            data[name] = [part.strip() for part in value.split(",") if part.strip()] if value else []
        elif origin is dict:
            data[name] = _json_object(name, value)
    try:
        return WorkerOptions.model_validate(data)
    except ValidationError as exc:
        fail(cli_message(exc))


def _json_object(name: str, text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    flag = flag_of(name)
    try:
        value = json.loads(text)
    except ValueError as exc:
        fail(f"{flag} is not valid JSON: {exc}")
    if not isinstance(value, dict):
        fail(f"{flag} must be a JSON object, e.g. '{OPTIONS[name].example or '{}'}'")
    return value


def cli_message(exc: ValidationError) -> str:
    """Schema errors in command-line words: `--flag must be a or b, not 'x'`, `--flag: problem (got x)`."""
    lines = []
    for err in exc.errors():
        problem = err.get("ctx", {}).get("error")
        if isinstance(problem, OptionProblem):
            lines.append(problem.render("cli"))
            continue
        flag = flag_of(str(err["loc"][0])) if err["loc"] and err["loc"][0] in OPTIONS else "options"
        if err["type"] == "literal_error":
            lines.append(f"{flag} must be {err['ctx']['expected'].replace(chr(39), '')}, not {err['input']!r}")
        elif err["type"] == "value_error":
            lines.append(f"{flag}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{flag}: {err['msg']} (got {err['input']!r})")
    return "\n".join(lines)


def with_worker_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Replace `func`'s `options: WorkerOptions` parameter by the worker's flags (after a leading
    `typer.Context`, before `func`'s own parameters)."""
    own = [p.replace(kind=_KW) for p in inspect.signature(func, eval_str=True).parameters.values()]
    context = [p for p in own if p.annotation is typer.Context]
    rest = [p for p in own if p.annotation is not typer.Context and p.name != "options"]

    @functools.wraps(func)
    def command(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in OPTIONS}
        return func(options=parse_worker_options(values), **kwargs)

    command.__signature__ = inspect.Signature([*context, *worker_parameters(), *rest])  # type: ignore[attr-defined]
    command.__annotations__ = {}  # the signature above is the whole truth for typer
    return command
