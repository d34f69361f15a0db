"""The service commands: `controller`, `worker` and `api`, each one process of a stack (the tutorial's
terminals).  Thin: parse flags, build settings, call into `llmstack.services`."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from llmstack.cli.common import (
    SSL,
    ClusterToken,
    ControllerAddress,
    Debug,
    DrainTimeout,
    Host,
    SSLCert,
    SSLKey,
    fail,
)

#: The commands of this group; `register` adds them to the main app.
commands = typer.Typer()


def _tls(ssl: bool, certfile: str | None, keyfile: str | None):  # noqa: ANN202
    from llmstack.common.http import TLSFiles

    try:
        return TLSFiles.resolve(ssl, certfile, keyfile)
    except ValueError as exc:
        fail(str(exc))


def _check_port(host: str, port: int) -> None:
    from llmstack.common.http import check_port_free

    try:
        check_port_free(host, port)
    except OSError as exc:
        fail(f"{exc} (is another llmstack or program using it?)")


@commands.command(epilog="Example: llmstack controller --port 21001 --dispatch-method shortest_queue")
def controller(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 21001,
    dispatch_method: Annotated[
        str, typer.Option("--dispatch-method", help="lottery (random by speed) or shortest_queue.")
    ] = "shortest_queue",
    heartbeat_expiry: Annotated[
        float, typer.Option(help="Seconds without heartbeat before a worker is dropped.")
    ] = 10.0,
    cluster_token: ClusterToken = None,
    ssl: SSL = False,
    ssl_certfile: SSLCert = None,
    ssl_keyfile: SSLKey = None,
    debug: Debug = False,
) -> None:
    """Run the controller: the registry of workers and their heartbeats."""
    from llmstack.common.http import is_loopback, serve, setup_logging
    from llmstack.services.controller import ControllerSettings, build_controller_app

    if dispatch_method not in ("lottery", "shortest_queue"):
        fail(f"--dispatch-method must be lottery or shortest_queue, not {dispatch_method!r}")
    tls = _tls(ssl, ssl_certfile, ssl_keyfile)
    setup_logging("controller", debug=debug)
    if not is_loopback(host) and not cluster_token:
        typer.secho(
            f"warning: the controller listens on {host} without --cluster-token: anyone who can reach it can "
            "register workers",
            fg=typer.colors.YELLOW,
            err=True,
        )
    _check_port(host, port)
    settings = ControllerSettings(dispatch_method, heartbeat_expiry, cluster_token)  # type: ignore[arg-type]
    serve(build_controller_app(settings), host=host, port=port, tls=tls)


_VLLM = "vLLM engine (--backend vllm)"


@commands.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=(
        "Examples:\n\n"
        "  llmstack worker --model-path ./Qwen2.5-0.5B-Instruct --device cpu\n\n"
        "  llmstack worker --model-path baichuan-inc/Baichuan2-13B-Chat --load-8bit --trust-remote-code "
        "--model-names Baichuan2-13B-Chat\n\n"
        "  llmstack worker --backend vllm --model-path Qwen/Qwen2.5-7B-Instruct --num-gpus 2 "
        "--gpu-memory-utilization 0.9 --max-model-len 8192\n\n"
        "  llmstack worker --backend vllm --model-path ./model --engine-args '{\"enable_prefix_caching\": true}'\n\n"
        "With --backend vllm, any other vLLM engine argument may follow as --its-name VALUE."
    ),
)
def worker(
    ctx: typer.Context,
    model_path: Annotated[str, typer.Option("--model-path", help="Local directory or ModelScope id.")],
    backend: Annotated[
        str, typer.Option("--backend", envvar="LLMSTACK_BACKEND", help="Engine: transformers or vllm.")
    ] = "transformers",
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 21002,
    worker_address: Annotated[
        str | None, typer.Option("--worker-address", help="URL the API server uses to reach this worker.")
    ] = None,
    controller_address: ControllerAddress = "http://127.0.0.1:21001",
    revision: Annotated[str | None, typer.Option(help="Model revision (branch, tag or commit).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")] = "auto",
    gpus: Annotated[str | None, typer.Option(help="GPUs to use, e.g. '0,1' (sets CUDA_VISIBLE_DEVICES).")] = None,
    num_gpus: Annotated[
        int, typer.Option("--num-gpus", help="Spread the model over this many GPUs (vLLM: tensor parallel size).")
    ] = 1,
    max_gpu_memory: Annotated[
        str | None, typer.Option("--max-gpu-memory", help="Per-GPU memory cap for weights, e.g. '20GiB'.")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16 (vLLM also: half, float).")] = "auto",
    load_8bit: Annotated[bool, typer.Option("--load-8bit", help="Quantize weights to 8 bits (bitsandbytes).")] = False,
    cpu_offloading: Annotated[
        bool, typer.Option("--cpu-offloading", help="With --load-8bit: offload what does not fit on GPU to CPU.")
    ] = False,
    model_names: Annotated[
        str | None, typer.Option("--model-names", help="Comma-separated names to serve (aliases).")
    ] = None,
    conv_template: Annotated[
        str | None, typer.Option("--conv-template", help="Fallback chat template, e.g. baichuan2-chat, chatml.")
    ] = None,
    limit_worker_concurrency: Annotated[
        int | None,
        typer.Option(
            "--limit-worker-concurrency",
            help="Requests generating at once; the rest queue. Default: --max-batch-size (transformers), 1024 (vllm).",
        ),
    ] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Queued requests before answering 429.")] = 256,
    stream_interval: Annotated[int, typer.Option("--stream-interval", help="Tokens per streamed chunk.")] = 1,
    max_batch_size: Annotated[
        int, typer.Option("--max-batch-size", help="Sequences decoded together (continuous batching).")
    ] = 32,
    max_batch_tokens: Annotated[
        int, typer.Option("--max-batch-tokens", help="KV-cache positions the running batch may hold.")
    ] = 16384,
    prefix_caching: Annotated[
        bool,
        typer.Option(
            "--prefix-caching/--no-prefix-caching",
            help="Reuse the cached keys/values of a prompt's already-seen prefix (a shared system prompt, "
            "earlier chat turns).",
        ),
    ] = True,
    no_register: Annotated[bool, typer.Option("--no-register", help="Do not register with a controller.")] = False,
    seed: Annotated[int | None, typer.Option(help="Global random seed.")] = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Run the model repository's own code (Baichuan2 needs it).")
    ] = False,
    embed_in_truncate: Annotated[
        bool, typer.Option("--embed-in-truncate", help="Truncate long embedding input instead of chunking it.")
    ] = False,
    tool_parser: Annotated[
        str,
        typer.Option(
            "--tool-parser",
            help="How tool calls are read from the model's text for tool_choice auto (hermes: <tool_call> JSON, "
            "as Qwen 2.5/3 and Hermes models write them).",
        ),
    ] = "hermes",
    heartbeat_interval: Annotated[float, typer.Option(help="Seconds between heartbeats.")] = 3.0,
    cluster_token: ClusterToken = None,
    gptq_ckpt: Annotated[str | None, typer.Option("--gptq-ckpt", help="Not needed: see --help-quant.")] = None,
    gptq_wbits: Annotated[int | None, typer.Option("--gptq-wbits")] = None,
    gptq_groupsize: Annotated[int | None, typer.Option("--gptq-groupsize")] = None,
    gptq_act_order: Annotated[bool, typer.Option("--gptq-act-order")] = False,
    awq_ckpt: Annotated[str | None, typer.Option("--awq-ckpt")] = None,
    awq_wbits: Annotated[int | None, typer.Option("--awq-wbits")] = None,
    awq_groupsize: Annotated[int | None, typer.Option("--awq-groupsize")] = None,
    gpu_memory_utilization: Annotated[
        float | None,
        typer.Option(
            "--gpu-memory-utilization",
            help="Fraction of GPU memory for weights and KV cache (vllm-cpu: fraction of the NUMA node's RAM).",
            rich_help_panel=_VLLM,
        ),
    ] = None,
    max_model_len: Annotated[
        int | None, typer.Option("--max-model-len", help="Context length.", rich_help_panel=_VLLM)
    ] = None,
    quantization: Annotated[
        str | None,
        typer.Option("--quantization", help="awq, gptq, fp8, bitsandbytes, ... (vLLM's names).", rich_help_panel=_VLLM),
    ] = None,
    enforce_eager: Annotated[
        bool | None, typer.Option("--enforce-eager", help="No CUDA graphs.", rich_help_panel=_VLLM)
    ] = None,
    swap_space: Annotated[
        float | None, typer.Option("--swap-space", help="CPU swap space in GiB (older vLLM).", rich_help_panel=_VLLM)
    ] = None,
    block_size: Annotated[
        int | None, typer.Option("--block-size", help="KV cache block size in tokens.", rich_help_panel=_VLLM)
    ] = None,
    max_num_seqs: Annotated[
        int | None, typer.Option("--max-num-seqs", help="Sequences per batch.", rich_help_panel=_VLLM)
    ] = None,
    max_num_batched_tokens: Annotated[
        int | None, typer.Option("--max-num-batched-tokens", help="Tokens per batch.", rich_help_panel=_VLLM)
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="Tokenizer path or id.", rich_help_panel=_VLLM)
    ] = None,
    tokenizer_mode: Annotated[
        str | None, typer.Option("--tokenizer-mode", help="auto, slow, mistral, ...", rich_help_panel=_VLLM)
    ] = None,
    download_dir: Annotated[
        str | None, typer.Option("--download-dir", help="Where vLLM downloads weights.", rich_help_panel=_VLLM)
    ] = None,
    load_format: Annotated[
        str | None, typer.Option("--load-format", help="auto, safetensors, pt, ...", rich_help_panel=_VLLM)
    ] = None,
    pipeline_parallel_size: Annotated[
        int | None, typer.Option("--pipeline-parallel-size", help="Pipeline stages.", rich_help_panel=_VLLM)
    ] = None,
    distributed_executor_backend: Annotated[
        str | None,
        typer.Option("--distributed-executor-backend", help="mp, ray (multi-node), uni.", rich_help_panel=_VLLM),
    ] = None,
    engine_args: Annotated[
        str | None,
        typer.Option(
            "--engine-args",
            help="JSON object of further vLLM engine arguments (overrides the flags above).",
            rich_help_panel=_VLLM,
        ),
    ] = None,
    ssl: SSL = False,
    ssl_certfile: SSLCert = None,
    ssl_keyfile: SSLKey = None,
    drain_timeout: DrainTimeout = 30.0,
    debug: Debug = False,
) -> None:
    """Run a model worker (transformers or vLLM engine).

    GPTQ/AWQ with transformers: point --model-path at a pre-quantized checkpoint (its config.json carries
    a quantization_config); transformers loads it when gptqmodel/autoawq is installed.  The
    --gptq-*/--awq-* flags are checked against that checkpoint; separate --*-ckpt files are not used.
    With vLLM use --quantization instead.
    """
    import json

    if backend not in ("transformers", "vllm"):
        fail(f"--backend must be transformers or vllm, not {backend!r}")
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus  # before torch initialises CUDA
        if num_gpus > len(gpus.split(",")):
            fail(f"--num-gpus {num_gpus} is larger than the number of --gpus given ({gpus})")
    from llmstack.services.engines import EngineOptionError, EngineOptions, create_engine, tune_openmp

    if backend == "transformers":
        tune_openmp()  # before torch is imported
    from llmstack.common.http import serve, setup_logging
    from llmstack.services.worker.app import WorkerSettings, build_worker_app

    if max_batch_size < 1 or max_batch_tokens < 1:
        fail("--max-batch-size and --max-batch-tokens must be at least 1")

    extra: dict = {}
    if ctx.args:
        if backend != "vllm":
            fail(f"no such option: {ctx.args[0]} (vLLM engine arguments need --backend vllm)")
        from llmstack.services.engines.vllm.args import parse_extra_flags

        try:
            extra = parse_extra_flags(ctx.args)
        except ValueError as exc:
            fail(str(exc))
    extra_json: dict = {}
    if engine_args:
        try:
            extra_json = json.loads(engine_args)
        except ValueError as exc:
            fail(f"--engine-args is not valid JSON: {exc}")
        if not isinstance(extra_json, dict):
            fail("--engine-args must be a JSON object, e.g. '{\"enable_prefix_caching\": true}'")
    tls = _tls(ssl, ssl_certfile, ssl_keyfile)
    setup_logging("worker", debug=debug)
    _check_port(host, port)
    names = [n.strip() for n in model_names.split(",") if n.strip()] if model_names else []
    if not names:
        names = [os.path.basename(os.path.normpath(model_path))]
    if worker_address is None:
        if host in ("0.0.0.0", "::"):
            fail("--worker-address is required when binding all interfaces (how should others reach this worker?)")
        scheme = "https" if tls.certfile else "http"
        worker_address = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"
    if not model_path.startswith(("/", ".", "~")) and not os.path.isdir(model_path):
        from llmstack.stack.models import DownloadError, resolve_model

        try:
            model_path = str(resolve_model(model_path, revision=revision))
        except DownloadError as exc:
            fail(str(exc))
    if conv_template:
        from llmstack.services.engines.text.templates import get_template

        try:
            get_template(conv_template)
        except ValueError as exc:
            fail(str(exc))
    transformers_only = {
        "max_gpu_memory": max_gpu_memory,
        "load_8bit": load_8bit or None,
        "cpu_offloading": cpu_offloading or None,
        "gptq": {"ckpt": gptq_ckpt, "wbits": gptq_wbits, "groupsize": gptq_groupsize, "act_order": gptq_act_order},
        "awq": {"ckpt": awq_ckpt, "wbits": awq_wbits, "groupsize": awq_groupsize},
    }
    vllm_flags = {
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": max_model_len,
        "quantization": quantization,
        "enforce_eager": enforce_eager,
        "swap_space": swap_space,
        "block_size": block_size,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
        "tokenizer": tokenizer,
        "tokenizer_mode": tokenizer_mode,
        "download_dir": download_dir,
        "load_format": load_format,
        "pipeline_parallel_size": pipeline_parallel_size,
        "distributed_executor_backend": distributed_executor_backend,
    }
    options = EngineOptions(
        backend=backend,  # type: ignore[arg-type]
        model_path=os.path.expanduser(model_path),
        model_names=names,
        revision=revision,
        device=device,
        num_gpus=num_gpus,
        dtype=dtype,
        conv_template=conv_template,
        trust_remote_code=trust_remote_code,
        stream_interval=stream_interval,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        prefix_caching=prefix_caching,
        seed=seed,
        embed_in_truncate=embed_in_truncate,
        # only what was given: the factory rejects options of the other backend
        transformers={k: v for k, v in transformers_only.items() if _given(v)},
        vllm={k: v for k, v in vllm_flags.items() if v is not None},
        engine_args=extra_json,
        extra_flags=extra,
    )
    from llmstack.services.worker.toolcalls import PARSERS

    if tool_parser not in PARSERS:
        fail(f"--tool-parser {tool_parser!r}: choose one of {', '.join(sorted(PARSERS))}")
    try:
        engine = create_engine(options)
    except EngineOptionError as exc:
        fail(str(exc))
    if limit_worker_concurrency is None:
        # vLLM batches continuously and queues by itself; the transformers engine batches up to
        # --max-batch-size sequences, so admitting more would only queue them inside the engine
        limit_worker_concurrency = 1024 if backend == "vllm" else max_batch_size
    settings = WorkerSettings(
        worker_address=worker_address,
        model_names=names,
        controller_address=None if no_register else controller_address.rstrip("/"),
        register=not no_register,
        limit_worker_concurrency=limit_worker_concurrency,
        max_queue=max_queue,
        heartbeat_interval=heartbeat_interval,
        cluster_token=cluster_token,
        embed_in_truncate=embed_in_truncate,
        tool_parser=tool_parser,
    )
    from llmstack.services.engines.hf.loading import EngineConfigError

    try:
        serve(build_worker_app(settings, engine), host=host, port=port, tls=tls, drain_timeout=drain_timeout)
    except EngineConfigError as exc:
        fail(str(exc))


def _given(value: object) -> bool:
    """An option counts as given when it is set to something other than its off value."""
    if isinstance(value, dict):
        return any(v not in (None, False, "") for v in value.values())
    return value not in (None, False, "")


@commands.command(epilog="Example: llmstack api --port 8000 --api-keys sk-one,sk-two")
def api(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    controller_address: ControllerAddress = "http://127.0.0.1:21001",
    api_keys: Annotated[
        str | None, typer.Option("--api-keys", envvar="LLMSTACK_API_KEYS", help="Comma-separated Bearer keys.")
    ] = None,
    cluster_token: ClusterToken = None,
    sync_interval: Annotated[float, typer.Option(help="Seconds between routing-table syncs.")] = 1.0,
    request_timeout: Annotated[float, typer.Option(help="Seconds a request may take end to end.")] = 600.0,
    stream_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a worker may stay silent in the middle of a stream before the stream ends with an error "
            "(before the first token, silence is allowed while the worker's /health answers)."
        ),
    ] = 60.0,
    ssl: SSL = False,
    ssl_certfile: SSLCert = None,
    ssl_keyfile: SSLKey = None,
    drain_timeout: DrainTimeout = 30.0,
    debug: Debug = False,
) -> None:
    """Run the OpenAI-compatible API server (/v1/models, /v1/chat/completions, /v1/completions,
    /v1/embeddings)."""
    from llmstack.common.http import is_loopback, parse_keys, serve, setup_logging
    from llmstack.services.api.app import APISettings, build_api_app

    tls = _tls(ssl, ssl_certfile, ssl_keyfile)
    setup_logging("api", debug=debug)
    keys = parse_keys(api_keys)
    if not is_loopback(host) and not keys:
        typer.secho(
            f"warning: the API server listens on {host} without --api-keys: anyone who can reach it can use it",
            fg=typer.colors.YELLOW,
            err=True,
        )
    _check_port(host, port)
    settings = APISettings(
        controller_address=controller_address,
        api_keys=keys,
        cluster_token=cluster_token,
        sync_interval=sync_interval,
        request_timeout=request_timeout,
        stream_timeout=stream_timeout,
    )
    serve(build_api_app(settings), host=host, port=port, tls=tls, drain_timeout=drain_timeout)


def register(app: typer.Typer) -> None:
    """Add `controller`, `worker` and `api` to the main command line."""
    app.registered_commands.extend(commands.registered_commands)
