"""The second-host fixture (`tests/support/netns.py`) survives what an earlier, killed test run leaves on the
machine: a namespace whose veth still holds an address of the pool.  Such a leftover once made every connection
across a new pair time out (both host ends held the same address)."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import threading

import psutil
import pytest

from tests.support import netns as netns_support


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _dead_pid() -> int:
    return next(pid for pid in range(3_999_999, 3_000_000, -1) if not psutil.pid_exists(pid))


def _reachable(host: netns_support.NetHost) -> bool:
    """A TCP connection from inside the namespace to a listener on this side of the pair."""
    with socket.create_server((host.host_ip, 0)) as server:
        port = server.getsockname()[1]
        threading.Thread(target=lambda: server.accept()[0].close(), daemon=True).start()
        probe = f"import socket; socket.create_connection(({host.host_ip!r}, {port}), timeout=5).close()"
        return subprocess.run(host.command([sys.executable, "-c", probe]), capture_output=True).returncode == 0


def test_a_new_host_is_reachable_beside_what_a_killed_run_left(request: pytest.FixtureRequest) -> None:
    dead, pid = _dead_pid(), os.getpid()
    stale, stale_if, held = f"{netns_support.PREFIX}{dead}", f"lsh{dead}", f"lsb{pid}"
    try:
        busy = netns_support.free_subnet(pid)  # where a new host would start: a live interface holds it
        _ip("link", "add", held, "type", "veth", "peer", "name", f"lsc{pid}")  # (no dummy links here)
        _ip("addr", "add", f"{next(busy.hosts())}/30", "dev", held)
        left = netns_support.free_subnet(pid)  # the next one: a killed run's namespace holds it
        _ip("netns", "add", stale)
        _ip("link", "add", stale_if, "type", "veth", "peer", "name", f"lsn{dead}")
        _ip("link", "set", f"lsn{dead}", "netns", stale)
        _ip("addr", "add", f"{next(left.hosts())}/30", "dev", stale_if)
        _ip("link", "set", stale_if, "up")

        host: netns_support.NetHost = request.getfixturevalue("netns")
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert stale not in listed  # the leftover was removed, its host end with it
        assert subprocess.run(["ip", "link", "show", stale_if], capture_output=True).returncode != 0
        assert ipaddress.ip_address(host.host_ip) in left  # its address is free again; the live one's is not
        assert _reachable(host)
    finally:
        subprocess.run(["ip", "link", "del", held], capture_output=True)
        subprocess.run(["ip", "link", "del", stale_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
