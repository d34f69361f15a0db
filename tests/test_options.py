"""The worker option schema is the one declaration: a stack.toml entry with every option set survives the
trip through `llmstack worker`'s generated flags unchanged, every transformers option reaches the engine's
configuration, and bad flags fail with messages that name the flag and the fix."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from llmstack.cli import app
from llmstack.cli.options import with_worker_options
from llmstack.services.worker.engine_config import WORKER_LEVEL, hf_engine_config, vllm_engine_args
from llmstack.services.worker.options import OPTIONS, WorkerOptions
from llmstack.stack.config import parse_config

# A value other than the default for every option (a new option must add one here), per backend.
BOTH: dict[str, Any] = {
    "model": "/models/m",
    "names": ["a", "b"],
    "revision": "v2",
    "gguf_file": "*q4_k_m.gguf",
    "host": "10.0.0.7",
    "port": 23456,
    "worker_address": "http://10.0.0.7:23456",
    "device": "cpu",
    "gpus": "0,1",
    "num_gpus": 2,
    "conv_template": "chatml",
    "limit_worker_concurrency": 3,
    "max_queue": 5,
    "stream_interval": 2,
    "max_batch_size": 4,
    "max_batch_tokens": 999,
    "prefix_caching": False,
    "seed": 7,
    "trust_remote_code": True,
    "embed_in_truncate": True,
    "reasoning_parser": "qwen3",
    "heartbeat_interval": 0.5,
}
TRANSFORMERS: dict[str, Any] = {
    "dtype": "bfloat16",
    "max_gpu_memory": "20GiB",
    "load_8bit": True,
    "cpu_offloading": True,
    "gptq_ckpt": "q.safetensors",
    "gptq_wbits": 4,
    "gptq_groupsize": 128,
    "gptq_act_order": True,
    "awq_ckpt": "a.safetensors",
    "awq_wbits": 4,
    "awq_groupsize": 64,
    "attention_kernel": "matmul",
    "compile_decode": "off",
}
VLLM: dict[str, Any] = {
    "backend": "vllm",
    "dtype": "half",
    "gpu_memory_utilization": 0.25,
    "max_model_len": 4096,
    "quantization": "awq",
    "enforce_eager": True,
    "swap_space": 2.5,
    "block_size": 32,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 2048,
    "tokenizer": "/tok",
    "tokenizer_mode": "slow",
    "download_dir": "/dl",
    "load_format": "safetensors",
    "pipeline_parallel_size": 2,
    "distributed_executor_backend": "mp",
    "engine_args": {"enable_prefix_caching": True, "kv_cache_dtype": "auto"},
}
NOT_SAMPLED = {"backend", "tool_parser"}  # transformers is the default; hermes is the only parser so far


def test_every_option_has_a_sample() -> None:
    assert set(OPTIONS) - NOT_SAMPLED == set(BOTH) | set(TRANSFORMERS) | set(VLLM) - {"backend"}


def _parsed_by_the_worker_command(argv: list[str]) -> WorkerOptions:
    seen: list[WorkerOptions] = []
    probe = typer.Typer()

    @probe.command()
    @with_worker_options
    def worker(options: WorkerOptions, controller_address: str = "") -> None:
        seen.append(options)

    result = CliRunner().invoke(probe, argv)
    assert result.exit_code == 0, result.output
    return seen[0]


@pytest.mark.parametrize("backend_values", [TRANSFORMERS, VLLM], ids=["transformers", "vllm"])
def test_a_stack_entry_reaches_the_worker_unchanged(backend_values: dict[str, Any]) -> None:
    entry = {**BOTH, **backend_values}
    section = parse_config({"models": [entry]}).models[0]
    argv = section.args(entry["model"], entry["port"], "http://127.0.0.1:21001")
    parsed = _parsed_by_the_worker_command(argv)
    assert {name: getattr(parsed, name) for name in OPTIONS} == {name: getattr(section, name) for name in OPTIONS}
    assert parsed.given() == [name for name in OPTIONS if name in entry]


def test_every_transformers_option_reaches_the_engine_configuration() -> None:
    cfg = hf_engine_config(WorkerOptions.model_validate({**BOTH, **TRANSFORMERS}))
    assert cfg.model_path == "/models/m" and cfg.model_names == ["a", "b"]
    assert cfg.gptq == {"ckpt": "q.safetensors", "wbits": 4, "groupsize": 128, "act_order": True}
    assert cfg.awq == {"ckpt": "a.safetensors", "wbits": 4, "groupsize": 64}
    for name, value in {**BOTH, **TRANSFORMERS}.items():
        if name not in WORKER_LEVEL and name not in ("model", "names") and not name.startswith(("gptq", "awq")):
            assert getattr(cfg, name) == value, name


def test_every_vllm_option_becomes_an_engine_argument() -> None:
    args = vllm_engine_args(WorkerOptions.model_validate({**BOTH, **VLLM}))
    mapped = {OPTIONS[n].vllm: v for n, v in {**BOTH, **VLLM}.items() if OPTIONS[n].vllm}
    assert args == {**mapped, **VLLM["engine_args"]}
    assert all(OPTIONS[name].vllm for name in VLLM if name not in ("backend", "engine_args"))


WORKER = ["worker", "--no-register", "--model-path", "/nonexistent"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--backend", "tpu"], "--backend must be transformers or vllm, not 'tpu'"),
        (["--gpus", "0", "--num-gpus", "2"], "--num-gpus 2 is larger than the number of --gpus given (0)"),
        (["--max-batch-size", "0"], "--max-batch-size: Input should be greater than or equal to 1 (got 0)"),
        (["--dtype", "float64"], "--dtype must be auto, float32, float16, bfloat16, half or float, not 'float64'"),
        (["--host", "0.0.0.0"], "--worker-address is required when binding all interfaces"),
        (["--cpu-offloading"], "--cpu-offloading needs --load-8bit"),
        (["--backend", "vllm", "--load-8bit"], "--load-8bit is a transformers option; with --backend vllm use "
         "--quantization (e.g. bitsandbytes"),
        (["--max-model-len", "8", "--engine-args", "{}"], "--max-model-len only apply to --backend vllm"),
        (["--attention-kernel", "flash"], "--attention-kernel must be auto, sdpa or matmul, not 'flash'"),
        (["--backend", "vllm", "--attention-kernel", "sdpa"], "--attention-kernel is a transformers option; with "
         "--backend vllm use --engine-args '{\"attention_backend\": ...}'"),
        (["--engine-args", "[1]"], "--engine-args must be a JSON object, e.g. '{\"enable_prefix_caching\": true}'"),
        (["--engine-args", "{"], "--engine-args is not valid JSON"),
        (["--conv-template", "nope"], "--conv-template: unknown conversation template 'nope'; known templates:"),
        (["--tool-parser", "nope"], "--tool-parser must be hermes, not 'nope'"),
        (["--model-names", "a,a"], "--model-names: names must be unique"),
        (["--enable-prefix-caching"], "no such option: --enable-prefix-caching (vLLM engine arguments need --backend"),
    ],
)  # fmt: skip
def test_bad_worker_flags_name_the_flag(flags: list[str], message: str) -> None:
    result = CliRunner().invoke(app, [*WORKER, *flags])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
