"""Addresses, ports and tokens, once: the URL a service is reached at, the bearer header, whether a port is
free, whether a service answers its health check."""

from __future__ import annotations

import contextlib

ALL_INTERFACES = ("0.0.0.0", "::")


def service_url(host: str, port: int, tls: bool = False) -> str:
    """The URL to reach a service bound to `host:port` from this machine (an all-interfaces bind is
    reached on loopback; an IPv6 literal is bracketed)."""
    shown = "127.0.0.1" if host in ALL_INTERFACES else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def bearer(token: str | None) -> dict[str, str]:
    """The `Authorization` header for a bearer token; no header without one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


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
