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
as `torch.mv` against 17.4 ms with `F.linear`, and 4 rows 29.3 ms as `W @ X.T` against 20.5 ms.  So the
engine times both at load, for one row and for 8, and keeps the faster (`plan_head`); in bfloat16 the two
give the same bits up to 32 rows, so the choice changes no logits.  A third candidate is a copy of the head
reordered for oneDNN (as `packing` does for the other linears: 9.9 ms a bfloat16 row on the EPYC, 34 GB/s;
on a 2-core AVX2 host, float32, 22 ms a row against 46 with `torch.mv`, which runs on one core, and 35
against 59 ms at 8 rows), kept only when it is clearly the fastest and the copy is not too large
(`PACKED_COPY_LIMIT`: it doubles the head's memory, the input embedding still needing the plain weight);
its logits match `F.linear`'s within rounding, and a row's are the same whatever the batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llmstack.services.engines.hf.kernels import fastest_seconds
from llmstack.services.engines.hf.packing import packed_linear, packed_weight, packing_available

MAX_ROWS = 64  # measured up to 64; beyond, the plain linear and the model's dtype
PACKED_COPY_LIMIT = 1024 * 1024 * 1024  # bytes of head a packed copy may add (Gemma 3's in float32: 640 MiB)
# oneDNN's bfloat16 products (F.linear, the packed copy) give a row the bits torch.mv gives it up to 32 rows,
# not above (measured on AMX: 33 rows differ by 2**-8): larger decode batches take the vocabulary-major product,
# so a row's greedy token never depends on how many rows share its step
ONEDNN_ROW_CONSISTENT_ROWS = 32
_PACKED_FASTER_BY = 0.85  # the packed copy is kept only below this fraction of the best plain product's time


@dataclass(frozen=True)
class HeadPlan:
    """Which product each decode size uses: vocabulary-major (True) or `F.linear`."""

    one_row: bool = True  # torch.mv(W, x)
    many_rows: bool = True  # W @ X.T, up to MAX_ROWS rows
    why: str = "vocabulary-major products at decode sizes"
    packed: torch.Tensor | None = field(default=None, compare=False)  # oneDNN copy: used for every decode size

    def describe(self) -> str:
        if self.packed is not None:  # an opaque oneDNN tensor: its size is the plain head's
            extra = self.packed.numel() * self.packed.element_size() / 2**20
            return f"a packed copy of the head for oneDNN, about {extra:.0f} MiB more ({self.why})"
        ways = {True: "vocabulary-major", False: "F.linear"}
        return f"1 row {ways[self.one_row]}, 2-{MAX_ROWS} rows {ways[self.many_rows]} ({self.why})"


VOCABULARY_MAJOR = HeadPlan()


def _forward(weight: torch.Tensor, x: torch.Tensor, plan: HeadPlan = VOCABULARY_MAJOR) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows > MAX_ROWS or rows == 0:
        return F.linear(x, weight)
    flat = x.reshape(rows, x.shape[-1])
    onednn = rows <= ONEDNN_ROW_CONSISTENT_ROWS
    if onednn and plan.packed is not None:
        logits = packed_linear(plan.packed, None, flat).float()
    elif onednn and not (plan.one_row if rows == 1 else plan.many_rows):
        logits = F.linear(flat, weight).float()
    elif rows == 1:
        logits = torch.mv(weight, flat[0]).float().unsqueeze(0)
    else:  # float32: a transposing copy into it is 3x faster than into bfloat16, and exact
        logits = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=x.device)
        logits.copy_((weight @ flat.t()).t())
    return logits.view(*x.shape[:-1], weight.shape[0])


def plan_head(weight: torch.Tensor) -> HeadPlan:
    """The faster product for 1 row and for 8 rows, timed here on the head itself (and a packed copy, where
    `packing` works and the copy is not too large)."""
    packed = _packed_copy(weight)
    picks, notes, plain_best, packed_best = [], [], 0.0, 0.0
    with torch.inference_mode():
        for rows in (1, 8):
            x = torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
            ways = [lambda x=x: _forward(weight, x), lambda x=x: _forward(weight, x, HeadPlan(False, False))]
            if packed is not None:
                ways.append(lambda x=x: _forward(weight, x, HeadPlan(packed=packed)))
            major, linear, *rest = fastest_seconds(ways, runs=3)
            picks.append(major <= linear)
            plain_best, packed_best = plain_best + min(major, linear), packed_best + (rest[0] if rest else 0.0)
            extra = f", packed {rest[0] * 1e3:.1f}" if rest else ""
            notes.append(f"{rows} row{'s' if rows > 1 else ''} {major * 1e3:.1f} vs {linear * 1e3:.1f}{extra} ms")
    why = "timed at load, vocabulary-major vs F.linear: " + ", ".join(notes)
    if packed is not None and packed_best <= _PACKED_FASTER_BY * plain_best:
        return HeadPlan(False, False, why, packed)
    return HeadPlan(picks[0], picks[1], why)


def _packed_copy(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.numel() * weight.element_size() > PACKED_COPY_LIMIT or not packing_available(weight.dtype, weight.device):
        return None
    try:
        return packed_weight(weight)
    except RuntimeError:  # an oneDNN that cannot reorder this shape: the plain products
        return None


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
