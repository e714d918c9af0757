"""Supervised component: turns the store's quota evictions into events, a few at most per minute.

Eviction happens in the store's write transaction (oldest telemetry first); this only reports it, aggregated
per stream over ``interval_s``, as ``telemetry-evicted`` events (which are never evicted themselves).
"""

from __future__ import annotations

import asyncio
import logging

from fleetgate.daemon.runtime.events import Events
from fleetgate.sync.store import Outbox

log = logging.getLogger(__name__)


class QuotaWatch:
    name = "quota"

    def __init__(self, outbox: Outbox, events: Events, interval_s: float = 10.0) -> None:
        self._outbox = outbox
        self._events = events
        self._interval_s = interval_s
        self.evicted_total = 0

    async def report(self) -> None:
        evictions = await self._outbox.take_evictions()
        records = []
        for stream, ev in evictions.items():
            self.evicted_total += ev.records
            log.warning("quota: oldest records evicted", extra={"stream": stream, "records": ev.records})
            body = {
                "stream": stream,
                "records": ev.records,
                "bytes": ev.bytes,
                "first_seq": ev.first_seq,
                "last_seq": ev.last_seq,
                "quota_bytes": self._outbox.quotas.get(stream),
            }
            records.append(self._events.record("telemetry-evicted", body))
        if records:
            await self._events.emit(*records)

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval_s)
                await self.report()
        finally:
            await asyncio.shield(self.report())
