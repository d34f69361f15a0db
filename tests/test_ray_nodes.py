"""The `[ray]` section and `llmstack ray join`: what a Ray node's service looks like in the plan, what a worker
whose vLLM runs over Ray gets, and the errors before a node starts (head unreachable, versions that differ).
The cluster itself, across two network namespaces, is tests/test_netns_ray.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmstack.stack.config import ConfigError, parse_config
from llmstack.stack.plan import build_specs, selected_roles
from llmstack.stack.raynode import version_problem
from tests.support.procs import DEFAULT_ENV, REPO_ROOT, free_port


def _cfg(ray: dict, **extra: object):  # noqa: ANN202
    return parse_config({"ray": ray, "webui": {"enabled": False}, **extra})


def test_head_node_is_a_supervised_service_started_first_and_stopped_last() -> None:
    cfg = _cfg({"head": True, "node_ip": "10.0.0.5", "num_cpus": 2, "num_gpus": 1})
    roles = selected_roles(cfg, None)
    assert roles[0] == "ray"
    spec = build_specs(cfg, roles, None)[0]
    assert spec.name == "ray-head" and spec.role == "ray" and spec.health_url == "tcp://10.0.0.5:6380"
    argv = spec.argv
    assert Path(argv[0]).name == "ray" and argv[1:3] == ["start", "--block"]
    assert ["--head", "--port", "6379"] == argv[argv.index("--head") : argv.index("--head") + 3]
    assert "--num-gpus" in argv and "--address" not in argv
    assert spec.env["LLMSTACK_VLLM_CPU_RAY"] == "1" and spec.env["VLLM_HOST_IP"] == "10.0.0.5"
    from llmstack.stack.children import STOP_TIERS
    from llmstack.stack.supervisor import START_ORDER

    assert START_ORDER[0] == "ray" and STOP_TIERS[-1] == ("ray",)


def test_joining_node_and_a_worker_over_ray(tmp_path: Path) -> None:
    from llmstack.common.net import outward_ip
    from llmstack.stack.plan import stack_secrets
    from llmstack.stack.rundir import RunDir

    here = outward_ip()  # an address of this host: its interface is the one gloo is told to use
    model = {"model": "/m", "source": "local", "backend": "vllm", "pipeline_parallel_size": 2}
    cfg = _cfg({"address": "10.0.0.5:6379", "node_ip": here}, stack={"cluster_token": "t0ken"}, models=[
        {**model, "names": ["over-ray"], "distributed_executor_backend": "ray"},
        {**model, "names": ["local-ranks"]},
    ])  # fmt: skip
    specs = {s.name: s for s in build_specs(cfg, selected_roles(cfg, None), None)}
    node = specs["ray-node"]
    assert node.argv[node.argv.index("--address") + 1] == "10.0.0.5:6379" and "--head" not in node.argv
    over_ray, local = specs["worker-over-ray"], specs["worker-local-ranks"]
    assert over_ray.env["RAY_ADDRESS"] == "10.0.0.5:6379" and over_ray.env["VLLM_HOST_IP"] == here
    assert over_ray.env["GLOO_SOCKET_IFNAME"] and over_ray.env["RAY_AUTH_MODE"] == "token"
    assert "RAY_ADDRESS" not in local.env and "RAY_AUTH_TOKEN" not in local.secret_env
    # Ray's token authentication: the stack's cluster token, as a secret, to the node and the worker over Ray
    assert "RAY_AUTH_TOKEN" in node.secret_env and "RAY_AUTH_TOKEN" in over_ray.secret_env
    assert stack_secrets(cfg, RunDir(tmp_path), ["ray"])["RAY_AUTH_TOKEN"] == "t0ken"
    assert "RAY_AUTH_TOKEN" not in stack_secrets(parse_config({}), RunDir(tmp_path), ["controller"])


def test_ray_section_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="set either head = true"):
        _cfg({"head": True, "address": "10.0.0.5:6379"})
    with pytest.raises(ConfigError, match=r"ray.address: must be the head's host:port"):
        _cfg({"address": "http://10.0.0.5"})
    with pytest.raises(ConfigError, match="port 6379 is used by both ray and controller"):
        _cfg({"head": True, "node_ip": "10.0.0.5"}, controller={"port": 6379, "host": "0.0.0.0"})
    with pytest.raises(ConfigError, match="ray.node_ip: must be an address the other hosts reach, not loopback"):
        _cfg({"head": True, "node_ip": "127.0.0.1"})
    with pytest.raises(ConfigError, match="--only ray: there is no \\[ray\\] section"):
        from llmstack.stack.plan import RoleName

        selected_roles(parse_config({}), [RoleName.ray])


def test_version_mismatch_names_both_versions_and_the_fix() -> None:
    assert version_problem(("2.60.0", "3.11.7"), ("2.60.0", "3.11.7"), "h:1") is None
    problem = version_problem(("2.49.0", "3.11.7"), ("2.60.0", "3.11.7"), "10.0.0.5:6379")
    assert problem is not None
    assert "runs Ray 2.49.0 on Python 3.11.7, this host has Ray 2.60.0" in problem and "ray==2.49.0" in problem


def _join(*args: str, token: str | None = "t0ken") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **DEFAULT_ENV, "COLUMNS": "200"}
    env.pop("LLMSTACK_CLUSTER_TOKEN", None)
    if token is not None:
        env["LLMSTACK_CLUSTER_TOKEN"] = token
    cmd = [sys.executable, "-m", "llmstack", "ray", "join", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)


def test_unreachable_head_fails_in_seconds(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    run = ["--connect-timeout", "2", "--run-dir", str(tmp_path / "run")]
    t0 = time.monotonic()
    r = _join(f"127.0.0.1:{port}", *run)
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"the Ray head at 127.0.0.1:{port} does not answer" in " ".join(r.stderr.split())
    assert time.monotonic() - t0 < 15
    r = _join(f"127.0.0.1:{port}", *run, token=None)
    assert r.returncode == 3 and "needs its token: set LLMSTACK_CLUSTER_TOKEN" in " ".join(r.stderr.split())
    assert not (tmp_path / "run" / "state.json").exists()
