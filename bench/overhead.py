"""What the API server's hop costs: a 1-token chat completion through the API server versus the same
generation asked of the worker directly, sequentially, in one run.

    python bench/overhead.py [--requests 200] [--out bench/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.stack import new_stack  # noqa: E402
from tests.support.tiny_model import build_tiny_llama  # noqa: E402

MESSAGES = [{"role": "user", "content": "Say one word."}]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(requests: int, out: Path) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_llama(Path(tmp) / "model")
        stack = new_stack(Path(tmp) / "logs")
        try:
            stack.start_controller()
            stack.start_worker("worker", model, "--model-names", "tiny")
            stack.start_api()
            stack.wait_models("tiny")
            worker_url = stack.workers["worker"][1]
            api_body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1, "temperature": 0}
            worker_body = {"model": "tiny", "messages": MESSAGES, "params": {"max_tokens": 1, "temperature": 0}}
            timings: dict[str, list[float]] = {"api server (1 hop)": [], "worker directly": []}
            with httpx.Client(timeout=30) as client:
                for _ in range(20):  # warm up both paths and the connection pools
                    client.post(f"{stack.base_url}/chat/completions", json=api_body).raise_for_status()
                    client.post(f"{worker_url}/generate", json=worker_body).raise_for_status()
                for _ in range(requests):  # alternate so drift on a shared machine hits both alike
                    t = time.perf_counter()
                    r = client.post(f"{stack.base_url}/chat/completions", json=api_body)
                    timings["api server (1 hop)"].append(time.perf_counter() - t)
                    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
                    t = time.perf_counter()
                    r = client.post(f"{worker_url}/generate", json=worker_body)
                    timings["worker directly"].append(time.perf_counter() - t)
                    assert r.status_code == 200 and '"usage"' in r.text
        finally:
            stack.group.stop_all()
    return timings


def report(timings: dict[str, list[float]], out: Path) -> None:
    print(f"{'path':<22} {'n':>5} {'median ms':>10} {'p99 ms':>8}")
    for name, values in timings.items():
        ms = [v * 1000 for v in values]
        print(f"{name:<22} {len(ms):>5} {statistics.median(ms):>10.2f} {_percentile(ms, 0.99):>8.2f}")
    api, direct = (statistics.median(v) for v in timings.values())
    print(f"added by the API server: {1000 * (api - direct):.2f} ms median")
    out.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: pip install 'llmstack[bench]' for the plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot([[v * 1000 for v in vals] for vals in timings.values()], showfliers=False)
    ax.set_xticks(range(1, len(timings) + 1), list(timings))
    ax.set_ylabel("latency of a 1-token chat completion (ms)")
    ax.set_title("API server hop vs worker directly")
    path = out / "overhead.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    report(measure(args.requests, args.out), args.out)


if __name__ == "__main__":
    main()
