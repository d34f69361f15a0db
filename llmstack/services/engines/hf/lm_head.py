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
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

MAX_ROWS = 64  # measured up to 64; beyond, the plain linear and the model's dtype


def _forward(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows > MAX_ROWS or rows == 0:
        return F.linear(x, weight)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        logits = torch.mv(weight, flat[0]).float().unsqueeze(0)
    else:  # float32: a transposing copy into it is 3x faster than into bfloat16, and exact
        logits = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=x.device)
        logits.copy_((weight @ flat.t()).t())
    return logits.view(*x.shape[:-1], weight.shape[0])


def vocabulary_major_head(model: Any) -> bool:
    """Route the model's LM head through `_forward` when it is a plain CPU `nn.Linear` without bias in
    float32 or bfloat16 (a tied head stays tied: the function reads the same weight); whether it did."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return False
    weight = head.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) or weight.dim() != 2:
        return False
    head.forward = functools.partial(_module_forward, head)
    return True


def _module_forward(head: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _forward(head.weight, x)  # the weight read at each call: re-tying or moving it stays seen
