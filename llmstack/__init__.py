"""llmstack: a self-hosted, OpenAI-compatible LLM service from one stack.toml.

The map
-------
Four kinds of process, each a FastAPI app started by `llmstack <service>` (or by `llmstack up`)::

    controller   services/controller.py    registry of workers, heartbeats, dispatch policy
    worker       services/worker/          one engine (services/engines/hf or .../vllm) behind /generate
    api          services/api/             OpenAI /v1 surface, routing table, one hop to a worker
    webui        faces/webui.py            Gradio chat page, a client of the api like any other

Two flows
---------
A chat request: `services/api/app.py` (key, models and limits in `keys/`, validation into `protocol.py`) ->
`chat.py` builds the worker body -> `upstream.py` picks a worker from `routing.py` (synced from the controller
in the background) and streams `/generate`, reporting tokens to the key's grant -> `services/worker/app.py`
renders and tokenises the prompt, checks the budget, admits it (`admission.py`, by priority) -> the engine
streams `Chunk`s -> NDJSON events (`common/wire.py`) -> SSE chunks; the usage is recorded before the last one.

`llmstack up`: `cli/stack.py` -> `stack/config.py` (validate) -> `stack/plan.py` (roles, ports, command lines,
secrets, preflight) -> `stack/models/` (resolve, cache first, then download) -> `stack/control.py` (foreground or
detached) -> `stack/supervisor.py` (spawn via `children.py`, health-gate, restart, stop in tiers) writing
`stack/rundir.py` state that `status`, `logs` and `down` read from any shell. `up` on a running stack:
`stack/reconcile_request.py` builds the new plan, `stack/reconcile.py` diffs it against the running one, and a
SIGHUP has the supervisor apply it (`stack/reconcile_apply.py`: start, drain and restart, stop; the rest untouched).

The layer rule
--------------
Imports point one way: `cli` -> `stack` -> `services` -> `common`, and `cli` -> `faces` -> `common`.
Nothing imports `cli`; `common` imports nothing else of llmstack; the engines never import each other
(`services/engines/text` holds what they share); the API server never imports a worker or an engine.
"""

__version__ = "0.1.0"
