"""Events (startup, shutdown, trip-started, dtc-on, ...) go to the outbox at event priority, durably.

``emit`` returns once the events are committed, together with any state change that goes with them (a
trip's completion and the removal of its saved state are one transaction). The payload has ``event`` (its
type) and the event's own fields; when it happened is the record's stamp (wall and monotonic clocks, trust
flags), which the outbox corrects if trust in the clock arrives later.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.sync.store import Appended, NewRecord, Outbox, Priority, Stamp

log = logging.getLogger(__name__)

STREAM = "events"


def iso_utc(wall_ns: int) -> str:
    seconds, ns = divmod(wall_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ns // 1_000_000:03d}Z"


class Events:
    def __init__(self, outbox: Outbox, clock: Clock) -> None:
        self._outbox = outbox
        self._clock = clock
        self.emitted: dict[str, int] = {}

    def record(self, event: str, body: dict[str, Any] | None = None, stamp: Stamp | None = None) -> NewRecord:
        """An event record, stamped now unless ``stamp`` says when it happened."""
        return NewRecord.json(
            STREAM, Priority.EVENT, stamp or self._clock.stamp(), {"event": event, **(body or {})}
        )

    async def emit(self, *records: NewRecord, state: dict[str, Any] | None = None) -> list[Appended]:
        appended = await self._outbox.append(records, state)
        for record, done in zip(records, appended, strict=True):
            name = json.loads(record.payload)["event"]
            self.emitted[name] = self.emitted.get(name, 0) + 1
            log.info("event", extra={"event": name, "seq": done.seq})
        return appended

    async def emit_now(self, event: str, body: dict[str, Any] | None = None) -> Appended:
        return (await self.emit(self.record(event, body)))[0]
