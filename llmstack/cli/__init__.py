"""The `llmstack` command line: one module per command group (services, stack, faces), options and exit
codes once in `common`.  Nothing else imports this package."""

from __future__ import annotations

import typer

from llmstack.cli import faces, models, ray, services, stack, usage

app = typer.Typer(
    name="llmstack",
    help="A self-hosted, OpenAI-compatible LLM service: controller, model workers, API server.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
for group in (services, stack, models, ray, usage, faces):
    group.register(app)


def main() -> None:
    app(prog_name="llmstack")
