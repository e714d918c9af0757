"""Supervised component: pulls this vehicle's sessions from the REEF API (HTTPS, mTLS) into the session book.

At start, whenever the MQTT link (re)connects (coverage is back), and whenever no channel has synchronized
for ``interval_s``; after a failed pull, again after ``retry_s``. A failed pull is counted by kind and
logged; it never takes the component down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from fleetgate.daemon.access.session_sync import SessionSync
from fleetgate.daemon.runtime.clock import mono_ns
from fleetgate.sync.reef.client import ReefClient, ReefError

log = logging.getLogger(__name__)


class ReefPoller:
    """Supervised component: asks REEF for this vehicle's sessions at start, whenever the MQTT link
    (re)connects (coverage is back), and whenever no channel has synchronized for ``interval_s``."""

    name = "reef"
    expected_errors = (ReefError,)

    def __init__(
        self,
        client_factory: Callable[[], ReefClient],
        vin: str,
        sync: SessionSync,
        interval_s: float,
        retry_s: float,
        reconnected: asyncio.Event | None,
    ) -> None:
        self._client_factory = client_factory
        self._vin = vin
        self._sync = sync
        self._interval_s = interval_s
        self._retry_s = retry_s
        self.reconnected = reconnected  # the MQTT link's connect event, once there is one
        self.polls = 0
        self.failures: dict[str, int] = {}
        self.last_error: str | None = None
        self.last_success_wall: float | None = None

    async def run(self) -> None:
        try:
            context = self._client_factory()
            client = await context.__aenter__()
        except (
            Exception
        ) as exc:  # a CA or key file gone or unreadable: shown in `fleetgate sessions`, retried
            self._failed(f"setup-{type(exc).__name__}", f"the REEF client cannot be set up: {exc}")
            raise
        try:
            while True:
                if await self._poll(client):
                    await self._wait(self._interval_s, after_last_sync=True)
                else:
                    await self._wait(self._retry_s, after_last_sync=False)
        finally:
            await context.__aexit__(None, None, None)

    def _failed(self, kind: str, error: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1
        self.last_error = error

    async def _poll(self, client: ReefClient) -> bool:
        self.polls += 1
        try:
            sessions = await client.get_vehicle_sessions(self._vin)
        except ReefError as exc:
            kind = type(exc).__name__
            self._failed(kind, str(exc))
            log.warning("REEF pull failed", extra={"error_kind": kind, "error": str(exc)})
            return False
        await self._sync.apply_reef(sessions)
        self.last_success_wall = time.time()
        self.last_error = None
        return True

    async def _wait(self, delay_s: float, after_last_sync: bool) -> None:
        """Until ``delay_s`` from now (or after the last sync from any channel), or an MQTT reconnect."""
        start = mono_ns()
        while True:
            last = self._sync.last_sync_mono_ns if after_last_sync else start
            due = delay_s if last is None else delay_s - (mono_ns() - last) / 1e9
            if due <= 0:
                return
            if self.reconnected is None:
                await asyncio.sleep(due)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reconnected.wait(), due)
            if self.reconnected.is_set():
                self.reconnected.clear()
                return

    def snapshot(self) -> dict[str, Any]:
        return {
            "polls": self.polls,
            "failures": dict(self.failures),
            "last_success": self.last_success_wall,
            "last_error": self.last_error,
        }
