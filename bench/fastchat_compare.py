"""llmstack against FastChat 0.2.36, side by side on the same model and the same machine.

    python bench/fastchat_compare.py            # full run: ~72M-parameter Llama, >= 200 latency requests
    python bench/fastchat_compare.py --quick    # CI smoke run: tiny model, few requests, no timing asserts
    python bench/fastchat_compare.py --only latency    # one measurement (latency, streaming, throughput)

Both stacks run as their real processes (controller, worker, OpenAI API server) and stay up for the
whole run; each measurement runs on one stack, then on the other, alternating (the order flips from
one measurement to the next) so that a noisy neighbour hurts both alike.  Measurements:

1. stack overhead: latency of a 1-token chat completion, one request at a time (median, p99), and in
   the same run the bare model time of that request (its prompt through the same model in this
   process: one prefill and one sampled token), so that stack overhead = latency - bare model time;
2. streaming: delivered tokens/s and time to first token with 1, 8, 32 and 64 concurrent streams;
3. throughput: aggregate generated tokens/s of non-streamed requests at 1, 4, 16 and 32 at once, and
   the worker's peak resident memory.

Prints a table, writes `bench/results/fastchat_compare[-quick].{json,png}`.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the checkout importable
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench.model import FULL, QUICK, build_model, parameters  # noqa: E402
from bench.stacks import (  # noqa: E402
    MODEL_NAME,
    RssSampler,
    Stack,
    ensure_fastchat,
    start_fastchat,
    start_llmstack,
)

STACKS = ("llmstack", "fastchat")
SYSTEM = "You are a helpful assistant."  # FastChat's ChatML template has it: both stacks get the same prompt


@dataclass(frozen=True)
class Plan:
    latency_requests: int
    latency_block: int  # requests per stack before switching to the other
    stream_levels: tuple[int, ...]
    throughput_levels: tuple[int, ...]
    max_tokens: int
    concurrency_limit: int  # both workers' --limit-worker-concurrency
    max_batch_size: int  # llmstack's --max-batch-size


FULL_PLAN = Plan(200, 25, (1, 8, 32, 64), (1, 4, 16, 32), 128, 64, 64)
QUICK_PLAN = Plan(20, 5, (1, 4), (1, 4), 16, 8, 8)


@dataclass
class Reply:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    finish: str | None = None
    error: str = ""


@dataclass
class Results:
    mode: str
    model: dict[str, Any]
    plan: dict[str, Any]
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    bare_model: dict[str, float] = field(default_factory=dict)  # the 1-token request's model compute alone
    streaming: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    throughput: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


# -- one request ----------------------------------------------------------------------------------------
def _body(i: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Request {i}: tell me a long story about the scheduler."},
        ],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "stream": stream,
    }


def _tokens(finish: str | None, reported: int, max_tokens: int) -> int:
    """Tokens generated.  A generation that ended on its length limit made exactly `max_tokens`
    (FastChat 0.2.36 reports one fewer: its count is the 0-based index of the last step, and it puts
    no usage in streams); otherwise trust the reported count."""
    return max_tokens if finish == "length" else reported


async def complete(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> Reply:
    started = time.perf_counter()
    try:
        resp = await client.post(f"{url}/chat/completions", json=_body(i, max_tokens, False))
        elapsed = time.perf_counter() - started
        if resp.status_code != 200:
            return Reply(False, elapsed, error=f"HTTP {resp.status_code}: {resp.text[:200]}")
        body = resp.json()
        finish = body["choices"][0]["finish_reason"]
        return Reply(
            True,
            elapsed,
            tokens=_tokens(finish, int(body["usage"]["completion_tokens"]), max_tokens),
            prompt_tokens=int(body["usage"]["prompt_tokens"]),
            finish=finish,
        )
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        return Reply(False, time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")


async def stream(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> Reply:
    """A streamed chat completion; TTFT is the first chunk carrying content (not the role-only one)."""
    started = time.perf_counter()
    reply = Reply(False)
    try:
        async with client.stream("POST", f"{url}/chat/completions", json=_body(i, max_tokens, True)) as resp:
            if resp.status_code != 200:
                reply.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return reply
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    reply.error = str(event["error"])[:200]
                    return reply
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content") and reply.ttft is None:
                        reply.ttft = time.perf_counter() - started
                    reply.finish = choice.get("finish_reason") or reply.finish
                usage = event.get("usage")
                if usage:
                    reply.tokens = int(usage["completion_tokens"])
    except (httpx.HTTPError, ValueError) as exc:
        reply.error = f"{type(exc).__name__}: {exc}"
        return reply
    reply.latency = time.perf_counter() - started
    reply.tokens = _tokens(reply.finish, reply.tokens, max_tokens)
    reply.ok = reply.finish is not None and reply.ttft is not None
    if not reply.ok and not reply.error:
        reply.error = f"stream ended without content or finish reason (finish={reply.finish})"
    return reply


# -- measurements -----------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def _check(replies: list[Reply], label: str, results: Results) -> list[Reply]:
    bad = [r for r in replies if not r.ok]
    for r in bad[:3]:
        results.errors.append(f"{label}: {r.error}")
    if bad:
        print(f"  ! {label}: {len(bad)} of {len(replies)} requests failed: {bad[0].error}", flush=True)
    return [r for r in replies if r.ok]


class BareModel:
    """The model compute of a 1-token request without any stack: the request's prompt token ids through
    the same model in this process (the same weights, dtype and torch build as llmstack's worker, on
    the same cores): one prefill into a fresh cache, then one token sampled from the last position's
    logits at the benchmark's temperature.  Every call runs on the calling thread (one OpenMP pool)."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.generator = torch.Generator().manual_seed(0)

    def prompt_ids(self, i: int) -> list[int]:
        """The token ids the stacks feed the model for request `i` (its chat template, as both render it)."""
        messages = _body(i, 1, False)["messages"]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def run(self, ids: list[int]) -> float:
        """Seconds for one prefill producing one token."""
        torch = self.torch
        with torch.inference_mode():
            started = time.perf_counter()
            input_ids = torch.tensor([ids])
            logits = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1).logits[0, -1]
            probs = torch.softmax(logits.float() / 0.7, dim=-1)
            int(torch.multinomial(probs, 1, generator=self.generator))
            return time.perf_counter() - started


async def measure_latency(stacks: dict[str, Stack], plan: Plan, results: Results, bare: BareModel | None) -> None:
    """Blocks of `latency_block` sequential requests per stack, and as many bare model runs, in an order
    that rotates from one block to the next."""
    samples: dict[str, list[float]] = {name: [] for name in stacks}
    bare_samples: list[float] = []
    prompt_tokens: dict[str, set[int]] = {name: set() for name in stacks}
    sources = [*stacks, "bare model"] if bare is not None else list(stacks)
    blocks = max(1, plan.latency_requests // plan.latency_block)
    expected_prompts = sorted({len(bare.prompt_ids(n)) for n in range(blocks * plan.latency_block)}) if bare else []
    if bare is not None:
        for n in range(5):  # warm up, as the stacks were
            bare.run(bare.prompt_ids(n))
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
        for b in range(blocks):
            order = sources[b % len(sources) :] + sources[: b % len(sources)]
            if b % 2:
                order.reverse()
            for name in order:
                for i in range(plan.latency_block):
                    n = b * plan.latency_block + i
                    if name == "bare model":
                        assert bare is not None
                        bare_samples.append(bare.run(bare.prompt_ids(n)))
                        continue
                    reply = await complete(client, stacks[name].api_url, n, 1)
                    good = _check([reply], f"{name} latency", results)
                    samples[name].extend(r.latency for r in good)
                    prompt_tokens[name].update(r.prompt_tokens for r in good)
                if name == "bare model":
                    await asyncio.sleep(0.05)  # let this process's OpenMP threads stop spinning
    bare_ms = 1000 * statistics.median(bare_samples) if bare_samples else None
    if bare_ms is not None:
        results.bare_model = {
            "runs": len(bare_samples),
            "median_ms": bare_ms,
            "p99_ms": 1000 * _pct(bare_samples, 0.99),
            "prompt_tokens_min": expected_prompts[0],
            "prompt_tokens_max": expected_prompts[-1],
        }
        tokens = f"{expected_prompts[0]}-{expected_prompts[-1]} prompt tokens"
        print(f"  bare model        median {bare_ms:8.1f} ms ({tokens})", flush=True)
    for name, values in samples.items():
        row: dict[str, float] = {
            "requests": len(values),
            "median_ms": 1000 * statistics.median(values) if values else float("nan"),
            "p99_ms": 1000 * _pct(values, 0.99),
        }
        if bare_ms is not None:  # the model's share is the same in both stacks: what is left is the stack's
            row["overhead_median_ms"] = row["median_ms"] - bare_ms
            row["overhead_p99_ms"] = row["p99_ms"] - bare_ms
        results.latency[name] = row
        reported = sorted(prompt_tokens[name])
        if name == "llmstack" and expected_prompts and reported and reported != expected_prompts:
            results.errors.append(f"llmstack's prompts have {reported} tokens, the bare model's {expected_prompts}")
        extra = f", overhead {row['overhead_median_ms']:6.1f} ms" if "overhead_median_ms" in row else ""
        print(f"  latency {name:9s} median {row['median_ms']:8.1f} ms{extra}", flush=True)


async def _burst(url: str, n: int, call: Callable[..., Awaitable[Reply]], max_tokens: int) -> tuple[list[Reply], float]:
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(timeout=1800, limits=limits, trust_env=False) as client:
        started = time.perf_counter()
        replies = await asyncio.gather(*(call(client, url, i, max_tokens) for i in range(n)))
        return list(replies), time.perf_counter() - started


async def measure_concurrency(
    stacks: dict[str, Stack], plan: Plan, results: Results, kind: str, rss: dict[str, RssSampler]
) -> None:
    levels = plan.stream_levels if kind == "streaming" else plan.throughput_levels
    call = stream if kind == "streaming" else complete
    table = results.streaming if kind == "streaming" else results.throughput
    for step, level in enumerate(levels):
        order = list(stacks) if step % 2 == 0 else list(reversed(stacks))
        for name in order:
            replies, wall = await _burst(stacks[name].api_url, level, call, plan.max_tokens)
            good = _check(replies, f"{name} {kind} x{level}", results)
            tokens = sum(r.tokens for r in good)
            row: dict[str, float] = {"requests": len(good), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}
            if kind == "streaming":
                ttfts = [r.ttft for r in good if r.ttft is not None]
                row["ttft_p50_ms"] = 1000 * _pct(ttfts, 0.5)
                row["ttft_p99_ms"] = 1000 * _pct(ttfts, 0.99)
            row["peak_rss_mb"] = rss[name].peak / 2**20
            table.setdefault(name, {})[str(level)] = row
            extra = f", TTFT p50 {row['ttft_p50_ms']:.0f} ms" if kind == "streaming" else ""
            print(f"  {kind} x{level:<3d} {name:9s} {row['tok_s']:8.1f} tok/s{extra}", flush=True)


async def warm_up(stacks: dict[str, Stack]) -> None:
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        for stack in stacks.values():
            for i in range(3):
                await complete(client, stack.api_url, i, 8)


MEASUREMENTS = ("latency", "streaming", "throughput")


async def run_all(
    stacks: dict[str, Stack], plan: Plan, results: Results, bare: BareModel | None, only: tuple[str, ...] = MEASUREMENTS
) -> None:
    rss = {name: RssSampler(stack.worker.popen.pid) for name, stack in stacks.items()}
    for sampler in rss.values():
        sampler.__enter__()
    try:
        await warm_up(stacks)
        if "latency" in only:
            print("1. stack overhead (1-token chat completions, and the bare model)", flush=True)
            await measure_latency(stacks, plan, results, bare)
        if "streaming" in only:
            print("2. streaming", flush=True)
            await measure_concurrency(stacks, plan, results, "streaming", rss)
        if "throughput" in only:
            print("3. throughput", flush=True)
            await measure_concurrency(stacks, plan, results, "throughput", rss)
    finally:
        for name, sampler in rss.items():
            sampler.__exit__()
            results.peak_rss_mb[name] = sampler.peak / 2**20


# -- report -------------------------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def targets(results: Results, plan: Plan) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the three ratio targets; only meaningful for the full plan."""
    out: list[tuple[str, str, bool]] = []
    lat = results.latency
    if "overhead_median_ms" in lat.get("fastchat", {}) and "overhead_median_ms" in lat.get("llmstack", {}):
        ours, theirs = lat["llmstack"]["overhead_median_ms"], lat["fastchat"]["overhead_median_ms"]
        r = _ratio(theirs, ours)
        out.append(
            (
                "stack overhead (median 1-token latency - bare model time) >= 5x lower",
                f"{ours:.1f} vs {theirs:.1f} ms, {r:.1f}x lower",
                r >= 5,
            )
        )
    level = "16" if "16" in results.throughput.get("llmstack", {}) else str(plan.throughput_levels[-1])
    thr = results.throughput
    if level in thr.get("fastchat", {}) and level in thr.get("llmstack", {}):
        r = _ratio(thr["llmstack"][level]["tok_s"], thr["fastchat"][level]["tok_s"])
        out.append((f"throughput at {level} concurrent >= 4x", f"{r:.1f}x", r >= 4))
    level = "32" if "32" in results.streaming.get("llmstack", {}) else str(plan.stream_levels[-1])
    st = results.streaming
    if level in st.get("fastchat", {}) and level in st.get("llmstack", {}):
        ours, theirs = st["llmstack"][level]["ttft_p50_ms"], st["fastchat"][level]["ttft_p50_ms"]
        out.append(
            (f"streaming TTFT p50 at {level} streams <= FastChat's", f"{ours:.0f} vs {theirs:.0f} ms", ours <= theirs)
        )
    return out


def render_table(results: Results, plan: Plan) -> str:
    names = [n for n in STACKS if n in results.latency or n in results.throughput or n in results.streaming]
    lines: list[str] = []
    model = results.model
    lines.append(
        f"model: {model['name']} ({model['parameters'] / 1e6:.1f}M parameters, context 2048), "
        f"{plan.max_tokens} tokens per generation, temperature 0.7; mode: {results.mode}"
    )
    head = f"{'measurement':44s}" + "".join(f"{n:>14s}" for n in names) + (f"{'ratio':>10s}" if len(names) == 2 else "")
    lines += [head, "-" * len(head)]

    def row(label: str, values: list[float], fmt: str, better_low: bool) -> None:
        cells = "".join(f"{format(v, fmt):>14s}" for v in values)
        ratio = ""
        if len(values) == 2 and values[0] and values[1]:
            r = values[1] / values[0] if better_low else values[0] / values[1]
            ratio = f"{r:>9.1f}x"
        lines.append(f"{label:44s}{cells}{ratio}")

    if names and all(n in results.latency for n in names):
        row("1. 1-token latency median (ms)", [results.latency[n]["median_ms"] for n in names], ".1f", True)
        row("   1-token latency p99 (ms)", [results.latency[n]["p99_ms"] for n in names], ".1f", True)
    bare = results.bare_model
    if bare and all("overhead_median_ms" in results.latency.get(n, {}) for n in names):
        lines.append(
            f"{'   bare model time, median (ms)':44s}{bare['median_ms']:>14.1f}  (same for both: the prompt's "
            f"{bare['prompt_tokens_min']}-{bare['prompt_tokens_max']} tokens, 1 prefill + 1 sample, in-process)"
        )
        row("   stack overhead median (ms)", [results.latency[n]["overhead_median_ms"] for n in names], ".1f", True)
        row("   stack overhead p99 (ms)", [results.latency[n]["overhead_p99_ms"] for n in names], ".1f", True)
    for level in plan.stream_levels:
        key = str(level)
        if all(key in results.streaming.get(n, {}) for n in names):
            vals = [results.streaming[n][key] for n in names]
            row(f"2. {level:>2d} streams: delivered tok/s", [v["tok_s"] for v in vals], ".1f", False)
            row(f"   {level:>2d} streams: TTFT p50 (ms)", [v["ttft_p50_ms"] for v in vals], ".0f", True)
            row(f"   {level:>2d} streams: TTFT p99 (ms)", [v["ttft_p99_ms"] for v in vals], ".0f", True)
    for level in plan.throughput_levels:
        key = str(level)
        if all(key in results.throughput.get(n, {}) for n in names):
            vals = [results.throughput[n][key] for n in names]
            row(f"3. {level:>2d} concurrent: generated tok/s", [v["tok_s"] for v in vals], ".1f", False)
    row("   worker peak RSS (MiB)", [results.peak_rss_mb.get(n, 0.0) for n in names], ".0f", True)
    lines.append(
        "ratio: how many times better llmstack is (FastChat / llmstack for times, llmstack / FastChat for rates); "
        "stack overhead = latency - bare model time"
    )
    if results.mode == "full":
        lines.append("targets:")
        for label, measured, met in targets(results, plan):
            lines.append(f"  [{'met' if met else 'MISSED'}] {label}: {measured}")
    return "\n".join(lines)


def plot(results: Results, plan: Plan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in STACKS if n in results.latency or n in results.throughput or n in results.streaming]
    colors = {"llmstack": "#1f77b4", "fastchat": "#d62728"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0][0]
    lat_names = [n for n in names if n in results.latency]
    xs = range(len(lat_names))
    bars = [("median_ms", {}), ("p99_ms", {"alpha": 0.5})]
    if all("overhead_median_ms" in results.latency[n] for n in lat_names):
        bars.append(("overhead_median_ms", {"hatch": "//", "fill": False}))
    width = 0.8 / len(bars)
    for k, (key, style) in enumerate(bars):
        ax.bar(
            [x - 0.4 + width * (k + 0.5) for x in xs],
            [results.latency[n][key] for n in lat_names],
            width,
            color=[colors[n] for n in lat_names],
            edgecolor=[colors[n] for n in lat_names],
            **style,
        )
    if results.bare_model:
        ax.axhline(results.bare_model["median_ms"], color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(list(xs), lat_names)
    ax.set_ylabel("ms")
    ax.set_title(
        "1. 1-token latency: median, p99 (light), stack overhead (hatched)\n= median - bare model time (dashed line)",
        fontsize=10,
    )
    panels = [
        (axes[0][1], results.streaming, plan.stream_levels, "tok_s", "2. streaming: delivered tokens/s", "tokens/s"),
        (axes[1][0], results.streaming, plan.stream_levels, "ttft_p50_ms", "2. streaming: TTFT p50", "ms"),
        (axes[1][1], results.throughput, plan.throughput_levels, "tok_s", "3. generation throughput", "tokens/s"),
    ]
    for ax, table, levels, key, title, unit in panels:
        for n in names:
            pts = [(lv, table[n][str(lv)][key]) for lv in levels if str(lv) in table.get(n, {})]
            label = n if table is not results.throughput else f"{n} (peak RSS {results.peak_rss_mb.get(n, 0):.0f} MiB)"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[n], label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(levels), [str(lv) for lv in levels])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"llmstack vs FastChat 0.2.36 on {results.model['name']} ({results.model['parameters'] / 1e6:.0f}M, CPU)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="tiny model and few requests (CI); asserts only that all ran"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results directory")
    parser.add_argument("--skip-fastchat", action="store_true", help="measure llmstack alone (e.g. while profiling)")
    parser.add_argument(
        "--only",
        default=",".join(MEASUREMENTS),
        help="comma-separated subset of: latency, streaming, throughput (output files get it as a suffix)",
    )
    parser.add_argument("--latency-requests", type=int, help="1-token requests per stack (default: the plan's)")
    args = parser.parse_args(argv)
    only = tuple(m.strip() for m in args.only.split(",") if m.strip())
    unknown = [m for m in only if m not in MEASUREMENTS]
    if unknown or not only:
        parser.error(f"--only: choose among {', '.join(MEASUREMENTS)} (got {args.only!r})")

    plan = QUICK_PLAN if args.quick else FULL_PLAN
    if args.latency_requests:
        plan = replace(plan, latency_requests=args.latency_requests)
    size = QUICK if args.quick else FULL
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    if set(only) != set(MEASUREMENTS):
        suffix += "-" + "-".join(only)
    logs = out / f"logs{'-quick' if args.quick else ''}"
    model_dir = build_model(out / "models", size)
    results = Results(
        mode="quick" if args.quick else "full",
        model={"name": size.name, "parameters": parameters(model_dir), "path": str(model_dir)},
        plan=asdict(plan),
    )
    print(f"model {model_dir} ({results.model['parameters'] / 1e6:.1f}M parameters)", flush=True)
    bare = BareModel(model_dir) if "latency" in only else None
    python = None if args.skip_fastchat else ensure_fastchat(log=logs / "fastchat-install.log")

    stacks: dict[str, Stack] = {}
    try:
        started = time.perf_counter()
        stacks["llmstack"] = start_llmstack(model_dir, logs, plan.concurrency_limit, plan.max_batch_size)
        if python is not None:
            stacks["fastchat"] = start_fastchat(python, model_dir, logs, plan.concurrency_limit)
        print(f"stacks up in {time.perf_counter() - started:.1f}s: " + ", ".join(stacks), flush=True)
        asyncio.run(run_all(stacks, plan, results, bare, only))
    finally:
        for stack in stacks.values():
            stack.stop()

    table = render_table(results, plan)
    print()
    print(table)
    (out / f"fastchat_compare{suffix}.json").write_text(json.dumps(asdict(results), indent=2) + "\n")
    (out / f"fastchat_compare{suffix}.txt").write_text(table + "\n")
    png = out / f"fastchat_compare{suffix}.png"
    plot(results, plan, png)
    print(f"\nwrote {png} and {png.with_suffix('.json')}")
    if results.errors:
        print("errors:\n  " + "\n  ".join(results.errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
