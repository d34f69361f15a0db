"""The LM head at decode sizes on a CPU: vocabulary-major products instead of `F.linear`.

A decode step multiplies a few hidden rows by the whole (vocabulary x hidden) head, and that product is the
largest single cost of a small model's step (Gemma 3 270M: a 262144 x 640 head, 335 MB in bfloat16).  For the
same weight torch's CPU kernels are faster the other way round: measured on a 2-core AMX host, medians of 10
rounds interleaved, bfloat16, against `F.linear`: one row as `torch.mv(W, x)` 0.61 of the time; 8 rows as
`W @ X.T` then a transposing copy into float32 logits 0.83, 16 rows 0.79, 32 rows 0.88, 64 rows 0.90; float32
weights at 8 rows 0.74 (one row: the same time).  In bfloat16 the logits are `F.linear`'s bit for bit up to
32 rows, and each row's are the same whatever the batch (`F.linear`'s are not above 32 rows: greedy batched ==
solo needs this); in float32 they are within rounding (4e-6) of `F.linear`'s, which itself differs that much
between batch sizes.  Above `MAX_ROWS` (a prompt's logits for prompt logprobs) the head runs as before.

Which way is faster depends on the CPU: on an AMD EPYC (AVX512-BF16, no AMX) one bfloat16 row took 27.9 ms
as `torch.mv` against 17.4 ms with `F.linear`, and 4 rows 29.3 ms as `W @ X.T` against 20.5 ms.  So in
bfloat16 the engine times both at load, for one row and for 8, and keeps the faster (`plan_head`); the two
give the same bits up to 32 rows, so the choice changes no logits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmstack.services.engines.hf.kernels import fastest_seconds

MAX_ROWS = 64  # measured up to 64; beyond, the plain linear and the model's dtype


@dataclass(frozen=True)
class HeadPlan:
    """Which product each decode size uses: vocabulary-major (True) or `F.linear`."""

    one_row: bool = True  # torch.mv(W, x)
    many_rows: bool = True  # W @ X.T, up to MAX_ROWS rows
    why: str = "vocabulary-major products at decode sizes"

    def describe(self) -> str:
        ways = {True: "vocabulary-major", False: "F.linear"}
        return f"1 row {ways[self.one_row]}, 2-{MAX_ROWS} rows {ways[self.many_rows]} ({self.why})"


VOCABULARY_MAJOR = HeadPlan()


def _forward(weight: torch.Tensor, x: torch.Tensor, plan: HeadPlan = VOCABULARY_MAJOR) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows > MAX_ROWS or rows == 0:
        return F.linear(x, weight)
    flat = x.reshape(rows, x.shape[-1])
    if not (plan.one_row if rows == 1 else plan.many_rows):
        logits = F.linear(flat, weight).float()
    elif rows == 1:
        logits = torch.mv(weight, flat[0]).float().unsqueeze(0)
    else:  # float32: a transposing copy into it is 3x faster than into bfloat16, and exact
        logits = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=x.device)
        logits.copy_((weight @ flat.t()).t())
    return logits.view(*x.shape[:-1], weight.shape[0])


def plan_head(weight: torch.Tensor) -> HeadPlan:
    """In bfloat16, the faster product for 1 row and for 8 rows, timed here on the head itself; float32
    keeps the vocabulary-major products (measured: as fast or faster, and greedy output is compared token
    for token in float32)."""
    if weight.dtype != torch.bfloat16:
        return VOCABULARY_MAJOR
    picks, notes = [], []
    with torch.inference_mode():
        for rows in (1, 8):
            x = torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
            major, linear = fastest_seconds(
                [lambda x=x: _forward(weight, x), lambda x=x: _forward(weight, x, HeadPlan(False, False))], runs=3
            )
            picks.append(major <= linear)
            notes.append(f"{rows} row{'s' if rows > 1 else ''} {major * 1e3:.1f} vs {linear * 1e3:.1f} ms")
    return HeadPlan(picks[0], picks[1], "timed at load, vocabulary-major vs F.linear: " + ", ".join(notes))


def vocabulary_major_head(model: Any) -> HeadPlan | None:
    """Route the model's LM head through `_forward` when it is a plain CPU `nn.Linear` without bias in
    float32 or bfloat16 (a tied head stays tied: the function reads the same weight), with the products
    `plan_head` picks; the plan, or None where the head was left alone."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    weight = head.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) or weight.dim() != 2:
        return None
    plan = plan_head(weight)
    head.forward = functools.partial(_module_forward, head, plan)
    return plan


def _module_forward(head: torch.nn.Linear, plan: HeadPlan, x: torch.Tensor) -> torch.Tensor:
    return _forward(head.weight, x, plan)  # the weight read at each call: re-tying or moving it stays seen
