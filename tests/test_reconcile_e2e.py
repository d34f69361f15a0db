"""`llmstack up` on a running stack, for real: one stack (controller, two tiny-model workers, API server) on
loopback for the whole module. Changing one model and adding another while streams run on a third restarts
exactly the changed worker and starts the new one, and the streams finish; removing a model stops its worker;
`--dry-run` and a malformed stack.toml change nothing."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import psutil
import pytest

from llmstack.stack.rundir import RunDir, RunState, kill_all, marked_processes
from tests.support.procs import free_port
from tests.support.procs import run_llmstack as llmstack

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Hello there"}]
STREAM_TOKENS = 300


@dataclass
class Files:
    root: Path
    model_dir: Path
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("controller", "api", "a", "b", "c"):
            self.ports[name] = free_port()
        self.config = self.root / "stack.toml"
        self.run_dir = self.root / "run"

    def model(self, name: str, extra: str = "") -> str:
        return f"""
[[models]]
model = "{self.model_dir}"
source = "local"
names = ["model-{name}"]
device = "cpu"
port = {self.ports[name]}
heartbeat_interval = 0.5
{extra}
"""

    def write(self, *models: str, raw: str | None = None) -> None:
        p = self.ports
        self.config.write_text(
            raw
            if raw is not None
            else f"""
[stack]
name = "reconcile-e2e"
run_dir = "run"
drain_timeout = 60
start_timeout = 180
restart_backoff = 0.2

[controller]
port = {p["controller"]}
heartbeat_expiry = 3

{"".join(models)}

[api]
port = {p["api"]}
sync_interval = 0.2

[webui]
enabled = false
"""
        )

    def state(self) -> RunState:
        state = RunDir(self.run_dir).read_state()
        assert state is not None
        return state

    def pids(self) -> dict[str, int]:
        return {s.name: s.proc.pid for s in self.state().services if s.proc is not None and s.proc.alive()}

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.ports['api']}/v1", api_key="none", max_retries=0)

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            for log in sorted((self.run_dir / "logs").glob("*.log"))
        )


def _up(files: Files, *args: str) -> tuple[int, str]:
    result = llmstack("up", "--detach", "-c", str(files.config), *args, timeout=600)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Files]:
    f = Files(tmp_path_factory.mktemp("reconcile"), tiny_model_dir)
    f.write(f.model("a"), f.model("b"))
    code, out = _up(f)
    assert code == 0, out + f.logs()
    try:
        yield f
    finally:
        state = RunDir(f.run_dir).read_state()
        llmstack("down", "--run-dir", str(f.run_dir), "--timeout", "5", timeout=120)
        if state is not None:
            kill_all(marked_processes(state.run_id))


def _row(out: str, name: str) -> str:
    """The plan table's row of one service (padded, so ` start ` is a whole cell word)."""
    return next(line for line in out.splitlines() if f" {name} " in f" {line} ".replace("│", " "))


def _chat(files: Files, model: str) -> None:
    resp = files.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, timeout=60)
    assert resp.usage is not None and resp.usage.completion_tokens > 0


class Streams:
    """Threads that stream from one model back to back until stopped, recording every outcome."""

    def __init__(self, files: Files, model: str, n: int) -> None:
        self.files, self.model = files, model
        self.stop = threading.Event()
        self.done: list[tuple[float, float]] = []  # (start, end) of each complete stream
        self.failed: list[str] = []
        self.first_chunk = threading.Barrier(n + 1)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        client = self.files.client()
        signalled = False
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                stream = client.chat.completions.create(
                    model=self.model, messages=MESSAGES, max_tokens=STREAM_TOKENS, stream=True, timeout=120,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                )  # fmt: skip
                last = None
                for chunk in stream:
                    if not signalled:
                        signalled = True
                        self.first_chunk.wait(60)
                    last = chunk
                assert last is not None and last.usage is not None, "no usage chunk"
                assert last.usage.completion_tokens == STREAM_TOKENS, last.usage
                self.done.append((t0, time.monotonic()))
            except Exception as exc:  # every failure counts, whatever raised it
                self.failed.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> Streams:
        for t in self.threads:
            t.start()
        self.first_chunk.wait(120)  # every thread is mid-stream
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(180)


def test_dry_run_prints_the_plan_and_changes_nothing(files: Files) -> None:
    before, plan = files.pids(), (files.run_dir / "plan.json").read_text()
    files.write(files.model("a"), files.model("b", "max_queue = 64"), files.model("c"))
    code, out = _up(files, "--dry-run")
    assert code == 0, out
    lines = {name: _row(out, name) for name in ("worker-model-a", "worker-model-b", "worker-model-c", "api")}
    assert " restart " in lines["worker-model-b"] and "--max-queue 64 added" in lines["worker-model-b"]
    assert " start " in lines["worker-model-c"] and " keep " in lines["worker-model-a"] and " keep " in lines["api"]
    assert "1 to start, 1 to restart, 0 to stop, 3 unchanged" in out
    assert "dry run: nothing was changed" in out
    assert files.pids() == before and (files.run_dir / "plan.json").read_text() == plan
    assert not (files.run_dir / "reconcile.json").exists()


@pytest.mark.parametrize(
    ("model_b_extra", "raw", "named"),
    [
        ("bogus_key = 1", None, "models[1].bogus_key: unknown key"),
        ("max_queue = -1", None, "models[1].max_queue: Input should be greater than or equal to 0 (got -1)"),
        (None, "[stack\nname = 1", "not valid TOML: Expected ']' at the end of a table declaration (at line 1"),
    ],
    ids=["unknown-key", "bad-value", "bad-toml"],
)
def test_a_malformed_stack_toml_leaves_the_running_stack_untouched(
    files: Files, model_b_extra: str | None, raw: str | None, named: str
) -> None:
    before, plan = files.pids(), (files.run_dir / "plan.json").read_text()
    files.write(files.model("a"), files.model("b", model_b_extra or ""), raw=raw)
    code, out = _up(files)
    assert code == 2, out
    assert named in " ".join(out.split())
    assert files.pids() == before and (files.run_dir / "plan.json").read_text() == plan
    _chat(files, "model-b")


def test_change_one_model_and_add_one_while_streams_run_on_another(files: Files) -> None:
    before = files.pids()
    files.write(files.model("a"), files.model("b", "max_queue = 64"), files.model("c"))
    with Streams(files, "model-a", 3) as streams:
        t_up = time.monotonic()
        code, out = _up(files)
        t_done = time.monotonic()
        time.sleep(1.0)
    assert code == 0, out + files.logs()
    assert not streams.failed, streams.failed
    for moment in (t_up, (t_up + t_done) / 2, t_done):  # back to back on 3 threads: in flight all along
        assert any(t0 < moment < t1 for t0, t1 in streams.done), f"no stream in flight {moment - t_up:.1f}s in"
    after = files.pids()
    assert set(after) == {"controller", "worker-model-a", "worker-model-b", "worker-model-c", "api"}
    for kept in ("controller", "worker-model-a", "api"):
        assert after[kept] == before[kept], kept
    assert after["worker-model-b"] != before["worker-model-b"]  # exactly the changed one restarted
    assert "stack.toml applied" in out and "restarted: worker-model-b" in out and "started: worker-model-c" in out
    _chat(files, "model-c")  # routable as soon as `up` returns
    _chat(files, "model-b")
    print("\n" + out)
    print(f"reconcile: {len(streams.done)} streams on model-a completed, 0 failed; up took {t_done - t_up:.1f}s")


def test_removing_a_model_stops_its_worker(files: Files) -> None:
    before = files.pids()
    assert "worker-model-c" in before
    files.write(files.model("a"), files.model("b", "max_queue = 64"))
    code, out = _up(files)
    assert code == 0, out + files.logs()
    assert "stopped: worker-model-c" in out and " stop " in _row(out, "worker-model-c")
    assert "worker-model-c" not in {s.name for s in files.state().services}
    assert (
        not psutil.pid_exists(before["worker-model-c"]) or psutil.Process(before["worker-model-c"]).status() == "zombie"
    )
    after = files.pids()
    assert after == {k: v for k, v in before.items() if k != "worker-model-c"}
    deadline = time.monotonic() + 10  # the API server's table syncs from the controller every 0.2 s
    while "model-c" in {m.id for m in files.client().models.list()} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "model-c" not in {m.id for m in files.client().models.list()}
    again, out = _up(files)  # nothing left to do
    assert again == 0 and "nothing to do" in out and files.pids() == after


def test_a_new_model_that_fails_to_start_fails_up_and_the_rest_keeps_serving(files: Files, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(files.model_dir, broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    files.ports["d"] = free_port()
    before = files.pids()
    entry_d = files.model("d").replace(str(files.model_dir), str(broken))
    files.write(files.model("a"), files.model("b", "max_queue = 64"), entry_d)
    code, out = _up(files)
    assert code == 1, out
    flat = " ".join(out.split())
    assert "worker-model-d: exited with" in flat and "before it was healthy" in flat and "no-such-architecture" in flat
    assert files.pids() == before  # nothing else was touched
    _chat(files, "model-a")
    files.write(files.model("a"), files.model("b", "max_queue = 64"))
    code, out = _up(files)
    assert code == 0 and "stopped: worker-model-d" in out, out
    assert files.pids() == before
