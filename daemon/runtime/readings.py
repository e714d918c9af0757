"""The reading sink: drivers' values become telemetry records, handed to the outbox in batches.

``add`` stamps a reading the moment it is taken and keeps it in memory; the sink hands what it holds to the
outbox every ``flush_interval_s`` or as soon as ``max_pending`` readings wait. With the uplink on, the outbox
keeps them in memory until the broker acknowledges them or ``mqtt.memory_window_s`` passes (its hot tier,
sync/store/hot.py); without it, one group commit makes them durable. So a crash loses at most the readings of
the last interval (and, with the uplink, of the memory window that the broker had not acknowledged). The
latest value of each signal is kept for the live CLI views.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from fleetgate.config.signals import CATALOGUE
from fleetgate.daemon.runtime.clock import Clock
from fleetgate.sync.store import NewRecord, Outbox, Priority, Stamp

log = logging.getLogger(__name__)

STREAM = "telemetry"
MAX_HELD_FACTOR = 10  # readings held in memory while the store fails, in units of max_pending
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _templates(session: int | None) -> dict[str, tuple[str, str, str]]:
    """The payload is {"signal":…,"value":…,"unit":…[,"session":id]}; the parts around the value are fixed
    per signal (and managed session), so they are encoded once. This is the hot path of every reading (see
    tools/bench/ingest.py)."""
    tail = "}" if session is None else f',"session":{int(session)}}}'
    return {
        name: (f'{{"signal":{_dumps(name)},"value":', f',"unit":{_dumps(meta.unit)}{tail}', meta.unit)
        for name, meta in CATALOGUE.items()
    }


_TEMPLATES = _templates(None)


def _encode_value(value: Any) -> str:
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a JSON number")
        return repr(value)  # what json.dumps writes for a finite float
    if kind is int:
        return str(value)
    return _dumps(value)


def _to_the_ms(stamp: Stamp) -> Stamp:
    """A reading's stamp truncated to the millisecond (no sample is timed better than that: an OBD answer
    takes tens of ms). Both clocks lose the same nanoseconds, so wall_ns - mono_ns is unchanged, and the
    compact envelope's time deltas are round numbers that compress (~3 bytes a reading on the link)."""
    extra = stamp.mono_ns % 1_000_000
    return Stamp(stamp.wall_ns - extra, stamp.mono_ns - extra, stamp.trusted)


class Latest(NamedTuple):
    value: Any
    unit: str
    stamp: Stamp


class ReadingSink:
    name = "readings"

    def __init__(
        self, outbox: Outbox, clock: Clock, flush_interval_s: float = 1.0, max_pending: int = 5000
    ) -> None:
        self._outbox = outbox
        self._clock = clock
        self._flush_interval_s = flush_interval_s
        self._max_pending = max_pending
        self._pending: list[NewRecord] = []
        self._full = asyncio.Event()
        self._room = asyncio.Event()
        self._flushing = asyncio.Lock()
        self.latest: dict[str, Latest] = {}
        self.session: int | None = None
        self._templates = _TEMPLATES
        self.taken = 0
        self.committed = 0
        self.rejected = 0
        self.dropped = 0
        self._listeners: list[Callable[[str, Any, Stamp], None]] = []
        self.listener_errors = 0

    def add(self, signal: str, value: Any, stamp: Stamp | None = None) -> None:
        """Take one reading of a catalogue signal; its unit comes from the catalogue."""
        template = self._templates.get(signal)
        if template is None:
            raise ValueError(f"unknown signal {signal!r}")
        prefix, suffix, unit = template
        stamp = _to_the_ms(stamp or self._clock.stamp())
        try:
            payload = (prefix + _encode_value(value) + suffix).encode()
        except (TypeError, ValueError) as exc:  # NaN, infinity or an object a driver should not have passed
            self.rejected += 1
            log.warning("reading rejected", extra={"signal": signal, "error": str(exc)})
            return
        self._pending.append(NewRecord(STREAM, Priority.TELEMETRY, stamp, payload))
        self.latest[signal] = Latest(value, unit, stamp)
        self.taken += 1
        for listener in self._listeners:
            try:
                listener(signal, value, stamp)
            except Exception:  # a listener's bug must not cost the reading or the sink
                self.listener_errors += 1
                if self.listener_errors == 1 or self.listener_errors % 1000 == 0:
                    log.exception(
                        "reading listener failed", extra={"signal": signal, "errors": self.listener_errors}
                    )
        if len(self._pending) >= self._max_pending:
            self._full.set()

    def on_reading(self, listener: Callable[[str, Any, Stamp], None]) -> None:
        """``listener(signal, value, stamp)`` for every reading taken, synchronously (keep it fast: it runs on
        the producer's turn of the event loop; edge rules take ~5 us)."""
        self._listeners.append(listener)

    def set_session(self, session: int | None) -> None:
        """Tag readings taken from now on with this managed session's id (REEF session telemetry), or none."""
        if session != self.session:
            self.session = session
            self._templates = _templates(session)

    async def flush(self) -> int:
        """Commit every reading taken so far (waiting for a flush already under way); returns how many."""
        async with self._flushing:
            batch, self._pending = self._pending, []
            self._full.clear()
            self._room.set()
            if batch:
                # Shielded: a caller cancelled mid-commit (shutdown) must not lose count of a committed batch.
                await asyncio.shield(self._commit(batch))
            return len(batch)

    async def _commit(self, batch: list[NewRecord]) -> None:
        try:
            await self._outbox.append_hot(batch)
        except Exception:
            # Keep the readings for the next try; if the store stays broken, memory stays bounded.
            self._pending[:0] = batch
            overflow = len(self._pending) - MAX_HELD_FACTOR * self._max_pending
            if overflow > 0:
                del self._pending[:overflow]
                self.dropped += overflow
                log.error("store failing: oldest uncommitted readings dropped", extra={"dropped": overflow})
            raise
        self.committed += len(batch)

    async def wait_for_room(self) -> None:
        """Backpressure for producers: wait while a full batch is pending and the previous one is still being
        committed, so readings in memory stay below two batches whatever the store's speed."""
        while len(self._pending) >= self._max_pending:
            self._room.clear()
            self._full.set()
            await self._room.wait()

    async def run(self) -> None:
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._flush_interval_s)
                await self.flush()
        finally:
            # Stopping (or crashing): keep what was taken. Shielded, so cancellation cannot cut it short.
            await asyncio.shield(self.flush())

    def snapshot(self) -> dict[str, Any]:
        return {
            "taken": self.taken,
            "committed": self.committed,
            "pending": len(self._pending),
            "rejected": self.rejected,
            "dropped": self.dropped,
        }
