"""Named chat templates and the stop tokens a template brings: its end-of-turn markers are stop tokens
even when the model's generation_config does not list them (Gemma 3: `<eos>` only, turns end with
`<end_of_turn>`).  Real tokenizers: Gemma 3's (converted from its GGUF file) and the tiny test model's."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llmstack.services.engines.text.stops import end_of_turn_tokens, render_jinja, special_tokens
from llmstack.services.engines.text.templates import ChatRenderer, get_template, guess_template
from tests.support.real_model import gemma_hf_dir

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Where?"},
]


@pytest.fixture(scope="module")
def gemma_tokenizer():  # noqa: ANN201
    return AutoTokenizer.from_pretrained(gemma_hf_dir())


def test_gemma_template_renders_gemma_turns_and_stops_at_end_of_turn(gemma_tokenizer) -> None:  # noqa: ANN001
    renderer = ChatRenderer(gemma_tokenizer, "/models/gemma-3-270m-q4_k_m.gguf", "gemma")
    assert renderer.render(CHAT) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nWhere?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert renderer.end_of_turn == {"<end_of_turn>": 106, "<start_of_turn>": 105}
    assert renderer.stop_token_ids == [105, 106]
    # the base model's own generation config knows only <eos>: the template is what adds 106
    assert gemma_tokenizer.eos_token_id == 1
    # with no template in the tokenizer, a Gemma model gets the gemma fallback by its name
    assert ChatRenderer(gemma_tokenizer, "/models/gemma-3-270m-q4_k_m.gguf", None).name == "gemma"


@pytest.mark.parametrize(
    ("name", "expected", "markers"),
    [
        (
            "llama-3",
            "<bos><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
            "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhere?<|eot_id|><|start_header_id|>assistant"
            "<|end_header_id|>\n\n",
            {"<|eot_id|>": 10, "<|start_header_id|>": 11},
        ),
        (
            "phi-3",
            "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\nWhere?"
            "<|end|>\n<|assistant|>\n",
            {"<|end|>": 12},
        ),
        (
            "mistral-instruct",
            "<bos>[INST] Be brief.\n\nHi [/INST]Hello<eos>[INST] Where? [/INST]",
            {"<eos>": 1},
        ),
    ],
)
def test_more_named_templates(name: str, expected: str, markers: dict[str, int], gemma_tokenizer) -> None:  # noqa: ANN001
    template = get_template(name)
    rendered = render_jinja(template.jinja, CHAT, bos_token="<bos>", eos_token="<eos>", add_generation_prompt=True)
    assert rendered == expected
    # as special tokens of a vocabulary that has them, their end-of-turn markers become stop tokens
    special = {"<bos>": 2, "<eos>": 1, "<|eot_id|>": 10, "<|start_header_id|>": 11, "<|end|>": 12}

    def render(messages: list[dict]) -> str:
        return render_jinja(template.jinja, messages, bos_token="<bos>", eos_token="<eos>")

    assert end_of_turn_tokens(render, template.jinja, special, template.stop) == markers


def test_template_guesses_by_model_name() -> None:
    assert guess_template("/m/gemma-3-270m-q4_k_m.gguf") == "gemma"
    assert guess_template("/m/model.gguf", "Meta Llama 3.1 8B Instruct", "llama") == "llama-3"
    assert guess_template("microsoft/Phi-3-mini-4k-instruct") == "phi-3"
    assert guess_template("TheBloke/Mistral-7B-Instruct-v0.2-GGUF") == "mistral-instruct"
    assert guess_template("org/unknown") == "chatml"
    assert get_template("llama3").name == "llama-3"


def test_the_tokenizers_own_template_gives_its_end_of_turn_token(
    tiny_model_dir: Path, tiny_model_no_template_dir: Path
) -> None:
    own = AutoTokenizer.from_pretrained(tiny_model_dir)
    renderer = ChatRenderer(own, str(tiny_model_dir), None)
    assert renderer.name == "tokenizer"
    im_end = own.convert_tokens_to_ids("<|im_end|>")
    assert renderer.end_of_turn == {"<|im_end|>": im_end}
    # the chatml fallback also stops at <|im_start|>: special tokens never show up as stop *text*
    bare = AutoTokenizer.from_pretrained(tiny_model_no_template_dir)
    fallback = ChatRenderer(bare, "org/unknown", None)
    assert fallback.end_of_turn == {"<|im_end|>": im_end, "<|im_start|>": bare.convert_tokens_to_ids("<|im_start|>")}
    assert special_tokens(bare)["<|im_end|>"] == im_end


def test_a_template_the_probe_cannot_render_is_searched_for_known_markers() -> None:
    source = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}<|im_end|>"

    def render(messages: list[dict]) -> str:
        return render_jinja(source, messages)

    assert end_of_turn_tokens(render, source, {"<|im_end|>": 7, "<|eot_id|>": 8}) == {"<|im_end|>": 7}
    # markers that are not special tokens of the vocabulary stay stop strings, not stop tokens
    assert end_of_turn_tokens(render, source, {"<|eot_id|>": 8}) == {}
