"""Profile the llmstack worker under load with py-spy (sampling; the worker runs unmodified).

    python bench/profile_worker.py [--concurrency 32] [--max-tokens 128] [--quick]

Starts llmstack on the benchmark model, sends `--concurrency` chat completions at once while py-spy
samples every thread of the worker, then prints where the time went: per thread, and the functions
with the most samples (inclusive, and self).  Writes the collapsed stacks and a flame graph SVG to
bench/results/profile/ for a closer look.  Needs `py-spy` (pip install py-spy) and permission to
ptrace the worker (root, or kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.fastchat_compare import _burst, complete  # noqa: E402
from bench.model import FULL, QUICK, build_model  # noqa: E402
from bench.stacks import start_llmstack  # noqa: E402


def summarize(collapsed: Path, top: int = 25) -> str:
    """Threads and hottest functions from py-spy's collapsed stacks (`frame;frame;... count`)."""
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(encoding="utf-8").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        for frame in set(frames[1:]):
            inclusive[frame] += count
        if len(frames) > 1:
            self_time[frames[-1]] += count
    lines = [f"{total} samples"]
    lines.append("by thread:")
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in threads.most_common(8)]
    lines.append("inclusive (function and what it calls):")
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in inclusive.most_common(top)]
    lines.append("self:")
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in self_time.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="the tiny model")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "profile")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(REPO / "bench" / "results" / "models", QUICK if args.quick else FULL)
    stack = start_llmstack(model_dir, out / "logs", args.concurrency, args.concurrency)
    try:
        url = stack.api_url
        asyncio.run(_burst(url, 2, complete, 8))  # warm up
        pid = str(stack.worker.popen.pid)
        collapsed, svg = out / "worker.collapsed", out / "worker.svg"
        recorders = [
            subprocess.Popen([py_spy, "record", "--threads", "--format", "raw", "-o", str(collapsed), "-p", pid]),
            subprocess.Popen([py_spy, "record", "--threads", "-o", str(svg), "-p", pid]),
        ]
        time.sleep(1.0)  # let py-spy attach
        replies, wall = asyncio.run(_burst(url, args.concurrency, complete, args.max_tokens))
        for rec in recorders:
            rec.send_signal(2)  # SIGINT: py-spy writes its output and exits
        for rec in recorders:
            rec.wait(timeout=60)
        tokens = sum(r.tokens for r in replies if r.ok)
        print(f"{args.concurrency} concurrent x {args.max_tokens} tokens: {tokens / wall:.1f} tok/s in {wall:.1f}s")
        print(summarize(collapsed))
        print(f"flame graph: {svg}")
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
