"""Supervised component ``signal-watch``: a signal silent past its schedule is a ``signal-silent`` event, its
return a ``signal-reporting`` one (the insurance portal's NotReporting, seen from the vehicle).

A signal is expected only when its silence means something: it has reported at least once since the daemon
started (a PID the vehicle does not support never does, and is not news), its source is up (an OBD signal
while the adapter is connected and the ECU answers: with the ignition off every PID is silent, and the
adapter's own state is reported by ``obd-plugged-*``), and it is past ``SILENT_AFTER`` of its interval and at
least ``MIN_SILENT_S``. Each silence is reported once, and its end once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fleetgate.daemon.runtime.clock import mono_ns
from fleetgate.daemon.runtime.events import Events
from fleetgate.daemon.runtime.readings import ReadingSink

log = logging.getLogger(__name__)

SILENT_AFTER = 3.0  # intervals
MIN_SILENT_S = 15.0
CHECK_EVERY_S = 2.0
NS = 1_000_000_000


class SilenceWatch:
    name = "signal-watch"

    def __init__(
        self,
        sink: ReadingSink,
        events: Events,
        expected: Callable[[], dict[str, float]],  # signal -> interval (s), for the sources that are up now
    ) -> None:
        self._sink = sink
        self._events = events
        self._expected = expected
        self.silent: dict[str, int] = {}  # signal -> mono_ns of its last reading when it fell silent

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            await self.check(mono_ns())

    async def check(self, now_ns: int) -> None:
        expected = self._expected()
        records = []
        for signal, latest in list(self._sink.latest.items()):
            last_ns = latest.stamp.mono_ns
            if signal in self.silent:
                if last_ns > self.silent[signal]:
                    silent_s = round((last_ns - self.silent.pop(signal)) / NS, 1)
                    records.append(
                        self._events.record("signal-reporting", {"signal": signal, "silent_s": silent_s})
                    )
                continue
            interval = expected.get(signal)
            if interval is None:
                continue
            limit = max(SILENT_AFTER * interval, MIN_SILENT_S)
            silent_s = (now_ns - last_ns) / NS
            if silent_s > limit:
                self.silent[signal] = last_ns
                body = {"signal": signal, "silent_s": round(silent_s, 1), "expected_every_s": interval}
                records.append(self._events.record("signal-silent", body))
        if records:
            for record in records:
                log.warning("signal %s", record.payload.decode())
            await self._events.emit(*records)

    def snapshot(self) -> dict[str, Any]:
        return {"silent": sorted(self.silent)}
