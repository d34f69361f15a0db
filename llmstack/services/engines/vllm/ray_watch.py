"""A vLLM worker whose ranks run on a Ray cluster cannot outlive a node that holds one of its stages: vLLM's
engine over Ray then waits for that stage forever, and its streams stall.  This watch notices a node that was in
the cluster when the engine was ready leave it, and ends the worker process with an error: its streams end at
once (the API server reports them failed), and the supervisor restarts the worker, whose new engine waits for
the cluster to have room again, that is, for the node to be back.

Every node alive at start is watched, not only the ones holding this engine's stages (those are known to vLLM's
engine process only): losing any node of the cluster restarts the worker.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("llmstack.engine.vllm")

EXIT_NODE_LOST = 75  # EX_TEMPFAIL: try again later (the supervisor restarts it with backoff)


def alive_nodes() -> set[str]:
    import ray

    return {str(n["NodeID"]) for n in ray.nodes() if n.get("Alive")}


class RayNodeWatch:
    """Poll the cluster's nodes every `interval` seconds from a daemon thread; `lost(ids)` when one is gone."""

    def __init__(
        self,
        interval: float = 2.0,
        nodes: Callable[[], set[str]] = alive_nodes,
        lost: Callable[[set[str]], None] | None = None,
    ) -> None:
        self.interval = interval
        self.nodes = nodes
        self.lost = lost or _exit_for_lost_nodes
        self.expected: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self) -> None:
        """Join the cluster as a driver of its own (`RAY_ADDRESS`, `RAY_AUTH_TOKEN`: the worker's environment)."""
        import ray

        if not ray.is_initialized():
            ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)

    def start(self) -> None:
        self.expected = self.nodes()
        log.info("watching the Ray cluster's %d node(s): losing one restarts this worker", len(self.expected))
        self._thread = threading.Thread(target=self._run, name="ray-node-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                gone = self.expected - self.nodes()
            except Exception as exc:  # the head itself unreachable: vLLM fails on its own then
                log.warning("could not list the Ray cluster's nodes: %s", exc)
                continue
            if gone:
                self.lost(gone)
                return

    def stop(self) -> None:
        self._stop.set()


def _exit_for_lost_nodes(gone: set[str]) -> None:
    log.error(
        "Ray node(s) %s left the cluster while this worker's model had stages there: exiting so that the "
        "supervisor restarts the worker (it loads again once the cluster has room, when the node is back)",
        ", ".join(sorted(n[:12] for n in gone)),
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_NODE_LOST)  # the engine is stuck waiting on the lost stage: a clean shutdown would hang too
