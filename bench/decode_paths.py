"""How to batch generation in the transformers engine: the candidates, measured in one process.

    python bench/decode_paths.py [--sequences 16] [--tokens 32] [--quick] [--skip-generate-batch]

Generates `--tokens` greedy tokens for each of `--sequences` prompts of different lengths with:

- sequential: one sequence at a time, the model's own DynamicCache (batch size 1);
- dynamic-cache batch: one left-padded batch, transformers' DynamicCache (a decode step
  concatenates, i.e. copies, the whole cache of every layer);
- slot batch: llmstack's `slots.SlotKV` (all prompts prefilled in one forward, each row at its own
  positions; decode steps write in place into preallocated slabs, 4-D masks from the rows' positions);
- generate_batch: transformers' own continuous batching (`model.generate_batch`).

Prints tokens/s for each, and whether each batched path's tokens equal the sequential ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.model import FULL, QUICK, build_model  # noqa: E402
from llmstack.services.engines.hf.attention import planned_forward  # noqa: E402
from llmstack.services.engines.hf.probe import Batchable, probe  # noqa: E402
from llmstack.services.engines.hf.slots import SlotKV  # noqa: E402


def sequential(model: torch.nn.Module, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    outs = []
    for ids in prompts:
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        got = [int(out.logits[0, -1].argmax())]
        for _ in range(tokens - 1):
            out = model(input_ids=torch.tensor([[got[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            got.append(int(out.logits[0, -1].argmax()))
        outs.append(got)
    return outs


def dynamic_batch(model: torch.nn.Module, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    got = [[int(t)] for t in out.logits[:, -1].argmax(-1)]
    lengths = torch.tensor([len(p) for p in prompts])
    for step in range(tokens - 1):
        mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=mask.dtype)], dim=1)
        out = model(
            input_ids=torch.tensor([[g[-1]] for g in got]),
            attention_mask=mask,
            position_ids=(lengths + step).unsqueeze(1),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        for g, t in zip(got, out.logits[:, -1].argmax(-1).tolist(), strict=True):
            g.append(int(t))
    return got


_PROBED: dict[int, Batchable | str] = {}


def slot_batch(model: torch.nn.Module, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    if id(model) not in _PROBED:  # once (the warm-up call): it also switches the model to the slot attention
        _PROBED[id(model)] = probe(model, torch.device("cpu"))
    how = _PROBED[id(model)]
    if isinstance(how, str):
        raise RuntimeError(f"the slot batch cannot run this model: {how}")
    assert not isinstance(how, str)
    window = (how.layout.window or 0) + max(len(p) for p in prompts) + tokens
    kv = SlotKV(how.layout, how.specs, how.dtype, torch.device("cpu"), window_columns=window, rows=len(prompts))
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    pos = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        kv.add_row()
        ids[i, width - len(p) :] = torch.tensor(p)
        pos[i, width - len(p) :] = torch.arange(len(p))
    out = planned_forward(model, kv, ids, pos, [len(p) for p in prompts], logits_to_keep=1)
    got = [[int(t)] for t in out.logits[:, -1].argmax(-1)]
    for _ in range(tokens - 1):
        step = torch.tensor([[g[-1]] for g in got])
        out = planned_forward(model, kv, step, torch.tensor([[n] for n in kv.lengths]), [1] * len(prompts))
        for g, t in zip(got, out.logits[:, -1].argmax(-1).tolist(), strict=True):
            g.append(int(t))
    return got


def generate_batch(model: torch.nn.Module, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    results = model.generate_batch(prompts, generation_config=config)
    ordered = sorted(results.values(), key=lambda r: int(str(r.request_id).split("_")[-1]))
    return [list(r.generated_tokens) for r in ordered]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-generate-batch", action="store_true")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    model_dir = build_model(REPO / "bench" / "results" / "models", QUICK if args.quick else FULL)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 1000, (8 + (7 * i) % 40,), generator=gen).tolist() for i in range(args.sequences)]
    paths: list[tuple[str, Callable[..., list[list[int]]]]] = [
        ("sequential", sequential),
        ("dynamic-cache batch", dynamic_batch),
        ("slot batch (llmstack)", slot_batch),
    ]
    if not args.skip_generate_batch:
        paths.append(("generate_batch", generate_batch))
    threads = torch.get_num_threads()
    print(f"{model_dir.name}: {args.sequences} sequences x {args.tokens} greedy tokens, {threads} threads")
    reference: list[list[int]] | None = None
    for name, fn in paths:
        # generate_batch updates its own tensors in place, which inference mode forbids
        with torch.no_grad() if fn is generate_batch else torch.inference_mode():
            fn(model, prompts[:2], 2)  # warm up
            started = time.perf_counter()
            outs = fn(model, prompts, args.tokens)
            elapsed = time.perf_counter() - started
        reference = reference or outs
        same = sum(a == b for a, b in zip(outs, reference, strict=True))
        rate = args.sequences * args.tokens / elapsed
        print(f"  {name:24s} {elapsed:7.2f} s {rate:8.1f} tok/s   equal to sequential: {same}/{len(outs)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
