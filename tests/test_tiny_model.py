"""The test models themselves: if these break, every engine test would fail for the wrong reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tests.support.tiny_model import IM_END, IM_START

CHINESE = "我很想去北京旅行，我应该在哪里做什么？"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_model_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == ("llama", 128, 2, 64)
    assert cfg.max_position_embeddings == 2048
    assert cfg.vocab_size == len(tokenizer)
    assert 1000 <= len(tokenizer) <= 2000
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)


def test_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.eos_token == IM_END
    assert tokenizer.bos_token == "<s>" and tokenizer.pad_token == "<pad>"
    ids = tokenizer.encode(f"{IM_START}user\nhi{IM_END}", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids(IM_START)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("text", [CHINESE, "Hello, world!", "naïve café 😀 𝔘 Ω ñ\tx\n", "  two  spaces "])
def test_tokenizer_round_trips_utf8(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_chat_template_renders(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": CHINESE}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{CHINESE}<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tokenizer.apply_chat_template(parts, tokenize=False) == "<|im_start|>user\nab<|im_end|>\n"


def test_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :]
    assert 1 <= len(new) <= 8
    assert isinstance(tokenizer.decode(new, skip_special_tokens=True), str)


def test_tokenizer_config_loads_in_transformers_4(tiny_model_dir: Path) -> None:
    """Transformers 4.x (FastChat's venv) must read the same files: no v5-only spellings."""
    cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not isinstance(cfg.get("extra_special_tokens"), list)
    assert "<|im_start|>" in cfg["chat_template"]


def test_no_template_variant(tiny_model_no_template_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_no_template_dir)
    assert tok.chat_template is None
    assert not (tiny_model_no_template_dir / "chat_template.jinja").exists()
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert tok.decode(tok.encode(CHINESE, add_special_tokens=False)) == CHINESE


def test_minilm_embeds_384_dims(minilm_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell."]
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    assert hidden.shape[-1] == 384
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # sentence-transformers
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert similar > unrelated + 0.2, (similar, unrelated)
