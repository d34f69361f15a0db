"""A Ray node as a service of the stack: `ray start --block` (head or joining node) under the supervisor, so
it is health-gated, shown by `status`, restarted when it dies and stopped by `down` like any other service.

`ray start --block` stays in the foreground and exits as soon as one of the node's own processes (GCS,
raylet, ...) dies, which is how the supervisor sees a dead node.  Before a node joins, the head is checked
from here: unreachable in `connect_timeout` seconds, or running another Ray or Python version, is an error
that names the address, the versions and the fix, instead of Ray's own retries (about 20 s) or its
traceback."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from llmstack.common.net import tcp_open
from llmstack.stack.config import RaySection

INSTALL_HINT = 'Ray is not installed for {python}: install it with `pip install "llmstack[ray]"`'
#: Ray's own telemetry stays off; vLLM's CPU platform may run over Ray (services/engines/vllm/ray_platform.py).
#: Ray's token authentication is on: RAY_AUTH_TOKEN (the stack's cluster token) travels as a secret.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "LLMSTACK_VLLM_CPU_RAY": "1", "RAY_AUTH_MODE": "token"}


class RayNodeError(RuntimeError):
    """A Ray node that cannot start or join; the message names the address or versions and the fix."""


def ray_executable(python: str) -> str:
    """The `ray` command of the interpreter the services run with (next to it), else the one on PATH."""
    beside = Path(python).parent / "ray"
    if beside.is_file():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise RayNodeError(INSTALL_HINT.format(python=python))
    return found


def ray_argv(ray: RaySection, executable: str, temp_dir: Path | None = None) -> list[str]:
    """`ray start` for this node: foreground (`--block`), no dashboard, fixed ports where they are checked."""
    argv = [executable, "start", "--block", "--disable-usage-stats", "--node-ip-address", ray.ip]
    argv += ["--node-manager-port", str(ray.node_manager_port)]
    if ray.head:
        argv += ["--head", "--port", str(ray.port), "--include-dashboard", "false"]
    else:
        argv += ["--address", ray.head_address]
    if ray.num_cpus is not None:
        argv += ["--num-cpus", str(ray.num_cpus)]
    if ray.num_gpus is not None:
        argv += ["--num-gpus", str(ray.num_gpus)]
    if temp_dir is not None:
        argv += ["--temp-dir", str(temp_dir)]
    return argv


def node_env(ip: str) -> dict[str, str]:
    """What the processes of a node (Ray's, and vLLM's ranks on it) need to talk across hosts: vLLM's own
    address (without it, vLLM guesses from a default route, which a private link may lack) and the network
    interface gloo (CPU collectives) uses, the one that carries `ip`."""
    import psutil

    env = dict(RAY_ENV, VLLM_HOST_IP=ip)
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addresses):
            env["GLOO_SOCKET_IFNAME"] = name
    return env


def health_url(ray: RaySection) -> str:
    """The node is up once its raylet accepts connections (it registers with the head before listening)."""
    host = f"[{ray.ip}]" if ":" in ray.ip else ray.ip
    return f"tcp://{host}:{ray.node_manager_port}"


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def check_head_reachable(ray: RaySection) -> None:
    """Fail in `connect_timeout` seconds when the head's port does not answer."""
    host, port = split_address(ray.head_address)
    if not tcp_open(host, port, timeout=ray.connect_timeout):
        raise RayNodeError(
            f"the Ray head at {ray.head_address} does not answer (tried for {ray.connect_timeout:g}s): start it "
            f"on that host first (`llmstack up` with [ray] head = true, port = {port}), check [ray] address and "
            "that the port is open between the hosts"
        )


def head_versions(address: str, token: str) -> tuple[str, str] | None:
    """(Ray version, Python version) the head's cluster was started with, from its GCS; None if unrecorded.
    Raises `RayNodeError` when the head refuses the token."""
    import os

    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})  # read when Ray's core loads
    from ray._common.usage.usage_lib import get_cluster_metadata
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError, RpcError

    try:
        metadata = get_cluster_metadata(GcsClient(address=address))
    except AuthenticationError:
        raise RayNodeError(
            f"the Ray head at {address} refused this host's token: set LLMSTACK_CLUSTER_TOKEN to the head's "
            "cluster token (the cluster_token file in the head's run directory)"
        ) from None
    except RpcError as exc:
        raise RayNodeError(f"{address} answers, but not as a Ray head ({exc}); check [ray] address") from None
    except (AttributeError, ValueError, json.JSONDecodeError):
        return None
    return str(metadata.get("ray_version")), str(metadata.get("python_version"))


def local_versions() -> tuple[str, str]:
    import platform

    import ray

    return ray.__version__, platform.python_version()


def version_problem(head: tuple[str, str], here: tuple[str, str], address: str) -> str | None:
    """Ray refuses a node whose Ray or Python version differs from the head's (Python to the patch level)."""
    if head == here:
        return None
    return (
        f"the Ray cluster at {address} runs Ray {head[0]} on Python {head[1]}, this host has Ray {here[0]} on "
        f"Python {here[1]}; Ray nodes must match: install `ray=={head[0]}` with Python {head[1]} here (or the "
        "other way round on the head)"
    )


def check_join(ray: RaySection, token: str | None, python: str | None = None) -> None:
    """Before a node joins: it has the cluster's token, the head answers, and runs the same Ray and Python as
    this host."""
    if ray.head:
        return
    if not token:
        raise RayNodeError(
            "joining a Ray cluster needs its token: set LLMSTACK_CLUSTER_TOKEN to the head's cluster token (the "
            "cluster_token file in the head's run directory, or its [stack] cluster_token)"
        )
    check_head_reachable(ray)
    if python not in (None, sys.executable):
        return  # the services run another interpreter: Ray's own check at join time applies
    try:
        here = local_versions()
    except ImportError:
        raise RayNodeError(INSTALL_HINT.format(python=sys.executable)) from None
    head = head_versions(ray.head_address, token)
    problem = version_problem(head, here, ray.head_address) if head else None
    if problem:
        raise RayNodeError(problem)
