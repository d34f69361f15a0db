"""Starting and stopping a stack: the foreground or detached supervisor, and `down`, which works even
when the supervisor is gone (from the processes recorded in the run directory)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from rich.table import Table

from llmstack.common.console import EXIT_FAILED, EXIT_OK, console, err, print_error
from llmstack.stack.children import STOP_TIERS, RecordedStop, stop_tiers
from llmstack.stack.config import DEFAULT_CONFIG, StackConfig
from llmstack.stack.logs import LogFollower, PrefixPrinter, tail_file
from llmstack.stack.plan import SECRET_ENV, Plan, keys_required
from llmstack.stack.rundir import (
    RUN_ID_ENV,
    Phase,
    RunDir,
    RunState,
    ServiceState,
    kill_all,
    marked_processes,
)
from llmstack.stack.supervisor import supervisor_argv


def running_state(rd: RunDir) -> RunState | None:
    """The state of a stack that still has live processes in this run directory, if any."""
    state = rd.read_state()
    if state is None:
        return None
    refs = [state.supervisor] if state.supervisor else []
    refs += [s.proc for s in state.services if s.proc]
    if any(ref.alive() for ref in refs if ref.pid != os.getpid()):
        return state
    return None


def run_supervisor(rd: RunDir, *, echo: bool, secrets: dict[str, str] | None = None) -> int:
    """Run the supervisor in this process until stopped (foreground `up`, or the detached supervisor)."""
    from llmstack.stack.logs import ForegroundEcho
    from llmstack.stack.supervisor import Supervisor, install_signal_handlers

    plan = Plan.model_validate_json(rd.plan_path.read_text(encoding="utf-8"))
    if secrets is None:
        secrets = {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    printer = None
    if echo:
        names = ["supervisor", *(s.name for s in plan.services)]
        printer = PrefixPrinter(names, console)
        follower = LogFollower({s.name: rd.log_path(s.name) for s in plan.services}, from_end=False)
        sup = Supervisor(plan, rd, secrets=secrets, echo=ForegroundEcho(printer, follower))
    else:
        sup = Supervisor(plan, rd, secrets=secrets)
    install_signal_handlers(sup)
    has_keys = keys_required(plan, secrets)
    code = sup.run(on_ready=(lambda s: _print_ready(s.state, plan, has_keys)) if echo else None)
    if echo and sup.state.phase == Phase.FAILED:
        print_error(str(sup.state.message))
    return code


def start_detached(rd: RunDir, plan: Plan, secrets: dict[str, str]) -> int:
    """Start the supervisor as its own background process and wait until the stack is ready or failed."""
    env = {**os.environ, **secrets, RUN_ID_ENV: plan.run_id}
    rd.logs.mkdir(parents=True, exist_ok=True)
    with rd.log_path("supervisor").open("ab") as out:
        proc = subprocess.Popen(
            supervisor_argv(rd.root),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    shown: set[str] = set()
    try:
        while True:
            state = rd.read_state()
            if state is not None and state.run_id == plan.run_id:
                for rec in state.services:
                    if rec.state == ServiceState.RUNNING and rec.name not in shown:
                        shown.add(rec.name)
                        console.print(f"  [green]✓[/] {rec.name} healthy after {rec.first_ready_after or 0:.1f}s")
                if state.phase == Phase.READY:
                    _print_ready(state, plan, keys_required(plan, secrets))
                    console.print(
                        f"running in the background (supervisor pid {proc.pid}); stop with "
                        f"[bold]llmstack down[/]{_config_hint(plan)}"
                    )
                    return EXIT_OK
                if state.phase in (Phase.FAILED, Phase.STOPPED) and proc.poll() is not None:
                    print_error(state.message or "the stack stopped while starting")
                    return EXIT_FAILED
            if proc.poll() is not None and (state is None or state.phase not in (Phase.FAILED, Phase.STOPPED)):
                print_error(
                    f"the supervisor exited with {proc.returncode} while starting; its log:\n"
                    f"{tail_file(rd.log_path('supervisor'), 30)}"
                )
                stop_stack(rd, None, plan.policy.drain_timeout, quiet=True)
                return EXIT_FAILED
            time.sleep(0.2)
    except KeyboardInterrupt:
        err.print("interrupted: stopping what was started", markup=False)
        stop_stack(rd, None, 5.0, quiet=True)
        return 130


def _config_hint(plan: Plan) -> str:
    if plan.config_path and Path(plan.config_path) != Path(DEFAULT_CONFIG).resolve():
        return f" -c {_rel(plan.config_path)}"
    return ""


def _rel(path: str) -> str:
    with contextlib.suppress(ValueError):
        return str(Path(path).relative_to(Path.cwd()))
    return path


def _print_ready(state: RunState, plan: Plan, has_keys: bool) -> None:
    table = Table(title=f"stack {state.stack!r} is ready", title_justify="left")
    for col in ("service", "address", "pid", "ready in", "models"):
        table.add_column(col)
    for rec in state.services:
        table.add_row(
            rec.name,
            rec.url,
            str(rec.proc.pid if rec.proc else "-"),
            f"{rec.first_ready_after:.1f}s" if rec.first_ready_after is not None else "-",
            ", ".join(rec.models),
        )
    console.print(table)
    models = [m for rec in state.services for m in rec.models]
    if plan.api_url and any(s.role == "api" for s in plan.services):
        model = models[0] if models else "<model>"
        auth = ' -H "Authorization: Bearer $LLMSTACK_API_KEY"' if has_keys else ""
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
        key = "os.environ['LLMSTACK_API_KEY']" if auth else "'none'"
        console.print("Try it:", style="bold")
        console.print(
            f"  curl {plan.api_url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
            markup=False,
            soft_wrap=True,
        )
        console.print(
            f"  python -c \"import os; from openai import OpenAI; c = OpenAI(base_url='{plan.api_url}/v1', "
            f"api_key={key}); print(c.chat.completions.create(model='{model}', "
            "messages=[{'role': 'user', 'content': 'Hello!'}]).choices[0].message.content)\"",
            markup=False,
            soft_wrap=True,
        )
    webui = next((s for s in plan.services if s.role == "webui"), None)
    if webui is not None:
        console.print(f"  web UI: {webui.url}", markup=False)


def stop_stack(rd: RunDir, cfg: StackConfig | None, drain: float, *, quiet: bool = False) -> int:
    state = rd.read_state()
    if state is None:
        if not quiet:
            console.print(f"nothing to stop: no stack state in {rd.root}")
        return EXIT_OK
    sup = state.supervisor
    if sup is not None and sup.pid != os.getpid() and sup.alive():
        if not quiet:
            console.print(f"stopping supervisor (pid {sup.pid}); draining for up to {drain:g}s")
        sup.signal(signal.SIGTERM)  # it drains its services in order
        deadline = time.monotonic() + drain * 3 + 15
        while sup.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        state = rd.read_state() or state
    # whatever is left: the supervisor was killed, hung, or gave up
    tiers = [
        [RecordedStop(s.name, s.proc) for s in state.services if s.role in tier and s.proc is not None]
        for tier in STOP_TIERS
    ]
    live = [p.name for tier in tiers for p in tier if p.alive()]
    if live and not quiet:
        console.print(f"stopping {', '.join(live)} (no supervisor); draining for up to {drain:g}s")
    stop_tiers(tiers, drain if live else 0.0)
    if sup is not None and sup.pid != os.getpid():
        sup.kill_tree()
    stragglers = marked_processes(state.run_id)
    if stragglers:
        kill_all(stragglers)
        import psutil

        with contextlib.suppress(psutil.Error):
            psutil.wait_procs(stragglers, timeout=5)
    for rec in state.services:
        if rec.state != ServiceState.FAILED:
            rec.state = ServiceState.STOPPED
    state.phase = Phase.STOPPED
    rd.write_state(state)
    if not quiet:
        extra = f" ({len(stragglers)} stray processes killed)" if stragglers else ""
        console.print(f"stack {state.stack!r} stopped{extra}")
    return EXIT_OK
