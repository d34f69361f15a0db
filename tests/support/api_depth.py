"""Shared checks for logprobs, structured output and tool calls, run against each engine's stack."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmstack.services.engines.text.decoding import _BYTE_DECODER

# Five schemas covering nested objects, arrays, enums, required fields and numbers.
SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "tags": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 4}
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "point": {
        "type": "object",
        "properties": {
            "where": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}, "ok": {"type": "boolean"}},
                "required": ["x", "y", "ok"],
                "additionalProperties": False,
            }
        },
        "required": ["where"],
        "additionalProperties": False,
    },
    "mood": {
        "type": "object",
        "properties": {"mood": {"enum": ["happy", "sad", "calm"]}, "level": {"type": "integer"}},
        "required": ["mood"],
        "additionalProperties": False,
    },
    "list": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "done": {"type": "boolean"}},
            "required": ["id", "done"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Beijing?"}]


class Reference:
    """The tiny model in-process: the log-probabilities the served model should report."""

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.by_bytes: dict[bytes, int] = {}
        for piece, token_id in self.tokenizer.get_vocab().items():
            if piece in self.tokenizer.all_special_tokens:
                continue
            if all(c in _BYTE_DECODER for c in piece):
                self.by_bytes[bytes(_BYTE_DECODER[c] for c in piece)] = token_id

    def chat_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def token_id(self, entry: dict[str, Any]) -> int:
        return self.by_bytes[bytes(entry["bytes"])]

    def greedy_next(self, prompt: list[int]) -> int:
        with torch.inference_mode():
            return int(self.model(torch.tensor([prompt])).logits[0, -1].argmax())

    def logprobs(self, prompt: list[int], generated: list[int]) -> list[float]:
        """log p(generated[i] | prompt + generated[:i]) at temperature 1."""
        with torch.inference_mode():
            logits = self.model(torch.tensor([prompt + generated])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        return [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(generated)]


@dataclass
class Target:
    """What the engine-neutral end-to-end tests run against: one model behind an API server."""

    client: openai.OpenAI  # strict response validation
    model: str
    base_url: str
    ref: Reference
    context: int

    @property
    def api_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    @property
    def lenient(self) -> openai.OpenAI:
        """The same client without strict validation (for bodies the client's own types get wrong)."""
        return openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0)


def new_target(base_url: str, model: str, model_dir: Path, context: int) -> Target:
    client = openai.OpenAI(base_url=base_url, api_key="none", _strict_response_validation=True, max_retries=0)
    return Target(client, model, base_url, Reference(model_dir), context)


def check_top_logprobs(entries: list[dict[str, Any]], top: int) -> None:
    assert entries
    for e in entries:
        assert e["logprob"] <= 0
        alts = e["top_logprobs"]
        assert len(alts) == top
        values = [a["logprob"] for a in alts]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values)
        assert e["logprob"] <= values[0] + 1e-5  # nothing beats the most likely token
        assert isinstance(e["bytes"], list) and all(0 <= b < 256 for b in e["bytes"])


def check_against_reference(ref: Reference, messages: list[dict[str, Any]], entries: list[dict[str, Any]]) -> None:
    prompt = ref.chat_ids(messages)
    generated = [ref.token_id(e) for e in entries]
    expected = ref.logprobs(prompt, generated)
    for e, want in zip(entries, expected, strict=True):
        assert abs(e["logprob"] - want) < 2e-3, (e, want)


def json_schema_format(name: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def streamed_tool_calls(stream: Any) -> tuple[dict[int, dict[str, str]], str | None]:
    """Tool calls put together from streamed deltas: index -> {id, name, arguments}; and the finish reason."""
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                if delta.id:
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    call["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
            finish = choice.finish_reason or finish
    return calls, finish


def check_call(name: str, arguments: str) -> dict[str, Any]:
    args = json.loads(arguments)
    jsonschema.validate(args, PARAMETERS[name])
    return args


def chat(client: openai.OpenAI, model: str, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("max_tokens", 256)
    kwargs.setdefault("seed", 7)
    return client.chat.completions.create(model=model, **kwargs)
