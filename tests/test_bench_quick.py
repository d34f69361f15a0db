"""The benchmark suite's quick mode runs end to end (both stacks, every measurement, table and plot),
so the suite cannot rot.  Timing figures are not asserted: they come from the full mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run_quick(script: str, out: Path, timeout: float) -> None:
    """`bench/<script> --quick --out <out>`, which must succeed."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fastchat_compare_quick_runs_everything(tmp_path: Path) -> None:
    import matplotlib  # noqa: F401  - the bench extra (scripts/install.sh installs it): fail here, not skip

    out = tmp_path / "results"
    _run_quick("fastchat_compare.py", out, timeout=1100)
    results = json.loads((out / "fastchat_compare-quick.json").read_text())
    assert results["errors"] == []
    plan = results["plan"]
    for stack in ("llmstack", "fastchat"):
        assert results["latency"][stack]["requests"] == plan["latency_requests"]
        for level in plan["stream_levels"]:
            row = results["streaming"][stack][str(level)]
            assert row["requests"] == level and row["tokens"] == level * plan["max_tokens"]
            assert row["ttft_p50_ms"] > 0
        for level in plan["throughput_levels"]:
            row = results["throughput"][stack][str(level)]
            assert row["requests"] == level and row["tokens"] == level * plan["max_tokens"]
        assert results["peak_rss_mb"][stack] > 0
    png = out / "fastchat_compare-quick.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "fastchat_compare-quick.txt").read_text()
    assert "1-token latency median" in table and "worker peak RSS" in table


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ceiling_quick_measures_the_machine_and_the_engine(tmp_path: Path) -> None:
    out = tmp_path / "results"
    _run_quick("ceiling.py", out, timeout=500)
    results = json.loads((out / "ceiling-quick.json").read_text())
    assert results["machine"]["bandwidth_gbs"] > 0 and results["machine"]["matmul_gflops"]["float32"] > 0
    (run,) = results["runs"]
    assert run["server"] == "llmstack transformers" and all(c > 0 for c in run["ceilings"].values())
    for level in run["levels"]:
        assert level["errors"] == 0 and level["tokens"] == level["requests"] * results["plan"]["max_tokens"]
        assert level["tokens_per_s"] > 0 and level["ttft_p50_s"] > 0
    assert (out / "ceiling-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ceil b1" in (out / "ceiling-quick.txt").read_text()


def test_chat_flatness_compares_medians_of_early_and_late_turns() -> None:
    from bench.ceiling_report import chat_growth

    assert chat_growth([0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]) == 1.0  # turn 1: nothing cached yet
    assert chat_growth([0.1, 0.07, 0.2, 0.07, 0.1, 0.1, 0.1, 0.07, 0.2, 0.07]) == 1.0  # one slow turn each
    growing = [0.12, 0.17, 0.25, 0.31, 0.42, 0.64, 0.57, 0.71, 0.85, 0.84]  # measured without the cache
    assert chat_growth(growing) == 0.84 / 0.25


def test_a_target_against_a_server_that_did_not_run_is_not_judged_met() -> None:
    from bench.ceiling_report import targets_lines

    def run(server: str, tps: dict[int, float]) -> dict:
        levels = [{"streams": n, "tokens_per_s": t, "ttft_p50_s": 1.0} for n, t in tps.items()]
        return {"model": "gemma", "server": server, "levels": levels, "ceilings": {"batch1": 20.0}}

    hf = run("llmstack transformers", {1: 5.0, 8: 16.0, 16: 24.0})
    results = {"runs": [hf, run("vllm serve (auto)", {1: 5.0, 8: 6.0, 16: 30.0})]}
    assert "1.0x vllm serve (auto) (fastest): 2.67x, met" in "\n".join(targets_lines(results))
    results["errors"] = ["gemma vllm serve (float32): exited with -9"]
    lines = "\n".join(targets_lines(results))
    assert (
        "8 streams >= 1.0x vllm serve (auto) (fastest): 2.67x, not judged (vllm serve (float32) did not run)" in lines
    )
    assert "16 streams >= 1.0x vllm serve (auto) (fastest): 0.80x, MISSED" in lines  # slower than one that ran
