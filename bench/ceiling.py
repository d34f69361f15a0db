"""Each engine's decode throughput as a fraction of this machine's physical limits, in one run.

    python bench/ceiling.py                       # Gemma 3 270M and the 72M Llama, every server (~30 min)
    python bench/ceiling.py --models gemma --servers transformers --levels 1,8
    python bench/ceiling.py --quick               # tiny model, the transformers engine only: a smoke run

1. Measures the machine (`limits`): memory read bandwidth, float32 and bfloat16 matmul throughput.
2. Derives each model's decode ceilings in the dtype each server runs it: batch 1 (weight bytes per step /
   bandwidth) and large batch (FLOPs per token / matmul throughput).
3. Starts every server on the model and keeps them up (an idle server takes no CPU; the run prints what
   each takes while idle): llmstack with the transformers engine, llmstack with the vLLM engine
   (controller + worker + API server, default settings), and `vllm serve` (its defaults; `--serve-dtypes`
   adds runs with other dtypes, e.g. its fastest).  vLLM on a CPU needs a memory setting to start at all:
   `vllm serve` gets the KV cache size llmstack's vLLM worker picks by itself.
4. At each level of concurrent streams, `--rounds` rounds, each client sending one streamed completion of
   `--max-tokens` tokens per round; a round runs on one server at a time, every server in turn (the order
   rotating), so the noise of a shared machine falls on every server alike, and only once every server is
   idle again (vLLM's worker spins for a second after its last step).  Records generated tokens/s and time to
   first token.
5. On the transformers engine, the prefix-cache targets: the TTFT of a request whose ~1,500-token system
   prompt an earlier request already sent, against the first one's; and the TTFT of every turn of a
   10-turn chat (the median of 3 chats, turn by turn), with the prefix cache and without it.
6. With `--py-spy`, samples the transformers worker during its busiest level: where the time goes.

Prints the table and writes bench/results/ceiling[-quick].{txt,json,png}.  Figures are comparable within
one run; on a shared machine take the benchmark lock (`flock -x /tmp/llmstack-heavy.lock ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the checkout importable
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench.ceiling_report import plot, render  # noqa: E402
from bench.limits import MachineLimits, measure_machine, model_cost  # noqa: E402
from bench.model import FULL, QUICK, build_model  # noqa: E402
from bench.profile_worker import summarize  # noqa: E402
from bench.vllm_compare import Level as Totals  # noqa: E402
from llmstack.services.engines.vllm.args import CPU_KV_CACHE_BYTES  # noqa: E402
from tests.support.procs import Service, free_port  # noqa: E402

MODEL = "bench"
SERVERS = ("transformers", "vllm", "serve")


@dataclass
class Level(Totals):
    """One server at one concurrency: `vllm_compare`'s totals, and how many streams."""

    streams: int = 0

    @property
    def ttft_p50(self) -> float:
        return self.ttft_pct(0.5)


@dataclass
class Run:
    model: str
    server: str  # label, e.g. "llmstack transformers", "vllm serve (float32)"
    dtype: str
    ceilings: tuple[float, float]
    levels: list[Level] = field(default_factory=list)
    start_s: float = 0.0


# -- servers ------------------------------------------------------------------------------------------------
class Server:
    """One server under test; `url` is its OpenAI base URL."""

    def __init__(self, services: list[Service], url: str, worker: Service) -> None:
        self.services, self.url, self.worker = services, url, worker

    def stop(self) -> None:
        for svc in reversed(self.services):
            svc.stop(timeout=30)


def start_llmstack(model_dir: Path, backend: str, logs: Path, extra: list[str]) -> Server:
    controller_port, worker_port, api_port = free_port(), free_port(), free_port()
    controller = f"http://127.0.0.1:{controller_port}"
    services = [Service(f"controller-{backend}", ["controller", "--port", controller_port], logs).start()]
    try:
        services[0].wait_healthy(f"{controller}/health")
        args = ["worker", "--model-path", model_dir, "--model-names", MODEL, "--port", worker_port]
        args += ["--controller-address", controller, "--backend", backend, "--device", "cpu", *extra]
        worker = Service(f"worker-{backend}", args, logs).start()
        services.append(worker)
        _wait_ready(worker, f"http://127.0.0.1:{worker_port}/health", '"ok"')
        api = Service(f"api-{backend}", ["api", "--port", api_port, "--controller-address", controller], logs)
        services.append(api.start())
        api.wait_healthy(f"http://127.0.0.1:{api_port}/health")
        url = f"http://127.0.0.1:{api_port}/v1"
        asyncio.run(_wait_model(url))
    except BaseException:
        for svc in reversed(services):
            svc.stop()
        raise
    return Server(services, url, worker)


def start_vllm_serve(model_dir: Path, logs: Path, dtype: str, kv_bytes: int) -> Server:
    port = free_port()
    args = ["--vllm-serve", "serve", model_dir, "--port", port, "--host", "127.0.0.1", "--served-model-name", MODEL]
    args += ["--kv-cache-memory-bytes", kv_bytes, "--disable-uvicorn-access-log"]
    if dtype != "auto":
        args += ["--dtype", dtype]
    svc = Service(f"vllm-serve-{dtype}", args, logs, module="bench.vllm_compare").start()
    try:
        asyncio.run(_wait_model(f"http://127.0.0.1:{port}/v1", svc))
    except BaseException:
        svc.stop()
        raise
    return Server([svc], f"http://127.0.0.1:{port}/v1", svc)


def _wait_ready(svc: Service, url: str, ready: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        svc.wait_healthy(url, timeout=timeout)
        if ready in httpx.get(url, timeout=5).text:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{svc.name} not ready")


async def _wait_model(url: str, svc: Service | None = None, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        while time.monotonic() < deadline:
            if svc is not None and not svc.alive():
                raise RuntimeError(f"{svc.name} exited: see {svc.log_path}")
            try:
                resp = await client.get(f"{url}/models")
                if resp.status_code == 200 and any(m["id"] == MODEL for m in resp.json()["data"]):
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} did not serve {MODEL!r} within {timeout:.0f}s")


def log_value(svc: Service, marker: str) -> str | None:
    """The text after `marker` on the last log line that has it (e.g. the dtype a worker chose)."""
    found = None
    for line in svc.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if marker in line:
            found = line.split(marker, 1)[1]
    return found


# -- load ---------------------------------------------------------------------------------------------------
async def complete(
    client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, seed: int
) -> tuple[int, float, str]:
    """(completion tokens, seconds to the first text, text) of one streamed completion."""
    body = {
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "seed": seed,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    started, ttft, tokens, text = time.perf_counter(), float("nan"), -1, ""
    async with client.stream("POST", f"{url}/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = "".join(c.get("text") or "" for c in chunk.get("choices", []))
            if piece and ttft != ttft:
                ttft = time.perf_counter() - started
            text += piece
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens < 0:
        raise RuntimeError("the stream ended without usage")
    return tokens, ttft, text


def stream_prompt(k: int, i: int) -> str:
    topics = ("the sea", "a city at night", "an old clock", "winter", "a long journey", "the market")
    return f"Story {k}.{i}: write a short story about {topics[(k + i) % len(topics)]}. Once upon a time,"


async def run_level(url: str, streams: int, rounds: int, max_tokens: int, first_round: int = 0) -> Level:
    """`streams` clients, each sending `rounds` streamed completions back to back (rounds numbered from
    `first_round`: each round has its own prompts and seeds, so no round reuses another's prefix)."""
    level = Level(streams=streams)
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits, trust_env=False) as client:

        async def one_client(k: int) -> None:
            for i in range(first_round, first_round + rounds):
                try:
                    tokens, ttft, _ = await complete(client, url, stream_prompt(k, i), max_tokens, k * 100 + i)
                except Exception as exc:  # counted; the run reports it
                    level.errors += 1
                    print(f"    request failed: {exc}", file=sys.stderr)
                    continue
                level.requests += 1
                level.tokens += tokens
                level.ttft.append(ttft)

        started = time.perf_counter()
        await asyncio.gather(*(one_client(k) for k in range(streams)))
        level.seconds = time.perf_counter() - started
    return level


# -- prefix cache targets -----------------------------------------------------------------------------------
SYSTEM_FACTS = [
    f"Fact {i}: the {['north', 'south', 'east', 'west'][i % 4]} gate of ward {i % 13} opens at {6 + i % 5} "
    f"o'clock and the {['baker', 'smith', 'weaver', 'miller', 'potter'][i % 5]} there sells {i * 3 % 17} items."
    for i in range(64)
]


async def shared_system_prompt(url: str, samples: int = 3) -> dict:
    """TTFT of the first request with a ~1,500-token system prompt, and of a second one sharing it."""
    firsts, seconds = [], []
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), trust_env=False) as client:
        for s in range(samples):
            system = f"System {s}: answer from these facts.\n" + "\n".join(SYSTEM_FACTS[s:] + SYSTEM_FACTS[:s])
            questions = (f"\nQuestion: when does gate {s} open?\nAnswer:", f"\nQuestion: who sells {s}?\nAnswer:")
            _, first, _ = await complete(client, url, system + questions[0], 4, s)
            _, second, _ = await complete(client, url, system + questions[1], 4, s)
            firsts.append(first)
            seconds.append(second)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"first_ttft_s": med(firsts), "second_ttft_s": med(seconds), "ratio": med(firsts) / med(seconds)}


async def chat_turns(url: str, turns: int = 10, answer_tokens: int = 64, chats: int = 3) -> list[float]:
    """Per-turn TTFT of a chat whose transcript (every earlier turn and answer) is each turn's prompt: the
    median over `chats` different chats, turn by turn (one chat's turns move 2x with the machine's noise)."""
    samples: list[list[float]] = [[] for _ in range(turns)]
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), trust_env=False) as client:
        for c in range(chats):
            history = f"Chat {c}: a conversation between a user and a helpful assistant.\n"
            for t in range(turns):
                history += f"User: tell me something about the number {t * 7 + 3 + c}.\nAssistant:"
                _, ttft, text = await complete(client, url, history, answer_tokens, t)
                history += text + "\n"
                samples[t].append(ttft)
    return [sorted(s)[len(s) // 2] for s in samples]


# -- the run ------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    models: tuple[str, ...] = ("gemma", "llama")
    servers: tuple[str, ...] = SERVERS
    serve_dtypes: tuple[str, ...] = ("auto", "float32")
    levels: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"gemma": (1, 8, 16), "llama": (1, 8, 16, 32)})
    rounds: int = 2
    max_tokens: int = 64
    prefix: bool = True
    py_spy: bool = False
    quick: bool = False


def model_dir_of(name: str, plan: Plan, out: Path) -> Path:
    if name == "gemma":
        from tests.support.real_model import gemma_hf_dir

        return gemma_hf_dir()
    return build_model(out / "models", QUICK if plan.quick else FULL)


def merge(into: Level, part: Level) -> None:
    into.requests += part.requests
    into.tokens += part.tokens
    into.seconds += part.seconds
    into.ttft += part.ttft
    into.errors += part.errors


def idle_cpu(servers: list[Server], seconds: float = 3.0) -> dict[int, float]:
    """CPU (in cores) each idle server's process tree uses: an idle server must not slow the measured one."""
    import psutil

    def tree_cpu(pid: int) -> float:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    pids = [[svc.pid for svc in server.services if svc.pid] for server in servers]
    before = [sum(tree_cpu(pid) for pid in group) for group in pids]
    time.sleep(seconds)
    after = [sum(tree_cpu(pid) for pid in group) for group in pids]
    return {i: (a - b) / seconds for i, (a, b) in enumerate(zip(after, before, strict=True))}


def settle(servers: list[Server], quiet_cores: float = 0.1, timeout: float = 15.0) -> None:
    """Wait until every server is idle: vLLM's worker process keeps spinning on its shared-memory queue for a
    second after its last step (`SpinCondition.busy_loop_s`), which would slow whichever server runs next."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sum(idle_cpu(servers, 0.5).values()) > quiet_cores:
        pass


def measure_servers(started: list[tuple[Server, Run]], plan: Plan, results: dict, out: Path) -> None:
    """Every level on every server, interleaved: each round of a level runs on each server in turn (the order
    rotating), so a slow minute of a shared machine falls on all of them alike."""
    servers = [server for server, _ in started]
    for server in servers:
        asyncio.run(run_level(server.url, 2, 1, 8, first_round=1000))  # warm-up: first requests pay one-off costs
    settle(servers)
    for i, cores in idle_cpu(servers).items():
        run = started[i][1]
        print(f"  {run.server}: {cores:.2f} cores while idle")
        results.setdefault("idle_cores", {})[f"{run.model} {run.server}"] = cores
    levels = plan.levels[started[0][1].model]
    for n, streams in enumerate(levels):
        totals = [Level(streams=streams) for _ in started]
        spies = {}
        if plan.py_spy and streams == max(levels):
            spies = {i: _py_spy_start(server, out, run) for i, (server, run) in enumerate(started)
                     if run.server == "llmstack transformers"}  # fmt: skip
        for r in range(plan.rounds):
            order = list(range(len(started)))
            shift = (n + r) % len(order)
            for i in order[shift:] + order[:shift]:
                settle(servers)
                part = asyncio.run(run_level(started[i][0].url, streams, 1, plan.max_tokens, first_round=r))
                merge(totals[i], part)
        for i, spy in spies.items():
            if spy is not None:
                run = started[i][1]
                results.setdefault("profiles", {})[f"{run.model} {run.server}"] = _py_spy_stop(spy)
        for (_, run), level in zip(started, totals, strict=True):
            run.levels.append(level)
            b1, big = run.ceilings
            print(
                f"  {run.server:28s} {streams:>3} streams: {level.tps:7.1f} tok/s ({level.tps / b1:.2f} of batch-1, "
                f"{level.tps / big:.2f} of compute ceiling), TTFT p50 {level.ttft_p50:.2f}s, errors {level.errors}"
            )


def _prefix_targets(server: Server, run: Run, results: dict) -> None:
    targets = results.setdefault("prefix", {}).setdefault(run.server, {})
    targets["system_prompt"] = asyncio.run(shared_system_prompt(server.url))
    targets["chat_ttft_s"] = asyncio.run(chat_turns(server.url))
    print(f"  prefix targets: {targets}")


def _py_spy_start(server: Server, out: Path, run: Run) -> tuple[subprocess.Popen, Path] | None:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        print("  py-spy is not installed: no profile", file=sys.stderr)
        return None
    path = out / f"ceiling-{run.model}-{run.server.replace(' ', '_')}.collapsed"
    cmd = [
        py_spy,
        "record",
        "--threads",
        "--nonblocking",
        "--format",
        "raw",
        "-o",
        str(path),
        "-p",
        str(server.worker.pid),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return proc, path


def _py_spy_stop(spy: tuple[subprocess.Popen, Path]) -> str:
    proc, path = spy
    proc.send_signal(2)
    proc.wait(timeout=120)
    return summarize(path, top=20) if path.is_file() else "py-spy wrote nothing"


def _start(kind: str, dtype: str | None, model_dir: Path, logs: Path) -> tuple[Server, str]:
    """A server of `kind` and the dtype it runs the model in."""
    if kind == "serve":
        server = start_vllm_serve(model_dir, logs, str(dtype), CPU_KV_CACHE_BYTES)
        return server, "bfloat16" if dtype == "auto" else str(dtype)  # vLLM's auto on a CPU: bfloat16
    extra = ["--no-prefix-caching"] if kind == "no-cache" else []
    server = start_llmstack(model_dir, "vllm" if kind == "vllm" else "transformers", logs, extra)
    return server, _chosen_dtype(server.worker)


MIN_FREE_BYTES = 6 * 2**30  # what one more vLLM server on Gemma 3 270M takes, with room to measure
# What the started servers still grow by while they are measured: with four Gemma servers up, 3.3 GiB was left
# after the last start and under 0.2 GiB by the 8-stream level, and the machine then spent minutes reclaiming
# page cache (no swap): a system-prompt request's TTFT went from about 1 s to 179 s.  A server whose start
# leaves less is stopped again.
MEASURE_HEADROOM_BYTES = 4 * 2**30


def _memory_left() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _left_out(results: dict, name: str, label: str, why: str) -> None:
    """A server the run goes on without: said now, and listed in the results' errors."""
    print(f"  {label} {why}", file=sys.stderr)
    results.setdefault("errors", []).append(f"{name} {label}: {why}")


def run_model(name: str, plan: Plan, limits: MachineLimits, out: Path, results: dict) -> list[Run]:
    """Start every server of the model (an idle one takes no CPU: `idle_cpu` checks), measure them
    interleaved, then the prefix targets one server at a time."""
    model_dir = model_dir_of(name, plan, out)
    cost = model_cost(model_dir)
    results.setdefault("models", {})[name] = {"path": str(model_dir), **asdict(cost)}
    logs = out / "logs" / "ceiling"
    started: list[tuple[Server, Run]] = []
    try:
        for label, kind, dtype in _starts(name, plan):
            if kind == "no-cache":
                continue  # started alone, for the prefix targets only
            left = _memory_left()
            if started and left < MIN_FREE_BYTES:  # a machine that swaps or drops its page cache
                _left_out(results, name, label, f"not started: {left / 2**30:.1f} GiB of memory left")
                continue
            print(f"{name}: starting {label}", flush=True)
            t0 = time.perf_counter()
            try:
                server, chosen = _start(kind, dtype, model_dir, logs)
            except Exception as exc:
                _left_out(results, name, label, f"did not start: {exc}")
                continue
            left = _memory_left()
            if started and left < MEASURE_HEADROOM_BYTES:
                server.stop()
                _left_out(results, name, label, f"stopped after start: {left / 2**30:.1f} GiB left to measure in")
                continue
            started.append(
                (server, Run(name, label, chosen, cost.ceilings(limits, chosen), start_s=time.perf_counter() - t0))
            )
        if started:
            measure_servers(started, plan, results, out)
        for server, run in started:
            if plan.prefix and run.model == "gemma":
                _prefix_targets(server, run, results)
    finally:
        for server, _ in started:
            server.stop()
    if plan.prefix and name == "gemma" and "transformers" in plan.servers:
        server, chosen = _start("no-cache", None, model_dir, logs)
        try:  # only the prefix targets, for comparison
            _prefix_targets(server, Run(name, "llmstack transformers, no prefix cache", chosen, (0.0, 0.0)), results)
        finally:
            server.stop()
    return [run for _, run in started]


def _starts(model: str, plan: Plan) -> list[tuple[str, str, str | None]]:
    """(label, kind, dtype) of each server to run, in order."""
    starts: list[tuple[str, str, str | None]] = []
    if "transformers" in plan.servers:
        starts.append(("llmstack transformers", "transformers", None))
        if plan.prefix and model == "gemma":
            starts.append(("llmstack transformers, no prefix cache", "no-cache", None))
    if "vllm" in plan.servers:
        starts.append(("llmstack vLLM", "vllm", None))
    if "serve" in plan.servers:
        starts += [(f"vllm serve ({d})", "serve", d) for d in plan.serve_dtypes]
    return starts


def _chosen_dtype(worker: Service) -> str:
    hf = log_value(worker, "dtype auto on this CPU: ")
    vllm = log_value(worker, "vllm-cpu: dtype ")
    text = (vllm or hf or "float32").split()[0].strip("(),;")
    return text if text in ("float32", "bfloat16", "float16") else "float32"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma,llama")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--serve-dtypes", default="auto,float32", help="dtypes to run `vllm serve` with")
    parser.add_argument("--levels", default=None, help="concurrent streams, e.g. 1,8,16 (default per model)")
    parser.add_argument("--rounds", type=int, default=2, help="streamed requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-prefix", action="store_true", help="skip the prefix-cache targets")
    parser.add_argument("--py-spy", action="store_true", help="profile the transformers worker's busiest level")
    parser.add_argument("--quick", action="store_true", help="tiny model, transformers engine, levels 1,4")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    # a SIGTERM (timeout, kill) unwinds like Ctrl-C, so every server this run started is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = Plan(
        models=tuple(args.models.split(",")),
        servers=tuple(args.servers.split(",")),
        serve_dtypes=tuple(args.serve_dtypes.split(",")),
        rounds=args.rounds,
        max_tokens=args.max_tokens,
        prefix=not args.no_prefix,
        py_spy=args.py_spy,
    )
    if args.quick:
        plan = Plan(models=("llama",), servers=("transformers",), levels={"llama": (1, 4)}, rounds=1,
                    max_tokens=16, prefix=False, quick=True)  # fmt: skip
    elif args.levels:
        plan.levels = {m: tuple(int(x) for x in args.levels.split(",")) for m in plan.models}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    limits = measure_machine()
    print(f"machine: {limits.threads} threads, read {limits.bandwidth_gbs:.1f} GB/s, matmul {limits.matmul_gflops}")
    results: dict = {"plan": asdict(plan), "machine": limits.as_dict()}
    runs = [run for name in plan.models for run in run_model(name, plan, limits, out, results)]
    results["runs"] = [_run_dict(run) for run in runs]
    suffix = "-quick" if plan.quick else ""
    table = render(results)
    print("\n" + table)
    (out / f"ceiling{suffix}.txt").write_text(table + "\n", encoding="utf-8")
    (out / f"ceiling{suffix}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, out / f"ceiling{suffix}.png")
    print(f"\nwrote {out / f'ceiling{suffix}'}.{{txt,json,png}}")
    errors = sum(lv["errors"] for run in results["runs"] for lv in run["levels"]) + len(results.get("errors", []))
    return 1 if errors else 0


def _run_dict(run: Run) -> dict:
    return {
        "model": run.model,
        "server": run.server,
        "dtype": run.dtype,
        "ceilings": {"batch1": run.ceilings[0], "compute": run.ceilings[1]},
        "start_s": run.start_s,
        "levels": [
            {"streams": lv.streams, "requests": lv.requests, "tokens": lv.tokens, "seconds": lv.seconds,
             "tokens_per_s": lv.tps, "ttft_p50_s": lv.ttft_p50, "errors": lv.errors}
            for lv in run.levels
        ],
    }  # fmt: skip


if __name__ == "__main__":  # vLLM spawns processes: nothing may run at import
    sys.exit(main())
