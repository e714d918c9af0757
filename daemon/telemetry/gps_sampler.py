"""Supervised component: gpsd reports in; position readings, time trust and trip positions out.

The client (``fleetgate.drivers.gps``) raises GpsdError when gpsd is unreachable, drops the connection or
stays silent; the supervisor restarts this component with backoff, which reconnects. The sampler keeps one
client for the daemon's life, so its counters (bad lines, connects ...) add up across reconnects.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from fleetgate.config.schema import GpsConfig
from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.readings import ReadingSink
from fleetgate.daemon.telemetry.trip_recorder import TripRecorder
from fleetgate.drivers.gps import GpsdClient, GpsdError, GpsFix, GpsSky

log = logging.getLogger(__name__)

KMH_PER_MPS = 3.6
SKY_INTERVAL_NS = 10 * 1_000_000_000


class GpsSampler:
    name = "gps"
    expected_errors = (GpsdError,)

    def __init__(
        self,
        config: GpsConfig,
        clock: Clock,
        sink: ReadingSink,
        trips: TripRecorder,
        client_factory: Callable[..., GpsdClient] = GpsdClient,
    ) -> None:
        self._config = config
        self._clock = clock
        self._sink = sink
        self._trips = trips
        self.client: GpsdClient = client_factory(config.host, config.port, config.silence_timeout_s)
        self.fix: GpsFix | None = None
        self.sky: GpsSky | None = None
        self.connected_since: float | None = None
        self._last_mode: int | None = None
        self._last_position_ns = 0
        self._last_sky_ns = 0

    async def run(self) -> None:
        client = self.client
        try:
            async with contextlib.aclosing(client.reports()) as reports:
                async for report in reports:
                    if self.connected_since is None:
                        self.connected_since = time.time()
                    if isinstance(report, GpsFix):
                        self._on_fix(report)
                    elif isinstance(report, GpsSky):
                        self._on_sky(report)
                    await self._sink.wait_for_room()
        finally:
            self.connected_since = None

    def _on_fix(self, fix: GpsFix) -> None:
        self.fix = fix
        has_fix = fix.mode >= 2 and fix.lat is not None and fix.lon is not None
        gps_time = fix.time_ns
        if (
            has_fix
            and gps_time is not None
            and not self._clock.observe_gps_time(gps_time, fix.received_mono_ns)
        ):
            gps_time = None  # implausible (counted by the clock): trips fall back to arrival times
        stamp = self._clock.stamp()
        if fix.mode != self._last_mode:
            self._sink.add("gps_fix_mode", fix.mode, stamp)
            self._last_mode = fix.mode
        if not has_fix:
            return
        assert fix.lat is not None and fix.lon is not None
        self._trips.observe_fix(stamp.mono_ns, fix.lat, fix.lon, gps_time)
        if stamp.mono_ns - self._last_position_ns < self._config.sample_interval_s * 1e9:
            return
        self._last_position_ns = stamp.mono_ns
        altitude = fix.alt_m if fix.mode >= 3 else None
        self._sink.add(
            "gps_position", {"latitude": fix.lat, "longitude": fix.lon, "altitude": altitude}, stamp
        )
        if fix.speed_mps is not None:
            self._sink.add("gps_speed", round(fix.speed_mps * KMH_PER_MPS, 3), stamp)
        if fix.track_deg is not None:
            self._sink.add("gps_heading", fix.track_deg, stamp)

    def _on_sky(self, sky: GpsSky) -> None:
        self.sky = sky
        if sky.received_mono_ns - self._last_sky_ns < SKY_INTERVAL_NS:
            return
        self._last_sky_ns = sky.received_mono_ns
        stamp = self._clock.stamp()
        if sky.satellites_used is not None:
            self._sink.add("gps_satellites", sky.satellites_used, stamp)
        if sky.hdop is not None:
            self._sink.add("gps_hdop", sky.hdop, stamp)

    def snapshot(self) -> dict[str, Any]:
        fix, sky, client = self.fix, self.sky, self.client
        now = self._clock.stamp().mono_ns
        return {
            "enabled": True,
            "gpsd": f"{self._config.host}:{self._config.port}",
            "connected": self.connected_since is not None,
            "fix": None
            if fix is None
            else {
                "mode": fix.mode,
                "latitude": fix.lat,
                "longitude": fix.lon,
                "altitude_m": fix.alt_m,
                "speed_kmh": None if fix.speed_mps is None else round(fix.speed_mps * KMH_PER_MPS, 2),
                "heading_deg": fix.track_deg,
                "gps_time_ns": fix.time_ns,
                "age_s": round((now - fix.received_mono_ns) / 1e9, 1),
            },
            "sky": None
            if sky is None
            else {
                "satellites_used": sky.satellites_used,
                "satellites_visible": sky.satellites_visible,
                "hdop": sky.hdop,
            },
            "time": time_view(self._clock),
            "counters": {
                **client.counters,
                "time_implausible": self._clock.counters["gps_time_implausible"],
                "time_inconsistent": self._clock.counters["gps_time_inconsistent"],
            },
            "last_error": client.last_error,
        }


def time_view(clock: Clock) -> dict[str, Any]:
    """Time trust for the ``gps`` verb, with the clock's counters of implausible time."""
    return {**clock.trust.as_dict(), "counters": dict(clock.counters)}
