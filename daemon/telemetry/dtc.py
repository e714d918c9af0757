"""Diagnostic trouble codes: the MIL and stored codes, diffed into ``dtc-on`` / ``dtc-off`` events.

Each code seen for the first time opens an occurrence (``dtc-on`` with code, description and start); a code
no longer reported closes it (``dtc-off`` with start and stop), as Vinli's diagnostic service models them.
The open set is saved with each event in one transaction, so a restart neither repeats nor loses one.
"""

from __future__ import annotations

import logging
from typing import Any

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.events import Events, iso_utc
from fleetgate.daemon.runtime.saved_state import SavedState
from fleetgate.sync.store import StateStore

log = logging.getLogger(__name__)

STATE_KEY = "dtc.active"


class DtcTracker:
    def __init__(self, clock: Clock, events: Events, state: StateStore) -> None:
        self._clock = clock
        self._events = events
        self._state = state
        self.saved = SavedState(state, events, clock)
        self.mil: bool | None = None
        self.active: dict[str, dict[str, Any]] = {}  # code -> {"description", "start"}
        self._loaded = False

    async def load(self) -> None:
        if not self._loaded:
            self.active = await self.saved.load(
                STATE_KEY, _active, lambda: ({}, {}), "open DTCs forgotten: the next poll reports them anew"
            )
            self._loaded = True

    async def update(self, mil: bool | None, codes: list[tuple[str, str]]) -> None:
        """Feed one poll: MIL state and the (code, description) pairs the vehicle reports now."""
        await self.load()
        self.mil = mil
        stamp = self._clock.stamp()
        now = iso_utc(stamp.wall_ns)
        seen = dict(codes)
        active = dict(self.active)
        records = []
        for code, description in seen.items():
            if code not in active:
                active[code] = {"description": description, "start": now}
                records.append(
                    self._events.record(
                        "dtc-on", {"code": code, "description": description, "start": now}, stamp
                    )
                )
        for code in [c for c in active if c not in seen]:
            gone = active.pop(code)
            body = {"code": code, "description": gone["description"], "start": gone["start"], "stop": now}
            records.append(self._events.record("dtc-off", body, stamp))
        if records:
            await self._events.emit(*records, state={STATE_KEY: active})
            self.active = active

    def snapshot(self) -> dict[str, Any]:
        return {"mil": self.mil, "active": [{"code": c, **v} for c, v in sorted(self.active.items())]}


def _active(raw: Any) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ValueError("not an object of DTC occurrences")
    return raw
