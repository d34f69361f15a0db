"""A stack started with `llmstack up --detach` whose models load at run time, for the models e2e tests:
its stack.toml on free loopback ports, the admin API (key from the run directory) and the openai client."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai

from llmstack.stack.rundir import RunDir, RunState, kill_all, marked_processes
from tests.support.procs import free_port
from tests.support.procs import run_llmstack as llmstack

API_KEY = "sk-models-e2e"


class RuntimeStack:
    def __init__(self, root: Path, name: str, models: str, stack_extra: str = "", api_extra: str = "") -> None:
        self.root = root
        self.run_dir = root / "run"
        self.ports = {"controller": free_port(), "api": free_port()}
        self.api_url = f"http://127.0.0.1:{self.ports['api']}"
        self.config = root / "stack.toml"
        self.config.write_text(
            f"""
[stack]
name = "{name}"
run_dir = "run"
drain_timeout = 10
start_timeout = 180
{stack_extra}

[controller]
port = {self.ports["controller"]}
heartbeat_expiry = 3

{models}

[api]
port = {self.ports["api"]}
sync_interval = 0.2
api_keys = ["{API_KEY}"]
{api_extra}

[webui]
enabled = false
"""
        )

    # -- running it -----------------------------------------------------------------------------------------
    def up(self) -> None:
        done = llmstack("up", "--detach", "-c", str(self.config), timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr + self.logs()

    def down(self) -> None:
        state = RunDir(self.run_dir).read_state()
        if state is None:
            return
        llmstack("down", "--run-dir", str(self.run_dir), "--timeout", "5", timeout=120)
        kill_all(marked_processes(state.run_id))

    def state(self) -> RunState:
        state = RunDir(self.run_dir).read_state()
        assert state is not None
        return state

    def logs(self, lines: int = 40) -> str:
        out = []
        for log in sorted((self.run_dir / "logs").glob("*.log")) if (self.run_dir / "logs").is_dir() else []:
            out.append(f"--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # -- talking to it --------------------------------------------------------------------------------------
    def client(self, timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.api_url}/v1", api_key=API_KEY, max_retries=0, timeout=timeout)

    @property
    def admin_url(self) -> str:
        return json.loads((self.run_dir / "admin.json").read_text())["url"]

    @property
    def admin_key(self) -> str:
        return (self.run_dir / "admin_key").read_text().strip()

    def admin(self, method: str, path: str, key: str | None = None, **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        return httpx.request(method, f"{self.admin_url}{path}", headers=headers, timeout=300, **kw)  # type: ignore[arg-type]

    def rows(self) -> dict[str, dict]:
        return {r["name"]: r for r in self.admin("GET", "/models").json()["models"]}

    def events(self, action: str | None = None) -> list[dict]:
        events = self.admin("GET", "/events").json()["events"]
        return [e for e in events if action is None or e["action"] == action]

    def v1_models(self) -> dict[str, dict]:
        resp = httpx.get(f"{self.api_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        return {m["id"]: m for m in resp.json()["data"]}

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")

    def live_workers(self) -> list[str]:
        """Worker services whose processes exist now (running, starting or still draining)."""
        state = RunDir(self.run_dir).read_state()
        if state is None:
            return []
        return [s.name for s in state.services if s.role == "workers" and s.proc is not None and s.proc.alive()]
