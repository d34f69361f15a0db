"""Starting and stopping the two stacks under test, each as its real processes on loopback.

llmstack: `python -m llmstack controller | worker | api` from this checkout.
FastChat 0.2.36: `fastchat.serve.controller | model_worker | openai_api_server` from its own virtual
environment (`.venv-fastchat`), created on first use with the pins it needs to run here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
FASTCHAT_VENV = REPO / ".venv-fastchat"
# torch first, from the same local CPU wheel the main environment uses, so that fschat's own torch
# requirement is already met and no CUDA build is pulled in.  transformers < 4.58 (5.x breaks its
# model_worker), pydantic < 2 and fastapi < 0.100 (its streaming endpoints need pydantic 1).
FASTCHAT_STEPS: list[list[str]] = [
    ["torch==2.13.0"],
    ["fschat[model_worker]==0.2.36", "transformers<4.58", "pydantic<2", "fastapi<0.100"],
]
MODEL_NAME = "bench"
FASTCHAT_CONV_TEMPLATE = "qwen-7b-chat"  # ChatML, as the benchmark model's own template renders it


class StackError(RuntimeError):
    """A stack did not come up; the message carries its log tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    """One running stack: its OpenAI base URL and processes; `worker` is the one whose memory we watch."""

    name: str
    api_url: str
    processes: list[Process] = field(default_factory=list)

    @property
    def worker(self) -> Process:
        return next(p for p in self.processes if p.name == "worker")

    def start(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Process:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{self.name}-{name}.log"
        with open(log, "wb") as out:
            out.write(("$ " + " ".join(argv) + "\n").encode())
            out.flush()
            popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=log_dir,  # FastChat writes its own log files into the working directory
                env={**os.environ, **(env or {})},
                start_new_session=True,  # its own process group: stop() ends its children too
            )
        proc = Process(name, popen, log)
        self.processes.append(proc)
        return proc

    def wait_http(self, url: str, proc: Process, timeout: float, ready: str | None = None) -> None:
        """Poll `url` until it answers 200 (and contains `ready`, when given)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if proc.popen.poll() is not None:
                    raise StackError(f"{self.name} {proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
                try:
                    resp = client.get(url)
                    if resp.status_code == 200 and (ready is None or ready in resp.text):
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise StackError(f"{self.name} {proc.name}: {url} not ready after {timeout:.0f}s:\n{proc.tail()}")

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in reversed(self.processes):
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.popen.wait(timeout=5)


def start_llmstack(model_dir: Path, log_dir: Path, concurrency: int, max_batch_size: int) -> Stack:
    controller, worker, api = free_port(), free_port(), free_port()
    stack = Stack("llmstack", f"http://127.0.0.1:{api}/v1")
    py = [sys.executable, "-m", "llmstack"]
    controller_url = f"http://127.0.0.1:{controller}"
    try:
        proc = stack.start("controller", [*py, "controller", "--port", str(controller)], log_dir)
        stack.wait_http(f"{controller_url}/health", proc, 60)
        proc = stack.start(
            "worker",
            [
                *py,
                "worker",
                "--model-path",
                str(model_dir),
                "--model-names",
                MODEL_NAME,
                "--device",
                "cpu",
                "--port",
                str(worker),
                "--controller-address",
                controller_url,
                "--limit-worker-concurrency",
                str(concurrency),
                "--max-batch-size",
                str(max_batch_size),
            ],
            log_dir,
        )
        stack.wait_http(f"http://127.0.0.1:{worker}/health", proc, 300, ready='"ok"')
        proc = stack.start("api", [*py, "api", "--port", str(api), "--controller-address", controller_url], log_dir)
        stack.wait_http(f"{stack.api_url}/models", proc, 60, ready=f'"{MODEL_NAME}"')
    except BaseException:
        stack.stop()
        raise
    return stack


def ensure_fastchat(venv: Path = FASTCHAT_VENV, log: Path | None = None) -> Path:
    """Create the FastChat virtual environment once; returns its python.  Refuses a CUDA torch."""
    python = venv / "bin" / "python"
    stamp = venv / ".bench-installed"
    want = repr(FASTCHAT_STEPS)
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == want and python.exists():
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for step in FASTCHAT_STEPS:
        print(f"installing into {venv.name}: {' '.join(step)}", flush=True)
        result = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *step], capture_output=True, text=True, check=False
        )
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a", encoding="utf-8") as out:
                out.write(result.stdout + result.stderr)
        if result.returncode != 0:
            raise StackError(f"pip install {' '.join(step)} failed:\n{result.stderr[-3000:]}")
    check = subprocess.run(
        [
            str(python),
            "-c",
            "import torch, transformers, pydantic, fastchat; "
            "print(torch.__version__, transformers.__version__, pydantic.VERSION, fastchat.__version__)",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        raise StackError(f"the FastChat environment does not import:\n{check.stderr[-3000:]}")
    torch_version = check.stdout.split()[0]
    listed = subprocess.run([str(python), "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    if "+cpu" not in torch_version or "nvidia-" in listed.lower():
        raise StackError(f"the FastChat environment got a CUDA torch build ({torch_version}); expected the CPU wheel")
    stamp.write_text(want, encoding="utf-8")
    return python


def start_fastchat(python: Path, model_dir: Path, log_dir: Path, concurrency: int) -> Stack:
    controller, worker, api = free_port(), free_port(), free_port()
    stack = Stack("fastchat", f"http://127.0.0.1:{api}/v1")
    controller_url = f"http://127.0.0.1:{controller}"
    serve = [str(python), "-m"]
    try:
        proc = stack.start(
            "controller",
            [*serve, "fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(controller)],
            log_dir,
        )
        stack.wait_http(f"{controller_url}/test_connection", proc, 60)
        proc = stack.start(
            "worker",
            [
                *serve,
                "fastchat.serve.model_worker",
                "--host",
                "127.0.0.1",
                "--port",
                str(worker),
                "--worker-address",
                f"http://127.0.0.1:{worker}",
                "--controller-address",
                controller_url,
                "--model-path",
                str(model_dir),
                "--model-names",
                MODEL_NAME,
                "--device",
                "cpu",
                "--conv-template",
                FASTCHAT_CONV_TEMPLATE,
                "--limit-worker-concurrency",
                str(concurrency),
            ],
            log_dir,
        )
        proc = stack.start(
            "api",
            [
                *serve,
                "fastchat.serve.openai_api_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(api),
                "--controller-address",
                controller_url,
            ],
            log_dir,
        )
        # the model is listed once the worker has loaded and registered
        stack.wait_http(f"{stack.api_url}/models", stack.worker, 300, ready=f'"{MODEL_NAME}"')
    except BaseException:
        stack.stop()
        raise
    return stack


class RssSampler:
    """Peak resident memory of a process and its children, sampled every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        try:
            procs = [self.process, *self.process.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
