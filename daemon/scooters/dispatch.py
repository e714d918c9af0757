"""Who runs scooter commands, and when: one at a time per scooter, scooters side by side (``Dispatcher``), and
the queued ones tried again (``PendingRetrier``): every ``pending_retry_s``, and within a few seconds when
their scooter comes into BLE range with its key cached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from fleetgate.daemon.scooters.commands import CommandRunner, Request
from fleetgate.daemon.scooters.pending import Pending

log = logging.getLogger(__name__)

MAX_QUEUED = 256
BLE_RETRY_S = 2.0  # a queued command whose scooter came into BLE range waits at least this since its last try
TICK_S = 0.5


class Dispatcher:
    """The command worker (component ``scooter-commands``)."""

    name = "scooter-commands"

    def __init__(self, runner: CommandRunner | None) -> None:
        self._runner = runner
        self._queue: asyncio.Queue[tuple[Request, asyncio.Future[dict[str, Any]] | None]] = asyncio.Queue(
            MAX_QUEUED
        )
        self.inflight: set[str] = set()  # ids of queued-entry commands submitted and not finished
        self.unrecorded = 0  # commands whose outcome could not be committed (disk full ...)

    def full(self) -> bool:
        return self._queue.full()

    def qsize(self) -> int:
        return self._queue.qsize()

    def submit_nowait(self, request: Request) -> bool:
        """Queue ``request`` to run; False if the worker's queue is full."""
        if self._queue.full():
            return False
        if request.queued and request.id is not None:
            self.inflight.add(request.id)
        self._queue.put_nowait((request, None))
        return True

    async def submit(self, request: Request) -> dict[str, Any]:
        """Run ``request`` in turn with the scooter's others; its committed result record."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        await self._queue.put((request, future))
        return await future

    async def run(self) -> None:
        busy: dict[str, asyncio.Task[Any]] = {}
        try:
            while True:
                request, future = await self._queue.get()
                before = busy.get(request.iot_code)
                busy[request.iot_code] = asyncio.create_task(self._after(before, request, future))
                for code in [c for c, t in busy.items() if t.done()]:
                    busy.pop(code)
        finally:
            for task in busy.values():
                task.cancel()

    async def _after(
        self,
        before: asyncio.Task[Any] | None,
        request: Request,
        future: asyncio.Future[dict[str, Any]] | None,
    ) -> None:
        if before is not None:
            await asyncio.gather(before, return_exceptions=True)
        assert self._runner is not None
        try:
            record = await self._runner.run(request)
        except Exception as exc:  # the store could not commit the outcome (disk full ...): said, and counted
            self.unrecorded += 1
            log.exception("scooter command: no outcome recorded", extra={"id": request.id, "op": request.op})
            if future is not None and not future.done():
                future.set_exception(exc)
            return
        finally:
            if request.id is not None:
                self.inflight.discard(request.id)
        if future is not None and not future.done():
            future.set_result(record)


class PendingRetrier:
    """Component ``scooter-pending``: hands queued commands back to the dispatcher when they are due. Those
    found at start (queued before a restart) are due at once; one queued since waits ``retry_s``, or less if
    its scooter comes into BLE range (was not ready over BLE at its last try, is now)."""

    name = "scooter-pending"

    def __init__(self, runner: CommandRunner, dispatcher: Dispatcher, retry_s: float) -> None:
        self._runner = runner
        self._dispatcher = dispatcher
        self._retry_s = retry_s
        self._last_try: dict[str, float] = {}
        self._ble_ready_then: dict[str, bool] = {}  # whether BLE could run it at its last try
        self.retries = 0

    async def run(self) -> None:
        first = True
        while True:
            now = time.monotonic()
            for entry in list(self._runner.pending.entries.values()):
                if entry.id in self._dispatcher.inflight:
                    continue
                if entry.id not in self._last_try and not first:
                    self._tried(entry, now)  # just queued by its first run: the next try waits
                    continue
                if not self._due(entry, now):
                    continue
                if not self._dispatcher.submit_nowait(as_request(entry)):
                    break  # the worker is full: the rest wait for the next tick
                self._tried(entry, now)
                self.retries += 1
            for gone in set(self._last_try) - set(self._runner.pending.entries):
                self._last_try.pop(gone)
                self._ble_ready_then.pop(gone, None)
            first = False
            await asyncio.sleep(TICK_S)

    def _ble_ready(self, entry: Pending) -> bool:
        ble = self._runner.ble
        return entry.via != "cloud" and ble is not None and ble.unavailable(entry.iot_code, entry.op) is None

    def _tried(self, entry: Pending, now: float) -> None:
        self._last_try[entry.id] = now
        self._ble_ready_then[entry.id] = self._ble_ready(entry)

    def _due(self, entry: Pending, now: float) -> bool:
        last = self._last_try.get(entry.id)
        if last is None or now - last >= self._retry_s:
            return True
        came_into_range = not self._ble_ready_then.get(entry.id, False) and self._ble_ready(entry)
        return came_into_range and now - last >= BLE_RETRY_S


def as_request(entry: Pending) -> Request:
    expires = datetime.fromtimestamp(entry.expires_wall_ns / 1e9, UTC)
    return Request(
        entry.iot_code, entry.op, entry.params, entry.source, entry.id, entry.seq, expires, entry.via, True
    )
