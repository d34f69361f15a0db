"""The Grafana dashboard only queries metrics the services really export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from tests.support.stack import Stack

ROOT = Path(__file__).resolve().parents[1]


def test_dashboard_queries_exported_metrics(stack: Stack) -> None:
    dashboard = json.loads((ROOT / "examples/monitoring/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bllmstack_[a-z_]+", e)}
    exported = set()
    for url in (stack.api_url, stack.controller_url, *(u for _, u in stack.workers.values())):
        # declared families count even before their first sample (labels appear with traffic)
        for name, kind in re.findall(r"^# TYPE (llmstack_[a-z_]+) (\w+)", httpx.get(f"{url}/metrics").text, re.M):
            exported.add(name)
            if kind == "counter":
                exported.add(name if name.endswith("_total") else f"{name}_total")
            if kind == "histogram":
                exported |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    assert used and used <= exported, used - exported
