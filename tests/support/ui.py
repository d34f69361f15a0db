"""Helpers for the tests of the people-facing tools (web UI, terminal chat, SSH tunnel)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tests.support.procs import REPO_ROOT, Service, ServiceGroup, free_port
from tests.support.stack import Stack, new_stack

ARTIFACTS = REPO_ROOT / "artifacts"


def artifact_path(name: str) -> Path:
    """Where a test keeps a file for people to look at after the run (git-ignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


def start_tiny_stack(log_dir: Path, model_dir: Path, *api_args: str) -> Stack:
    """Controller + one tiny-model worker (served as `tiny`) + API server, all real processes.  float32: the
    tests compare what a face shows with the server's own greedy answer, and a random model's logits are
    near-ties that bfloat16 rounding (which depends on shapes: batch, prefix-cache hit, kernel) can tip."""
    stack = new_stack(log_dir)
    try:
        stack.start_controller()
        stack.start_worker("worker-tiny", model_dir, "--model-names", "tiny", "--dtype", "float32")
        stack.start_api(*api_args)
        stack.wait_models("tiny")
    except BaseException:
        print(stack.group.logs(60))
        stack.group.stop_all()
        raise
    return stack


def start_webui(
    group: ServiceGroup,
    name: str,
    api_url: str | None,
    *args: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> tuple[Service, str]:
    """`llmstack webui` as `llmstack up` runs it (no --api-url: taken from a `-c` stack.toml in `args`);
    returns (service, page URL). Not yet waited on. `cwd` matters: a ./stack.toml there gives defaults."""
    port = free_port()
    url_args = ["--api-url", api_url] if api_url else []
    svc = group.start(name, "webui", "--host", "127.0.0.1", "--port", port, *url_args, *args, env=env, cwd=cwd)
    return svc, f"http://127.0.0.1:{port}/"
