"""Supervised component: a periodic heartbeat record (uptime, component states, backlog) into the outbox (kept
in memory until the broker acknowledges it when the uplink's hot tiers are on: sync/store/hot.py)."""

from __future__ import annotations

import asyncio

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.status import StatusSource
from fleetgate.sync.store import NewRecord, Outbox, Priority

STREAM = "heartbeat"


class Heartbeat:
    name = "heartbeat"

    def __init__(self, outbox: Outbox, clock: Clock, status: StatusSource, interval_s: float) -> None:
        self._outbox = outbox
        self._clock = clock
        self._status = status
        self._interval_s = interval_s

    async def run(self) -> None:
        while True:
            snap = await self._status.snapshot()
            body = {
                "uptime_s": snap["uptime_s"],
                "components": {c["name"]: c["state"] for c in snap["components"]},
                "backlog": snap["outbox"]["total"],
            }
            await self._outbox.append_hot(
                [NewRecord.json(STREAM, Priority.TELEMETRY, self._clock.stamp(), body)]
            )
            await asyncio.sleep(self._interval_s)
