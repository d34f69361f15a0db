"""`llmstack chat`: a terminal chat with the API server.

Tokens are written as they arrive (so a slow model still feels alive); once a reply is complete it is
redrawn as rendered markdown when the terminal can show it. Ctrl-C stops the reply being generated
(closing the HTTP stream, which makes the server stop too) and returns to the prompt; Ctrl-D or
`/exit` quits. Errors are one readable line, never a traceback.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markdown import Markdown

from llmstack.faces.client import ChatClient, ChatRequest, ClientError

PROMPT = ">>> "
CONTINUE = "... "
FENCE = '"""'

HELP = """\
Type a message and press Enter. Multi-line input: end a line with \\ to continue it, or wrap the text
in \"\"\" lines. Ctrl-C stops a reply (or clears the line); Ctrl-D or /exit quits.

  /system TEXT   set the system prompt (/system alone shows it, /system - clears it)
  /model NAME    switch model (/model alone lists the served models)
  /temp X        sampling temperature, 0 to 2
  /reset         forget the conversation (keeps the system prompt)
  /save FILE     save the conversation (.json, or markdown for .md)
  /help          this help
  /exit          quit
"""


@dataclass
class ChatSession:
    """The conversation and sampling settings; independent of any terminal, so it is easy to reason about."""

    model: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)  # user/assistant turns only

    def messages(self, user_text: str | None = None) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        out += self.history
        if user_text is not None:
            out.append({"role": "user", "content": user_text})
        return out

    def request(self, user_text: str) -> ChatRequest:
        return ChatRequest(
            model=self.model,
            messages=self.messages(user_text),
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            extra=dict(self.extra),
        )

    def save(self, path: Path) -> None:
        """JSON (model, settings, messages) by default; a readable transcript for `.md` files."""
        if path.suffix.lower() in (".md", ".markdown"):
            parts = [f"# Chat with {self.model}\n"]
            for m in self.messages():
                parts.append(f"**{m['role']}**:\n\n{m['content']}\n")
            text = "\n".join(parts)
        else:
            body = {"model": self.model, "temperature": self.temperature, "messages": self.messages()}
            text = json.dumps(body, ensure_ascii=False, indent=2) + "\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def read_message(read_line: Callable[[str], str]) -> str:
    """One message from the user: a line; lines ending in a backslash continue; a `\"\"\"` line opens a
    block that runs until the next `\"\"\"` line. Raises EOFError / KeyboardInterrupt from `read_line`."""
    first = read_line(PROMPT)
    if first.strip() == FENCE or (first.lstrip().startswith(FENCE) and first.count(FENCE) == 1):
        lines = [first.strip()[len(FENCE) :]] if first.strip() != FENCE else []
        while True:
            line = read_line(CONTINUE)
            if line.rstrip().endswith(FENCE):
                lines.append(line.rstrip()[: -len(FENCE)])
                return "\n".join(lines).strip("\n")
            lines.append(line)
    lines = []
    line = first
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read_line(CONTINUE)
    lines.append(line)
    return "\n".join(lines)


def rows_used(text: str, width: int) -> int:
    """Terminal rows `text` occupies when written from column 0 at this width (for redrawing it)."""
    from rich.cells import cell_len

    width = max(width, 1)
    return sum(max(1, math.ceil(cell_len(line.expandtabs(8)) / width)) for line in text.split("\n"))


class ChatREPL:
    """The interactive loop; `out` is the terminal (rich markdown goes through `console`)."""

    def __init__(
        self,
        client: ChatClient,
        session: ChatSession,
        *,
        markdown: bool = True,
        out: TextIO | None = None,
        read_line: Callable[[str], str] = input,
    ) -> None:
        self.client = client
        self.session = session
        self.out = out or sys.stdout
        self.console = Console(file=self.out, highlight=False)
        self.err = Console(stderr=True, highlight=False)
        self.markdown = markdown and self.console.is_terminal
        self.read_line = read_line

    # -- output --------------------------------------------------------------------------------------
    def info(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False, highlight=False)

    def error(self, text: str) -> None:
        self.err.print(f"error: {text}", style="bold red", markup=False, highlight=False)

    def stream_reply(self, user_text: str) -> str | None:
        """Send one message and write the reply as it streams. Returns the text (possibly partial after
        Ctrl-C), or None when the request failed before any text arrived."""
        reply = ""
        stream: Iterator[str] = self.client.stream_chat(self.session.request(user_text))
        try:
            for delta in stream:
                reply += delta
                self.out.write(delta)
                self.out.flush()
        except KeyboardInterrupt:
            stream.close()  # closes the HTTP stream: the server stops generating
            self.out.write("\n")
            self.info("[stopped]")
            return reply
        except ClientError as exc:
            if reply:
                self.out.write("\n")
            self.error(str(exc))
            return reply or None
        self._finish(reply)
        return reply

    def _finish(self, reply: str) -> None:
        """Redraw the streamed text as rendered markdown when it is all still on screen."""
        if not reply:
            self.info("(empty reply)")
            return
        rows = rows_used(reply, self.console.width)
        if not self.markdown or rows >= self.console.height:
            self.out.write("\n")
            self.out.flush()
            return
        up = f"\x1b[{rows - 1}A" if rows > 1 else ""
        self.out.write(f"\r{up}\x1b[J")
        self.out.flush()
        self.console.print(Markdown(reply))

    # -- commands ------------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; returns False when the REPL should end."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.console.print(HELP, markup=False, highlight=False)
        elif name == "/reset":
            s.history.clear()
            self.info("conversation cleared" + (" (system prompt kept)" if s.system else ""))
        elif name == "/system":
            if not arg:
                self.info(f"system prompt: {s.system!r}" if s.system else "no system prompt")
            elif arg == "-":
                s.system = None
                self.info("system prompt cleared")
            else:
                s.system = arg
                self.info("system prompt set")
        elif name == "/model":
            self._model(arg)
        elif name == "/temp":
            try:
                value = float(arg)
                if not 0.0 <= value <= 2.0:
                    raise ValueError
            except ValueError:
                self.error("usage: /temp X with X between 0 and 2")
                return True
            s.temperature = value
            self.info(f"temperature {value:g}")
        elif name == "/save":
            if not arg:
                self.error("usage: /save FILE")
                return True
            path = Path(arg).expanduser()
            try:
                s.save(path)
            except OSError as exc:
                self.error(f"cannot save to {path}: {exc.strerror or exc}")
                return True
            self.info(f"saved {len(s.history)} messages to {path}")
        else:
            self.error(f"unknown command {name}; /help lists them")
        return True

    def _model(self, name: str) -> None:
        try:
            served = self.client.list_models()
        except ClientError as exc:
            if name:
                self.session.model = name
                self.info(f"model {name} (not checked: {exc})")
            else:
                self.error(str(exc))
            return
        if not name:
            for m in served:
                self.info(("* " if m == self.session.model else "  ") + m)
            return
        if name not in served:
            self.error(f"model {name!r} is not served; available: {', '.join(served) or 'none'}")
            return
        self.session.model = name
        self.info(f"model {name}")

    # -- loop ----------------------------------------------------------------------------------------
    def run(self) -> int:
        self.info(f"llmstack chat · {self.session.model} · {self.client.base_url} · /help for commands, Ctrl-D to quit")
        while True:
            try:
                text = read_message(self.read_line)
            except KeyboardInterrupt:
                self.out.write("\n")  # Ctrl-C at the prompt drops the line, as shells do
                continue
            except EOFError:
                self.out.write("\n")
                return 0
            if not text.strip():
                continue
            if text.startswith("/") and "\n" not in text:
                if not self.command(text):
                    return 0
                continue
            reply = self.stream_reply(text)
            if reply is not None:
                self.session.history.append({"role": "user", "content": text})
                self.session.history.append({"role": "assistant", "content": reply})


def run_once(client: ChatClient, session: ChatSession, prompt: str, out: TextIO | None = None) -> int:
    """Scripts: stream one reply to stdout (raw text, no markdown) and exit 0; errors to stderr, exit 1."""
    out = out or sys.stdout
    wrote = False
    try:
        for delta in client.stream_chat(session.request(prompt)):
            out.write(delta)
            out.flush()
            wrote = True
    except ClientError as exc:
        if wrote:
            out.write("\n")
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        out.write("\n")
        return 130
    out.write("\n")
    out.flush()
    return 0


def pick_model(client: ChatClient, wanted: str | None) -> str:
    """The model to talk to: the one asked for, else the first the server lists."""
    if wanted:
        return wanted
    models = client.list_models()
    if not models:
        raise ClientError("the API server serves no model yet (is a worker running?)")
    return models[0]


def enable_line_editing() -> None:
    """Arrow keys and history for input() where readline exists (not on every platform)."""
    try:
        import readline  # noqa: F401
    except ImportError:
        pass
