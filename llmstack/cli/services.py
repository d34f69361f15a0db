"""The service commands: `controller`, `worker` and `api`, each one process of a stack (the tutorial's
terminals).  Thin: parse flags, build settings, call into `llmstack.services`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
from llmstack.cli.options import with_worker_options
from llmstack.services.worker.options import WorkerOptions

if TYPE_CHECKING:
    from llmstack.common.http import TLSFiles

#: The commands of this group; `register` adds them to the main app.
commands = typer.Typer()


def _tls(ssl: bool, certfile: str | None, keyfile: str | None) -> TLSFiles:
    from llmstack.common.http import TLSFiles  # fastapi and uvicorn: only for the commands that serve

    try:
        return TLSFiles.resolve(ssl, certfile, keyfile)
    except ValueError as exc:
        fail(str(exc))


def _check_port(host: str, port: int) -> None:
    from llmstack.common.net import check_port_free

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
    from llmstack.common.http import serve, setup_logging
    from llmstack.common.net import is_loopback
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


_WORKER_EXAMPLES = (
    "Examples:\n\n"
    "  llmstack worker --model-path ./Qwen2.5-0.5B-Instruct --device cpu\n\n"
    "  llmstack worker --model-path baichuan-inc/Baichuan2-13B-Chat --load-8bit --trust-remote-code "
    "--model-names Baichuan2-13B-Chat\n\n"
    "  llmstack worker --backend vllm --model-path Qwen/Qwen2.5-7B-Instruct --num-gpus 2 "
    "--gpu-memory-utilization 0.9 --max-model-len 8192\n\n"
    "  llmstack worker --backend vllm --model-path ./model --engine-args '{\"enable_prefix_caching\": true}'\n\n"
    "With --backend vllm, any other vLLM engine argument may follow as --its-name VALUE."
)


@commands.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, epilog=_WORKER_EXAMPLES)
@with_worker_options
def worker(
    ctx: typer.Context,
    options: WorkerOptions,
    controller_address: ControllerAddress = "http://127.0.0.1:21001",
    no_register: Annotated[bool, typer.Option("--no-register", help="Do not register with a controller.")] = False,
    cluster_token: ClusterToken = None,
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
    from llmstack.common.http import setup_logging
    from llmstack.services.worker.launch import WorkerProcess, WorkerStartError, serve_worker

    options = _with_pass_through(options, ctx.args)
    tls = _tls(ssl, ssl_certfile, ssl_keyfile)
    setup_logging("worker", debug=debug)
    _check_port(options.host, options.port)
    process = WorkerProcess(None if no_register else controller_address, cluster_token, tls, drain_timeout)
    try:
        serve_worker(_with_local_model(options), process)
    except WorkerStartError as exc:
        fail(str(exc))


def _with_pass_through(options: WorkerOptions, extra: list[str]) -> WorkerOptions:
    """Unlisted `--its-name VALUE` flags become vLLM engine arguments, beneath --engine-args."""
    if not extra:
        return options
    if options.backend != "vllm":
        fail(f"no such option: {extra[0]} (vLLM engine arguments need --backend vllm)")
    from llmstack.services.engines.vllm.args import parse_extra_flags

    try:
        flags = parse_extra_flags(extra)
    except ValueError as exc:
        fail(str(exc))
    return options.model_copy(update={"engine_args": {**flags, **options.engine_args}})


def _with_local_model(options: WorkerOptions) -> WorkerOptions:
    """A hub id is downloaded (or found in the cache) first, a `pypi:` model found in its package, a
    --gguf-file picked; a .gguf file that the engine cannot serve fails here, before anything loads.  The
    served names stay the id's."""
    from llmstack.services.engines.gguf.files import is_gguf_path
    from llmstack.services.engines.gguf.header import GGUFError, read_header
    from llmstack.services.engines.gguf.support import check_servable

    path = options.model
    hub_id = not path.startswith(("/", ".", "~")) and not os.path.isdir(path) and not is_gguf_path(path)
    if hub_id or options.gguf_file:
        from llmstack.stack.models import DownloadError, resolve_model

        try:
            path = str(resolve_model(path, revision=options.revision, gguf_file=options.gguf_file))
        except (DownloadError, GGUFError) as exc:
            fail(str(exc))
    path = os.path.expanduser(path)
    if is_gguf_path(path):
        try:
            check_servable(read_header(path), options.backend)
        except GGUFError as exc:
            fail(str(exc))
    update = {"model": path, "names": options.served_names, "gguf_file": None}
    return options.model_copy(update=update)


@commands.command(
    epilog="Examples: llmstack api --port 8000 --api-keys sk-one,sk-two  |  "
    "llmstack api --keys-file team-keys.toml --state-dir /srv/llm/state"
)
def api(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    controller_address: ControllerAddress = "http://127.0.0.1:21001",
    api_keys: Annotated[
        str | None, typer.Option("--api-keys", envvar="LLMSTACK_API_KEYS", help="Comma-separated Bearer keys.")
    ] = None,
    keys_file: Annotated[
        Path | None,
        typer.Option(
            "--keys-file",
            envvar="LLMSTACK_KEYS_FILE",
            help="Named keys with models and limits (TOML, or JSON when the name ends in .json); reloaded when "
            "it changes and on SIGHUP.",
        ),
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
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            envvar="LLMSTACK_STATE_DIR",
            help="Directory for the server's state: usage accounting (usage.db) and stored responses "
            "(responses.sqlite3, for /v1/responses with store and previous_response_id). Default: usage is not "
            "recorded and stored responses live in memory only; `llmstack up` passes the run directory.",
        ),
    ] = None,
    response_retention: Annotated[
        int, typer.Option("--response-retention", min=1, help="The most stored responses kept (oldest go first).")
    ] = 10_000,
    response_max_age_days: Annotated[
        float, typer.Option("--response-max-age-days", min=0.0, help="Days a stored response is kept.")
    ] = 30.0,
    ssl: SSL = False,
    ssl_certfile: SSLCert = None,
    ssl_keyfile: SSLKey = None,
    drain_timeout: DrainTimeout = 30.0,
    debug: Debug = False,
) -> None:
    """Run the API server: OpenAI's /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings and
    /v1/responses, Anthropic's /v1/messages (and count_tokens), and vLLM's /tokenize and /detokenize.

    Keys: --api-keys (plain, unlimited), --keys-file (named, with models and limits), and the stack's
    \\[\\[api.keys]] in LLMSTACK_API_KEY_RULES (JSON).  With --state-dir, usage per key, model and day is
    recorded in STATE_DIR/usage.db (`llmstack usage --run-dir STATE_DIR`) and stored responses in
    STATE_DIR/responses.sqlite3."""
    from llmstack.common.http import parse_keys, serve, setup_logging
    from llmstack.common.net import is_loopback
    from llmstack.services.api.app import APISettings, build_api_app
    from llmstack.services.api.keys.rules import KeysFileError, rules_from_env
    from llmstack.services.api.keys.usage import StateDirInUse

    tls = _tls(ssl, ssl_certfile, ssl_keyfile)
    setup_logging("api", debug=debug)
    keys = parse_keys(api_keys)
    try:
        rules = rules_from_env(os.environ["LLMSTACK_API_KEY_RULES"]) if os.environ.get("LLMSTACK_API_KEY_RULES") else []
    except KeysFileError as exc:
        fail(str(exc))
    if not is_loopback(host) and not keys and not rules and keys_file is None:
        typer.secho(
            f"warning: the API server listens on {host} without --api-keys: anyone who can reach it can use it",
            fg=typer.colors.YELLOW,
            err=True,
        )
    _check_port(host, port)
    settings = APISettings(
        controller_address=controller_address,
        api_keys=keys,
        key_rules=rules,
        keys_file=keys_file.expanduser().resolve() if keys_file else None,
        state_dir=state_dir.expanduser().resolve() if state_dir else None,
        cluster_token=cluster_token,
        sync_interval=sync_interval,
        request_timeout=request_timeout,
        stream_timeout=stream_timeout,
        response_retention=response_retention,
        response_max_age=response_max_age_days * 86400.0,
    )
    try:
        app = build_api_app(settings)
    except (KeysFileError, StateDirInUse, OSError) as exc:
        fail(str(exc))
    serve(app, host=host, port=port, tls=tls, drain_timeout=drain_timeout)


def register(app: typer.Typer) -> None:
    """Add `controller`, `worker` and `api` to the main command line."""
    app.registered_commands.extend(commands.registered_commands)
