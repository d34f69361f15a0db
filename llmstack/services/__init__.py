"""The four kinds of process a stack runs, minus the web UI: the controller (registry and dispatch), model
workers (`worker/` over `engines/`) and the OpenAI-compatible API server (`api/`).  Each is a FastAPI app
built by a function; services talk to each other only over HTTP with the types in `llmstack.common.wire`."""
