"""A directory of its own for the vLLM engine's IPC sockets, removed when the engine closes.

vLLM binds its ZeroMQ sockets (front end <-> engine core, the workers' message queues) as `<uuid>` files in
`VLLM_RPC_BASE_PATH`, the system temp directory by default, and leaves them there: measured, one worker started
and stopped left 7 such sockets in /tmp, and a box whose workers restart collects them by the thousand.  Each
engine gets `llmstack-vllm-<pid>-*` instead; closing removes it, and the next engine removes those of processes
that are gone (a worker killed before it could close).  A `VLLM_RPC_BASE_PATH` the user set is left alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

log = logging.getLogger("llmstack.engine.vllm")

RPC_ENV = "VLLM_RPC_BASE_PATH"
PREFIX = "llmstack-vllm-"
SOCKET_PATH_MAX = 107  # sun_path on Linux; vLLM's names are a uuid (36 characters) in the directory


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_orphans(root: Path) -> list[Path]:
    """Remove the socket directories under `root` whose owning process is gone; the ones removed."""
    removed = []
    for entry in root.glob(f"{PREFIX}*"):
        pid_text = entry.name[len(PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or not entry.is_dir() or _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def private_rpc_dir(environ: MutableMapping[str, str] | None = None, root: str | None = None) -> Path | None:
    """Point vLLM's IPC sockets at a new directory of this process (set in `environ`, default `os.environ`,
    which the engine's processes inherit); None when the user chose the place, or when socket paths in a
    directory under `root` would be too long for Unix sockets."""
    environ = os.environ if environ is None else environ
    if environ.get(RPC_ENV):
        return None
    base = Path(root or tempfile.gettempdir())
    for gone in sweep_orphans(base):
        log.info("removed %s, left by a vLLM engine whose process is gone", gone)
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))
    if len(os.fsencode(path)) + 1 + 36 > SOCKET_PATH_MAX:  # a long temp path: vLLM's own place, not failure
        path.rmdir()
        return None
    environ[RPC_ENV] = str(path)
    return path


def remove_rpc_dir(path: Path | None, environ: MutableMapping[str, str] | None = None) -> None:
    if path is None:
        return
    environ = os.environ if environ is None else environ
    shutil.rmtree(path, ignore_errors=True)
    if environ.get(RPC_ENV) == str(path):
        del environ[RPC_ENV]
