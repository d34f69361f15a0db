"""The commands people use to talk to a stack: `webui`, `chat` and `tunnel`.

Thin: resolve settings (flags, then environment, then stack.toml, then defaults), then call into
webui.py / chat.py / tunnel.py. A stack.toml is read when `-c` names one, or when ./stack.toml exists.

Exit codes: 0 success; 1 the request or connection failed; 2 bad usage or an invalid stack.toml;
3 the machine is not ready for it (a local port in use).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from llmstack.cli.common import EXIT_ENV, EXIT_FAILED, APIKeyOpt, OptionalConfigOpt, fail
from llmstack.faces.tunnel import ServerDefaults
from llmstack.stack.config import DEFAULT_CONFIG, ConfigError, StackConfig, load_config


def _load(path: Path | None) -> StackConfig | None:
    """The stack file when one is named (a broken one is an error) or present here (a broken one is only
    a warning: these tools work without it, and `llmstack up -c other.toml` may run them from here)."""
    if path is None:
        if not Path(DEFAULT_CONFIG).is_file():
            return None
        try:
            return load_config(DEFAULT_CONFIG)
        except ConfigError as exc:
            typer.secho(f"warning: ignoring ./{DEFAULT_CONFIG}: {exc}", fg=typer.colors.YELLOW, err=True)
            return None
    try:
        return load_config(path)
    except ConfigError as exc:
        fail(str(exc))


def _api_url(cfg: StackConfig | None, url: str | None) -> str:
    from llmstack.faces.client import DEFAULT_API_URL

    return url or (cfg.api.url if cfg else DEFAULT_API_URL)


def _api_key(cfg: StackConfig | None, key: str | None) -> str | None:
    if key:
        return key
    return cfg.api.client_key() if cfg else None


# -- webui ------------------------------------------------------------------------------------------------
def webui(
    host: Annotated[str | None, typer.Option("--host", help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port to listen on (default 7860).")] = None,
    api_url: Annotated[
        str | None, typer.Option("--api-url", help="API server address (default: \\[api] of stack.toml).")
    ] = None,
    api_key: APIKeyOpt = None,
    title: Annotated[str | None, typer.Option("--title", help="Page title.")] = None,
    config: OptionalConfigOpt = None,
    debug: Annotated[bool, typer.Option("--debug", help="Verbose logs.")] = False,
) -> None:
    """Serve the chat web page (Gradio), which talks to the API server like any OpenAI client.

    Logins: LLMSTACK_WEBUI_AUTH="user:pass,user2:pass2" or \\[webui] auth in stack.toml.

    Without logins anyone who can reach the page can chat: keep it on 127.0.0.1 and use `llmstack tunnel`.
    """
    from llmstack.common.net import check_port_free, is_loopback
    from llmstack.faces.webui import AUTH_ENV, WebUISettings, parse_logins, run_webui

    cfg = _load(config)
    host = host or (cfg.webui.host if cfg else "127.0.0.1")
    port = port or (cfg.webui.port if cfg else 7860)
    try:
        logins = parse_logins(os.environ.get(AUTH_ENV) or (cfg.webui.auth if cfg else None))
    except ValueError as exc:
        fail(f"{AUTH_ENV}: {exc}")
    if not is_loopback(host) and not logins:
        typer.secho(
            f"warning: the web UI listens on {host} without logins: anyone who can reach it can chat",
            fg=typer.colors.YELLOW,
            err=True,
        )
    try:
        check_port_free(host, port)
    except OSError as exc:
        fail(str(exc), EXIT_ENV)
    settings = WebUISettings(
        api_url=_api_url(cfg, api_url),
        api_key=_api_key(cfg, api_key),
        title=title or (cfg.webui.title if cfg else "llmstack"),
        auth=logins,
    )
    run_webui(settings, host=host, port=port, debug=debug)


# -- chat ---------------------------------------------------------------------------------------------------
def _params(items: list[str]) -> dict[str, object]:
    import json

    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            fail(f"--param wants KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def chat(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name (default: the first served).")] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="API server address (default: \\[api] of stack.toml, else :8000).")
    ] = None,
    api_key: APIKeyOpt = None,
    config: OptionalConfigOpt = None,
    once: Annotated[
        str | None, typer.Option("--once", help="Send one prompt ('-' reads stdin), print the reply, exit.")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", min=0.0, max=2.0)] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Longest reply, in tokens.")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", help="Extra request field KEY=VALUE (JSON value), e.g. top_p=0.9. Repeatable."),
    ] = None,
    plain: Annotated[bool, typer.Option("--plain", help="Do not redraw replies as rendered markdown.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for a reply to progress.")] = 600.0,
) -> None:
    """Chat with a model in the terminal (or, with --once, answer one prompt for a script).

    In the chat: /system TEXT, /model NAME, /temp X, /reset, /save FILE, /help, /exit.

    End a line with \\ to continue it, or wrap several lines in \"\"\". Ctrl-C stops a reply; Ctrl-D quits.
    """
    from llmstack.faces.chat import ChatREPL, ChatSession, enable_line_editing, pick_model, run_once
    from llmstack.faces.client import ChatClient, ClientError

    cfg = _load(config)
    client = ChatClient(_api_url(cfg, url), _api_key(cfg, api_key), timeout=timeout)
    try:
        try:
            name = pick_model(client, model)
        except ClientError as exc:
            fail(str(exc), EXIT_FAILED)
        session = ChatSession(name, system=system, temperature=temperature, max_tokens=max_tokens)
        session.extra = _params(param or [])
        if once is not None:
            prompt = sys.stdin.read() if once == "-" else once
            raise typer.Exit(run_once(client, session, prompt))
        enable_line_editing()
        raise typer.Exit(ChatREPL(client, session, markdown=not plain).run())
    finally:
        client.close()


# -- tunnel -------------------------------------------------------------------------------------------------
def tunnel_defaults(cfg: StackConfig | None) -> ServerDefaults | None:
    """The server side of a tunnel as the stack file describes it (faces do not read stack files)."""
    if cfg is None:
        return None
    t = cfg.tunnel
    return ServerDefaults(
        destination=t.host,
        ssh_port=t.ssh_port,
        identity_file=str(cfg.resolve_path(t.identity_file)) if t.identity_file else None,
        api_host=cfg.api.host,
        api_port=cfg.api.port,
        local_api_port=t.local_api_port,
        webui_enabled=cfg.webui.enabled,
        webui_host=cfg.webui.host,
        webui_port=cfg.webui.port,
        local_webui_port=t.local_webui_port,
    )


def tunnel(
    destination: Annotated[
        str | None, typer.Argument(help="\\[user@]host of the server, as for ssh (default: \\[tunnel] host).")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", "-p", help="SSH port of the server.")] = None,
    identity: Annotated[str | None, typer.Option("--identity", "-i", help="SSH private key file.")] = None,
    local_api_port: Annotated[
        int | None, typer.Option("--local-api-port", help="Local port for the API (default: the server's).")
    ] = None,
    local_webui_port: Annotated[
        int | None, typer.Option("--local-webui-port", help="Local port for the web UI (default: the server's).")
    ] = None,
    api_port: Annotated[
        int | None, typer.Option("--api-port", help="API port on the server (default: \\[api] port, else 8000).")
    ] = None,
    webui_port: Annotated[
        int | None, typer.Option("--webui-port", help="Web UI port on the server (default: \\[webui] port, else 7860).")
    ] = None,
    no_webui: Annotated[bool, typer.Option("--no-webui", help="Forward the API only.")] = False,
    ssh_option: Annotated[
        list[str] | None, typer.Option("--ssh-option", "-o", help="Extra ssh -o KEY=VALUE. Repeatable.")
    ] = None,
    print_only: Annotated[bool, typer.Option("--print", help="Print the ssh command instead of running it.")] = False,
    config: OptionalConfigOpt = None,
) -> None:
    """Forward the server's API and web UI ports to this machine over SSH, and keep the tunnel up.

    Uses your ssh config, agent and keys; a password, if asked, goes to ssh and is never stored.
    """
    from llmstack.faces.tunnel import PortBusy, TunnelError, plan_tunnel, run_tunnel

    try:
        spec = plan_tunnel(
            tunnel_defaults(_load(config)),
            destination=destination,
            ssh_port=port,
            identity_file=identity,
            local_api_port=local_api_port,
            local_webui_port=local_webui_port,
            api_port=api_port,
            webui_port=webui_port,
            webui=not no_webui,
            ssh_options=ssh_option or [],
        )
    except TunnelError as exc:
        fail(str(exc))
    if print_only:
        typer.echo(spec.shell_command())
        return

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        code = run_tunnel(spec, say=say)
    except PortBusy as exc:
        fail(str(exc), EXIT_ENV)
    except TunnelError as exc:
        fail(str(exc), EXIT_FAILED)
    except FileNotFoundError:
        fail("ssh not found: install the OpenSSH client", EXIT_ENV)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add `webui`, `chat` and `tunnel` to the main command line."""
    app.command(
        epilog=(
            "Examples:\n\n  llmstack webui --port 7860 --api-url http://127.0.0.1:8000\n\n"
            '  LLMSTACK_WEBUI_AUTH="alice:s3cret" llmstack webui -c stack.toml'
        )
    )(webui)
    app.command(
        epilog=(
            "Examples:\n\n  llmstack chat\n\n  llmstack chat --model Baichuan2-13B-Chat --url http://10.0.0.5:8000\n\n"
            '  llmstack chat --once "Summarise RFC 2616 in one line"'
        )
    )(chat)
    app.command(
        epilog=(
            "Examples:\n\n  llmstack tunnel root@gpu-box -p 2222\n\n"
            "  llmstack tunnel gpu-box --local-webui-port 17860 -c stack.toml\n\n"
            "  llmstack tunnel root@gpu-box --print"
        )
    )(tunnel)
