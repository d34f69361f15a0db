"""The table, the targets and the plot of `ceiling.py`, from its results dictionary."""

from __future__ import annotations

from pathlib import Path

# The baseline (same model, same machine class, before this work): transformers engine TTFT p50
# at 8 streams, the sequential fallback's (at 16 it can only be worse).
BASELINE_TTFT_8 = 52.6


def _runs(results: dict, model: str) -> list[dict]:
    return [r for r in results["runs"] if r["model"] == model]


def _level(run: dict | None, streams: int) -> dict | None:
    if run is None:
        return None
    return next((lv for lv in run["levels"] if lv["streams"] == streams), None)


def _find(results: dict, model: str, server: str) -> dict | None:
    return next((r for r in _runs(results, model) if r["server"] == server), None)


def _tps(run: dict | None, streams: int) -> float:
    lv = _level(run, streams)
    return lv["tokens_per_s"] if lv else float("nan")


def render(results: dict) -> str:
    m = results["machine"]
    gflops = ", ".join(f"{d} {v:.0f} GFLOP/s" for d, v in m["matmul_gflops"].items())
    lines = [f"machine: {m['threads']} threads, memory read {m['bandwidth_gbs']:.1f} GB/s, matmul {gflops}", ""]
    for model, facts in results.get("models", {}).items():
        lines.append(
            f"{model}: {facts['parameters'] / 1e6:.0f}M parameters, {facts['read_parameters'] / 1e6:.0f}M read per "
            f"step, {2 * facts['matrix_parameters'] / 1e9:.2f} GFLOP per token ({facts['path']})"
        )
        head = f"  {'server':36s} {'dtype':9s} {'ceil b1':>8s} {'ceil big':>8s}"
        head += f" | {'streams':>7s} {'tok/s':>7s} {'/b1':>6s} {'/big':>6s} {'TTFT p50':>9s}"
        lines += [head, "  " + "-" * (len(head) - 2)]
        for run in _runs(results, model):
            c = run["ceilings"]
            for i, lv in enumerate(run["levels"]):
                left = f"{run['server']:36s} {run['dtype']:9s} {c['batch1']:8.1f} {c['compute']:8.1f}" if not i else ""
                lines.append(
                    f"  {left:64s} | {lv['streams']:>7d} {lv['tokens_per_s']:7.1f} "
                    f"{lv['tokens_per_s'] / c['batch1']:6.2f} {lv['tokens_per_s'] / c['compute']:6.2f} "
                    f"{lv['ttft_p50_s']:8.2f}s"
                )
        lines.append("")
    for server, targets in results.get("prefix", {}).items():
        sp = targets["system_prompt"]
        chat = " ".join(f"{t:.2f}" for t in targets["chat_ttft_s"])
        lines.append(
            f"prefix, {server}: shared 1,500-token system prompt TTFT {sp['first_ttft_s']:.2f}s -> "
            f"{sp['second_ttft_s']:.2f}s ({sp['ratio']:.1f}x); 10-turn chat TTFT per turn (s): {chat}"
        )
    lines += ["", *targets_lines(results)]
    for name, profile in results.get("profiles", {}).items():
        lines += ["", f"py-spy, {name}:", profile]
    for error in results.get("errors", []):
        lines.append(f"error: {error}")
    return "\n".join(lines)


def chat_growth(turns: list[float]) -> float:
    """How much later turns' TTFT exceeds early ones': the median of the last three over that of turns 2-4
    (turn 1 has nothing cached yet; medians, because one turn's TTFT moves with the machine's noise)."""
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return median(turns[-3:]) / median(turns[1:4])


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def targets_lines(results: dict) -> list[str]:
    out = ["targets:"]
    hf = _find(results, "gemma", "llmstack transformers")
    serves = [r for r in _runs(results, "gemma") if r["server"].startswith("vllm serve")]
    failed_serves = ", ".join(
        e.removeprefix("gemma ").split(":")[0] + " did not run"
        for e in results.get("errors", [])
        if e.startswith("gemma vllm serve")
    )
    if hf is not None:
        one = _tps(hf, 1)
        for streams in (8, 16):
            x = _tps(hf, streams) / one
            out.append(f"  gemma transformers {streams} streams >= 3x its 1 stream: {x:.2f}x, {_verdict(x >= 3)}")
            if serves:
                best = max(serves, key=lambda r: _tps(r, streams))
                y = _tps(hf, streams) / _tps(best, streams)
                # a vllm serve that did not run may have been the fastest: "met" cannot be said then
                verdict = _verdict(y >= 1.0) if y < 1.0 or not failed_serves else f"not judged ({failed_serves})"
                out.append(
                    f"  gemma transformers {streams} streams >= 1.0x {best['server']} (fastest): {y:.2f}x, {verdict}"
                )
        lv = _level(hf, 16)
        if lv is not None:
            limit = BASELINE_TTFT_8 / 5
            out.append(
                f"  gemma transformers TTFT p50 at 16 <= 1/5 of before ({BASELINE_TTFT_8}s at 8): "
                f"{lv['ttft_p50_s']:.2f}s, {_verdict(lv['ttft_p50_s'] <= limit)}"
            )
        b1 = one / hf["ceilings"]["batch1"]
        out.append(f"  gemma transformers batch-1 >= 0.85 of the bandwidth ceiling: {b1:.2f}, {_verdict(b1 >= 0.85)}")
    vw, default_serve = _find(results, "gemma", "llmstack vLLM"), _find(results, "gemma", "vllm serve (auto)")
    if vw is not None and default_serve is not None:
        x = _tps(vw, 8) / _tps(default_serve, 8)
        out.append(f"  gemma llmstack vLLM worker >= 2x default vllm serve at 8: {x:.2f}x, {_verdict(x >= 2)}")
    llama = _find(results, "llama", "llmstack transformers")
    llama_serves = [r for r in _runs(results, "llama") if r["server"].startswith("vllm serve")]
    if llama is not None and llama_serves:
        best = max(llama_serves, key=lambda r: _tps(r, 32))
        x = _tps(llama, 32) / _tps(best, 32)
        out.append(f"  llama transformers 32 streams >= 1.0x {best['server']}: {x:.2f}x, {_verdict(x >= 1.0)}")
    prefix = results.get("prefix", {}).get("llmstack transformers")
    if prefix:
        ratio = prefix["system_prompt"]["ratio"]
        out.append(f"  shared system prompt: second TTFT >= 5x lower: {ratio:.1f}x, {_verdict(ratio >= 5)}")
        growth = chat_growth(prefix["chat_ttft_s"])
        out.append(f"  10-turn chat TTFT flat (turns 8-10 <= 1.5x turns 2-4): {growth:.2f}x, {_verdict(growth <= 1.5)}")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results.get("models", {}))
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(6 * (len(models) + 1), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=False):
        for run in _runs(results, model):
            xs = [lv["streams"] for lv in run["levels"]]
            ax.plot(xs, [lv["tokens_per_s"] for lv in run["levels"]], marker="o", label=f"{run['server']}")
            ax.axhline(run["ceilings"]["batch1"], ls=":", lw=0.8, color=ax.lines[-1].get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent 64-token streams")
        ax.set_ylabel("generated tokens/s (dotted: batch-1 ceiling)")
        ax.set_title(f"{model}")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for server, targets in results.get("prefix", {}).items():
        turns = targets["chat_ttft_s"]
        ax.plot(range(1, len(turns) + 1), turns, marker="o", label=server)
    ax.set_xlabel("chat turn")
    ax.set_ylabel("TTFT (s)")
    ax.set_title("10-turn chat, gemma")
    if ax.get_legend_handles_labels()[0]:  # a run without the prefix targets draws no chat
        ax.legend(fontsize=7)
    m = results["machine"]
    fig.suptitle(f"decode throughput vs this machine's limits (read {m['bandwidth_gbs']:.1f} GB/s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
