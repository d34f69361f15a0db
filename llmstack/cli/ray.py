"""`llmstack ray join HEAD`: this host as one more node of a Ray cluster, for a vLLM worker on the head's host
whose model spans hosts (`distributed_executor_backend = "ray"`).  The same supervisor as `up` runs it, from
a stack of one service, so `status`, `logs` and `down` work as for any stack (`--run-dir`, or the default
~/.llmstack/ray-node).  With a stack file, `llmstack up --only ray` does the same from its [ray] section."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmstack.cli.common import EXIT_CONFIG, fail
from llmstack.cli.stack import start_stack
from llmstack.stack.config import ConfigError, parse_config
from llmstack.stack.plan import RoleName

ray_app = typer.Typer(help="Ray cluster nodes for models that span hosts.", no_args_is_help=True)

JOIN_EPILOG = """Examples:

  llmstack ray join 10.0.0.5:6379 --node-ip 10.0.0.6            # foreground; Ctrl-C leaves the cluster

  llmstack ray join 10.0.0.5:6379 --node-ip 10.0.0.6 --detach   # later: llmstack down --run-dir ~/.llmstack/ray-node
"""


@ray_app.command("join", epilog=JOIN_EPILOG)
def join(
    head: Annotated[str, typer.Argument(help="The head's host:port (its Ray port, default 6379).")],
    node_ip: Annotated[
        str | None,
        typer.Option("--node-ip", help="This host's address as the other nodes reach it (default: toward HEAD)."),
    ] = None,
    num_cpus: Annotated[int | None, typer.Option("--num-cpus", min=1, help="CPUs this node offers.")] = None,
    num_gpus: Annotated[
        int | None, typer.Option("--num-gpus", min=0, help="GPUs it offers (a CPU host: the vLLM ranks it takes).")
    ] = None,
    node_manager_port: Annotated[int, typer.Option("--node-manager-port", help="This node's raylet port.")] = 6380,
    connect_timeout: Annotated[float, typer.Option("--connect-timeout", help="Seconds to wait for the head.")] = 5.0,
    name: Annotated[str, typer.Option("--name", help="Stack name (the run directory's default).")] = "ray-node",
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Return once joined; keep running.")] = False,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default ~/.llmstack/NAME).")] = None,
) -> None:
    """Join this host to the Ray cluster whose head is HEAD, supervised until stopped (`llmstack down`)."""
    ray: dict[str, object] = {"address": head, "node_manager_port": node_manager_port}
    ray["connect_timeout"] = connect_timeout
    for key, value in (("node_ip", node_ip), ("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if value is not None:
            ray[key] = value
    data = {
        "stack": {"name": name},
        "controller": {"enabled": False},
        "api": {"enabled": False},
        "webui": {"enabled": False},
        "ray": ray,
    }
    try:
        cfg = parse_config(data, "llmstack ray join")
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
    start_stack(cfg, [RoleName.ray], detach=detach, offline=True, run_dir=run_dir)


def register(app: typer.Typer) -> None:
    app.add_typer(ray_app, name="ray")
