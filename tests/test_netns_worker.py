"""A worker on a second network host (`tests/support/netns.py`: a network namespace and a veth pair).  The
controller listens on the host side of the pair with a cluster token; a worker inside the namespace joins with the
token and serves through an API server, while one without the token is refused and never routed.

Needs root (or CAP_NET_ADMIN) and iproute2's `ip`.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.netns import NetHost
from tests.support.procs import Service, ServiceGroup, free_port

TOKEN = "netns-cluster-token"


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
def test_worker_in_another_namespace_joins_with_the_token(netns: NetHost, tmp_path: Path, tiny_model_dir: Path) -> None:
    host_ip, ns_ip = netns.host_ip, netns.ns_ip
    # addresses outside loopback must not go through any proxy configured in the environment
    no_proxy = f"127.0.0.1,localhost,::1,{host_ip},{ns_ip}"
    env = {"NO_PROXY": no_proxy, "no_proxy": no_proxy}
    controller_port, api_port, good_port, bad_port = free_port(), free_port(), 21102, 21103
    controller_url = f"http://{host_ip}:{controller_port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    group = ServiceGroup(tmp_path / "logs")
    try:
        with_token = {**env, "LLMSTACK_CLUSTER_TOKEN": TOKEN}  # secrets in the environment, not on command lines
        args = ["--host", host_ip, "--port", controller_port, "--heartbeat-expiry", "3"]
        controller = group.start("controller", "controller", *args, env=with_token)
        controller.wait_healthy(f"{controller_url}/health")

        def worker(name: str, port: int, worker_env: dict[str, str]) -> Service:
            argv = ["worker", "--model-path", tiny_model_dir, "--model-names", name, "--device", "cpu"]
            argv += ["--host", ns_ip, "--port", port, "--worker-address", f"http://{ns_ip}:{port}"]
            argv += ["--controller-address", controller_url, "--heartbeat-interval", "0.5"]
            svc = Service(name, [str(a) for a in argv], group.log_dir, env=worker_env)
            svc.cmd = netns.command(svc.cmd)  # the worker lives on the other "host"
            if "LLMSTACK_CLUSTER_TOKEN" not in worker_env:  # none inherited from the test's own environment
                svc.env.pop("LLMSTACK_CLUSTER_TOKEN", None)
            group.services.append(svc)
            return svc.start()

        good = worker("tiny-remote", good_port, with_token)
        bad = worker("tiny-intruder", bad_port, env)
        good.wait_healthy(f"http://{ns_ip}:{good_port}/health", timeout=180)
        bad.wait_healthy(f"http://{ns_ip}:{bad_port}/health", timeout=180)
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
        assert httpx.get(f"http://{ns_ip}:{good_port}/health").json()["served"] >= 1

        # the worker without the token was refused, and nothing is routed to it
        time.sleep(1.5)  # several of its registration attempts
        table = httpx.get(f"{controller_url}/workers", headers=auth).json()["workers"]
        assert [w["worker_address"] for w in table] == [f"http://{ns_ip}:{good_port}"]
        assert "tiny-intruder" not in httpx.get(f"{api_url}/health").json()["models"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="tiny-intruder", messages=[{"role": "user", "content": "hi"}])
        assert "refused registration (401)" in bad.log_text()
        metrics = httpx.get(f"{controller_url}/metrics").text
        refused = next(line for line in metrics.splitlines() if 'event="refused"' in line)
        assert float(refused.split()[-1]) >= 1
        # nor may anyone use the guarded worker directly without the token
        body = {"prompt": "hi", "params": {"max_tokens": 2}}
        assert httpx.post(f"http://{ns_ip}:{good_port}/generate", json=body).status_code == 401
        assert httpx.post(f"http://{ns_ip}:{good_port}/generate", json=body, headers=auth).status_code == 200
        # and without the token the worker table is not readable
        assert httpx.get(f"{controller_url}/workers").status_code == 401
        for svc in group:
            assert TOKEN not in svc.log_text(), f"{svc.name} logged the token"
    except BaseException:
        print(group.logs(40))
        raise
    finally:
        group.stop_all()
