"""CPU per streamed token of llmstack's worker front end and API server, without a model.

    python bench/hop.py [--streams 1,8,32] [--max-tokens 512] [--step 0.01]

Starts a controller, a worker whose engine is synthetic (every `--step` seconds it gives each running
stream one token, as a batching engine's output loop does; no model, no tokenizer) and the API server,
then streams chat completions through the API server at each concurrency and reports, per generated
token, the CPU time (user + system) of the worker process, the API server process and this client.
What the worker spends is its HTTP layer and NDJSON encoding; what the API server spends is the hop:
reading the worker's stream and writing SSE.  On a CPU host that time comes out of the model's share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def serve_worker(port: int, controller: str, step: float) -> None:
    from llmstack.common.http import serve, setup_logging
    from llmstack.services.engines.base import Chunk, Engine, EngineStats
    from llmstack.services.worker.app import WorkerSettings, build_worker_app

    class SyntheticEngine(Engine):
        kind = "chat"
        name = "synthetic"
        context_length = 1 << 20

        def __init__(self) -> None:
            self.streams: set[asyncio.Queue[int]] = set()
            self.ticker: asyncio.Task[None] | None = None

        async def start(self) -> None:
            self.ticker = asyncio.create_task(self._tick())

        async def _tick(self) -> None:
            while True:
                await asyncio.sleep(step)
                for q in list(self.streams):
                    q.put_nowait(1)

        def render_chat(self, messages: list[dict[str, Any]]) -> str:
            return " ".join(str(m.get("content", "")) for m in messages)

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return list(range(max(1, len(text.split()))))

        async def generate(self, prompt_ids: list[int], params: Any) -> Any:
            q: asyncio.Queue[int] = asyncio.Queue()
            self.streams.add(q)
            try:
                done = 0
                while done < params.max_tokens:
                    await q.get()
                    n = 1
                    while not q.empty() and done + n < params.max_tokens:  # steps missed while busy
                        q.get_nowait()
                        n += 1
                    done += n
                    yield Chunk(" tok" * n, n, "length" if done >= params.max_tokens else None)
            finally:
                self.streams.discard(q)

        async def embed(self, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
            raise NotImplementedError

        def stats(self) -> EngineStats:
            return EngineStats(running=len(self.streams))

    setup_logging("worker")
    settings = WorkerSettings(
        worker_address=f"http://127.0.0.1:{port}",
        model_names=["synthetic"],
        controller_address=controller,
        limit_worker_concurrency=1024,
        heartbeat_interval=1.0,
    )
    serve(build_worker_app(settings, SyntheticEngine()), host="127.0.0.1", port=port)


async def _one(client: Any, url: str, max_tokens: int) -> int:
    body = {
        "model": "synthetic",
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    async with client.stream("POST", f"{url}/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens


def measure(levels: list[int], max_tokens: int, step: float, log_dir: Path) -> list[dict[str, float]]:
    import httpx
    import psutil

    from bench.stacks import Stack, free_port

    cport, wport, aport = free_port(), free_port(), free_port()
    stack = Stack("llmstack", f"http://127.0.0.1:{aport}/v1")
    controller = f"http://127.0.0.1:{cport}"
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    py = [sys.executable, "-m", "llmstack"]
    rows: list[dict[str, float]] = []
    try:
        proc = stack.start("controller", [*py, "controller", "--port", str(cport)], log_dir, env)
        stack.wait_http(f"{controller}/health", proc, 60)
        worker = stack.start(
            "worker",
            [sys.executable, str(Path(__file__).resolve()), "--serve-worker", str(wport), controller, str(step)],
            log_dir,
            env,
        )
        stack.wait_http(f"http://127.0.0.1:{wport}/health", worker, 60, ready='"ok"')
        api = stack.start("api", [*py, "api", "--port", str(aport), "--controller-address", controller], log_dir, env)
        stack.wait_http(f"{stack.api_url}/models", api, 60, ready='"synthetic"')
        procs = {"worker": psutil.Process(worker.popen.pid), "api": psutil.Process(api.popen.pid)}
        me = psutil.Process()

        def cpu() -> dict[str, float]:
            times = {name: p.cpu_times() for name, p in {**procs, "client": me}.items()}
            return {name: t.user + t.system for name, t in times.items()}

        async def run() -> None:
            for n in levels:
                limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
                async with httpx.AsyncClient(timeout=600, trust_env=False, limits=limits) as client:
                    await asyncio.gather(*(_one(client, stack.api_url, 8) for _ in range(min(n, 4))))  # warm up
                    before, started = cpu(), time.perf_counter()
                    tokens = sum(await asyncio.gather(*(_one(client, stack.api_url, max_tokens) for _ in range(n))))
                    wall, after = time.perf_counter() - started, cpu()
                row = {"streams": n, "tokens": tokens, "wall_s": wall}
                row.update({f"{k}_us_per_token": 1e6 * (after[k] - before[k]) / tokens for k in after})
                rows.append(row)
                print(
                    f"{n:>7d} {tokens:>7d} {wall:>7.2f}s "
                    + " ".join(f"{row[f'{k}_us_per_token']:>9.0f}" for k in ("worker", "api", "client")),
                    flush=True,
                )

        print(f"{'streams':>7s} {'tokens':>7s} {'wall':>8s} {'worker':>9s} {'api':>9s} {'client':>9s}  (CPU us/token)")
        asyncio.run(run())
    finally:
        stack.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-worker"]:
        serve_worker(int(argv[1]), argv[2], float(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,8,32", help="comma-separated concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--step", type=float, default=0.01, help="seconds between the synthetic engine's tokens")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results directory")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.streams.split(",") if x.strip()]
    rows = measure(levels, args.max_tokens, args.step, args.out / "logs-hop")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hop.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
