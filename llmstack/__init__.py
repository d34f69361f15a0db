"""llmstack: a self-hosted, OpenAI-compatible LLM service from one stack.toml.

The folders
-----------
::

    cli/         the `llmstack` command line: one module per command group (services, stack, faces), shared
                 options and exit codes in `common`, `worker`'s flags generated from the worker option schema
    stack/       a stack's lifecycle: config (stack.toml), models/ (resolve: cache first, two hub adapters),
                 plan (roles, ports, command lines), supervisor + children, rundir, control, status, logs
    services/    the processes: controller (+ dispatch); worker/ (options, launch, app, service, link to the
                 controller, events, admission, tool calls); engines/ (base, text/ shared by engines, hf/,
                 vllm/); api/ (app, protocol, routing, upstream, one serving module per endpoint)
    faces/       what people use: client, webui, chat, tunnel
    common/      errors, wire (worker <-> API types), http plumbing, net (URLs, ports, health), metrics,
                 console

Four kinds of process, each a FastAPI app started by `llmstack <service>` (or by `llmstack up`)::

    controller   services/controller.py    registry of workers, heartbeats, dispatch policy
    worker       services/worker/          one engine (services/engines/hf or .../vllm) behind /generate
    api          services/api/             OpenAI /v1 surface, routing table, one hop to a worker
    webui        faces/webui.py            Gradio chat page, a client of the api like any other

Two flows
---------
A chat request: `services/api/app.py` (key, models and limits in `keys/`, validation into `protocol.py`) ->
`chat.py` (the worker body and sampling params) -> `upstream.py` picks a worker from `routing.py` (synced from
the controller in the background) and streams its `/generate`, reporting tokens to the key's grant ->
`services/worker/app.py` -> `service.py` renders, tokenises and checks the prompt on the worker's text thread,
admits it (`admission.py`, by priority) -> the engine streams `Chunk`s -> `events.py` writes them as NDJSON
`StreamEvent`s (`common/wire.py`) -> `upstream.py` reads and merges them -> `chat.py` / `streaming.py` turn
them into SSE chunks; the usage is recorded before the last one.  `/v1/responses` and `/v1/messages`
(`responses/`, `messages/`) translate to and from the same chat flow.

`llmstack up`: `cli/stack.py` -> `stack/config.py` (validate; `[[models]]` is the worker option schema,
`services/worker/options.py`) -> `stack/plan.py` (roles, ports, command lines, secrets, preflight) ->
`stack/models/` (resolve: cache first, then download) -> `stack/control.py` (foreground or detached) ->
`stack/supervisor.py` (spawn via `children.py`, health-gate, restart, stop in tiers) writing `stack/rundir.py`
state that `status`, `logs` and `down` read from any shell.  Each worker it spawns runs `llmstack worker`
-> `cli/options.py` (flags -> `WorkerOptions`) -> `services/worker/launch.py` -> `engine_config.py` ->
`services/engines` `create_engine` -> `services/worker/app.py`.
`up` on a running stack: `stack/reconcile_request.py` builds the new plan, `stack/reconcile.py` diffs it
against the running one, and a SIGHUP has the supervisor apply it (`stack/reconcile_apply.py`: start, drain
and restart, stop; the rest untouched).

Models at run time: `stack/lifecycle.py` (in the supervisor's loop) loads and unloads workers by `load`,
`keep_alive`, `pin` and the memory budget (`stack/budget.py`, footprints from `stack/footprint.py`);
`stack/admin.py` is its HTTP API (`llmstack models`, `cli/models.py`). A request for an on-demand model
that is not loaded: `services/api/catalog.py` demands it from that API and waits, then routing goes on.

The layer rule
--------------
Imports point one way: `cli` -> `stack` -> `services` -> `common`, and `cli` -> `faces` -> `common`.
Nothing imports `cli`; `common` imports nothing else of llmstack; faces never import stack or services;
services never import stack; the engines never import each other (`services/engines/text` holds what they
share); the API server never imports a worker or an engine.  `tests/test_layers.py` checks it.
"""

__version__ = "0.1.0"
