"""The benchmark suite's quick mode runs end to end (both stacks, every measurement, table and plot),
so the suite cannot rot.  Timing figures are not asserted: they come from the full mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fastchat_compare_quick_runs_everything(tmp_path: Path) -> None:
    import matplotlib  # noqa: F401  - the bench extra (scripts/install.sh installs it): fail here, not skip

    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fastchat_compare.py"), "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
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
