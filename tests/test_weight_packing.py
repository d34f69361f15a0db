"""bfloat16 and float32 linear weights packed once for oneDNN (`engines/hf/packing.py`): the model computes what it computed
with plain weights, the plain copies are gone, and the embeddings keep their layout."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_linears_compute_what_plain_ones_do(tiny_model_dir: Path, dtype: torch.dtype) -> None:
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    packed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    linears = [m for m in packed.model.modules() if type(m) is torch.nn.Linear]  # the decoder's, not the LM head
    before = sum(p.numel() for p in packed.parameters())

    count = pack_linear_weights(packed, CPU, timed=False)  # float32: packed whether or not it pays here

    if not packing_available(dtype, CPU):  # no oneDNN bfloat16 on this CPU: nothing changes
        assert dtype == torch.bfloat16
        assert count == 0 and sum(p.numel() for p in packed.parameters()) == before
        return
    assert count == len(linears) == 7 * packed.config.num_hidden_layers  # q, k, v, o, gate, up, down
    assert all(m.weight.numel() == 0 and m.weight.dtype == dtype for m in linears)  # no second copy
    assert packed.lm_head.weight.shape == plain.lm_head.weight.shape  # output embeddings keep their layout
    assert packed.dtype == dtype and packed.device.type == "cpu"
    prompt = [5, 17, 99, 3, 250, 41, 8]
    want_tokens, want_logits = _greedy(plain, prompt, 12)
    got_tokens, got_logits = _greedy(packed, prompt, 12)
    assert got_tokens == want_tokens
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert torch.allclose(got_logits, want_logits, atol=atol, rtol=0), (got_logits - want_logits).abs().max()


def test_a_packed_float32_row_is_the_same_whatever_the_batch() -> None:
    """What greedy batched == solo needs of the decoder's products (MKL's `F.linear` does not give it)."""
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(640, 2048, bias=False)
    model = torch.nn.Sequential(layer)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(2048, 640, generator=gen) * 0.05)
    weight = layer.weight.detach().clone()
    assert pack_linear_weights(model, CPU, timed=False) == 1
    x = torch.randn(40, 640, generator=gen)
    with torch.inference_mode():
        solo = layer(x[:1])
        for rows in (2, 8, 16, 33, 40):
            got = layer(x[:rows])
            assert torch.equal(got[0], solo[0]), rows
        assert torch.allclose(layer(x), x @ weight.t(), atol=1e-4, rtol=0)


def test_float32_packing_is_timed_at_load(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    linears = [m for m in model.model.modules() if type(m) is torch.nn.Linear]
    with caplog.at_level(logging.INFO, logger="llmstack.engine.hf"):
        count = pack_linear_weights(model, CPU)
    said = [r.getMessage() for r in caplog.records if "float32 linear weights" in r.getMessage()]
    assert len(said) == 1 and "timed at load on" in said[0] and "1 row " in said[0] and "8 rows " in said[0]
    if "packed for oneDNN" in said[0].split("(")[0]:
        assert count == len(linears) and all(m.weight.numel() == 0 for m in linears)
    else:
        assert "left plain" in said[0] and count == 0 and all(m.weight.numel() > 0 for m in linears)
