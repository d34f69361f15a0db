"""Chat prompt rendering: the tokenizer's own chat template first, named fallbacks for models
without one (selected with `--conv-template`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llmstack.services.engines.text.stops import end_of_turn_tokens, special_tokens


@dataclass(frozen=True)
class ConvTemplate:
    name: str
    jinja: str
    stop: list[str] = field(default_factory=list)
    description: str = ""


TEMPLATES: dict[str, ConvTemplate] = {
    t.name: t
    for t in [
        ConvTemplate(
            "chatml",
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            stop=["<|im_end|>", "<|im_start|>"],
            description="ChatML (Qwen, Yi, many fine-tunes)",
        ),
        ConvTemplate(
            "baichuan2-chat",
            # Baichuan2: the system text leads; user turns follow <reserved_106>, assistant turns
            # <reserved_107> (token ids 195 and 196 in its tokenizer).
            "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
            "{% elif m['role'] == 'user' %}<reserved_106>{{ m['content'] }}"
            "{% else %}<reserved_107>{{ m['content'] }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<reserved_107>{% endif %}",
            stop=["<reserved_106>"],
            description="Baichuan2-*-Chat (needs --trust-remote-code)",
        ),
        ConvTemplate(
            "llama-2",
            "{% if messages and messages[0]['role'] == 'system' %}"
            "{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
            "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
            "{% for m in msgs %}{% if m['role'] == 'user' %}"
            "<s>[INST] {% if loop.first %}{{ sys }}{% endif %}{{ m['content'] }} [/INST]"
            "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}",
            stop=["[INST]"],
            description="Llama-2-chat",
        ),
        ConvTemplate(
            "vicuna_v1.1",
            "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
            "{% set msgs = messages[1:] %}{% else %}A chat between a curious user and an artificial "
            "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the "
            "user's questions.{% set msgs = messages %}{% endif %}"
            "{% for m in msgs %}{% if m['role'] == 'user' %} USER: {{ m['content'] }}"
            "{% else %} ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %} ASSISTANT:{% endif %}",
            stop=["USER:"],
            description="Vicuna v1.1 and FastChat's default",
        ),
        ConvTemplate(
            "gemma",
            # Gemma has no system role: the system text opens the first user turn.  The assistant is "model".
            "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
            "{% set first = messages[0]['content'] + '\n\n' %}{% set msgs = messages[1:] %}"
            "{% else %}{% set first = '' %}{% set msgs = messages %}{% endif %}"
            "{% for m in msgs %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
            "{% if loop.first %}{{ first }}{% endif %}{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
            stop=["<end_of_turn>", "<start_of_turn>"],
            description="Gemma 1-3 (instruction-tuned, and base models with a chat format)",
        ),
        ConvTemplate(
            "llama-3",
            "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
            stop=["<|eot_id|>", "<|start_header_id|>"],
            description="Llama 3, 3.1, 3.2, 3.3 Instruct",
        ),
        ConvTemplate(
            "phi-3",
            "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
            stop=["<|end|>", "<|user|>", "<|endoftext|>"],
            description="Phi-3 and Phi-3.5 (mini, medium) Instruct",
        ),
        ConvTemplate(
            "mistral-instruct",
            # [INST] around user turns, </s> after each answer; the system text joins the first user turn.
            "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
            "{% set first = messages[0]['content'] + '\n\n' %}{% set msgs = messages[1:] %}"
            "{% else %}{% set first = '' %}{% set msgs = messages %}{% endif %}"
            "{% for m in msgs %}{% if m['role'] == 'user' %}[INST] {% if loop.first %}{{ first }}{% endif %}"
            "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
            stop=["[INST]"],
            description="Mistral / Mixtral Instruct (v0.1-v0.3)",
        ),
        ConvTemplate(
            "plain",
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}",
            stop=["\nuser:"],
            description="role: text lines, for base models",
        ),
    ]
}
ALIASES = {
    "baichuan2": "baichuan2-chat",
    "qwen": "chatml",
    "qwen-7b-chat": "chatml",
    "vicuna": "vicuna_v1.1",
    "gemma-3": "gemma",
    "llama3": "llama-3",
    "phi3": "phi-3",
    "mistral": "mistral-instruct",
}


def get_template(name: str) -> ConvTemplate:
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        known = ", ".join(sorted(TEMPLATES))
        raise ValueError(f"unknown conversation template {name!r}; known templates: {known}")
    return TEMPLATES[key]


def guess_template(*names: str) -> str:
    """A fallback for tokenizers that carry no chat template, by the model's name (its path, and for a
    GGUF file its `general.name` and architecture)."""
    lower = " ".join(names).lower().replace(" ", "-").replace("_", "-")  # "Llama 3.1" reads as llama-3
    for needles, template in _GUESSES:
        if any(n in lower for n in needles):
            return template
    return "chatml"


_GUESSES: list[tuple[tuple[str, ...], str]] = [
    (("baichuan2",), "baichuan2-chat"),
    (("llama-2", "llama2"), "llama-2"),
    (("vicuna",), "vicuna_v1.1"),
    (("gemma",), "gemma"),
    (("llama-3", "llama3"), "llama-3"),
    (("phi-3", "phi3"), "phi-3"),
    (("mistral", "mixtral"), "mistral-instruct"),
]


# How models without a tool-aware chat template learn about tools (the Hermes / Qwen 2.5 format, which
# the `hermes` tool parser reads back).
TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def tools_as_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Messages for a template that knows nothing of tools: the tool definitions go into the system
    message, assistant tool calls become `<tool_call>` text and tool results `<tool_response>` user turns."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False
                )
                + "\n</tool_call>"
                for c in m["tool_calls"]
            ]
            out.append({"role": "assistant", "content": "\n".join([content, *calls] if content else calls)})
        elif role == "tool":
            text = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + text}  # parallel results: one turn
            else:
                out.append({"role": "user", "content": text})
        else:
            out.append({"role": role, "content": content})
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = TOOLS_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


class ChatRenderer:
    """Renders messages with the chosen template through the tokenizer's Jinja sandbox, and knows the
    special tokens that end the template's turns (`stop_token_ids`, see `stops`)."""

    def __init__(self, tokenizer: Any, model_path: str, conv_template: str | None, *hints: str) -> None:
        self.tokenizer = tokenizer
        own = getattr(tokenizer, "chat_template", None)
        if conv_template:
            self.template: ConvTemplate | None = get_template(conv_template)
        elif own:
            self.template = None
        else:
            self.template = get_template(guess_template(model_path, *hints))
        self.name = self.template.name if self.template else "tokenizer"
        # a template that renders tools itself also renders tool calls and tool results its own way
        source = own if isinstance(own, str) else json.dumps(own) if own else ""
        self.native_tools = self.template is None and "tools" in source and "tool_calls" in source
        self.end_of_turn = end_of_turn_tokens(
            self._probe,
            self.template.jinja if self.template else source,
            special_tokens(tokenizer),
            self.stop,
        )

    @property
    def stop(self) -> list[str]:
        return list(self.template.stop) if self.template else []

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a turn of this template (stops even when generation_config lacks them)."""
        return sorted(set(self.end_of_turn.values()))

    def _probe(self, messages: list[dict[str, Any]]) -> str:
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": False}
        if self.template is not None:
            kwargs["chat_template"] = self.template.jinja
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        # the request's own variables first: the renderer's settings below always win
        kwargs: dict[str, Any] = {**(template_kwargs or {}), "tokenize": False, "add_generation_prompt": True}
        if self.template is not None:
            kwargs["chat_template"] = self.template.jinja
        if self.native_tools:
            if tools:
                kwargs["tools"] = tools
        elif tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            messages = tools_as_text(messages, tools)
        return self.tokenizer.apply_chat_template(messages, **kwargs)
