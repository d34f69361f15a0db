"""A second network "host" for tests: a Linux network namespace joined to this one by a veth pair in a private
/30 that the fixture creates and removes.

The /30 is one no interface or route of this machine already uses, and namespaces a killed test run left behind
(their owning process is gone) are removed first: a leftover pair holding the same address would swallow the
packets of the new one, and every connection across it would time out.  Needs root (or CAP_NET_ADMIN) and
iproute2's `ip`.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

PREFIX = "llmstack-t"  # + the owning pytest process's pid
POOL = ipaddress.ip_network("10.231.0.0/16")


@dataclass(frozen=True)
class NetHost:
    """The namespace (`name`, for `ip netns exec`), this host's address on the pair and the namespace's."""

    name: str
    host_ip: str
    ns_ip: str

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def _remove(ns: str) -> None:
    subprocess.run(["ip", "link", "del", f"lsh{ns.removeprefix(PREFIX)}"], capture_output=True)  # and its peer
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def remove_leftovers() -> list[str]:
    """Delete the test namespaces (and their host ends) whose pytest process no longer runs; their names."""
    gone = []
    for line in _ip("netns", "list").splitlines():
        ns = line.split()[0] if line.split() else ""
        tag = ns.removeprefix(PREFIX)
        if ns.startswith(PREFIX) and tag.isdigit() and not psutil.pid_exists(int(tag)):
            _remove(ns)
            gone.append(ns)
    return gone


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    used = []
    for line in _ip("-4", "-o", "addr", "show").splitlines():
        fields = line.split()
        if "inet" in fields:
            used.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    for line in _ip("-4", "route", "show", "table", "all").splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest[:1].isdigit():
            used.append(ipaddress.ip_network(dest, strict=False))
    return used


def free_subnet(pid: int) -> ipaddress.IPv4Network:
    """A /30 of the pool that overlaps nothing this machine has; where the search starts depends on `pid`, so two
    test runs side by side do not pick the same one."""
    used = _networks_in_use()
    subnets = list(POOL.subnets(new_prefix=30))
    start = pid % len(subnets)
    for subnet in subnets[start:] + subnets[:start]:
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise RuntimeError(f"no free /30 left in {POOL} on this machine")


@pytest.fixture
def netns() -> Iterator[NetHost]:
    if shutil.which("ip") is None:
        pytest.fail("this test needs iproute2's `ip` (apt-get install -y iproute2)")
    tag = str(os.getpid())
    ns, host_if, ns_if = f"{PREFIX}{tag}", f"lsh{tag}", f"lsn{tag}"
    remove_leftovers()
    _remove(ns)  # this process's own, should an earlier test have failed to remove it
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"cannot create a network namespace here (needs root / CAP_SYS_ADMIN): {exc.stderr.strip()}")
    try:
        host_ip, ns_ip = (str(a) for a in free_subnet(os.getpid()).hosts())
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield NetHost(ns, host_ip, ns_ip)
    finally:
        _remove(ns)
