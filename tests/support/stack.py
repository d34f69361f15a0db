"""A real controller + workers + API server on loopback, for end-to-end tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.procs import Service, ServiceGroup, free_port


@dataclass
class Stack:
    group: ServiceGroup
    controller_url: str
    api_url: str = ""
    workers: dict[str, tuple[Service, str]] = field(default_factory=dict)  # name -> (service, url)

    @property
    def base_url(self) -> str:
        return f"{self.api_url}/v1"

    def start_controller(self, *args: str) -> Service:
        port = self.controller_url.rsplit(":", 1)[1]
        svc = self.group.start("controller", "controller", "--port", port, "--heartbeat-expiry", "3", *args)
        svc.wait_healthy(f"{self.controller_url}/health", timeout=60)
        return svc

    def start_worker(self, name: str, model_path: Path, *args: str, wait: bool = True) -> Service:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        svc = self.group.start(
            name,
            "worker",
            "--model-path",
            str(model_path),
            "--port",
            str(port),
            "--controller-address",
            self.controller_url,
            "--device",
            "cpu",
            "--heartbeat-interval",
            "0.5",
            *args,
        )
        self.workers[name] = (svc, url)
        if wait:
            svc.wait_healthy(f"{url}/health", timeout=180)
        return svc

    def start_api(self, *args: str) -> Service:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        svc = self.group.start(
            "api",
            "api",
            "--port",
            str(port),
            "--controller-address",
            self.controller_url,
            "--sync-interval",
            "0.2",
            *args,
        )
        svc.wait_healthy(f"{self.api_url}/health", timeout=60)
        return svc

    def wait_models(self, *names: str, timeout: float = 30.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            models = httpx.get(f"{self.api_url}/health", timeout=5).json()["models"]
            if all(n in models for n in names):
                return
            time.sleep(0.1)
        raise AssertionError(f"models {names} not routable after {timeout}s; have {models}")

    def worker_health(self, name: str) -> dict:
        return httpx.get(f"{self.workers[name][1]}/health", timeout=5).json()


def new_stack(log_dir: Path) -> Stack:
    return Stack(ServiceGroup(log_dir), f"http://127.0.0.1:{free_port()}")
