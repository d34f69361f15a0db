"""The benchmark's model: a randomly initialised Llama built locally, large enough that compute is
measurable on a CPU (about 72M parameters at the full size), with a 2048-token context.

Random weights would end a generation whenever they happen to sample the end-of-turn token, so runs
would generate different amounts of text.  `silence_special_tokens` makes every special token
unreachable: residual dimension 0 carries a constant that no layer writes to, and the special tokens'
output rows read only that dimension with a large negative weight.  Every request then generates
exactly `max_tokens`, in both stacks, and the cost per token is that of an ordinary Llama.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.support.tiny_model import SPECIAL_TOKENS, build_tiny_llama


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int

    @property
    def name(self) -> str:
        return f"benchmodel-h{self.hidden}-l{self.layers}"


FULL = ModelSize(hidden=768, layers=12, heads=12)
QUICK = ModelSize(hidden=128, layers=2, heads=2)

_RESIDUAL_CONSTANT = 1.0
_SILENCE_WEIGHT = -20.0


def build_model(root: Path, size: ModelSize) -> Path:
    """Build (once) and return the model directory under `root`."""
    dest = root / size.name
    stamp = dest / "bench-model.json"
    if stamp.is_file():
        return dest
    build_tiny_llama(dest, hidden=size.hidden, layers=size.layers, heads=size.heads, head_dim=64, max_position=2048)
    params = silence_special_tokens(dest)
    stamp.write_text(json.dumps({"parameters": params, **size.__dict__}) + "\n", encoding="utf-8")
    return dest


def parameters(model_dir: Path) -> int:
    return int(json.loads((model_dir / "bench-model.json").read_text(encoding="utf-8"))["parameters"])


def silence_special_tokens(model_dir: Path) -> int:
    """Rewrite the weights in place; returns the parameter count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = _RESIDUAL_CONSTANT
        for layer in model.model.layers:  # no layer may change residual dimension 0
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        for token in SPECIAL_TOKENS:
            row = tokenizer.convert_tokens_to_ids(token)
            model.lm_head.weight[row, :] = 0.0
            model.lm_head.weight[row, 0] = _SILENCE_WEIGHT
    model.save_pretrained(model_dir)  # weights and config only: the tokenizer files stay as written
    return sum(p.numel() for p in model.parameters())
