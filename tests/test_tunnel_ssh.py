"""`llmstack tunnel` through a real OpenSSH server on loopback (generated host and client keys, a
non-default port, key login only), in front of a real stack and web UI."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from llmstack.cli.faces import tunnel_defaults
from llmstack.faces.tunnel import Forward, TunnelError, TunnelSpec, plan_tunnel
from llmstack.stack.config import parse_config
from tests.support.procs import DEFAULT_ENV, REPO_ROOT, Service, ServiceGroup, free_port
from tests.support.stack import Stack
from tests.support.ui import start_tiny_stack, start_webui

pytestmark = pytest.mark.slow

SSHD = "/usr/sbin/sshd"


@dataclass
class SSHServer:
    port: int
    user: str
    client_key: Path
    known_hosts: Path

    @property
    def destination(self) -> str:
        return f"{self.user}@127.0.0.1"

    def client_options(self) -> list[str]:
        """`-o` options for a throwaway known_hosts (never the user's) and no password prompts."""
        return [
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=accept-new",
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        ]  # fmt: skip


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    assert os.path.exists(SSHD), "OpenSSH server missing: apt-get install -y openssh-server"
    assert shutil.which("ssh") and shutil.which("ssh-keygen"), (
        "OpenSSH client missing: apt-get install -y openssh-client"
    )
    d = tmp_path_factory.mktemp("sshd")
    _keygen(d / "host_key")
    _keygen(d / "client_key")
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nAllowTcpForwarding yes\n"
        "PermitRootLogin prohibit-password\nLogLevel VERBOSE\n"
    )
    if os.geteuid() == 0:  # sshd started by root insists on its privilege-separation directory
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = (d / "sshd.log").open("wb")
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (d / "sshd.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "sshd did not start listening"
                time.sleep(0.1)
        yield SSHServer(port, getpass.getuser(), d / "client_key", d / "known_hosts")
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[Stack, int]]:
    """The 'server side': a tiny stack and its web UI on loopback; returns (stack, web UI port)."""
    s = start_tiny_stack(tmp_path_factory.mktemp("tunnel-stack"), tiny_model_dir)
    try:
        svc, url = start_webui(s.group, "webui", s.api_url, cwd=tmp_path_factory.mktemp("webui-cwd"))
        svc.wait_healthy(url, timeout=120)
        yield s, int(url.rstrip("/").rsplit(":", 1)[1])
    finally:
        s.group.stop_all()


def _stack_toml(path: Path, stack: Stack, webui_port: int, sshd: SSHServer, local_api: int, local_web: int) -> Path:
    api_port = stack.api_url.rsplit(":", 1)[1]
    path.write_text(
        f"[api]\nport = {api_port}\n\n[webui]\nport = {webui_port}\n\n"
        f'[tunnel]\nhost = "{sshd.destination}"\nssh_port = {sshd.port}\nidentity_file = "{sshd.client_key}"\n'
        f"local_api_port = {local_api}\nlocal_webui_port = {local_web}\n"
    )
    return path


def _tunnel(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **DEFAULT_ENV, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "llmstack", "tunnel", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _ssh_children(svc: Service) -> list[psutil.Process]:
    return [p for p in psutil.Process(svc.pid).children() if p.name() == "ssh"]


def _wait_for(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_print_shows_the_ssh_command(remote: tuple[Stack, int], sshd: SSHServer, tmp_path: Path) -> None:
    stack, webui_port = remote
    toml = _stack_toml(tmp_path / "stack.toml", stack, webui_port, sshd, 18000, 17860)
    api_port = stack.api_url.rsplit(":", 1)[1]
    r = _tunnel("root@gpu-box", "-p", "2222", "--local-api-port", "18001", "-c", str(toml), "--print", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.strip()
    assert cmd.startswith("ssh -N ")
    assert f"-L 127.0.0.1:18001:127.0.0.1:{api_port}" in cmd  # flag beats stack.toml
    assert f"-L 127.0.0.1:17860:127.0.0.1:{webui_port}" in cmd  # from [tunnel] local_webui_port
    assert "-p 2222" in cmd and f"-i {sshd.client_key}" in cmd
    assert "-o ExitOnForwardFailure=yes" in cmd and "-o ServerAliveInterval=" in cmd
    assert cmd.endswith("root@gpu-box")
    assert TunnelSpec("h", [Forward("api", 1, 2)]).command()[:4] == ["ssh", "-N", "-L", "127.0.0.1:1:127.0.0.1:2"]


def test_tunnel_forwards_api_and_webui_and_reconnects(
    remote: tuple[Stack, int], sshd: SSHServer, tmp_path: Path
) -> None:
    stack, webui_port = remote
    local_api, local_web = free_port(), free_port()
    toml = _stack_toml(tmp_path / "stack.toml", stack, webui_port, sshd, local_api, local_web)
    group = ServiceGroup(tmp_path / "logs")
    try:
        # destination, ssh port, key and local ports all come from [tunnel] in stack.toml
        tunnel = group.start("tunnel", "tunnel", "-c", str(toml), *sshd.client_options())
        models = tunnel.wait_healthy(f"http://127.0.0.1:{local_api}/v1/models", timeout=60)
        assert [m["id"] for m in models.json()["data"]] == ["tiny"]
        page = httpx.get(f"http://127.0.0.1:{local_web}/", timeout=30)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        assert httpx.get(f"http://127.0.0.1:{local_web}/config", timeout=30).status_code == 200
        log = tunnel.log_text()
        assert f"http://127.0.0.1:{local_api}/v1" in log and f"http://127.0.0.1:{local_web}/" in log
        chat = httpx.post(
            f"http://127.0.0.1:{local_api}/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
            timeout=60,
        )
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]

        # the connection drops (ssh killed): the tunnel comes back by itself
        (first,) = _ssh_children(tunnel)
        first.kill()
        _wait_for("a reconnect", lambda: tunnel.log_text().count("tunnel up") >= 2, timeout=30)
        assert "reconnecting in 1s" in tunnel.log_text()
        (second,) = _ssh_children(tunnel)
        assert second.pid != first.pid
        assert httpx.get(f"http://127.0.0.1:{local_api}/v1/models", timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{local_web}/", timeout=10).status_code == 200

        # Ctrl-C (SIGINT to the foreground group, as a terminal sends it) stops everything cleanly
        tunnel.signal(signal.SIGINT)
        assert tunnel.wait(timeout=10) == 0, tunnel.log_tail()
        assert "tunnel stopped" in tunnel.log_text() and "Traceback" not in tunnel.log_text()
        assert not psutil.pid_exists(second.pid) or psutil.Process(second.pid).status() == psutil.STATUS_ZOMBIE
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{local_api}/v1/models", timeout=5)
    finally:
        group.stop_all()
        if any(s.alive() for s in group):
            print(group.logs())


def test_busy_local_port_is_refused_before_connecting(sshd: SSHServer, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _tunnel(sshd.destination, "-p", str(sshd.port), "--local-api-port", str(port), "--no-webui", cwd=tmp_path)
    assert r.returncode == 3
    assert f"local port {port} (for the api) is already in use" in r.stderr and "--local-api-port" in r.stderr


def test_a_refused_key_fails_fast_instead_of_retrying(sshd: SSHServer, tmp_path: Path) -> None:
    _keygen(tmp_path / "stranger")
    started = time.monotonic()
    r = _tunnel(
        sshd.destination, "-p", str(sshd.port), "-i", str(tmp_path / "stranger"), *sshd.client_options(),
        "--local-api-port", str(free_port()), "--local-webui-port", str(free_port()), cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Permission denied" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - started < 30


def test_plan_follows_stack_toml(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "api": {"host": "10.0.0.5", "port": 9000},
            "webui": {"enabled": False},
            "tunnel": {"host": "me@box", "ssh_port": 2200, "identity_file": "keys/id", "local_api_port": 19000},
        }
    )
    cfg.source_path = tmp_path / "stack.toml"
    spec = plan_tunnel(tunnel_defaults(cfg))
    assert [f.spec() for f in spec.forwards] == ["127.0.0.1:19000:10.0.0.5:9000"]  # web UI disabled: API only
    assert spec.destination == "me@box" and spec.port == 2200
    assert spec.identity_file == str(tmp_path / "keys" / "id")  # relative to the stack.toml
    both = plan_tunnel(
        tunnel_defaults(parse_config({"api": {"host": "0.0.0.0"}})), destination="h", local_webui_port=17000
    )
    assert [f.spec() for f in both.forwards] == ["127.0.0.1:8000:127.0.0.1:8000", "127.0.0.1:17000:127.0.0.1:7860"]
    assert both.port is None and "-p" not in both.command()
    with pytest.raises(TunnelError, match="which server"):
        plan_tunnel(None)
