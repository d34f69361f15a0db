"""A worker process from its options: GPU visibility and OpenMP set before torch loads, the engine built
from the option schema, the HTTP app served until SIGTERM."""

from __future__ import annotations

import os
from dataclasses import dataclass

from llmstack.common.http import TLSFiles, serve
from llmstack.services.worker.engine_config import engine_config
from llmstack.services.worker.options import WorkerOptions


class WorkerStartError(ValueError):
    """The worker cannot start with these options; the message says what to change."""


@dataclass
class WorkerProcess:
    """What a worker process takes beyond its options: its link to the controller, TLS, shutdown."""

    controller_address: str | None  # None: do not register
    cluster_token: str | None = None
    tls: TLSFiles | None = None
    drain_timeout: float = 30.0


def serve_worker(options: WorkerOptions, process: WorkerProcess) -> None:
    """Build the engine and serve it; raises `WorkerStartError` for options that cannot work."""
    from llmstack.common.net import service_url
    from llmstack.services.engines import EngineOptionError, create_engine, tune_openmp

    if options.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = options.gpus  # before torch initialises CUDA
    if options.backend == "transformers":
        tune_openmp()  # before torch is imported
    from llmstack.services.engines.hf.loading import EngineConfigError
    from llmstack.services.worker.app import WorkerSettings, build_worker_app

    tls = process.tls or TLSFiles()
    address = options.worker_address or service_url(options.host, options.port, bool(tls.certfile))
    try:
        engine = create_engine(engine_config(options))
    except EngineOptionError as exc:
        raise WorkerStartError(str(exc)) from None
    limit = options.limit_worker_concurrency
    if limit is None:
        # vLLM batches continuously and queues by itself; the transformers engine batches up to
        # --max-batch-size sequences, so admitting more would only queue them inside the engine
        limit = 1024 if options.backend == "vllm" else options.max_batch_size
    settings = WorkerSettings(
        worker_address=address,
        model_names=options.served_names,
        controller_address=process.controller_address.rstrip("/") if process.controller_address else None,
        register=process.controller_address is not None,
        limit_worker_concurrency=limit,
        max_queue=options.max_queue,
        heartbeat_interval=options.heartbeat_interval,
        cluster_token=process.cluster_token,
        embed_in_truncate=options.embed_in_truncate,
        tool_parser=options.tool_parser,
        reasoning_parser=options.reasoning_parser,
    )
    app = build_worker_app(settings, engine)
    try:
        serve(app, host=options.host, port=options.port, tls=tls, drain_timeout=process.drain_timeout)
    except EngineConfigError as exc:
        raise WorkerStartError(str(exc)) from None
