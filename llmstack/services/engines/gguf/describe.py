"""What a GGUF model will be served as, from its header alone (no weights, no tokenizer loaded): for
`llmstack config check`.  The template and stop tokens are the ones the engines will use: the file's own
`tokenizer.chat_template`, else the named or guessed fallback, and its end-of-turn special tokens."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from llmstack.services.engines.gguf.header import GGUFError, GGUFHeader, read_header
from llmstack.services.engines.gguf.support import check_servable
from llmstack.services.engines.text.stops import end_of_turn_tokens, render_jinja
from llmstack.services.engines.text.templates import get_template, guess_template


class GGUFSummary(BaseModel):
    file: str
    architecture: str
    name: str
    quantization: str
    size_bytes: int
    parameters: int
    context_length: int | None
    template: str  # "file" (its own tokenizer.chat_template) or a named template
    template_source: str  # why: "the file's tokenizer.chat_template", "conv_template", "guessed from the name"
    stop_tokens: dict[str, int]  # eos and the template's end-of-turn tokens, by text
    add_bos_token: bool | None
    problem: str | None = None  # why the chosen engine cannot serve it, if it cannot


def describe_gguf(path: str | Path, conv_template: str | None = None, backend: str = "transformers") -> GGUFSummary:
    header = read_header(path, vocab=True)
    problem = None
    try:
        check_servable(header, backend)
    except GGUFError as exc:
        problem = str(exc)
    template, why, source = _template_of(header, conv_template)
    return GGUFSummary(
        file=str(header.path),
        architecture=header.architecture,
        name=header.name,
        quantization=header.quantization,
        size_bytes=header.size,
        parameters=header.parameters,
        context_length=header.context_length,
        template=template,
        template_source=why,
        stop_tokens=_stop_tokens(header, source, get_template(template).stop if template != "file" else []),
        add_bos_token=header.add_bos_token,
        problem=problem,
    )


def _template_of(header: GGUFHeader, conv_template: str | None) -> tuple[str, str, str]:
    """(template name or "file", why it was chosen, its Jinja source), as `ChatRenderer` chooses."""
    if conv_template:
        return get_template(conv_template).name, "conv_template", get_template(conv_template).jinja
    if header.chat_template:
        return "file", "the file's tokenizer.chat_template", header.chat_template
    name = guess_template(str(header.path), header.name, header.architecture)
    return name, "no template in the file: guessed from its name", get_template(name).jinja


def _stop_tokens(header: GGUFHeader, source: str, extra: list[str]) -> dict[str, int]:
    special = header.control_tokens()
    bos, eos = header.token(header.bos_token_id) or "", header.token(header.eos_token_id) or ""

    def render(messages: list[dict]) -> str:
        return render_jinja(source, messages, bos_token=bos, eos_token=eos, add_generation_prompt=False)

    stops = {eos: header.eos_token_id} if eos and header.eos_token_id is not None else {}
    for text, token_id in end_of_turn_tokens(render, source, special, extra).items():
        stops.setdefault(text, token_id)
    return stops
