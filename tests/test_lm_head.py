"""The LM head at decode sizes (`engines/hf/lm_head.py`): `F.linear`'s logits for every row count a decode
step uses, on Gemma 3's head shape and through a whole model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmstack.services.engines.hf import lm_head
from llmstack.services.engines.hf.packing import pack_linear_weights, packing_available

PLANS = [lm_head.VOCABULARY_MAJOR, lm_head.HeadPlan(False, True), lm_head.HeadPlan(True, False)]


@pytest.mark.parametrize("plan", PLANS, ids=["vocabulary-major", "linear-one-row", "linear-many-rows"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemma_sized_head_gives_linears_logits(dtype: torch.dtype, plan: lm_head.HeadPlan) -> None:
    """bfloat16: each row's logits are the same bits whatever the batch (what greedy batched == solo needs;
    `F.linear`'s are not above 32 rows) and `F.linear`'s up to 32 rows, whichever products the plan
    picks (the choice timed at load changes no logits); float32: within rounding of them."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(262144, 640, generator=gen) * 0.05).to(dtype)  # Gemma 3's tied head
    hidden = torch.randn(lm_head.MAX_ROWS + 1, 640, generator=gen).to(dtype)
    solo = [lm_head._forward(weight, hidden[i : i + 1].unsqueeze(1), plan)[0] for i in range(3)]
    for rows in (1, 2, 5, 8, 16, 32, 33, lm_head.MAX_ROWS):
        x = hidden[:rows].unsqueeze(1)  # (rows, 1, hidden), as a decode step hands it over
        got = lm_head._forward(weight, x, plan)
        assert got.shape == (rows, 1, 262144) and got.is_contiguous() and got.dtype == torch.float32
        plain = F.linear(x, weight).float()
        if dtype == torch.bfloat16:
            assert all(torch.equal(got[i], solo[i]) for i in range(min(rows, 3))), rows
            assert torch.equal(got, plain) if rows <= 32 else torch.allclose(got, plain, rtol=2**-7, atol=2**-8)
        else:
            assert torch.allclose(got, plain, rtol=1e-5, atol=1e-5), (rows, (got - plain).abs().max())
    above = lm_head._forward(weight, hidden.unsqueeze(1))  # a prompt's logits: the plain linear, model dtype
    assert above.dtype == dtype and torch.equal(above, F.linear(hidden.unsqueeze(1), weight))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_packed_copy_of_the_head_gives_linears_logits(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(262144, 640, generator=gen) * 0.05).to(dtype)
    too_large = lm_head.PACKED_COPY_LIMIT // dtype.itemsize // 2 + 1
    assert lm_head._packed_copy(torch.empty(too_large, 2, dtype=dtype)) is None
    packed = lm_head._packed_copy(weight)
    if not packing_available(dtype, torch.device("cpu")):  # an AVX2-only CPU: oneDNN has no bf16
        assert dtype == torch.bfloat16
        assert packed is None and lm_head.plan_head(weight).packed is None
        return
    assert packed is not None  # 320 MiB in bfloat16, 640 in float32: within the limit
    plan = lm_head.HeadPlan(packed=packed)
    assert "packed copy of the head for oneDNN" in plan.describe()
    first = torch.randn(1, 1, 640, generator=gen).to(dtype)
    solo = lm_head._forward(weight, first, plan)[0]
    tolerance = 2**-7 if dtype == torch.bfloat16 else 1e-5
    for rows in (1, 8, 32, 33):
        x = torch.cat([first, torch.randn(rows - 1, 1, 640, generator=gen).to(dtype)])
        got = lm_head._forward(weight, x, plan)
        assert got.shape == (rows, 1, 262144) and got.dtype == torch.float32
        if dtype == torch.bfloat16 or rows <= lm_head.ONEDNN_ROW_CONSISTENT_ROWS:  # float32 above: W @ X.T's rounding
            assert torch.equal(got[0], solo), rows  # a row's logits do not depend on the batch
        torch.testing.assert_close(got, F.linear(x, weight).float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_heads_are_timed_at_load(dtype: torch.dtype) -> None:
    weight = torch.randn(4096, 64).to(dtype)
    plan = lm_head.plan_head(weight)
    assert "timed at load" in plan.describe() and "1 row " in plan.why and "8 rows " in plan.why
    if packing_available(dtype, torch.device("cpu")):
        assert "packed" in plan.why  # the packed copy was a candidate


def _generate(model: torch.nn.Module, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens of each prompt alone, and the last step's logits of the first."""
    outs, last = [], torch.empty(0)
    with torch.inference_mode():
        for prompt in prompts:
            out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
            tokens = [int(out.logits[0, -1].argmax())]
            for _ in range(steps - 1):
                out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values)
                tokens.append(int(out.logits[0, -1].argmax()))
            outs.append(tokens)
            last = out.logits[0, -1].float() if not len(last) else last
    return outs, last


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_model_with_the_head_routed_generates_what_it_did(tiny_model_dir: Path, dtype: torch.dtype) -> None:
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    routed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    pack_linear_weights(routed, torch.device("cpu"), timed=False)  # as the engine loads it: packing, then the head
    pack_linear_weights(plain, torch.device("cpu"), timed=False)
    assert lm_head.vocabulary_major_head(routed)
    prompts = [[5, 17, 99, 3, 250, 41, 8], [7, 7, 300, 12]]
    want, want_last = _generate(plain, prompts, 10)
    got, got_last = _generate(routed, prompts, 10)
    assert got == want
    if dtype == torch.bfloat16:  # the same bits; float32: whichever product was timed fastest, within rounding
        assert torch.equal(got_last, want_last)
    else:
        assert torch.allclose(got_last, want_last, rtol=1e-5, atol=1e-5), (got_last - want_last).abs().max()


def test_heads_it_cannot_take_are_left_alone(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16).eval()
    assert not lm_head.vocabulary_major_head(model)  # float16 on a CPU: not measured, not routed
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    head = model.get_output_embeddings()
    model.set_output_embeddings(torch.nn.Linear(head.in_features, head.out_features, bias=True))
    assert not lm_head.vocabulary_major_head(model)
    assert "forward" not in vars(model.get_output_embeddings())
