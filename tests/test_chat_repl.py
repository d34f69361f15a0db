"""`llmstack chat` used as a person would: in a pseudo-terminal (pexpect), typing and reading the screen,
against a real stack (controller + tiny-model worker + API server with an API key)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest
from rich.console import Console

from llmstack.faces.chat import ChatREPL, ChatSession, read_message, rows_used
from llmstack.faces.client import ChatClient
from tests.support.procs import DEFAULT_ENV, REPO_ROOT, free_port
from tests.support.stack import Stack
from tests.support.ui import start_tiny_stack

pytestmark = pytest.mark.slow

API_KEY = "sk-chat-test"
PROMPT = ">>> "


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    s = start_tiny_stack(tmp_path_factory.mktemp("chat-stack"), tiny_model_dir, "--api-keys", API_KEY)
    yield s
    s.group.stop_all()


def _env() -> dict[str, str]:
    env = {**os.environ, **DEFAULT_ENV, "TERM": "xterm-256color", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LLMSTACK_API_KEY", None)
    env.pop("LLMSTACK_CONFIG", None)
    return env


def _spawn(*args: str, cwd: Path) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llmstack", "chat", *args],
        cwd=str(cwd),
        env=_env(),
        dimensions=(40, 120),
        encoding="utf-8",
        codec_errors="replace",
        timeout=60,
    )
    child.logfile_read = io.StringIO()  # the whole screen, for failure messages
    return child


def _screen(child: pexpect.spawn) -> str:
    return child.logfile_read.getvalue()[-3000:]


def _run(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmstack", "chat", *args],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120, input=stdin,
    )  # fmt: skip


def _greedy(stack: Stack, messages: list[dict[str, str]], max_tokens: int, **extra: object) -> str:
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
    r = httpx.post(
        f"{stack.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    )
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def _on_screen(text: str) -> str:
    """How the terminal's output stream shows text the program wrote (the pty turns \\n into \\r\\n)."""
    return text.replace("\n", "\r\n")


def test_conversation_commands_and_history(stack: Stack, tmp_path: Path) -> None:
    child = _spawn("--url", stack.api_url, "--api-key", API_KEY, "-t", "0", "--max-tokens", "40", cwd=tmp_path)
    try:
        child.expect("/help for commands")
        child.expect_exact(PROMPT)
        child.sendline("/system You are terse.")
        child.expect("system prompt set")
        child.expect_exact(PROMPT)

        child.sendline("Tell me about Beijing.")
        child.expect_exact("Tell me about Beijing.\r\n")
        child.expect_exact(PROMPT)
        system = {"role": "system", "content": "You are terse."}
        first_user = {"role": "user", "content": "Tell me about Beijing."}
        first = _greedy(stack, [system, first_user], 40)
        assert _on_screen(first) in child.before, _screen(child)  # streamed as the model wrote it
        assert "\x1b[J" in child.before  # then redrawn as rendered markdown

        # multi-line input: a trailing backslash continues the line; \"\"\" wraps a block
        child.sendline("first line \\")
        child.expect_exact("... ")
        child.sendline("second line")
        child.expect_exact(PROMPT)
        child.sendline('"""')
        child.expect_exact("... ")
        child.sendline("alpha")
        child.sendline("beta")
        child.sendline('"""')
        child.expect_exact(PROMPT)

        saved = tmp_path / "out" / "chat.json"
        child.sendline(f"/save {saved}")
        child.expect("saved 6 messages")
        child.expect_exact(PROMPT)
        data = json.loads(saved.read_text())
        assert data["model"] == "tiny"
        msgs = data["messages"]
        assert msgs[:3] == [system, first_user, {"role": "assistant", "content": first}]
        assert [m["content"] for m in msgs if m["role"] == "user"][1:] == ["first line \nsecond line", "alpha\nbeta"]
        assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3
        # the second turn was sent with the first as history: it matches the server's own greedy answer
        second = _greedy(stack, msgs[:3] + [{"role": "user", "content": "first line \nsecond line"}], 40)
        assert msgs[4]["content"] == second

        child.sendline("/temp 0.5")
        child.expect("temperature 0.5")
        child.sendline("/temp 9")
        child.expect("usage: /temp X")
        child.sendline("/model nope")
        child.expect("'nope' is not served; available: tiny")
        child.sendline("/model")
        child.expect_exact("* tiny")
        child.sendline("/model tiny")
        child.expect("model tiny")
        child.sendline("/help")
        child.expect("/save FILE")
        child.sendline("/bogus")
        child.expect("unknown command /bogus")
        child.sendline("/reset")
        child.expect(r"conversation cleared \(system prompt kept\)")
        child.expect_exact(PROMPT)
        markdown = tmp_path / "chat.md"
        child.sendline(f"/save {markdown}")
        child.expect("saved 0 messages")
        assert "You are terse." in markdown.read_text()
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)


def test_ctrl_c_stops_the_reply_not_the_chat(stack: Stack, tmp_path: Path) -> None:
    args = ["--url", stack.api_url, "--api-key", API_KEY, "-t", "0", "--max-tokens", "1500"]
    child = _spawn(*args, "--param", "ignore_eos=true", cwd=tmp_path)
    try:
        child.expect_exact(PROMPT)
        child.sendline("Write a very long story.")
        child.expect_exact("Write a very long story.\r\n")
        child.expect(r"\S{30}")  # the reply is arriving
        child.sendintr()
        started = time.monotonic()
        child.expect_exact("[stopped]", timeout=10)
        assert time.monotonic() - started < 3, "Ctrl-C took too long to stop the reply"
        child.expect_exact(PROMPT)

        saved = tmp_path / "partial.json"
        child.sendline(f"/save {saved}")
        child.expect("saved 2 messages")
        partial = json.loads(saved.read_text())["messages"][-1]["content"]
        full = _greedy(stack, [{"role": "user", "content": "Write a very long story."}], 1500, ignore_eos=True)
        assert partial and full.startswith(partial) and len(partial) < len(full)

        child.sendline("/model")  # still alive and talking to the server
        child.expect_exact("* tiny")
        child.expect_exact(PROMPT)
        child.sendintr()  # Ctrl-C at the prompt drops the line, as shells do
        child.expect_exact(PROMPT)
        child.sendeof()  # Ctrl-D quits
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)


def test_once_prints_the_reply_for_scripts(stack: Stack, tmp_path: Path) -> None:
    r = _run("--url", stack.api_url, "--api-key", API_KEY, "--once", "Hello!", "-t", "0", "--max-tokens", "24",
             cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == _greedy(stack, [{"role": "user", "content": "Hello!"}], 24) + "\n"
    assert "\x1b[" not in r.stdout  # raw text when not on a terminal
    piped = _run("--url", f"{stack.api_url}/v1", "--api-key", API_KEY, "--once", "-", "--max-tokens", "8",
                 cwd=tmp_path, stdin="from stdin")  # fmt: skip
    assert piped.returncode == 0 and piped.stdout.strip(), piped.stderr


def test_address_and_key_come_from_stack_toml(stack: Stack, tmp_path: Path) -> None:
    port = stack.api_url.rsplit(":", 1)[1]
    (tmp_path / "stack.toml").write_text(f'[api]\nport = {port}\napi_keys = ["{API_KEY}"]\n')
    r = _run("--once", "Hello!", "--max-tokens", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _run("-c", str(tmp_path / "stack.toml"), "--once", "Hello!", "--max-tokens", "8", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    bad = _run("-c", str(tmp_path / "missing.toml"), "--once", "x", cwd=elsewhere)
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_readable_errors_when_the_server_is_down_or_refuses(stack: Stack, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    r = _run("--url", dead, "--once", "hi", cwd=tmp_path)
    assert r.returncode == 1
    assert f"cannot reach the API server at {dead}" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout

    r = _run("--url", dead, "--model", "tiny", "--once", "hi", cwd=tmp_path)
    assert r.returncode == 1 and "cannot reach the API server" in r.stderr and "Traceback" not in r.stderr

    r = _run("--url", stack.api_url, "--api-key", "sk-wrong", "--model", "tiny", "--once", "hi", cwd=tmp_path)
    assert r.returncode == 1 and "LLMSTACK_API_KEY" in r.stderr and "Traceback" not in r.stderr

    # interactive: the chat starts, says what is wrong for each message, and keeps going
    child = _spawn("--url", dead, "--model", "tiny", cwd=tmp_path)
    try:
        child.expect_exact(PROMPT)
        child.sendline("anyone there?")
        child.expect("cannot reach the API server")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        assert "Traceback" not in child.logfile_read.getvalue()
    finally:
        child.close(force=True)


# -- pieces without a terminal ----------------------------------------------------------------------------
def test_multiline_reading() -> None:
    def feed(*lines: str):
        it = iter(lines)
        return lambda prompt: next(it)

    assert read_message(feed("plain")) == "plain"
    assert read_message(feed("a \\", "b\\", "c")) == "a \nb\nc"
    assert read_message(feed('"""', "x", "", "y", '"""')) == "x\n\ny"
    assert read_message(feed('"""start', 'end"""')) == "start\nend"
    assert read_message(feed('"""inline"""')) == '"""inline"""'


def test_rows_used_counts_wrapped_lines() -> None:
    assert rows_used("abc", 10) == 1
    assert rows_used("a" * 10, 10) == 1
    assert rows_used("a" * 11, 10) == 2
    assert rows_used("x\n\ny", 10) == 3
    assert rows_used("北京" * 3, 4) == 3  # wide characters take two cells


def test_finished_reply_is_redrawn_as_markdown() -> None:
    out = io.StringIO()
    repl = ChatREPL(ChatClient("http://127.0.0.1:9"), ChatSession("tiny"), out=out)
    repl.console = Console(file=out, force_terminal=True, width=60, height=40, highlight=False)
    repl.markdown = True
    out.write("# Title\n\n**bold** text")
    repl._finish("# Title\n\n**bold** text")
    screen = out.getvalue()
    assert "\r\x1b[2A\x1b[J" in screen  # back to the start of the 3 streamed rows, erase them
    redrawn = screen.split("\x1b[J", 1)[1]
    assert "Title" in redrawn and "**" not in redrawn and "bold" in redrawn
