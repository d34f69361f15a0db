"""What named keys cost the API server: 1-token chat completions through API servers that differ only in
their keys, side by side on one controller and one tiny-model worker, requests alternating between them.

    plain            no keys, no usage accounting (the baseline)
    plain (again)    the same, a second server: how far two identical servers differ in one run (noise)
    usage only       no keys, usage recorded (--state-dir)
    100 keys         100 named keys (models, rpm, max_concurrent, priority), usage recorded
    100 keys + tpm   the same with a token limit too: the worker sends the prompt's token count first

Limits are set high enough never to refuse.  Target: "100 keys + tpm" median within 0.5 ms of "plain".

    python bench/keys_overhead.py [--requests 400] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.procs import free_port  # noqa: E402
from tests.support.stack import Stack, new_stack  # noqa: E402
from tests.support.tiny_model import build_tiny_llama  # noqa: E402

MESSAGES = [{"role": "user", "content": "Say one word."}]
TARGET_MS = 0.5
CONFIGS = ("plain", "plain (again)", "usage only", "100 keys", "100 keys + tpm")


def _keys_file(path: Path, tpm: bool) -> str:
    """100 keys with limits; returns the key the benchmark presents (the last one)."""
    entries = []
    for i in range(100):
        extra = "tpm = 1000000000\n" if tpm else ""
        entries.append(
            f'[[keys]]\nname = "user-{i:03d}"\nkey = "sk-bench-{i:03d}-0123456789abcdef"\n'
            f'models = ["tiny*", "other-{i}"]\n'
            f"rpm = 1000000\nmax_concurrent = 1000\npriority = {i % 3}\n{extra}"
        )
    path.write_text("\n".join(entries))
    return "sk-bench-099-0123456789abcdef"


PIDS: dict[str, int] = {}


def _start_api(stack: Stack, name: str, root: Path, *args: str) -> str:
    port = free_port()
    svc = stack.group.start(name, "api", "--port", str(port), "--controller-address", stack.controller_url, *args)
    url = f"http://127.0.0.1:{port}"
    svc.wait_healthy(f"{url}/health", timeout=60)
    PIDS[url] = svc.pid
    return url


def _cpu(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def measure(requests: int, root: Path) -> tuple[dict[str, list[float]], dict[str, float]]:
    model = build_tiny_llama(root / "model")
    stack = new_stack(root / "logs")
    try:
        stack.start_controller()
        stack.start_worker("worker", model, "--model-names", "tiny")
        key = _keys_file(root / "keys.toml", tpm=False)
        _keys_file(root / "keys-tpm.toml", tpm=True)
        servers = {
            "plain": (_start_api(stack, "api-plain", root), None),
            "plain (again)": (_start_api(stack, "api-plain2", root), None),
            "usage only": (_start_api(stack, "api-usage", root, "--state-dir", str(root / "s1")), None),
            "100 keys": (
                _start_api(
                    stack, "api-keys", root, "--keys-file", str(root / "keys.toml"), "--state-dir", str(root / "s2")
                ),
                key,
            ),
            "100 keys + tpm": (
                _start_api(
                    stack, "api-tpm", root, "--keys-file", str(root / "keys-tpm.toml"), "--state-dir", str(root / "s3")
                ),
                key,
            ),
        }
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1, "temperature": 0}
        timings: dict[str, list[float]] = {name: [] for name in servers}
        shuffle = random.Random(16)
        with httpx.Client(timeout=30) as client:
            for name in servers:  # the routing tables must know the model
                url, k = servers[name]
                headers = {"Authorization": f"Bearer {k}"} if k else {}
                deadline = time.monotonic() + 30
                while client.post(f"{url}/v1/chat/completions", json=body, headers=headers).status_code != 200:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name}: no model after 30 s")
                    time.sleep(0.2)
            cpu: dict[str, float] = {}
            for i in range(30 + requests):  # warm-up, then rounds: drift hits every server alike
                if i == 30:
                    cpu = {name: _cpu(PIDS[servers[name][0]]) for name in servers}
                order = list(servers)
                shuffle.shuffle(order)  # a fresh order each round: no server keeps a place in it
                for name in order:
                    url, k = servers[name]
                    headers = {"Authorization": f"Bearer {k}"} if k else {}
                    t = time.perf_counter()
                    r = client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                    elapsed = time.perf_counter() - t
                    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text
                    if i >= 30:
                        timings[name].append(elapsed)
            cpu = {name: 1000 * (_cpu(PIDS[servers[name][0]]) - cpu[name]) / requests for name in servers}
    finally:
        stack.group.stop_all()
    return timings, cpu


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def report(timings: dict[str, list[float]], cpu: dict[str, float], out: Path) -> bool:
    """The table: latency figures, the difference of medians to `plain`, the median of the per-round
    differences to `plain` (each round asks every server once, back to back, so drift on a shared machine
    cancels out), and the API server's CPU per request."""
    base = statistics.median(timings["plain"]) * 1000
    lines = [
        f"{'API server':<16} {'n':>5} {'median ms':>10} {'p90 ms':>8} {'p99 ms':>8} {'vs plain ms':>12} "
        f"{'paired ms':>10} {'API CPU ms/req':>15}"
    ]
    figures = {}
    for name, values in timings.items():
        ms = [v * 1000 for v in values]
        paired = statistics.median(1000 * (a - b) for a, b in zip(values, timings["plain"], strict=True))
        figures[name] = {
            "n": len(ms), "median_ms": statistics.median(ms), "p90_ms": _percentile(ms, 0.9),
            "p99_ms": _percentile(ms, 0.99), "vs_plain_ms": statistics.median(ms) - base, "paired_ms": paired,
            "api_cpu_ms_per_request": cpu[name],
        }  # fmt: skip
        f = figures[name]
        lines.append(
            f"{name:<16} {f['n']:>5} {f['median_ms']:>10.3f} {f['p90_ms']:>8.3f} {f['p99_ms']:>8.3f} "
            f"{f['vs_plain_ms']:>+12.3f} {paired:>+10.3f} {cpu[name]:>15.3f}"
        )
    worst = max(figures["100 keys + tpm"]["vs_plain_ms"], figures["100 keys + tpm"]["paired_ms"])
    met = worst <= TARGET_MS
    lines.append(
        f"100 keys with limits (tpm too) add {worst:+.3f} ms (the larger of the two differences); "
        f"target <= {TARGET_MS} ms: {'met' if met else 'NOT met'}"
    )
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "keys_overhead.txt").write_text(text + "\n")
    summary = {"figures": figures, "added_ms": worst, "target_ms": TARGET_MS, "target_met": met}
    (out / "keys_overhead.json").write_text(json.dumps(summary, indent=2))
    _plot(timings, base, out / "keys_overhead.png")
    return met


def _plot(timings: dict[str, list[float]], base: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.boxplot([[v * 1000 for v in timings[n]] for n in CONFIGS], showfliers=False)
    ax.set_xticks(range(1, len(CONFIGS) + 1), [c.replace(" + ", "\n+ ") for c in CONFIGS])
    ax.axhline(base + TARGET_MS, color="tab:red", linestyle="--", linewidth=1, label=f"plain median + {TARGET_MS} ms")
    ax.set_ylabel("latency of a 1-token chat completion (ms)")
    ax.set_title("API server with and without named keys (same run, servers in a random order each round)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="measured requests per API server")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        timings, cpu = measure(args.requests, Path(tmp))
    report(timings, cpu, args.out)


if __name__ == "__main__":
    main()
