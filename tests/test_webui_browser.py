"""The web UI in a real browser: headless Chromium (Playwright) against `llmstack webui` processes in front
of a real stack (controller + tiny-model worker + API server with an API key).

Screenshots land in artifacts/ (git-ignored) for people to look at after a run.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from llmstack.faces.webui import build_messages, parse_logins
from tests.support.procs import Service, ServiceGroup, free_port
from tests.support.stack import Stack, new_stack
from tests.support.ui import artifact_path, start_tiny_stack, start_webui

pytestmark = pytest.mark.slow

API_KEY = "sk-webui-test"
LOGINS = "alice:wonder land,bob:builder"
CHROMIUM = "/usr/bin/chromium"
DEAD_PORT = free_port()

# Records every distinct length of the newest bot message, so a test can tell a streamed reply (many
# lengths) from one that arrived in one piece.
WATCH_STREAM_JS = """
() => {
  window.__lengths = [];
  const root = document.querySelector('#llmstack-chatbot');
  const record = () => {
    const bots = root.querySelectorAll('[data-testid="bot"]');
    if (!bots.length) return;
    const n = bots[bots.length - 1].innerText.length;
    const l = window.__lengths;
    if (!l.length || l[l.length - 1] !== n) l.push(n);
  };
  new MutationObserver(record).observe(root, {subtree: true, childList: true, characterData: true});
}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    s = start_tiny_stack(tmp_path_factory.mktemp("webui-stack"), tiny_model_dir, "--api-keys", API_KEY)
    yield s
    s.group.stop_all()


@pytest.fixture(scope="module")
def webuis(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Service, str]]]:
    """Three web UIs, started together: the normal one, one behind logins, one whose API server is down."""
    group = ServiceGroup(tmp_path_factory.mktemp("webui-logs"))
    key = {"LLMSTACK_API_KEY": API_KEY}
    # the third one reads its API address and title from a stack.toml; nothing listens on that port
    toml = tmp_path_factory.mktemp("webui-config") / "stack.toml"
    toml.write_text(f'[api]\nport = {DEAD_PORT}\n\n[webui]\ntitle = "from stack.toml"\n')
    here = tmp_path_factory.mktemp("webui-cwd")  # no ./stack.toml there: only flags, env and -c count
    uis = {
        "main": start_webui(group, "webui", stack.api_url, "--title", "llmstack test", cwd=here, env=key),
        "auth": start_webui(group, "webui-auth", stack.api_url, cwd=here, env={**key, "LLMSTACK_WEBUI_AUTH": LOGINS}),
        "down": start_webui(group, "webui-down", None, "-c", str(toml), cwd=here),
    }
    try:
        for svc, url in uis.values():
            svc.wait_healthy(url, timeout=120)  # the health check `llmstack up` uses: GET / answers 200
        yield uis
    except BaseException:
        print(group.logs(60))
        raise
    finally:
        group.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(30_000)
    yield p
    context.close()


def _open(page: Page, url: str) -> None:
    page.goto(url)
    expect(page.locator("#llmstack-chatbot")).to_be_visible()


def _set_number(page: Page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")


def _send(page: Page, text: str) -> None:
    box = page.locator("#llmstack-input textarea")
    box.fill(text)
    box.press("Enter")


def _wait_done(page: Page, timeout: float = 60_000) -> None:
    """Generation is over when the input shows its submit button again (the stop button is gone)."""
    expect(page.locator("#llmstack-input .stop-button")).to_have_count(0, timeout=timeout)
    expect(page.locator("#llmstack-input .submit-button")).to_be_visible(timeout=timeout)


def _wait_for(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _bot_messages(page: Page):
    return page.locator('#llmstack-chatbot [data-testid="bot"]')


def _greedy_reply(stack: Stack, messages: list[dict[str, str]], max_tokens: int) -> str:
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "top_p": 1}
    r = httpx.post(
        f"{stack.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    )
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def test_pick_model_send_and_see_the_reply_stream(page: Page, webuis, stack: Stack) -> None:
    _, url = webuis["main"]
    _open(page, url)
    expect(page).to_have_title("llmstack test")
    expect(page.locator("#llmstack-status")).to_be_hidden()  # API and model are fine: no alert

    page.locator("#llmstack-model input").click()
    page.get_by_role("option", name="tiny").click()
    expect(page.locator("#llmstack-model input")).to_have_value("tiny")
    _set_number(page, "llmstack-temperature", "0")
    _set_number(page, "llmstack-max-tokens", "400")
    page.locator("#llmstack-system textarea").fill("You are terse.")

    page.evaluate(WATCH_STREAM_JS)
    _send(page, "Tell me about Beijing.")
    expect(page.locator('#llmstack-chatbot [data-testid="user"]')).to_have_count(1)
    expect(_bot_messages(page)).to_have_count(1)
    _wait_done(page)

    lengths = page.evaluate("window.__lengths")
    nonzero = [n for n in lengths if n > 0]
    assert len(nonzero) >= 3, f"the reply did not arrive in pieces (lengths seen: {lengths})"
    assert nonzero == sorted(nonzero), f"a streamed reply only grows: {lengths}"
    reply = _bot_messages(page).last.inner_text()
    assert "⚠️" not in reply and reply.strip()
    # the page sent what was on it: same model, system prompt, temperature 0 -> the API's greedy reply
    expected = _greedy_reply(
        stack, [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about Beijing."}],
        400,
    )  # fmt: skip
    assert _squash(reply) == _squash(expected)
    page.screenshot(path=str(artifact_path("webui-chat.png")), full_page=True)

    # a second turn carries the first as history
    _send(page, "And Shanghai?")
    expect(_bot_messages(page)).to_have_count(2)
    _wait_done(page)
    second = _bot_messages(page).last.inner_text()
    history = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me about Beijing."},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "And Shanghai?"},
    ]
    assert _squash(second) == _squash(_greedy_reply(stack, history, 400))

    # regenerate replaces the last reply (same settings, greedy: the same text again), clear empties the chat
    page.evaluate(WATCH_STREAM_JS)
    page.get_by_role("button", name="Retry").click()
    _wait_for(lambda: len(page.evaluate("window.__lengths")) >= 2, "the regenerated reply to stream")
    _wait_for(lambda: _squash(_bot_messages(page).last.inner_text()) == _squash(second), "the regenerated reply")
    _wait_done(page)
    expect(_bot_messages(page)).to_have_count(2)
    page.get_by_role("button", name="Copy conversation").wait_for()
    expect(page.get_by_role("button", name="Copy message").first).to_be_attached()
    page.get_by_role("button", name="Clear").click()
    expect(_bot_messages(page)).to_have_count(0)


def _squash(text: str) -> str:
    """Compare rendered text with raw model text: the page renders markdown (which eats markup characters
    and folds whitespace), so only letters and digits are compared."""
    return re.sub(r"[\W_]+", "", text)


def _long_prompt(stack: Stack, max_tokens: int) -> tuple[str, str]:
    """A prompt whose greedy reply runs to `max_tokens` (the page cannot ask the server to ignore EOS)."""
    for prompt in ("Hello", "Describe Beijing in detail.", "Tell me a story.", "Write a very long story.", "Hi!"):
        body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        r = httpx.post(
            f"{stack.base_url}/chat/completions",
            json={**body, "temperature": 0, "top_p": 1},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=120,
        )
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "length":
            return prompt, choice["message"]["content"]
    raise AssertionError("no candidate prompt makes the tiny model talk long enough to press Stop")


def test_stop_button_ends_generation(page: Page, webuis, stack: Stack) -> None:
    _, url = webuis["main"]
    _open(page, url)
    expect(page.locator("#llmstack-model input")).to_have_value("tiny")  # the first served model by default
    _set_number(page, "llmstack-temperature", "0")
    _set_number(page, "llmstack-max-tokens", "2000")
    prompt, full = _long_prompt(stack, 2000)
    _send(page, prompt)
    expect(_bot_messages(page)).to_have_count(1)
    page.locator("#llmstack-input .stop-button").dispatch_event("click")  # gradio's progress overlay may cover it
    _wait_done(page, timeout=10_000)
    # updates already on their way may still render (a busy browser lags), then the text must settle
    deadline = time.monotonic() + 15
    stopped = _bot_messages(page).last.inner_text()
    while True:
        time.sleep(1.0)
        now = _bot_messages(page).last.inner_text()
        if now == stopped:
            break
        assert time.monotonic() < deadline, "the reply kept growing after Stop"
        stopped = now
    assert len(_squash(stopped)) < len(_squash(full)), "Stop did not cut the reply short"


def test_unavailable_api_server_is_explained_on_the_page(page: Page, webuis) -> None:
    _, url = webuis["down"]
    page.goto(url)
    expect(page).to_have_title("from stack.toml")
    status = page.locator("#llmstack-status")
    expect(status).to_be_visible()
    expect(status).to_contain_text(f"API server is unavailable: cannot reach http://127.0.0.1:{DEAD_PORT}")
    _send(page, "hello?")
    expect(_bot_messages(page)).to_have_count(1)
    expect(_bot_messages(page).last).to_contain_text("API server is unavailable")
    _wait_done(page)
    page.screenshot(path=str(artifact_path("webui-api-down.png")), full_page=True)


def test_no_model_served_is_explained_on_the_page(page: Page, tmp_path: Path) -> None:
    """An API server that is up but has no worker: the page says no model is available."""
    s = new_stack(tmp_path / "logs")
    try:
        s.start_controller()
        s.start_api()
        svc, url = start_webui(s.group, "webui-nomodel", s.api_url, cwd=tmp_path)
        svc.wait_healthy(url, timeout=120)
        page.goto(url)
        expect(page.locator("#llmstack-status")).to_contain_text("No model is available")
        _send(page, "hello?")
        expect(_bot_messages(page).last).to_contain_text("No model is available")
    finally:
        s.group.stop_all()


def test_login_is_required_when_auth_is_set(page: Page, webuis) -> None:
    _, url = webuis["auth"]
    assert httpx.get(url, timeout=10).status_code == 200  # health check still works: the login page
    assert httpx.get(f"{url}config", timeout=10).status_code == 401  # the app itself needs a login
    page.goto(url)
    user = page.get_by_label("username")
    password = page.get_by_label("password")
    expect(user).to_be_visible()
    expect(page.locator("#llmstack-chatbot")).to_have_count(0)
    user.fill("alice")
    password.fill("wrong")
    page.get_by_role("button", name="Login").click()
    expect(page.get_by_text("Incorrect Credentials")).to_be_visible()
    page.screenshot(path=str(artifact_path("webui-login.png")), full_page=True)
    user.fill("alice")
    password.fill("wonder land")  # everything after the first colon is the password, spaces included
    page.get_by_role("button", name="Login").click()
    expect(page.locator("#llmstack-chatbot")).to_be_visible()
    expect(page.locator("#llmstack-model input")).to_have_value("tiny")


def test_sigterm_stops_the_web_ui_quickly(webuis, browser: Browser) -> None:
    """`llmstack down` sends SIGTERM: the service must exit promptly even with a browser connected."""
    svc, url = webuis["down"]
    context = browser.new_context()
    p = context.new_page()
    p.goto(url)
    expect(p.locator("#llmstack-chatbot")).to_be_visible()
    started = time.monotonic()
    svc.signal(signal.SIGTERM, group=False)
    code = svc.wait(timeout=15)
    elapsed = time.monotonic() - started
    context.close()
    # uvicorn re-raises the signal once it has shut down cleanly, so the status says "ended by SIGTERM"
    assert code in (0, -signal.SIGTERM), svc.log_tail()
    assert elapsed < 2.5, f"took {elapsed:.1f}s to stop"
    assert "Traceback" not in svc.log_text() and "graceful shutdown exceeded" not in svc.log_text()


def test_model_going_away_mid_session_is_explained(page: Page, webuis, stack: Stack) -> None:
    """The last test on the shared stack: it stops the worker."""
    _, url = webuis["main"]
    _open(page, url)
    expect(page.locator("#llmstack-model input")).to_have_value("tiny")
    stack.workers["worker-tiny"][0].stop()
    _send(page, "still there?")
    _wait_done(page)
    reply = _bot_messages(page).last
    expect(reply).to_contain_text("⚠️")
    expect(reply).to_contain_text("worker")  # what to check next
    expect(page.locator("#llmstack-status")).to_be_visible()
    page.screenshot(path=str(artifact_path("webui-model-gone.png")), full_page=True)


def test_page_history_becomes_openai_messages() -> None:
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "assistant", "content": {"path": "/tmp/x.png"}},  # not text: skipped
    ]
    assert build_messages("next", history, "  be brief ") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "next"},
    ]
    assert build_messages("x", [], "   ") == [{"role": "user", "content": "x"}]


def test_logins_parse_from_env_and_config() -> None:
    assert parse_logins("a:b, c:d:e") == [("a", "b"), ("c", "d:e")]
    assert parse_logins(["u:p w"]) == [("u", "p w")]
    assert parse_logins(None) == [] and parse_logins("") == []
    with pytest.raises(ValueError):
        parse_logins("nopassword")
