"""The worker's link to the controller: register (retrying until it answers), heartbeat with the current
status, register again whenever the controller has forgotten the worker (it restarted, or expired it during
a pause), and unregister on the way out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx

from llmstack.common.wire import Heartbeat, Unregister, WorkerRegistration, WorkerStatus

log = logging.getLogger("llmstack.worker")


class ControllerLink:
    def __init__(
        self,
        client: httpx.AsyncClient,
        controller_address: str,
        heartbeat_interval: float,
        registration: Callable[[], WorkerRegistration],
        status: Callable[[], WorkerStatus],
    ) -> None:
        self.client = client
        self.base = controller_address
        self.interval = heartbeat_interval
        self.registration = registration
        self.status = status
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        """Stop heartbeating and leave the controller's table (once; later calls do nothing)."""
        if self._task is None:
            return
        self._task.cancel()
        self._task = None
        await self.unregister()

    async def run(self) -> None:
        registered = False
        backoff = 0.5
        while True:
            try:
                if registered:
                    registered = await self._heartbeat()
                    if not registered:
                        continue
                else:
                    registered = await self._register()
                    if not registered:  # refused: the token is wrong, retrying slowly
                        await asyncio.sleep(min(backoff, 10))
                        backoff *= 2
                        continue
                    backoff = 0.5
                await asyncio.sleep(self.interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # controller down or restarting: keep trying, keep serving
                log.warning("controller %s unreachable (%s); retrying in %.1fs", self.base, type(exc).__name__, backoff)
                registered = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.interval)

    async def _register(self) -> bool:
        """True once the controller knows this worker; False when it refuses the cluster token."""
        reg = self.registration()
        resp = await self.client.post(f"{self.base}/workers/register", json=reg.model_dump())
        if resp.status_code == 409:  # we are known already: just heartbeat
            return True
        if resp.status_code in (401, 403):
            log.error("controller refused registration (%s): check the cluster token", resp.status_code)
            return False
        resp.raise_for_status()
        log.info("registered with controller %s as %s", self.base, reg.worker_address)
        return True

    async def _heartbeat(self) -> bool:
        """True while the controller still knows this worker."""
        reg = self.registration()
        beat = Heartbeat(worker_id=reg.worker_id, worker_address=reg.worker_address, status=self.status())
        resp = await self.client.post(f"{self.base}/workers/heartbeat", json=beat.model_dump())
        resp.raise_for_status()
        if not resp.json().get("known", False):
            log.warning("controller does not know this worker any more; registering again")
            return False
        return True

    async def unregister(self) -> None:
        reg = self.registration()
        body = Unregister(worker_id=reg.worker_id, worker_address=reg.worker_address)
        try:
            await self.client.post(f"{self.base}/workers/unregister", json=body.model_dump(), timeout=2)
        except httpx.HTTPError as exc:
            log.warning("could not unregister from controller: %s", exc)
