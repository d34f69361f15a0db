"""Which tokens end a turn: the end-of-turn markers of the chat template in use, as stop tokens.

A model's `generation_config` often lists only its end-of-text token (Gemma 3: `<eos>`), while its chat
turns end with another one (`<end_of_turn>`); without that as a stop the model writes past its turn.  The
marker is found by rendering a two-message probe through the template and reading what the template writes
right after the assistant's text; templates that cannot render the probe are searched for well-known
markers instead.  Only markers that are single special tokens count: anything else stays a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

PROBE_USER = "Where is the probe?"
PROBE_REPLY = "Here is the probe reply."
PROBE = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_REPLY}]

#: End-of-turn markers of widespread templates, for templates the probe cannot render.
KNOWN_MARKERS = (
    "<|im_end|>",  # ChatML: Qwen, Yi, many fine-tunes
    "<end_of_turn>",  # Gemma 1-3
    "<turn|>",  # Gemma 4
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",
    "<|end|>",  # Phi-3, GPT-OSS
    "<|return|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|END_OF_TURN_TOKEN|>",  # Command-R
    "<\uff5cend\u2581of\u2581sentence\uff5c>",  # DeepSeek
    "</s>",
)

Render = Callable[[list[dict[str, Any]]], str]


def render_jinja(source: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    """Render a chat template as transformers does (sandboxed, trim/lstrip blocks), for places with no
    tokenizer at hand (`llmstack config check` on a GGUF file)."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(messages=messages, **variables)


def turn_end_text(render: Render) -> str | None:
    """What the template writes right after an assistant message, or None when the probe fails."""
    try:
        text = render(PROBE)
    except Exception:  # a template that insists on a system message, tools, ...: fall back to a search
        return None
    at = text.rfind(PROBE_REPLY)
    return text[at + len(PROBE_REPLY) :] if at != -1 else None


def end_of_turn_tokens(
    render: Render | None,
    source: str,
    special: Mapping[str, int],
    extra: Iterable[str] = (),
) -> dict[str, int]:
    """`{marker: token id}` for the special tokens that end a turn of this template: the one the probe
    finds after the assistant's text (else known markers that occur in `source`), and those of `extra`
    (a named template's stop strings) that are special tokens."""
    found: dict[str, int] = {}
    after = turn_end_text(render) if render is not None else None
    if after is not None:
        marker = _leading_token(after.lstrip(" "), special)
        if marker is not None:
            found[marker] = special[marker]
    else:
        for marker in KNOWN_MARKERS:
            if marker in source and marker in special:
                found[marker] = special[marker]
    for text in extra:
        if text in special:
            found.setdefault(text, special[text])
    return found


def _leading_token(text: str, special: Mapping[str, int]) -> str | None:
    """The longest special token `text` starts with."""
    best: str | None = None
    for size in range(1, min(len(text), 64) + 1):
        if text[:size] in special:
            best = text[:size]
    return best


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """A Hugging Face tokenizer's special tokens by text (the named ones and added special tokens)."""
    out: dict[str, int] = {}
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            out[str(getattr(added, "content", added))] = int(token_id)
    for text in getattr(tokenizer, "all_special_tokens", None) or []:
        token_id = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token_id, int) and token_id >= 0:
            out.setdefault(text, token_id)
    return out
