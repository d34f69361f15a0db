"""A worker on a second network host: a Linux network namespace joined to this one by a veth pair in a
private /30 that the test creates (and removes).  The controller listens on the host side of the pair with a
cluster token; a worker inside the namespace joins with the token and serves through an API server, while
one without the token is refused and never routed.

Needs root (or CAP_NET_ADMIN) and iproute2's `ip`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.procs import Service, ServiceGroup, free_port

HOST_IP, NS_IP = "10.231.0.1", "10.231.0.2"
TOKEN = "netns-cluster-token"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which("ip") is None:
        pytest.fail("this test needs iproute2's `ip` (apt-get install -y iproute2)")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"llmstack-t{tag}", f"lsh{tag}", f"lsn{tag}"
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"cannot create a network namespace here (needs root / CAP_SYS_ADMIN): {exc.stderr.strip()}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{HOST_IP}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{NS_IP}/30", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)  # removes its peer too
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slow
def test_worker_in_another_namespace_joins_with_the_token(netns: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    # addresses outside loopback must not go through any proxy configured in the environment
    no_proxy = f"127.0.0.1,localhost,::1,{HOST_IP},{NS_IP}"
    env = {"NO_PROXY": no_proxy, "no_proxy": no_proxy}
    controller_port, api_port, good_port, bad_port = free_port(), free_port(), 21102, 21103
    controller_url = f"http://{HOST_IP}:{controller_port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    group = ServiceGroup(tmp_path / "logs")
    try:
        with_token = {**env, "LLMSTACK_CLUSTER_TOKEN": TOKEN}  # secrets in the environment, not on command lines
        args = ["--host", HOST_IP, "--port", controller_port, "--heartbeat-expiry", "3"]
        controller = group.start("controller", "controller", *args, env=with_token)
        controller.wait_healthy(f"{controller_url}/health")

        def worker(name: str, port: int, worker_env: dict[str, str]) -> Service:
            argv = ["worker", "--model-path", tiny_model_dir, "--model-names", name, "--device", "cpu"]
            argv += ["--host", NS_IP, "--port", port, "--worker-address", f"http://{NS_IP}:{port}"]
            argv += ["--controller-address", controller_url, "--heartbeat-interval", "0.5"]
            svc = Service(name, [str(a) for a in argv], group.log_dir, env=worker_env)
            svc.cmd = ["ip", "netns", "exec", netns, *svc.cmd]  # the worker lives on the other "host"
            if "LLMSTACK_CLUSTER_TOKEN" not in worker_env:  # none inherited from the test's own environment
                svc.env.pop("LLMSTACK_CLUSTER_TOKEN", None)
            group.services.append(svc)
            return svc.start()

        good = worker("tiny-remote", good_port, with_token)
        bad = worker("tiny-intruder", bad_port, env)
        good.wait_healthy(f"http://{NS_IP}:{good_port}/health", timeout=180)
        bad.wait_healthy(f"http://{NS_IP}:{bad_port}/health", timeout=180)
        _wait(
            lambda: "tiny-remote" in httpx.get(f"{controller_url}/models", timeout=2).json()["models"], 30, "register"
        )

        api = group.start(
            "api", "api", "--port", api_port, "--controller-address", controller_url, "--sync-interval", "0.2",
            env=with_token,
        )  # fmt: skip
        api_url = f"http://127.0.0.1:{api_port}"
        api.wait_healthy(f"{api_url}/health")
        _wait(lambda: "tiny-remote" in httpx.get(f"{api_url}/health").json()["models"], 30, "routing")

        client = openai.OpenAI(base_url=f"{api_url}/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="tiny-remote", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        assert httpx.get(f"http://{NS_IP}:{good_port}/health").json()["served"] >= 1

        # the worker without the token was refused, and nothing is routed to it
        time.sleep(1.5)  # several of its registration attempts
        table = httpx.get(f"{controller_url}/workers", headers=auth).json()["workers"]
        assert [w["worker_address"] for w in table] == [f"http://{NS_IP}:{good_port}"]
        assert "tiny-intruder" not in httpx.get(f"{api_url}/health").json()["models"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="tiny-intruder", messages=[{"role": "user", "content": "hi"}])
        assert "refused registration (401)" in bad.log_text()
        metrics = httpx.get(f"{controller_url}/metrics").text
        refused = next(line for line in metrics.splitlines() if 'event="refused"' in line)
        assert float(refused.split()[-1]) >= 1
        # nor may anyone use the guarded worker directly without the token
        body = {"prompt": "hi", "params": {"max_tokens": 2}}
        assert httpx.post(f"http://{NS_IP}:{good_port}/generate", json=body).status_code == 401
        assert httpx.post(f"http://{NS_IP}:{good_port}/generate", json=body, headers=auth).status_code == 200
        # and without the token the worker table is not readable
        assert httpx.get(f"{controller_url}/workers").status_code == 401
        for svc in group:
            assert TOKEN not in svc.log_text(), f"{svc.name} logged the token"
    except BaseException:
        print(group.logs(40))
        raise
    finally:
        group.stop_all()
