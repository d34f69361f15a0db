"""Addresses, ports and health, once: the URL a service is reached at, the bearer header, whether a port is
free, what a `/health` answer means."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

ALL_INTERFACES = ("0.0.0.0", "::")


def reach_host(bind_host: str) -> str:
    """The address that reaches a service bound to `bind_host` from its own machine: loopback for an
    all-interfaces (or unnamed) bind, else the address itself."""
    return "127.0.0.1" if bind_host in (*ALL_INTERFACES, "", "localhost") else bind_host


def service_url(host: str, port: int, tls: bool = False) -> str:
    """The URL to reach a service bound to `host:port` from this machine (IPv6 literals bracketed)."""
    shown = reach_host(host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def bearer(token: str | None) -> dict[str, str]:
    """The `Authorization` header for a bearer token; no header without one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def check_port_free(host: str, port: int) -> None:
    """Raise `OSError` naming the address when `host:port` cannot be listened on (fail before loading
    anything heavy)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    try:
        check_port_free(host, port)
    except OSError:
        return False
    return True


def judge_health(resp: httpx.Response, expect_models: Iterable[str] = ()) -> tuple[bool, str]:
    """What a `/health` answer means, the same for every service: healthy is HTTP 200 whose JSON `status`,
    when it has one, is "ok" (a worker says "loading" or "draining" otherwise) and, for the API server,
    whose `models` include every expected one.  Returns (healthy, why not / "ok")."""
    if resp.status_code != 200:
        return False, f"HTTP {resp.status_code}"
    try:
        body = resp.json()
    except ValueError:
        body = None  # the web UI's page is HTML
    if isinstance(body, dict) and body.get("status", "ok") != "ok":
        return False, str(body["status"])
    missing = set(expect_models) - set(body.get("models") or [] if isinstance(body, dict) else [])
    if missing:
        return False, f"waiting for {', '.join(sorted(missing))}"
    return True, "ok"


def tcp_open(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections on host:port (for services without an HTTP health route)."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tcp_target(url: str) -> tuple[str, int] | None:
    """("10.0.0.5", 6380) from "tcp://10.0.0.5:6380"; None for any other URL."""
    if not url.startswith("tcp://"):
        return None
    host, _, port = url[len("tcp://") :].rpartition(":")
    return host.strip("[]"), int(port)


def outward_ip(toward: str | None = None) -> str:
    """This host's address on the route toward `toward` (default: the default route), as Ray picks its node
    address; the host name's address when there is no such route."""
    import socket

    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((toward.strip("[]") if toward else "8.8.8.8", 80))  # UDP: nothing is sent
        return str(sock.getsockname()[0])
    return socket.gethostbyname(socket.gethostname())
