"""Where vLLM's IPC sockets go (llmstack/services/engines/vllm/ipc.py): a directory per engine process,
removed on close; directories of processes that are gone are swept; the user's VLLM_RPC_BASE_PATH wins."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmstack.services.engines.vllm import ipc


@pytest.fixture
def root() -> Iterator[Path]:
    """A temp directory as short as the system's own (pytest's tmp_path is too deep for socket paths)."""
    path = Path(tempfile.mkdtemp(prefix="ipc-"))
    yield path
    shutil.rmtree(path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _bound_socket(directory: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:  # a short name: pytest's temp paths are long
        sock.bind(str(directory / "s"))


def test_each_engine_gets_its_own_directory_and_close_removes_it(root: Path) -> None:
    env: dict[str, str] = {}
    path = ipc.private_rpc_dir(env, root=str(root))
    assert path is not None and path.is_dir() and path.parent == root
    assert path.name.startswith(f"{ipc.PREFIX}{os.getpid()}-") and env[ipc.RPC_ENV] == str(path)
    _bound_socket(path)
    ipc.remove_rpc_dir(path, env)
    assert not path.exists() and ipc.RPC_ENV not in env


def test_directories_of_dead_processes_are_swept_live_ones_kept(root: Path) -> None:
    dead = root / f"{ipc.PREFIX}{_dead_pid()}-abc"
    live = root / f"{ipc.PREFIX}{os.getpid()}-def"
    unrelated = root / "llmstack-vllm-notapid"
    for d in (dead, live, unrelated):
        d.mkdir()
    _bound_socket(dead)
    ours = ipc.private_rpc_dir({}, root=str(root))
    assert not dead.exists() and live.is_dir() and unrelated.is_dir() and ours is not None and ours.is_dir()


def test_a_base_path_the_user_set_is_left_alone(tmp_path: Path) -> None:
    env = {ipc.RPC_ENV: str(tmp_path / "mine")}
    assert ipc.private_rpc_dir(env, root=str(tmp_path)) is None
    assert env[ipc.RPC_ENV] == str(tmp_path / "mine") and list(tmp_path.iterdir()) == []


def test_a_temp_directory_too_deep_for_socket_paths_keeps_vllms_default(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    env: dict[str, str] = {}
    assert ipc.private_rpc_dir(env, root=str(deep)) is None
    assert env == {} and list(deep.iterdir()) == []
