"""Ignition and trips, computed on the device.

``IgnitionDetector`` turns OBD evidence (RPM, charging voltage, the ECU answering at all) into ignition
on/off with hysteresis: a state changes only after the contrary evidence has lasted a configured time, and
the change is dated at the first sample of that evidence (so ``startup`` carries when the engine started,
not when we became sure).

``Trip`` accumulates statistics between startup and shutdown, in Vinli's trip vocabulary and units:
distance by vehicle speed (trapezoids over speed samples no further apart than ``max_sample_gap_s``) and by
GPS (haversine between consecutive fixes), duration (ms), max / average (mean of samples) / average-moving
speed (km/h), stop count (moving -> stopped transitions), hard acceleration and braking counts (speed change
between consecutive samples, in m/s², against thresholds), start and stop points and an encoded-polyline
preview. Its state is plain JSON so a trip survives a restart of the daemon.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import polyline

EARTH_RADIUS_M = 6_371_008.8
KMH_PER_MPS = 3.6


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


@dataclass(frozen=True)
class TripThresholds:
    moving_speed_kmh: float = 3.0
    hard_accel_mps2: float = 3.0
    hard_brake_mps2: float = 3.5
    max_sample_gap_s: float = 5.0
    max_gps_jump_kmh: float = 250.0  # a GPS step implying more than this is a glitch, not distance
    preview_min_spacing_m: float = 20.0
    preview_max_points: int = 400


class IgnitionDetector:
    """Debounced ignition state from "is the vehicle running?" samples."""

    def __init__(self, on_after_s: float, off_after_s: float, initially_on: bool = False) -> None:
        self._on_after_ns = int(on_after_s * 1e9)
        self._off_after_ns = int(off_after_s * 1e9)
        self.on = initially_on
        self._contrary_since: int | None = None

    def observe(self, mono_ns: int, running: bool) -> int | None:
        """Feed one sample; returns the mono time the state flipped at, or None if it did not."""
        if running == self.on:
            self._contrary_since = None
            return None
        if self._contrary_since is None:
            self._contrary_since = mono_ns
        needed = self._off_after_ns if self.on else self._on_after_ns
        if mono_ns - self._contrary_since < needed:
            return None
        flipped_at, self._contrary_since = self._contrary_since, None
        self.on = not self.on
        return flipped_at


@dataclass(frozen=True)
class Harsh:
    """A hard acceleration or braking between two speed samples of a trip."""

    kind: str  # "hard-accel" or "hard-brake"
    from_kmh: float
    to_kmh: float
    accel_mps2: float  # negative when braking
    threshold_mps2: float


@dataclass
class Trip:
    """A trip's running statistics. All times are CLOCK_BOOTTIME ns of ``boot_id``."""

    id: str
    boot_id: str
    start_mono_ns: int
    last_mono_ns: int
    distance_vss_m: float = 0.0
    distance_gps_m: float = 0.0
    max_speed_kmh: float = 0.0
    speed_sum: float = 0.0
    speed_samples: int = 0
    moving_speed_sum: float = 0.0
    moving_samples: int = 0
    stop_count: int = 0
    hard_accel_count: int = 0
    hard_brake_count: int = 0
    location_count: int = 0
    moving: bool = False
    last_speed: tuple[int, float] | None = None  # (mono_ns, km/h)
    last_fix: tuple[int, float, float, int | None] | None = None  # (mono_ns, lat, lon, gps_time_ns)
    start_point: tuple[float, float] | None = None  # (lat, lon)
    preview: list[tuple[float, float]] = field(default_factory=list)

    @classmethod
    def begin(cls, boot_id: str, mono_ns: int, position: tuple[float, float] | None) -> Trip:
        trip = cls(str(uuid.uuid4()), boot_id, mono_ns, mono_ns)
        if position is not None:
            trip.start_point = position
            trip.preview.append(position)
        return trip

    def add_speed(self, mono_ns: int, kmh: float, th: TripThresholds) -> Harsh | None:
        """Take a speed sample; returns the hard acceleration or braking it completes, if any."""
        self.last_mono_ns = max(self.last_mono_ns, mono_ns)
        harsh = None
        self.speed_samples += 1
        self.speed_sum += kmh
        self.max_speed_kmh = max(self.max_speed_kmh, kmh)
        moving = kmh >= th.moving_speed_kmh
        if moving:
            self.moving_speed_sum += kmh
            self.moving_samples += 1
        elif self.moving:
            self.stop_count += 1
        self.moving = moving
        if self.last_speed is not None:
            prev_ns, prev_kmh = self.last_speed
            dt = (mono_ns - prev_ns) / 1e9
            if 0 < dt <= th.max_sample_gap_s:
                self.distance_vss_m += (prev_kmh + kmh) / 2 / KMH_PER_MPS * dt
                accel = (kmh - prev_kmh) / KMH_PER_MPS / dt
                if accel >= th.hard_accel_mps2:
                    self.hard_accel_count += 1
                    harsh = Harsh("hard-accel", prev_kmh, kmh, accel, th.hard_accel_mps2)
                elif -accel >= th.hard_brake_mps2:
                    self.hard_brake_count += 1
                    harsh = Harsh("hard-brake", prev_kmh, kmh, accel, th.hard_brake_mps2)
        self.last_speed = (mono_ns, kmh)
        return harsh

    def add_fix(
        self, mono_ns: int, lat: float, lon: float, th: TripThresholds, gps_time_ns: int | None = None
    ) -> None:
        self.last_mono_ns = max(self.last_mono_ns, mono_ns)
        self.location_count += 1
        if self.start_point is None:
            self.start_point = (lat, lon)
        if self.last_fix is not None:
            prev_ns, prev_lat, prev_lon, prev_gps_ns = self.last_fix
            step = haversine_m(prev_lat, prev_lon, lat, lon)
            # GPS time when both fixes have it: arrival times bunch up when gpsd or the link buffers.
            if gps_time_ns is not None and prev_gps_ns is not None and gps_time_ns > prev_gps_ns:
                dt = (gps_time_ns - prev_gps_ns) / 1e9
            else:
                dt = (mono_ns - prev_ns) / 1e9
            if step == 0 or (dt > 0 and step / dt * KMH_PER_MPS <= th.max_gps_jump_kmh):
                self.distance_gps_m += step
        self.last_fix = (mono_ns, lat, lon, gps_time_ns)
        if not self.preview or haversine_m(*self.preview[-1], lat, lon) >= th.preview_min_spacing_m:
            self.preview.append((lat, lon))
            if len(self.preview) > th.preview_max_points:
                self.preview = self.preview[::2]  # halve the resolution, keep the shape

    def stats(self, stop_mono_ns: int) -> dict[str, Any]:
        """Vinli's trip stats: distances in metres, duration in ms, speeds in km/h."""
        by_vss = round(self.distance_vss_m, 2)
        by_gps = round(self.distance_gps_m, 2)
        return {
            # VSS is the better measure of a trip (no fix delay, no GPS jitter); GPS when the vehicle has no VSS.
            "distance": by_vss if self.speed_samples else by_gps,
            "distanceByVSS": by_vss if self.speed_samples else None,
            "distanceByGPS": by_gps if self.location_count else None,
            "duration": (stop_mono_ns - self.start_mono_ns) // 1_000_000,
            "maxSpeed": round(self.max_speed_kmh, 2) if self.speed_samples else None,
            "averageSpeed": round(self.speed_sum / self.speed_samples, 2) if self.speed_samples else None,
            "averageMovingSpeed": round(self.moving_speed_sum / self.moving_samples, 2)
            if self.moving_samples
            else None,
            "stopCount": self.stop_count,
            "hardAccelCount": self.hard_accel_count,
            "hardBrakeCount": self.hard_brake_count,
            "locationCount": self.location_count,
            "messageCount": self.speed_samples,
        }

    def stop_point(self) -> tuple[float, float] | None:
        return None if self.last_fix is None else (self.last_fix[1], self.last_fix[2])

    def encoded_preview(self) -> str | None:
        """Google encoded polyline (precision 5) of the thinned route; None for a trip with no fix."""
        points = list(self.preview)
        stop = self.stop_point()
        if stop is not None and (not points or points[-1] != stop):
            points.append(stop)
        return polyline.encode(points, 5) if points else None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON, the preview as an encoded polyline (precision 5, ~1 m, as the trip event carries it):
        400 points are ~3 KB instead of ~14 KB of number pairs, rewritten at every checkpoint."""
        data = asdict(self)
        data["preview"] = polyline.encode(self.preview, 5) if self.preview else ""
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Trip:
        data = dict(data)
        for key in ("last_speed", "last_fix", "start_point"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        preview = data.get("preview") or []
        if isinstance(preview, str):
            preview = polyline.decode(preview, 5)
        data["preview"] = [(float(p[0]), float(p[1])) for p in preview]  # or pairs, as saved before
        return cls(**data)


def geojson_point(point: tuple[float, float] | None) -> dict[str, Any] | None:
    return None if point is None else {"type": "Point", "coordinates": [point[1], point[0]]}
