"""One model on one vLLM rank vs two (tensor parallel 2, pipeline parallel 2) on this host's CPUs.

`python bench/parallel_ranks.py [--quick] [--max-tokens 64] [--streams 1,4]` starts, one at a time, a
controller + vLLM worker + API server for the benchmark model (bench/model.py: 72M parameters, 12 layers,
12 heads; `--quick`: the 2-layer tiny one), with 1 rank, `--num-gpus 2` (tensor parallel) and
`--pipeline-parallel-size 2`, and measures the worker's start (spawn to healthy) and streamed completion
tokens/s at each concurrency.  Writes bench/results/parallel_ranks.txt, .json and .png.

On a CPU host the ranks share the host's cores (llmstack binds each rank to its own share), so two ranks
bring no more compute than one: what they cost is the collectives between ranks per token."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the checkout importable
    sys.path.insert(0, str(REPO))

from bench.ceiling import run_level, start_llmstack  # noqa: E402
from bench.model import FULL, QUICK, build_model  # noqa: E402

CONFIGS: dict[str, list[str]] = {
    "1 rank": [],
    "tensor parallel 2": ["--num-gpus", "2"],
    "pipeline parallel 2": ["--pipeline-parallel-size", "2"],
}
ENGINE = ["--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(512 * 2**20)]


def measure(model_dir: Path, flags: list[str], logs: Path, streams: list[int], max_tokens: int) -> dict:
    t0 = time.monotonic()
    server = start_llmstack(model_dir, "vllm", logs, [*ENGINE, *flags])
    result: dict = {"start_s": round(time.monotonic() - t0, 1), "levels": {}}
    try:
        asyncio.run(run_level(server.url, 1, 1, 8))  # warm-up
        for n in streams:
            level = asyncio.run(run_level(server.url, n, 2, max_tokens))
            result["levels"][str(n)] = {
                "tps": round(level.tps, 1), "ttft_p50_s": round(level.ttft_p50, 3), "errors": level.errors,
            }  # fmt: skip
    finally:
        server.stop()
    return result


def render(results: dict, streams: list[int]) -> str:
    head = f"{'configuration':<22}{'start (s)':>10}" + "".join(f"{f'tok/s x{n}':>12}" for n in streams)
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        cells = "".join(f"{r['levels'][str(n)]['tps']:>12.1f}" for n in streams)
        lines.append(f"{name:<22}{r['start_s']:>10.1f}{cells}")
    return "\n".join(lines)


def plot(results: dict, streams: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        xs = [k + i * width for k in range(len(streams))]
        ax.bar(xs, [r["levels"][str(n)]["tps"] for n in streams], width, label=f"{name} (start {r['start_s']}s)")
    ax.set_xticks([k + width * (len(results) - 1) / 2 for k in range(len(streams))], [f"{n} streams" for n in streams])
    ax.set_ylabel("completion tokens/s")
    ax.set_title("one model, vLLM ranks on this CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the 2-layer tiny model")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--streams", default="1,4")
    args = p.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",")]
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(out / "models", QUICK if args.quick else FULL)
    results = {
        name: measure(model_dir, flags, out / "logs-parallel", streams, args.max_tokens)
        for name, flags in CONFIGS.items()
    }
    table = render(results, streams)
    print(table)
    (out / "parallel_ranks.txt").write_text(table + "\n")
    (out / "parallel_ranks.json").write_text(json.dumps({"model": model_dir.name, "results": results}, indent=2))
    plot(results, streams, out / "parallel_ranks.png")
    return 0


if __name__ == "__main__":  # vLLM spawns processes: nothing may run at import
    raise SystemExit(main())
