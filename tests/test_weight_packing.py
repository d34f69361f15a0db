"""bfloat16 linear weights packed once for oneDNN (`engines/hf/packing.py`): the model computes what it computed
with plain weights, the plain copies are gone, and the embeddings keep their layout."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llmstack.services.engines.hf.packing import pack_linear_weights, packing_available

CPU = torch.device("cpu")


def _greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        first_logits = out.logits[0].float()
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(steps - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, first_logits


def test_packed_bfloat16_linears_compute_what_plain_ones_do(tiny_model_dir: Path) -> None:
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    packed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    linears = [m for m in packed.model.modules() if type(m) is torch.nn.Linear]  # the decoder's, not the LM head
    before = sum(p.numel() for p in packed.parameters())

    count = pack_linear_weights(packed, CPU)

    if not packing_available(torch.bfloat16, CPU):  # no oneDNN bfloat16 on this CPU: nothing changes
        assert count == 0 and sum(p.numel() for p in packed.parameters()) == before
        return
    assert count == len(linears) == 7 * packed.config.num_hidden_layers  # q, k, v, o, gate, up, down
    assert all(m.weight.numel() == 0 and m.weight.dtype == torch.bfloat16 for m in linears)  # no second copy
    assert packed.lm_head.weight.shape == plain.lm_head.weight.shape  # output embeddings keep their layout
    assert packed.dtype == torch.bfloat16 and packed.device.type == "cpu"
    prompt = [5, 17, 99, 3, 250, 41, 8]
    want_tokens, want_logits = _greedy(plain, prompt, 12)
    got_tokens, got_logits = _greedy(packed, prompt, 12)
    assert got_tokens == want_tokens
    assert torch.allclose(got_logits, want_logits, atol=2e-2, rtol=0), (got_logits - want_logits).abs().max()


def test_float32_weights_stay_plain(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert pack_linear_weights(model, CPU) == 0
    assert all(m.weight.numel() > 0 for m in model.modules() if type(m) is torch.nn.Linear)
