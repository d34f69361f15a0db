"""The web UI: a Gradio chat page that talks to the API server like any other OpenAI client.

Going through the API server (not to workers directly) means API keys, routing and failover apply to
the page too. It binds loopback by default; a laptop reaches it through `llmstack tunnel`.

Served by uvicorn with the Gradio app mounted at `/` on FastAPI, so it stops on SIGTERM like every
other llmstack service and `GET /` answers 200 once it is up (the login page when auth is set).
"""

from __future__ import annotations

import asyncio
import html
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from llmstack.faces.client import AsyncChatClient, ChatRequest, ClientError, Unreachable

log = logging.getLogger("llmstack.webui")

AUTH_ENV = "LLMSTACK_WEBUI_AUTH"
STOP_GRACE_SECONDS = 3.0  # open event streams from browsers must not hold a stop up


@dataclass
class WebUISettings:
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    title: str = "llmstack"
    auth: list[tuple[str, str]] = field(default_factory=list)
    concurrency: int = 32
    status_interval: float = 10.0


def parse_logins(raw: str | list[str] | None) -> list[tuple[str, str]]:
    """Logins as ``"user:pass,user2:pass2"`` (environment) or a list of ``"user:pass"`` (stack.toml).
    The password is everything after the first colon."""
    if not raw:
        return []
    items = raw.split(",") if isinstance(raw, str) else raw
    logins = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError(f'each login must look like "user:password" (got {user or item!r}:...)')
        logins.append((user, password))
    return logins


def _text_of(content: Any) -> str:
    """Gradio hands history content as a string or as content parts; the API wants plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, list | tuple):
        return "".join(_text_of(part) for part in content)
    return ""


def build_messages(message: str, history: list[dict[str, Any]], system: str | None) -> list[dict[str, str]]:
    """OpenAI messages from the page's history (user/assistant turns) plus the new message."""
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for turn in history:
        role = turn.get("role")
        text = _text_of(turn.get("content"))
        if role in ("user", "assistant") and text:
            messages.append({"role": role, "content": text})
    messages.append({"role": "user", "content": message})
    return messages


def _show(problem: str) -> Any:
    """The banner's update: shown, as an alert, only while there is a problem to report."""
    import gradio as gr

    banner = f'<div class="llmstack-alert" role="alert">⚠️ {html.escape(problem)}</div>' if problem else ""
    return gr.update(value=banner, visible=bool(problem))


class ChatBackend:
    """What the page's events call: model list, status line and the streamed reply."""

    def __init__(self, settings: WebUISettings) -> None:
        self.settings = settings
        self.client = AsyncChatClient(settings.api_url, settings.api_key)

    async def status(self) -> tuple[list[str], str]:
        """(models, problem); the problem is empty when everything is usable."""
        try:
            models = await self.client.list_models()
        except Unreachable:
            return [], (
                f"The API server is unavailable: cannot reach {self.client.base_url}. "
                "Start it (llmstack up) or check the address; this page retries by itself."
            )
        except ClientError as exc:
            return [], str(exc)
        if not models:
            return [], "No model is available: the API server serves none yet (is a worker running?)."
        return models, ""

    async def respond(
        self,
        message: str,
        history: list[dict[str, Any]],
        model: str | None,
        system: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
    ) -> AsyncIterator[tuple[str, Any]]:
        """Stream the reply as (text so far, banner update). Failures end up in the chat and in the
        banner, never as an exception (which Gradio would only show as a short-lived toast)."""
        import gradio as gr

        if not model:
            models, problem = await self.status()
            if not models:
                yield f"⚠️ {problem}", _show(problem)
                return
            model = models[0]
        request = ChatRequest(
            model=model,
            messages=build_messages(message, history, system),
            temperature=float(temperature),
            top_p=float(top_p),
            max_tokens=int(max_tokens),
        )
        reply = ""
        try:
            async for delta in self.client.stream_chat(request):
                banner = _show("") if not reply else gr.skip()  # clear a stale alert once, not per token
                reply += delta
                yield reply, banner
        except Unreachable:
            _, problem = await self.status()
            problem = problem or "The API server is unavailable."
            yield _join(reply, problem), _show(problem)
            return
        except ClientError as exc:
            yield _join(reply, str(exc)), _show(f"{model}: {exc}")
            return
        if not reply:
            yield "(the model returned an empty reply)", _show("")


def _join(reply: str, error: str) -> str:
    return f"{reply}\n\n⚠️ {error}" if reply else f"⚠️ {error}"


CSS = """
.llmstack-alert { padding: 0.6em 0.9em; border-radius: 8px; background: #fff4e5; color: #663c00;
                  border: 1px solid #ffb74d; font-weight: 500; }
footer { display: none !important; }
"""


def build_blocks(settings: WebUISettings):  # gradio.Blocks; gradio is imported lazily
    """The page: settings on the left, the chat on the right, a status banner on top."""
    import gradio as gr

    backend = ChatBackend(settings)

    async def refresh(current: str | None) -> tuple[Any, str]:
        models, problem = await backend.status()
        value = current if current in models else (models[0] if models else None)
        return gr.update(choices=models, value=value), _show(problem)

    with gr.Blocks(title=settings.title, fill_height=True, analytics_enabled=False) as demo:
        gr.Markdown(f"## {html.escape(settings.title)}")
        status = gr.HTML("", elem_id="llmstack-status", visible=False)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=260):
                with gr.Row():
                    model = gr.Dropdown(
                        choices=[], value=None, label="Model", elem_id="llmstack-model", scale=4,
                        allow_custom_value=False,
                    )  # fmt: skip
                    reload_btn = gr.Button("↻", elem_id="llmstack-refresh", scale=1, min_width=40, size="sm")
                system = gr.Textbox(
                    label="System prompt", lines=3, placeholder="You are a helpful assistant.",
                    elem_id="llmstack-system",
                )  # fmt: skip
                temperature = gr.Slider(
                    0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="llmstack-temperature"
                )
                top_p = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Top p", elem_id="llmstack-top-p")
                max_tokens = gr.Slider(16, 4096, value=512, step=16, label="Max tokens", elem_id="llmstack-max-tokens")
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(
                    elem_id="llmstack-chatbot", buttons=["copy", "copy_all"], height=520, label="Chat",
                    placeholder="Pick a model and send a message.",
                )  # fmt: skip
                textbox = gr.Textbox(
                    placeholder="Type a message and press Enter", elem_id="llmstack-input", show_label=False,
                    submit_btn=True, stop_btn=True, autofocus=True,
                )  # fmt: skip
                gr.ChatInterface(
                    backend.respond,
                    chatbot=chatbot,
                    textbox=textbox,
                    additional_inputs=[model, system, temperature, top_p, max_tokens],
                    additional_outputs=[status],
                    concurrency_limit=settings.concurrency,
                    fill_height=True,
                    api_visibility="private",
                )
        demo.load(refresh, inputs=[model], outputs=[model, status], api_visibility="private")
        reload_btn.click(refresh, inputs=[model], outputs=[model, status], api_visibility="private")
        timer = gr.Timer(settings.status_interval)
        timer.tick(refresh, inputs=[model], outputs=[model, status], api_visibility="private", show_progress="hidden")
    return demo


def build_app(settings: WebUISettings):  # fastapi.FastAPI
    """FastAPI with the page mounted at `/` (and a JSON `/health` for scripts)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from fastapi import FastAPI

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # system fonts: a self-hosted box (and the browser reaching it) may have no internet for web fonts
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return gr.mount_gradio_app(
        app,
        build_blocks(settings),
        path="/",
        auth=settings.auth or None,
        auth_message=f"Sign in to {html.escape(settings.title)}" if settings.auth else None,
        footer_links=[],
        run_history=False,
        ssr_mode=False,
        show_error=True,
        theme=theme,
        css=CSS,
        mcp_server=False,
        enable_monitoring=False,
    )


class DisconnectOnStop:
    """ASGI middleware: once the server is stopping, requests still waiting on the client (the page's
    event streams stay open for as long as a tab is) are told the client left, so they end now instead
    of holding the stop up until uvicorn's grace period runs out and cancels them."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.stopping = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def receive_or_stop() -> dict[str, Any]:
            if self.stopping.is_set():
                return {"type": "http.disconnect"}
            message = asyncio.ensure_future(receive())
            stop = asyncio.ensure_future(self.stopping.wait())
            try:
                await asyncio.wait({message, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when cancelled (Starlette polls for a disconnect with a cancelled receive)
                for task in (message, stop):
                    if not task.done():
                        task.cancel()
            if message.done() and not message.cancelled():
                return message.result()
            return {"type": "http.disconnect"}

        await self.app(scope, receive_or_stop, send)


def run_webui(settings: WebUISettings, *, host: str, port: int, debug: bool = False) -> None:
    """Serve until SIGTERM/SIGINT; open browser streams are ended at once, so a stop takes well under a second."""
    import uvicorn

    from llmstack.common.http import RequestContextMiddleware, setup_logging

    setup_logging("webui", debug=debug)
    for noisy in ("gradio", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app = DisconnectOnStop(RequestContextMiddleware(build_app(settings)))

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            app.stopping.set()
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False,
        timeout_graceful_shutdown=STOP_GRACE_SECONDS, timeout_keep_alive=30,
    )  # fmt: skip
    log.info("web UI for %s on http://%s:%d (login %s)", settings.api_url, host, port,
             "required" if settings.auth else "off")  # fmt: skip
    Server(config).run()
