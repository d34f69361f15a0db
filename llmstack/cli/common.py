"""What every command group shares: options defined once, the exit codes, and `fail()`.

Exit codes: 0 success / healthy; 1 a start, download, request or health failure; 2 an invalid stack.toml or
usage; 3 the machine is not ready for it (port in use, stack still starting or unsupervised, not running).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from llmstack.common.console import EXIT_CONFIG, EXIT_ENV, EXIT_FAILED, EXIT_OK, EXIT_USAGE, console, err, print_error
from llmstack.stack.config import DEFAULT_CONFIG, ConfigError, StackConfig, load_config

__all__ = [
    "EXIT_CONFIG", "EXIT_ENV", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "console", "err", "fail", "load_stack",
]  # fmt: skip

# -- services ---------------------------------------------------------------------------------------------
Host = Annotated[str, typer.Option("--host", help="Address to bind. Loopback unless you mean to expose it.")]
SSL = Annotated[bool, typer.Option("--ssl", help="Serve HTTPS (cert/key from flags or LLMSTACK_SSL_*).")]
SSLCert = Annotated[str | None, typer.Option("--ssl-certfile", envvar="LLMSTACK_SSL_CERTFILE")]
SSLKey = Annotated[str | None, typer.Option("--ssl-keyfile", envvar="LLMSTACK_SSL_KEYFILE")]
ControllerAddress = Annotated[
    str, typer.Option("--controller-address", envvar="LLMSTACK_CONTROLLER", help="Controller URL.")
]
ClusterToken = Annotated[
    str | None,
    typer.Option("--cluster-token", envvar="LLMSTACK_CLUSTER_TOKEN", help="Shared secret for worker registration."),
]
Debug = Annotated[bool, typer.Option("--debug", help="Verbose logs.")]
DrainTimeout = Annotated[float, typer.Option("--drain-timeout", help="Seconds to finish in-flight work on stop.")]

# -- stack ------------------------------------------------------------------------------------------------
ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", envvar="LLMSTACK_CONFIG", help="The stack file.", show_default=True)
]
RunDirOpt = Annotated[
    Path | None,
    typer.Option("--run-dir", help="Run directory (default: from the stack file, else ~/.llmstack/<name>)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

# -- faces ------------------------------------------------------------------------------------------------
OptionalConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", envvar="LLMSTACK_CONFIG", help="stack.toml to read defaults from (default: ./stack.toml)."
    ),
]
APIKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="LLMSTACK_API_KEY", help="Bearer key for the API server (default: stack.toml)."),
]


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print `error: message` on stderr and end the command with `code`."""
    print_error(message)
    raise typer.Exit(code)


def load_stack(config: Path | str = DEFAULT_CONFIG) -> StackConfig:
    """The stack file, or exit 2 with every problem it has."""
    try:
        return load_config(config)
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
