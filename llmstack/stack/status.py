"""What `llmstack status` reports: every service's process and health, every model's workers, queue,
speed, TTFT and memory, from the run directory, the controller and the API server's metrics."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import psutil
from rich.table import Table

from llmstack.common.net import bearer, judge_health
from llmstack.stack.plan import cluster_token_for
from llmstack.stack.rundir import (
    Phase,
    RunState,
    ServiceState,
)


def _health(rec: Any) -> tuple[bool, str, dict]:
    """Whether a service is healthy, in a word, and (workers) its engine's figures from /health."""
    import httpx

    from llmstack.common.net import tcp_open, tcp_target

    target = tcp_target(rec.health_url)
    if target is not None:  # a Ray node
        return (True, "ok", {}) if tcp_open(*target) else (False, "not answering", {})
    try:
        with httpx.Client(timeout=2.0, trust_env=False, verify=False) as client:
            resp = client.get(rec.health_url)
    except httpx.HTTPError as exc:
        return False, type(exc).__name__, {}
    healthy, detail = judge_health(resp)
    engine: dict = {}
    if rec.role == "workers":
        with contextlib.suppress(ValueError, AttributeError):
            figures = resp.json().get("engine")
            engine = figures if isinstance(figures, dict) else {}
    return healthy, detail, engine


def _prefix_hit_rates(engines: list[tuple[list[str], dict]]) -> dict[str, float]:
    """Per model, prompt tokens served from the workers' prefix caches / tokens looked up, since they started."""
    totals: dict[str, list[int]] = {}
    for models, engine in engines:
        queried, hits = engine.get("prefix_cache_queried_tokens"), engine.get("prefix_cache_hit_tokens")
        if not isinstance(queried, int) or not isinstance(hits, int):
            continue
        for name in models:
            pair = totals.setdefault(name, [0, 0])
            pair[0] += queried
            pair[1] += hits
    return {name: hits / queried for name, (queried, hits) in totals.items() if queried}


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _models_from_controller(url: str | None, token: str | None, state: RunState) -> tuple[list[dict], str | None]:
    import httpx

    if not url:
        return [], None
    headers = bearer(token)
    try:
        with httpx.Client(timeout=3.0, trust_env=not url.startswith(("http://127.", "http://localhost"))) as client:
            resp = client.get(f"{url}/workers", headers=headers)
            resp.raise_for_status()
            table = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        return [], f"controller {url}: {type(exc).__name__}: {exc}"
    memory: dict[str, int] = {}
    for rec in state.services:
        if rec.role == "workers" and rec.proc is not None:
            total = 0
            for proc in rec.proc.members():
                with contextlib.suppress(psutil.Error):  # it exited meanwhile
                    total += proc.memory_info().rss
            memory[rec.url.rstrip("/")] = total
    models: dict[str, dict] = {}
    for w in table.get("workers", []):
        status = w.get("status", {})
        for name in w.get("model_names", []):
            m = models.setdefault(
                name,
                {
                    "name": name,
                    "workers": 0,
                    "queue_length": 0,
                    "running": 0,
                    "tokens_per_s": 0.0,
                    "memory_bytes": 0,
                    "kind": w.get("kind"),
                },
            )
            m["workers"] += 1
            m["queue_length"] += int(status.get("queue_length", 0))
            m["running"] += int(status.get("running", 0))
            m["tokens_per_s"] += float(status.get("speed", 0.0))
            m["memory_bytes"] += memory.get(str(w.get("worker_address", "")).rstrip("/"), 0)
    return sorted(models.values(), key=lambda m: m["name"]), None


def _ttft_p50(api_url: str | None) -> dict[str, float]:
    """Median time to first token per model, from the API server's histogram (as histogram_quantile)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    if not api_url:
        return {}
    try:
        with httpx.Client(timeout=2.0, trust_env=False, verify=False) as client:
            text = client.get(f"{api_url}/metrics").text
    except httpx.HTTPError:
        return {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "llmstack_api_time_to_first_token_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets.setdefault(sample.labels["model"], []).append((float(sample.labels["le"]), sample.value))
    out = {}
    for model, pairs in buckets.items():
        pairs.sort()
        total = pairs[-1][1] if pairs else 0
        if not total:
            continue
        rank, lower, below = total / 2, 0.0, 0.0
        for upper, count in pairs:
            if count >= rank:
                if upper == float("inf"):
                    out[model] = lower
                else:
                    share = (rank - below) / (count - below) if count > below else 1.0
                    out[model] = lower + (upper - lower) * share
                break
            lower, below = upper, count
    return out


def status_report(cfg: Any, rd: Any, state: RunState) -> dict:
    now = time.time()
    sup_alive = bool(state.supervisor and state.supervisor.alive())
    services = []
    engines: list[tuple[list[str], dict]] = []
    for rec in state.services:
        alive = bool(rec.proc and rec.proc.alive()) and rec.state != ServiceState.UNLOADED
        ok, detail, engine = _health(rec) if alive else (False, "not running", {})
        if rec.state == ServiceState.UNLOADED:
            ok, detail = True, "not loaded"  # its model loads at run time
        if engine:
            engines.append((list(rec.models), engine))
        shown = rec.state.value
        if rec.state in (ServiceState.RUNNING, ServiceState.RESTARTING, ServiceState.STARTING) and not alive:
            shown = "dead"
        services.append(
            {
                "name": rec.name,
                "role": rec.role,
                "state": shown,
                "pid": rec.proc.pid if rec.proc and alive else None,
                "uptime_s": round(now - rec.ready_at, 1) if alive and rec.ready_at else None,
                "restarts": rec.restarts,
                "address": rec.url,
                "healthy": ok,
                "health": detail,
                "message": rec.message,
                "log_path": rec.log_path,
                "models": rec.models,
            }
        )
    controller_url = state.controller_url
    models, models_error = _models_from_controller(controller_url, cluster_token_for(cfg, rd), state)
    ttft = _ttft_p50(state.api_url)
    hit_rates = _prefix_hit_rates(engines)
    for row in models:
        row["ttft_p50_s"] = ttft.get(row["name"])
        row["prefix_cache_hit_rate"] = hit_rates.get(row["name"])
    running = state.phase not in (Phase.STOPPED,) and any(s["pid"] for s in services)
    healthy = bool(services) and all(s["healthy"] for s in services) and sup_alive
    return {
        "stack": state.stack,
        "run_dir": str(rd.root),
        "phase": state.phase.value,
        "running": running,
        "healthy": healthy,
        "message": state.message,
        "supervisor": {"pid": state.supervisor.pid if state.supervisor else None, "alive": sup_alive},
        "started_at": state.started_at,
        "ready_at": state.ready_at,
        "timings": state.timings,
        "api_url": state.api_url,
        "controller_url": controller_url,
        "services": services,
        "models": models,
        "models_error": models_error,
        "model_states": model_states(rd.root),
    }


def model_states(root: Any) -> list[dict]:
    """The supervisor's view of each model (loaded, loading, unloaded, failed; memory; last use), as it
    last wrote it to the run directory."""
    import json
    from pathlib import Path

    try:
        rows = json.loads((Path(root) / "models.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return rows if isinstance(rows, list) else []


def status_renderable(report: dict) -> Any:
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = []
    sup = report["supervisor"]
    head = f"stack {report['stack']!r}: {report['phase']}"
    head += f", supervisor pid {sup['pid']}" if sup["alive"] else ", [bold red]supervisor not running[/]"
    parts.append(head)
    t = Table(title="services", title_justify="left")
    for col in ("service", "state", "pid", "uptime", "restarts", "address", "health"):
        t.add_column(col)
    for s in report["services"]:
        style = "green" if s["healthy"] else "red"
        t.add_row(
            s["name"],
            s["state"],
            str(s["pid"] or "-"),
            _uptime(s["uptime_s"]),
            str(s["restarts"]),
            s["address"],
            f"[{style}]{s['health']}[/]",
        )
    parts.append(t)
    for s in report["services"]:
        if s["message"]:
            parts.append(Text(f"  {s['name']}: {s['message']}"))
    if report["models"]:
        m = Table(title="models", title_justify="left")
        for col in ("model", "workers", "queue", "running", "tokens/s", "TTFT p50", "prefix hits", "memory"):
            m.add_column(col)
        for row in report["models"]:
            mem = f"{row['memory_bytes'] / 2**20:.0f} MiB" if row["memory_bytes"] else "-"
            ttft = row.get("ttft_p50_s")
            hits = row.get("prefix_cache_hit_rate")
            m.add_row(
                row["name"],
                str(row["workers"]),
                str(row["queue_length"]),
                str(row["running"]),
                f"{row['tokens_per_s']:.1f}",
                "-" if ttft is None else f"{ttft * 1000:.0f} ms",
                "-" if hits is None else f"{hits:.0%}",
                mem,
            )
        parts.append(m)
    elif report["models_error"]:
        parts.append(Text(f"models: unavailable ({report['models_error']})"))
    if report.get("model_states"):
        from llmstack.stack.units import format_size

        st = Table(title="model states", title_justify="left")
        for col in ("model", "state", "load", "memory", "in flight", "note"):
            st.add_column(col)
        for row in report["model_states"]:
            memory = f"{format_size(row['memory_bytes'])} ({row['memory_source']})" if row.get("memory_bytes") else "-"
            load = row["load"] + (", pinned" if row.get("pinned") else "")
            st.add_row(row["name"], row["state"], load, memory, str(row.get("inflight", 0)), row.get("message") or "")
        parts.append(st)
    return Group(*parts)
