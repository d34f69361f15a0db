"""The matmul attention kernel computes what SDPA computes (grouped heads, per-row causal and sliding-window
masks, padding queries), and the choice between the two: asked for, fixed in float32, timed otherwise."""

from __future__ import annotations

import pytest
import torch

from llmstack.services.engines.hf.kernels import (
    SDPA_ONLY,
    HeadShape,
    Kernel,
    choose,
    fits_matmul,
    matmul_attention,
)


def _mask(lengths: list[int], queries: int, window: int | None) -> torch.Tensor:
    """(rows, 1, queries, keys): row r's queries sit at its last positions, right-aligned, the first
    `queries - new` of a short row are padding (they see key 0 only, as `masks` builds them)."""
    keys = max(lengths)
    mask = torch.zeros(len(lengths), 1, queries, keys, dtype=torch.bool)
    for r, length in enumerate(lengths):
        new = min(queries, length)
        for q in range(queries):
            if q < queries - new:
                mask[r, 0, q, 0] = True
                continue
            pos = length - queries + q
            lo = 0 if window is None else max(0, pos - window + 1)
            mask[r, 0, q, lo : pos + 1] = True
    return mask


def _inputs(rows: int, heads: int, kv_heads: int, queries: int, keys: int, dim: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(rows, heads, queries, dim, generator=gen).to(dtype)
    k = torch.randn(rows, kv_heads, keys, dim, generator=gen).to(dtype)
    v = torch.randn(rows, kv_heads, keys, dim, generator=gen).to(dtype)
    return q, k, v


def _sdpa(q, k, v, mask, scale):
    gqa = q.shape[1] != k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


CASES = [  # rows, query heads, kv heads, queries, lengths, head dim, window
    pytest.param(3, 12, 12, 1, [40, 17, 33], 64, None, id="decode"),
    pytest.param(3, 4, 1, 1, [600, 90, 301], 256, 512, id="decode-gqa-window"),
    pytest.param(2, 8, 2, 24, [70, 10], 32, None, id="prefill-gqa-padding"),
    pytest.param(2, 4, 1, 16, [64, 40], 64, 8, id="prefill-window"),
]


@pytest.mark.parametrize(("rows", "heads", "kv_heads", "queries", "lengths", "dim", "window"), CASES)
def test_matmul_attention_equals_sdpa(rows, heads, kv_heads, queries, lengths, dim, window) -> None:
    mask = _mask(lengths, queries, window)
    scale = dim**-0.5
    q, k, v = _inputs(rows, heads, kv_heads, queries, max(lengths), dim, torch.float32)
    want = _sdpa(q, k, v, mask, scale)
    got = matmul_attention(q, k, v, mask, scale)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # as the slot cache hands them over: views of slabs with more columns than the rows use
    slab_k, slab_v = (
        torch.zeros(rows + 1, kv_heads, k.shape[2] + 7, dim),
        torch.zeros(rows + 1, kv_heads, k.shape[2] + 7, dim),
    )
    slab_k[:rows, :, : k.shape[2]], slab_v[:rows, :, : k.shape[2]] = k, v
    strided = matmul_attention(q, slab_k[:rows, :, : k.shape[2]], slab_v[:rows, :, : k.shape[2]], mask, scale)
    torch.testing.assert_close(strided, want, rtol=1e-5, atol=1e-5)
    # bfloat16: as close to the float32 result as bfloat16 allows (a few times SDPA's own rounding)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    sdpa_error = (_sdpa(qb, kb, vb, mask, scale).float() - want).abs().max().item()
    matmul_error = (matmul_attention(qb, kb, vb, mask, scale).float() - want).abs().max().item()
    assert matmul_error <= max(4 * sdpa_error, 0.02), (matmul_error, sdpa_error)


def test_matmul_attention_without_a_mask_is_full_attention() -> None:
    q, k, v = _inputs(2, 4, 2, 1, 9, 16, torch.float32)
    torch.testing.assert_close(matmul_attention(q, k, v, None, 0.25), _sdpa(q, k, v, None, 0.25))


def test_long_prefill_chunks_do_not_hold_their_scores() -> None:
    q = torch.empty(1, 16, 512, 64)
    assert fits_matmul(q, torch.empty(1, 4, 512, 64))
    assert not fits_matmul(q, torch.empty(1, 4, 8192, 64))  # 67M scores: SDPA, which never holds them


SHAPE = HeadShape(query_heads=4, kv_heads=1, key_dim=64, value_dim=64)
CPU = torch.device("cpu")


def test_an_asked_kernel_is_used_for_both_phases() -> None:
    for kernel in (Kernel.SDPA, Kernel.MATMUL):
        chosen = choose(SHAPE, torch.bfloat16, CPU, kernel)
        assert (chosen.decode, chosen.prefill) == (kernel, kernel)
        assert chosen.for_queries(1) == chosen.for_queries(7) == kernel
        assert "--attention-kernel" in chosen.describe()


def test_float32_keeps_sdpa_without_timing() -> None:
    chosen = choose(SHAPE, torch.float32, CPU)
    assert (chosen.decode, chosen.prefill) == (Kernel.SDPA, Kernel.SDPA)
    assert "timed" not in chosen.why and SDPA_ONLY.describe() == "decode sdpa, prefill sdpa"


def test_bfloat16_on_a_cpu_is_timed_and_says_so() -> None:
    chosen = choose(SHAPE, torch.bfloat16, CPU)
    assert chosen.decode in (Kernel.SDPA, Kernel.MATMUL) and chosen.prefill in (Kernel.SDPA, Kernel.MATMUL)
    assert chosen.why.startswith("timed at load") and chosen.why in chosen.describe()
    assert chosen.why.count("SDPA ") == 2 and chosen.why.count("matmul ") == 2  # both phases, both kernels
