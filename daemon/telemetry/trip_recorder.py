"""Supervised component: ignition evidence in, startup / shutdown and trip events out, trips kept across restarts.

Events are Vinli's: ``startup`` and ``trip-started`` share one stamp (the first sample of running evidence),
``shutdown`` and ``trip-completed`` another. A trip found in the state table after a restart continues if it
belongs to this boot; one from an earlier boot (a power cut mid-trip) is closed as ``trip-completed`` with
``status: "orphaned"`` at its last known moment.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from fleetgate.config.schema import TripsConfig
from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.events import Events, iso_utc
from fleetgate.daemon.runtime.saved_state import SavedState
from fleetgate.daemon.telemetry.trips import Harsh, IgnitionDetector, Trip, TripThresholds, geojson_point
from fleetgate.sync.store import NewRecord, Stamp, StateStore

log = logging.getLogger(__name__)

STATE_KEY = "trip"
RECENT_SAMPLES = 600  # covers ignition_on_s at up to 10 samples/s for a minute


class TripRecorder:
    name = "trips"

    def __init__(
        self, config: TripsConfig, clock: Clock, events: Events, state: StateStore, boot_id: str
    ) -> None:
        self._config = config
        self._clock = clock
        self._events = events
        self._state = state
        self.saved = SavedState(state, events, clock)
        self._boot_id = boot_id
        self.thresholds = TripThresholds(
            moving_speed_kmh=config.moving_speed_kmh,
            hard_accel_mps2=config.hard_accel_mps2,
            hard_brake_mps2=config.hard_brake_mps2,
            max_sample_gap_s=config.max_sample_gap_s,
        )
        self.ignition = IgnitionDetector(config.ignition_on_s, config.ignition_off_s)
        self.trip: Trip | None = None
        self.position: tuple[float, float] | None = None
        # Samples taken while ignition evidence is still being confirmed belong to the trip once it starts.
        self._recent_speeds: deque[tuple[int, float]] = deque(maxlen=RECENT_SAMPLES)
        self._recent_fixes: deque[tuple[int, float, float, int | None]] = deque(maxlen=RECENT_SAMPLES)
        self.trips_completed = 0
        self._restored = False
        self._harsh: list[NewRecord] = []  # hard-accel / hard-brake events not yet committed

    async def restore(self) -> None:
        """Pick up a trip saved before a restart (call once, before evidence arrives)."""
        if self._restored:
            return
        self._restored = True
        trip = await self.saved.load(
            STATE_KEY, _trip, lambda: (None, None), "the trip in progress is dropped"
        )
        if trip is None:
            return
        if trip.boot_id == self._boot_id:
            self.trip = trip
            self.ignition.on = True
            log.info("trip resumed after restart", extra={"trip": trip.id})
        else:
            # Monotonic times of another boot cannot be mapped to wall time reliably any more: close the trip
            # at its last saved moment with what the saved state knows.
            await self._complete(trip, trip.last_mono_ns, status="orphaned", foreign_boot=True)

    def _stamp(self, mono_ns: int) -> Stamp:
        wall, trusted = self._clock.wall_for(mono_ns)
        return Stamp(wall, mono_ns, trusted)

    async def observe_running(self, mono_ns: int, running: bool) -> None:
        flipped_at = self.ignition.observe(mono_ns, running)
        if flipped_at is None:
            return
        if self.ignition.on:
            await self._start(flipped_at)
        elif self.trip is not None:
            await self._complete(self.trip, flipped_at, status="completed")

    def observe_speed(self, mono_ns: int, kmh: float) -> None:
        if self.trip is not None:
            harsh = self.trip.add_speed(mono_ns, kmh, self.thresholds)
            if harsh is not None:
                self._harsh.append(self._harsh_record(harsh, mono_ns))
        else:
            self._recent_speeds.append((mono_ns, kmh))

    def _harsh_record(self, harsh: Harsh, mono_ns: int) -> NewRecord:
        body = {
            "trip_id": self.trip.id if self.trip else None,
            "from_kmh": round(harsh.from_kmh, 1),
            "to_kmh": round(harsh.to_kmh, 1),
            "accel_mps2": round(harsh.accel_mps2, 2),
            "threshold_mps2": harsh.threshold_mps2,
            "location": geojson_point(self.position),
        }
        stamp = self._stamp(mono_ns)
        if harsh.kind == "hard-accel":
            return self._events.record("hard-accel", body, stamp)
        return self._events.record("hard-brake", body, stamp)

    async def flush_harsh(self) -> None:
        """Commit the hard accelerations and brakings seen since the last call (the sampler calls it every
        round, so they reach the outbox within a second of the sample)."""
        if self._harsh:
            records, self._harsh = self._harsh, []
            await self._events.emit(*records)

    def observe_fix(self, mono_ns: int, lat: float, lon: float, gps_time_ns: int | None = None) -> None:
        self.position = (lat, lon)
        if self.trip is not None:
            self.trip.add_fix(mono_ns, lat, lon, self.thresholds, gps_time_ns)
        else:
            self._recent_fixes.append((mono_ns, lat, lon, gps_time_ns))

    async def _start(self, mono_ns: int) -> None:
        earlier_fixes = [f for f in self._recent_fixes if f[0] < mono_ns]
        start_position = (earlier_fixes[-1][1], earlier_fixes[-1][2]) if earlier_fixes else self.position
        trip = Trip.begin(self._boot_id, mono_ns, start_position)
        for at, kmh in self._recent_speeds:
            if at >= mono_ns:
                trip.add_speed(at, kmh, self.thresholds)
        for at, lat, lon, gps_ns in self._recent_fixes:
            if at >= mono_ns:
                trip.add_fix(at, lat, lon, self.thresholds, gps_ns)
        self._recent_speeds.clear()
        self._recent_fixes.clear()
        stamp = self._stamp(mono_ns)
        started = {
            "id": trip.id,
            "start": iso_utc(stamp.wall_ns),
            "startPoint": geojson_point(trip.start_point),
        }
        await self._events.emit(
            self._events.record("startup", stamp=stamp),
            self._events.record("trip-started", {"trip": started}, stamp),
            state={STATE_KEY: trip.to_json()},
        )
        self.trip = trip
        log.info("trip started", extra={"trip": trip.id})

    async def _complete(self, trip: Trip, stop_mono_ns: int, status: str, foreign_boot: bool = False) -> None:
        if foreign_boot:
            # No mapping from that boot's monotonic clock: the record is stamped now, untrusted.
            stamp = self._clock.stamp()
            start_wall = stop_wall = None
        else:
            stamp = self._stamp(stop_mono_ns)
            start_wall = iso_utc(self._clock.wall_for(trip.start_mono_ns)[0])
            stop_wall = iso_utc(stamp.wall_ns)
        body = {
            "id": trip.id,
            "status": status,
            "start": start_wall,
            "stop": stop_wall,
            "startPoint": geojson_point(trip.start_point),
            "stopPoint": geojson_point(trip.stop_point()),
            "preview": trip.encoded_preview(),
            "stats": trip.stats(stop_mono_ns),
            "thresholds": {
                "hardAccelMps2": self.thresholds.hard_accel_mps2,
                "hardBrakeMps2": self.thresholds.hard_brake_mps2,
                "movingSpeedKmh": self.thresholds.moving_speed_kmh,
            },
        }
        records = [self._events.record("trip-completed", {"trip": body}, stamp)]
        if not foreign_boot:
            records.insert(0, self._events.record("shutdown", stamp=stamp))
        await self._events.emit(*records, state={STATE_KEY: None})
        self.trip = None
        self.trips_completed += 1
        log.info(
            "trip completed",
            extra={"trip": trip.id, "status": status, "distance_m": body["stats"]["distance"]},
        )

    async def checkpoint(self) -> None:
        if self.trip is not None:
            await self._state.checkpoint(STATE_KEY, self.trip.to_json())

    async def run(self) -> None:
        await self.restore()
        try:
            while True:
                await asyncio.sleep(self._config.checkpoint_interval_s)
                await self.checkpoint()
        finally:
            await asyncio.shield(self.checkpoint())  # stopping: keep the trip's latest statistics

    def snapshot(self) -> dict[str, Any]:
        trip = self.trip
        return {
            "ignition": "on" if self.ignition.on else "off",
            "trips_completed": self.trips_completed,
            "trip": None
            if trip is None
            else {"id": trip.id, "stats": trip.stats(max(trip.last_mono_ns, trip.start_mono_ns))},
        }


def _trip(raw: Any) -> Trip | None:
    if raw is None:
        return None
    try:
        return Trip.from_json(raw)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"not a saved trip: {type(exc).__name__}") from None
