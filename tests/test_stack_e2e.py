"""`llmstack up / status / logs / down / pull` end to end: real processes, a tiny model in a ModelScope
cache laid out as ModelScope lays it, the official `openai` client. Nothing of a stack may survive `down`,
not even when its supervisor was killed with SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from llmstack.common.net import check_port_free
from llmstack.stack.models import modelscope_cache_path
from llmstack.stack.rundir import RunDir, RunState, ServiceState, kill_all, marked_processes
from tests.support.procs import DEFAULT_ENV, REPO_ROOT, free_port
from tests.support.procs import run_llmstack as llmstack

MODEL_ID = "test-org/tiny-chat"
API_KEY = "sk-e2e-key-1"
MESSAGES = [{"role": "user", "content": "Hello there"}]


class StackFiles:
    """A stack.toml on free loopback ports, its run directory and its ModelScope cache."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.root = root
        self.cache = root / "cache"
        self.snapshot = modelscope_cache_path(MODEL_ID, self.cache)
        shutil.copytree(model_dir, self.snapshot)
        self.ports = {"controller": free_port(), "worker": free_port(), "api": free_port()}
        self.config = root / "stack.toml"
        self.run_dir = root / "run"
        self.api_url = f"http://127.0.0.1:{self.ports['api']}"

    def write(self, extra_stack: str = "", webui: bool = False) -> Path:
        p = self.ports
        if webui:
            p.setdefault("webui", free_port())
        webui_section = f'port = {p["webui"]}\ntitle = "e2e"' if webui else "enabled = false"
        self.config.write_text(
            f"""
[stack]
name = "e2e"
run_dir = "run"
drain_timeout = 120  # the drained stream below must finish even on a busy machine
start_timeout = 180
restart_backoff = 0.2
restart_backoff_max = 1
crash_loop_restarts = 2
crash_loop_window = 300
{extra_stack}

[controller]
port = {p["controller"]}
heartbeat_expiry = 3

[[models]]
model = "{MODEL_ID}"
cache_dir = "cache"
names = ["tiny-chat", "tiny"]
device = "cpu"
port = {p["worker"]}
heartbeat_interval = 0.5

[api]
port = {p["api"]}
sync_interval = 0.2
api_keys = ["{API_KEY}"]

[webui]
{webui_section}
"""
        )
        return self.config

    def state(self) -> RunState:
        state = RunDir(self.run_dir).read_state()
        assert state is not None, f"no state in {self.run_dir}"
        return state

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.api_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def logs(self) -> str:
        out = []
        for log in sorted((self.run_dir / "logs").glob("*.log")):
            out.append(f"--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(out)


@pytest.fixture
def stack(tmp_path: Path, tiny_model_dir: Path) -> Iterator[StackFiles]:
    files = StackFiles(tmp_path, tiny_model_dir)
    files.write()
    try:
        yield files
    finally:
        state = RunDir(files.run_dir).read_state()
        if state is not None:
            llmstack("down", "--run-dir", str(files.run_dir), "--timeout", "2", timeout=120)
            leftovers = marked_processes(state.run_id)
            kill_all(leftovers)  # never leave processes behind, even when the test found a bug


def assert_nothing_left(files: StackFiles) -> None:
    """psutil finds no process of the stack and every port is free again."""
    state = files.state()
    assert marked_processes(state.run_id) == []
    assert state.supervisor is not None and not state.supervisor.alive()
    for rec in state.services:
        if rec.proc is not None:  # None: never started
            assert not rec.proc.alive(), f"{rec.name} survived"
            assert rec.proc.members() == []
    for port in files.ports.values():
        check_port_free("127.0.0.1", port)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, files: StackFiles) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{files.logs()}")


def chat(files: StackFiles) -> str:
    resp = files.client().chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8)
    assert resp.usage is not None and resp.usage.completion_tokens > 0
    return resp.choices[0].message.content or ""


def chat_eventually(files: StackFiles, timeout: float = 60) -> None:
    def attempt() -> bool:
        try:
            chat(files)
            return True
        except openai.APIError:
            return False

    wait_for(attempt, timeout, "a successful chat completion", files)


def _worker(state: RunState):
    return next(s for s in state.services if s.role == "workers")


@pytest.mark.slow
def test_up_chat_status_logs_down(stack: StackFiles) -> None:
    t0 = time.monotonic()
    up = llmstack("up", "--detach", "-c", str(stack.config))
    t_up = time.monotonic() - t0
    assert up.returncode == 0, up.stdout + up.stderr + stack.logs()
    assert "Try it:" in up.stdout and f"{stack.api_url}/v1/chat/completions" in up.stdout
    assert "from openai import OpenAI" in up.stdout and "Authorization: Bearer $LLMSTACK_API_KEY" in up.stdout
    t1 = time.monotonic()
    text = chat(stack)
    t_first = time.monotonic() - t0
    t_after_up = time.monotonic() - t1
    assert isinstance(text, str)

    # secrets travel in the environment: never on a command line that `ps` shows
    state = stack.state()
    token = (stack.run_dir / "cluster_token").read_text().strip()
    assert oct((stack.run_dir / "cluster_token").stat().st_mode & 0o777) == "0o600"
    for proc in marked_processes(state.run_id):
        cmdline = " ".join(proc.cmdline())
        assert API_KEY not in cmdline and token not in cmdline
    assert httpx.get(f"{stack.api_url}/v1/models", timeout=5).status_code == 401  # keys are enforced

    status = llmstack("status", "--json", "-c", str(stack.config))
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["healthy"] and report["supervisor"]["alive"]
    assert {s["name"]: (s["state"], s["healthy"]) for s in report["services"]} == {
        "controller": ("running", True),
        "worker-tiny-chat": ("running", True),
        "api": ("running", True),
    }
    models = {m["name"]: m for m in report["models"]}
    assert models["tiny-chat"]["workers"] == 1 and models["tiny"]["workers"] == 1
    assert models["tiny-chat"]["memory_bytes"] > 10 * 2**20
    assert models["tiny-chat"]["ttft_p50_s"] > 0  # live figure from the API server's metrics
    assert 0 <= models["tiny-chat"]["prefix_cache_hit_rate"] <= 1  # the worker's prefix cache, from its /health
    human = llmstack("status", "-c", str(stack.config))
    assert human.returncode == 0 and "worker-tiny-chat" in human.stdout and "tiny-chat" in human.stdout
    assert "TTFT p50" in human.stdout and "prefix hits" in human.stdout
    import pexpect  # a terminal, so the live display redraws in place

    watch = pexpect.spawn(
        sys.executable, ["-m", "llmstack", "status", "--watch", "0.3", "-c", str(stack.config)],
        cwd=str(REPO_ROOT), env={**os.environ, **DEFAULT_ENV, "COLUMNS": "200"}, encoding="utf-8", timeout=30,
    )  # fmt: skip
    watch.expect("TTFT p50")
    watch.expect("TTFT p50")  # drawn again at the next refresh
    watch.sendintr()
    watch.expect(pexpect.EOF)
    watch.close()
    assert watch.exitstatus == 0

    pids = {s.name: s.proc.pid for s in stack.state().services if s.proc}
    again = llmstack("up", "--detach", "-c", str(stack.config))  # a running stack that matches its file
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
    assert {s.name: s.proc.pid for s in stack.state().services if s.proc} == pids

    logs = llmstack("logs", "-c", str(stack.config), "-n", "100")
    assert logs.returncode == 0
    for name in ("controller", "worker-tiny-chat", "api", "supervisor"):
        assert any(line.startswith(f"{name} ") and "|" in line for line in logs.stdout.splitlines()), name
    assert "registered worker" in logs.stdout and "Uvicorn running" in logs.stdout
    only_api = llmstack("logs", "api", "-c", str(stack.config), "-n", "5")
    assert only_api.returncode == 0 and only_api.stdout.strip()
    assert all(line.startswith("api ") for line in only_api.stdout.splitlines())

    # `down` drains: a streamed completion started before `down` is still delivered in full
    follow = subprocess.Popen(
        [sys.executable, "-m", "llmstack", "logs", "-f", "-n", "0", "-c", str(stack.config)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        cwd=REPO_ROOT,
    )
    try:
        stream = stack.client().chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=1900,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        first = next(chunks)  # the request is in flight now
        down_proc = subprocess.Popen(
            [sys.executable, "-m", "llmstack", "down", "-c", str(stack.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
            cwd=REPO_ROOT,
        )
        sup_log = stack.run_dir / "logs" / "supervisor.log"
        wait_for(lambda: "stopping (drain timeout" in sup_log.read_text(), 60, "down to begin", stack)
        rest = list(chunks)
        assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == 1900
        assert first.choices and all(c.choices[0].finish_reason is None for c in rest[:-2] if c.choices)
        down_out, _ = down_proc.communicate(timeout=120)
        assert down_proc.returncode == 0, down_out
        assert_nothing_left(stack)
        time.sleep(0.5)
    finally:
        follow.terminate()
        followed, _ = follow.communicate(timeout=10)
    assert "supervisor" in followed and "Shutting down" in followed  # lines written after `logs -f` began
    stopped = llmstack("status", "--json", "-c", str(stack.config))
    assert stopped.returncode == 3 and not json.loads(stopped.stdout)["healthy"]

    timings = {
        "up_returned_s": round(t_up, 2),
        "first_completion_after_up_returned_s": round(t_after_up, 2),
        "up_to_first_completion_s": round(t_first, 2),
        "steps_s": state.timings,
        "service_ready_after_spawn_s": {s.name: s.first_ready_after for s in state.services},
    }
    print("\nup-to-first-completion:", json.dumps(timings, indent=2))


@pytest.mark.slow
def test_restart_crash_loop_and_killed_supervisor(stack: StackFiles) -> None:
    up = llmstack("up", "--detach", "-c", str(stack.config))
    assert up.returncode == 0, up.stdout + up.stderr + stack.logs()
    chat(stack)

    # SIGKILL the worker: the supervisor restarts it and the model serves again
    old = _worker(stack.state()).proc
    assert old is not None
    os.kill(old.pid, signal.SIGKILL)
    wait_for(
        lambda: _worker(stack.state()).restarts == 1 and _worker(stack.state()).state == ServiceState.RUNNING,
        120,
        "the worker to be restarted",
        stack,
    )
    new = _worker(stack.state()).proc
    assert new is not None and new.pid != old.pid and new.alive()
    chat_eventually(stack)

    # break the model, then kill the worker again: restarts now die at once -> crash loop, reported
    for name in ("model.safetensors", "config.json"):
        (stack.snapshot / name).unlink()
    os.kill(new.pid, signal.SIGKILL)
    wait_for(lambda: _worker(stack.state()).state == ServiceState.FAILED, 120, "the crash loop to be reported", stack)
    rec = _worker(stack.state())
    assert "crash loop" in (rec.message or "")
    restarts = rec.restarts
    time.sleep(3)
    assert _worker(stack.state()).restarts == restarts  # not retried any more
    assert rec.proc is not None and not rec.proc.alive()
    status = llmstack("status", "--json", "-c", str(stack.config))
    assert status.returncode == 1
    report = json.loads(status.stdout)
    worker = next(s for s in report["services"] if s["role"] == "workers")
    assert worker["state"] == "failed" and not worker["healthy"] and "crash loop" in worker["message"]
    sup_log = (stack.run_dir / "logs" / "supervisor.log").read_text()
    assert "crash loop" in sup_log and "Last lines of its log" in sup_log
    assert "Traceback" in sup_log or "error" in sup_log.lower()  # the worker's own last words are quoted

    # SIGKILL the supervisor: the services keep running unsupervised, and `down` still ends them all
    sup = stack.state().supervisor
    assert sup is not None
    os.kill(sup.pid, signal.SIGKILL)
    psutil.Process(sup.pid).wait(10) if psutil.pid_exists(sup.pid) else None
    alive = [s.name for s in stack.state().services if s.proc and s.proc.alive()]
    assert set(alive) == {"controller", "api"}
    unsupervised = llmstack("status", "--json", "-c", str(stack.config))
    assert unsupervised.returncode == 1 and not json.loads(unsupervised.stdout)["supervisor"]["alive"]
    down = llmstack("down", "-c", str(stack.config))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "no supervisor" in down.stdout
    assert_nothing_left(stack)


@pytest.mark.slow
def test_start_failure_aborts_up_and_shows_the_cause(stack: StackFiles) -> None:
    (stack.snapshot / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    up = llmstack("up", "--detach", "-c", str(stack.config))
    assert up.returncode == 1, up.stdout + up.stderr
    err = " ".join(up.stderr.split())
    assert "worker-tiny-chat exited with" in err and "before it was healthy" in err
    assert "no-such-architecture" in err  # the worker's own error, from its log tail
    state = stack.state()
    assert state.phase == "failed"
    assert state.service("controller").state == ServiceState.STOPPED  # what was started was stopped
    assert "api" not in {s.name for s in state.services if s.spawned_at}
    wait_for(lambda: not state.supervisor or not state.supervisor.alive(), 30, "the supervisor to exit", stack)
    assert_nothing_left(stack)


@pytest.mark.slow
def test_foreground_up_with_webui_stops_everything_on_ctrl_c(stack: StackFiles) -> None:
    stack.write(webui=True)
    env = {**os.environ, **DEFAULT_ENV, "COLUMNS": "200", "LLMSTACK_WEBUI_AUTH": "ann:pw-e2e"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmstack", "up", "-c", str(stack.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        wait_for(
            lambda: (stack.run_dir / "state.json").exists() and stack.state().phase == "ready", 180, "ready", stack
        )
        chat(stack)
        page = httpx.get(f"http://127.0.0.1:{stack.ports['webui']}/", timeout=10)
        assert page.status_code == 200
        webui = stack.state().service("webui").proc
        assert webui is not None and "pw-e2e" not in " ".join(psutil.Process(webui.pid).cmdline())
        assert psutil.Process(webui.pid).environ().get("LLMSTACK_WEBUI_AUTH") == "ann:pw-e2e"
        assert psutil.Process(webui.pid).environ().get("LLMSTACK_API_KEY") == API_KEY
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    lines = out.splitlines()
    for name in ("controller", "worker-tiny-chat", "api", "webui"):
        assert any(line.startswith(f"{name} ") and " | " in line for line in lines), name
    assert "web UI: http://127.0.0.1:" in out
    assert "stack 'e2e' is ready" in out and "supervisor" in out and "stopped" in out
    assert stack.state().phase == "stopped"
    assert_nothing_left(stack)


def test_pull_uses_the_cache_without_network(stack: StackFiles) -> None:
    result = llmstack("pull", "-c", str(stack.config), "--offline")
    assert result.returncode == 0, result.stderr
    assert str(stack.snapshot) in " ".join(result.stdout.split())
    one = llmstack("pull", "-c", str(stack.config), "--model", "tiny", "--offline")
    assert one.returncode == 0
    shutil.rmtree(stack.cache)
    missing = llmstack("pull", "-c", str(stack.config), "--offline")
    assert missing.returncode == 1 and MODEL_ID in missing.stderr
    unknown = llmstack("pull", "-c", str(stack.config), "--model", "nope")
    assert unknown.returncode == 2 and "no model 'nope'" in unknown.stderr


def test_status_logs_down_without_a_stack(stack: StackFiles) -> None:
    status = llmstack("status", "-c", str(stack.config))
    assert status.returncode == 3 and "not running" in status.stdout
    down = llmstack("down", "-c", str(stack.config))
    assert down.returncode == 0 and "nothing to stop" in down.stdout
    logs = llmstack("logs", "-c", str(stack.config))
    assert logs.returncode == 3


@pytest.mark.slow
def test_worker_only_machine_joins_a_remote_controller(stack: StackFiles, tmp_path: Path) -> None:
    """Two run directories on one box stand in for two machines: the first runs the controller and the
    API (`--only controller --only api`), the second only a worker (`--only workers`) against it."""
    first = llmstack("up", "--detach", "-c", str(stack.config), "--only", "controller", "--only", "api")
    assert first.returncode == 0, first.stdout + first.stderr + stack.logs()
    assert {s.name for s in stack.state().services} == {"controller", "api"}
    token = (stack.run_dir / "cluster_token").read_text().strip()

    second_dir = tmp_path / "second"
    second_dir.mkdir()
    port = free_port()
    second = second_dir / "remote-worker.toml"
    second.write_text(
        f"""
[stack]
name = "second"
run_dir = "run"
drain_timeout = 5

[controller]
address = "http://127.0.0.1:{stack.ports["controller"]}"

[[models]]
model = "{MODEL_ID}"
cache_dir = "{stack.cache}"
names = ["tiny-remote"]
device = "cpu"
port = {port}
heartbeat_interval = 0.5

[api]
enabled = false

[webui]
enabled = false
"""
    )
    env = {**os.environ, **DEFAULT_ENV, "COLUMNS": "200", "LLMSTACK_CLUSTER_TOKEN": token}
    run = [sys.executable, "-m", "llmstack"]
    try:
        up = subprocess.run(
            [*run, "up", "--detach", "--only", "workers", "-c", str(second)],
            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
        )  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        assert not (second_dir / "run" / "cluster_token").exists()  # the remote controller's token is used
        wait_for(
            lambda: "tiny-remote" in httpx.get(f"{stack.api_url}/health", timeout=5).json()["models"],
            60,
            "the remote worker to be routable",
            stack,
        )
        resp = stack.client().chat.completions.create(model="tiny-remote", messages=MESSAGES, max_tokens=4)
        assert resp.usage is not None and resp.usage.completion_tokens > 0
        status = subprocess.run(
            [*run, "status", "--json", "-c", str(second)], capture_output=True, text=True, env=env, timeout=60
        )
        report = json.loads(status.stdout)
        assert status.returncode == 0 and [s["name"] for s in report["services"]] == ["worker-tiny-remote"]
        assert {m["name"] for m in report["models"]} == {"tiny-remote"}  # read from the remote controller
    finally:
        down = subprocess.run([*run, "down", "-c", str(second)], capture_output=True, text=True, env=env, timeout=120)
    assert down.returncode == 0
    second_state = RunDir(second_dir / "run").read_state()
    assert second_state is not None and marked_processes(second_state.run_id) == []
    assert llmstack("down", "-c", str(stack.config)).returncode == 0
    assert_nothing_left(stack)
