"""A Ray cluster over two network hosts: the head (with llmstack's controller) in this namespace, a node joining
from a second one (`tests/support/netns.py`), each supervised by llmstack.

Checked: the cluster sees both nodes; a node whose head runs another Ray version is refused before it starts;
the node's Ray process killed is reported by its supervisor, which restarts it and the node rejoins; `down`
on each host stops its node and leaves no Ray process behind.  Needs root (or CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import psutil
import pytest

from tests.support.netns import NetHost
from tests.support.procs import DEFAULT_ENV, REPO_ROOT, free_port

RAY_PORT, NODE_PORT = 26379, 26380


def _env(net: NetHost, token: str | None = None) -> dict[str, str]:
    no_proxy = f"127.0.0.1,localhost,{net.host_ip},{net.ns_ip}"
    env = {**os.environ, **DEFAULT_ENV, "COLUMNS": "200", "NO_PROXY": no_proxy, "no_proxy": no_proxy}
    env.pop("LLMSTACK_CLUSTER_TOKEN", None)
    if token is not None:  # the head's cluster token, which is also its Ray token
        env.update({"LLMSTACK_CLUSTER_TOKEN": token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    return env


def _run(
    *argv: str, net: NetHost, inside: bool = False, token: str | None = None, timeout: float = 120
) -> CompletedProcess:
    """`llmstack *argv` on this host, or on the namespace's host when `inside`."""
    cmd = [sys.executable, "-m", "llmstack", *argv]
    if inside:
        cmd = net.command(cmd)
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(net, token), cwd=REPO_ROOT, timeout=timeout)


def _ray_python(script: str, token: str, net: NetHost) -> str:
    """Run `script` in a Python of its own with the cluster's Ray token; its last line of output."""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(net, token), timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def _alive_nodes(token: str, net: NetHost) -> set[str]:
    """The node addresses the cluster's head (on this side of `net`) counts as alive (asked from a driver of its
    own)."""
    address = f"{net.host_ip}:{RAY_PORT}"
    script = (
        f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
        "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))"
    )
    return set(json.loads(_ray_python(script, token, net)))


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _ray_processes(ip: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if ip in cmdline and ("raylet" in cmdline or "gcs_server" in cmdline or "ray start" in cmdline):
            found.append(proc)
    return found


def _set_head_version(version: str, token: str, net: NetHost) -> str:
    """Overwrite the Ray version the head recorded for its cluster (what a joining node is checked against);
    returns the one it had."""
    script = f"""
import json
from ray._common.usage import usage_constants
from ray._private import ray_constants
from ray._raylet import GcsClient
client = GcsClient(address="{net.host_ip}:{RAY_PORT}")
key, ns = usage_constants.CLUSTER_METADATA_KEY, ray_constants.KV_NAMESPACE_CLUSTER
metadata = json.loads(client.internal_kv_get(key, namespace=ns))
old, metadata["ray_version"] = metadata["ray_version"], {version!r}
client.internal_kv_put(key, json.dumps(metadata).encode(), overwrite=True, namespace=ns)
print(old)
"""
    return _ray_python(script, token, net)


@pytest.mark.slow
def test_ray_cluster_over_two_hosts_is_supervised(netns: NetHost, tmp_path: Path) -> None:
    host_ip, ns_ip = netns.host_ip, netns.ns_ip
    head_run, node_run = tmp_path / "head-run", tmp_path / "node-run"
    config = tmp_path / "head.toml"
    config.write_text(
        f'[stack]\nname = "ray-head"\nrun_dir = "{head_run}"\n'
        f'[controller]\nhost = "{host_ip}"\nport = 26001\n[api]\nenabled = false\n[webui]\nenabled = false\n'
        f'[ray]\nhead = true\nnode_ip = "{host_ip}"\nport = {RAY_PORT}\nnode_manager_port = {NODE_PORT}\n'
        "num_cpus = 1\nnum_gpus = 1\n"
    )
    join = ["ray", "join", f"{host_ip}:{RAY_PORT}", "--node-ip", ns_ip, "--node-manager-port", str(NODE_PORT)]
    join += ["--num-cpus", "1", "--num-gpus", "1", "--detach", "--run-dir", str(node_run)]
    try:
        up = _run("up", "--detach", "-c", str(config), net=netns, timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "ray-head healthy" in up.stdout
        token = (head_run / "cluster_token").read_text().strip()
        assert _alive_nodes(token, netns) == {host_ip}

        # errors in seconds, before a node starts: no token, a wrong one, no head at that port
        for given, message in ((None, "needs its token"), ("wrong-token", "refused this host's token")):
            r = _run(*join, net=netns, inside=True, token=given)
            assert r.returncode == 3 and message in " ".join(r.stderr.split()), r.stdout + r.stderr
        t0 = time.monotonic()
        wrong_port = [*join[:2], f"{host_ip}:{RAY_PORT + 7}", *join[3:]]
        r = _run(*wrong_port, net=netns, inside=True, token=token)
        assert r.returncode == 3 and "does not answer" in r.stderr and time.monotonic() - t0 < 20, r.stderr

        # a node with another Ray version than the head's is refused before anything starts
        real = _set_head_version("2.0.0", token, netns)
        try:
            t0 = time.monotonic()
            bad = _run(*join, net=netns, inside=True, token=token)
            assert bad.returncode == 3, bad.stdout + bad.stderr
            err = " ".join(bad.stderr.split())
            assert "runs Ray 2.0.0 on Python" in err and f"this host has Ray {real}" in err
            assert "install `ray==2.0.0`" in err and time.monotonic() - t0 < 30
        finally:
            _set_head_version(real, token, netns)

        joined = _run(*join, net=netns, inside=True, token=token, timeout=180)
        assert joined.returncode == 0, joined.stdout + joined.stderr
        _wait(lambda: _alive_nodes(token, netns) == {host_ip, ns_ip}, 60, "both nodes alive")
        status = _run("status", "--json", "--run-dir", str(node_run), net=netns)
        report = json.loads(status.stdout)
        assert status.returncode == 0 and report["healthy"], status.stdout
        assert [s["name"] for s in report["services"]] == ["ray-node"]
        head_status = json.loads(_run("status", "--json", "-c", str(config), net=netns).stdout)
        assert {s["name"] for s in head_status["services"]} == {"ray-head", "controller"}

        # the node's raylet dies: its supervisor reports it, restarts it, and the node rejoins
        raylet = next(p for p in _ray_processes(ns_ip) if "raylet" in " ".join(p.cmdline()))
        raylet.kill()
        log = node_run / "logs" / "supervisor.log"
        _wait(lambda: "ray-node exited with exit code 1" in log.read_text(), 60, "the supervisor to see it")
        _wait(lambda: "ray-node is healthy again" in log.read_text(), 120, "the node to be restarted")
        _wait(lambda: ns_ip in _alive_nodes(token, netns), 90, "the node to rejoin")
    except BaseException:
        for run in (head_run, node_run):
            for f in sorted((run / "logs").glob("*.log")) if (run / "logs").is_dir() else []:
                print(f"--- {f}\n{f.read_text()[-3000:]}")
        raise
    finally:
        down_node = _run("down", "--run-dir", str(node_run), "--timeout", "10", net=netns)
        down_head = _run("down", "-c", str(config), "--timeout", "10", net=netns)
    assert down_node.returncode == 0 and down_head.returncode == 0, down_node.stderr + down_head.stderr
    _wait(lambda: not _ray_processes(ns_ip) and not _ray_processes(host_ip), 30, "every Ray process to end")


def _platform_plugin_installed() -> None:
    from importlib.metadata import entry_points

    names = [e.value for e in entry_points(group="vllm.platform_plugins")]
    if "llmstack.services.engines.vllm.ray_platform:register" not in names:
        pytest.fail("vLLM does not see llmstack's platform plugin: reinstall llmstack (`pip install -e .`)")


@pytest.mark.slow
@pytest.mark.timeout(900)  # two vLLM engines start side by side on 2 cores
def test_one_model_split_over_two_hosts_serves_a_chat(netns: NetHost, tmp_path: Path, tiny_model_dir: Path) -> None:
    """vLLM pipeline parallel 2 over the Ray cluster (one stage per host) answers as one rank does; when the
    second host's Ray dies mid-stream, the stream ends with an error, that host's supervisor restarts its node,
    and the head's worker (which left when the node did: `engines/vllm/ray_watch.py`) is restarted by the head's
    supervisor and serves the same reply again once the node is back."""
    import openai

    _platform_plugin_installed()
    host_ip, ns_ip = netns.host_ip, netns.ns_ip
    head_run, node_run = tmp_path / "head-run", tmp_path / "node-run"
    config = tmp_path / "head.toml"
    engine = 'dtype = "float32"\nmax_model_len = 512\nengine_args = { kv_cache_memory_bytes = 67108864 }\n'
    controller, api, split, whole = (free_port() for _ in range(4))  # never the defaults another stack may hold
    config.write_text(
        f'[stack]\nname = "ray-pp"\nrun_dir = "{head_run}"\n[controller]\nport = {controller}\n'
        f"[api]\nport = {api}\nstream_timeout = 10\n[webui]\nenabled = false\n"
        f'[ray]\nhead = true\nnode_ip = "{host_ip}"\nport = {RAY_PORT}\nnode_manager_port = {NODE_PORT}\n'
        "num_cpus = 1\nnum_gpus = 1\n"
        f'[[models]]\nmodel = "{tiny_model_dir}"\nsource = "local"\nbackend = "vllm"\nnames = ["split"]\nport = {split}\n'
        f'pipeline_parallel_size = 2\ndistributed_executor_backend = "ray"\n{engine}'
        f'[[models]]\nmodel = "{tiny_model_dir}"\nsource = "local"\nbackend = "vllm"\nnames = ["whole"]\nport = {whole}\n{engine}'
    )
    join = ["ray", "join", f"{host_ip}:{RAY_PORT}", "--node-ip", ns_ip, "--node-manager-port", str(NODE_PORT)]
    join += ["--num-cpus", "1", "--num-gpus", "1", "--detach", "--run-dir", str(node_run)]
    up = subprocess.Popen(
        [sys.executable, "-m", "llmstack", "up", "--detach", "-c", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(netns), cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        from llmstack.common.net import tcp_open

        _wait(lambda: tcp_open(host_ip, NODE_PORT) or up.poll() is not None, 120, "the head's raylet")
        assert up.poll() is None, up.communicate()[0]
        token = (head_run / "cluster_token").read_text().strip()
        joined = _run(*join, net=netns, inside=True, token=token, timeout=180)
        assert joined.returncode == 0, joined.stdout + joined.stderr
        out, _ = up.communicate(timeout=600)
        assert up.returncode == 0, out
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{api}/v1", api_key="none", max_retries=0, timeout=120)
        replies = {}
        for model in ("split", "whole"):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Tell me about Beijing."}], temperature=0,
                max_tokens=24,
            )  # fmt: skip
            assert reply.usage is not None and reply.usage.completion_tokens > 0
            replies[model] = reply.choices[0].message.content
        assert replies["split"] == replies["whole"]
        log = (head_run / "logs" / "worker-split.log").read_text()
        assert ns_ip in log  # a stage ran on the other host
        for model in ("whole", "split"):  # what the hop between hosts costs per token
            t0 = time.monotonic()
            reply = client.completions.create(
                model=model, prompt="Once upon a time", max_tokens=128, temperature=0, extra_body={"ignore_eos": True}
            )
            assert reply.usage is not None
            print(f"\n{model}: {reply.usage.completion_tokens / (time.monotonic() - t0):.1f} tok/s (1 stream)")

        # the second host's Ray dies mid-stream: the stream ends with an error, the supervisors say so
        stream = client.chat.completions.create(
            model="split", messages=[{"role": "user", "content": "hi"}], max_tokens=400, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        raylet = next(p for p in _ray_processes(ns_ip) if "raylet" in " ".join(p.cmdline()))
        got, error = 0, None
        try:
            for _chunk in stream:
                got += 1
                if got == 5:
                    raylet.kill()
        except openai.APIError as exc:
            error = exc
        assert isinstance(error, openai.APIError) and "during generation" in str(error), got
        node_log = node_run / "logs" / "supervisor.log"
        _wait(lambda: "ray-node exited with exit code 1" in node_log.read_text(), 60, "the node's supervisor")
        _wait(lambda: "ray-node is healthy again" in node_log.read_text(), 120, "the node's restart")
        head_log = head_run / "logs" / "supervisor.log"
        _wait(lambda: "worker-split exited with exit code 75" in head_log.read_text(), 60, "the worker to leave")
        _wait(lambda: "worker-split is healthy again" in head_log.read_text(), 400, "the worker's restart")
        again = client.chat.completions.create(
            model="split", messages=[{"role": "user", "content": "Tell me about Beijing."}], temperature=0,
            max_tokens=24,
        )  # fmt: skip
        assert again.choices[0].message.content == replies["whole"]
    except BaseException:
        for run in (head_run, node_run):
            for f in sorted((run / "logs").glob("*.log")) if (run / "logs").is_dir() else []:
                print(f"--- {f}\n{f.read_text()[-4000:]}")
        raise
    finally:
        if up.poll() is None:
            up.kill()
        _run("down", "--run-dir", str(node_run), "--timeout", "10", net=netns)
        _run("down", "-c", str(config), "--timeout", "10", net=netns)
    _wait(lambda: not _ray_processes(ns_ip) and not _ray_processes(host_ip), 30, "every Ray process to end")
