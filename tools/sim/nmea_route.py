#!/usr/bin/env python3
"""Write an NMEA 0183 log of a drive along waypoints, for gpsfake (tests and the demo).

One epoch per GPS second: RMC, GGA, GSA and GSV sentences, positions interpolated along great-circle legs at
the given speed. The returned `Route` carries the ground truth (every epoch's time, position, speed, course),
the route's exact length (haversine, mean earth radius) and its duration, so tests compare against computed
numbers.

Timeline, in epochs of one second: `no_fix_s` without a fix at the first waypoint, `stop_start_s` parked
there, the drive, then `stop_end_s` parked at the last waypoint (at least one epoch when the route moves, so
the log ends on the last waypoint).

Note for gpsfake users: its `-c` delay is per sentence, not per epoch. Its loader drops bytes that are not
NMEA at all (the binary garbage line); sentences with a bad checksum or cut short do reach gpsd, which rejects
them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

EARTH_RADIUS_M = 6_371_008.8
KNOTS_PER_MPS = 3600 / 1852
DEFAULT_START = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

# What `garbage_every` inserts: a non-NMEA binary line, an NMEA sentence with a wrong checksum (carrying a
# position at 0,0 so a test notices if it got through), and a truncated sentence.
GARBAGE_POSITION = (0.0, 0.0)

LatLon = tuple[float, float]


def haversine_m(a: LatLon, b: LatLon) -> float:
    phi1, phi2 = math.radians(a[0]), math.radians(b[0])
    dphi, dlmb = phi2 - phi1, math.radians(b[1] - a[1])
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def bearing_deg(a: LatLon, b: LatLon) -> float:
    """Initial great-circle bearing from a to b, degrees true in [0, 360)."""
    phi1, phi2 = math.radians(a[0]), math.radians(b[0])
    dlmb = math.radians(b[1] - a[1])
    y = math.sin(dlmb) * math.cos(phi2)
    x = math.cos(phi1) * math.sin(phi2) - math.sin(phi1) * math.cos(phi2) * math.cos(dlmb)
    return math.degrees(math.atan2(y, x)) % 360.0


def intermediate(a: LatLon, b: LatLon, fraction: float) -> LatLon:
    """The point `fraction` of the way from a to b along the great circle."""
    delta = haversine_m(a, b) / EARTH_RADIUS_M
    if delta == 0.0:
        return a
    phi1, lmb1, phi2, lmb2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    wa = math.sin((1 - fraction) * delta) / math.sin(delta)
    wb = math.sin(fraction * delta) / math.sin(delta)
    x = wa * math.cos(phi1) * math.cos(lmb1) + wb * math.cos(phi2) * math.cos(lmb2)
    y = wa * math.cos(phi1) * math.sin(lmb1) + wb * math.cos(phi2) * math.sin(lmb2)
    z = wa * math.sin(phi1) + wb * math.sin(phi2)
    return math.degrees(math.atan2(z, math.hypot(x, y))), math.degrees(math.atan2(y, x))


def checksum(body: str) -> str:
    """NMEA checksum: XOR of the characters between '$' and '*', two upper-case hex digits."""
    value = 0
    for char in body.encode("ascii"):
        value ^= char
    return f"{value:02X}"


def sentence(body: str) -> str:
    return f"${body}*{checksum(body)}\r\n"


@dataclass(frozen=True, slots=True)
class Epoch:
    """Ground truth for one second of the log."""

    time: datetime
    fix: bool
    lat: float
    lon: float
    speed_mps: float
    course_deg: float | None  # None when stationary (RMC course field left empty)
    leg: int | None  # index of the leg being driven, None when stationary


@dataclass(frozen=True, slots=True)
class Route:
    waypoints: tuple[LatLon, ...]
    epochs: tuple[Epoch, ...]
    length_m: float  # sum of the legs' haversine lengths
    moving_s: float  # exact driving time, sum of leg length / leg speed
    duration_s: float  # no_fix_s + stop_start_s + moving_s + stop_end_s
    data: bytes  # the NMEA log
    sats_used: int
    sats_visible: int
    hdop: float
    alt_msl_m: float
    geoid_sep_m: float

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.data)
        return path


def _lat_field(lat: float) -> str:
    deg, minutes = divmod(abs(lat) * 60.0, 60.0)
    return f"{int(deg):02d}{minutes:010.7f},{'N' if lat >= 0 else 'S'}"


def _lon_field(lon: float) -> str:
    deg, minutes = divmod(abs(lon) * 60.0, 60.0)
    return f"{int(deg):03d}{minutes:010.7f},{'E' if lon >= 0 else 'W'}"


def _epoch_sentences(epoch: Epoch, used: int, visible: int, hdop: float, alt: float, geoid: float) -> str:
    hms = epoch.time.strftime("%H%M%S.00")
    dmy = epoch.time.strftime("%d%m%y")
    if epoch.fix:
        pos = f"{_lat_field(epoch.lat)},{_lon_field(epoch.lon)}"
        course = "" if epoch.course_deg is None else f"{epoch.course_deg:.2f}"
        rmc = f"GPRMC,{hms},A,{pos},{epoch.speed_mps * KNOTS_PER_MPS:.3f},{course},{dmy},,,A"
        gga = f"GPGGA,{hms},{pos},1,{used:02d},{hdop:.1f},{alt:.1f},M,{geoid:.1f},M,,"
        prns = [f"{prn:02d}" for prn in range(1, used + 1)]
        gsa = f"GPGSA,A,3,{','.join(prns + [''] * (12 - len(prns)))},{hdop + 0.5:.1f},{hdop:.1f},{hdop + 0.3:.1f}"
    else:
        rmc = f"GPRMC,{hms},V,,,,,,,{dmy},,,N"
        gga = f"GPGGA,{hms},,,,,0,00,,,M,,M,,"
        gsa = "GPGSA,A,1" + "," * 12 + ",,,"
    text = sentence(rmc) + sentence(gga) + sentence(gsa)
    n_msgs = max(1, math.ceil(visible / 4))
    for msg in range(n_msgs):
        sats = []
        for prn in range(msg * 4 + 1, min(visible, msg * 4 + 4) + 1):
            # Deterministic sky: spread in azimuth, elevations 15..75, SNR lower for unused satellites.
            snr = 40 if prn <= used and epoch.fix else 20
            sats.append(f"{prn:02d},{15 + (prn * 13) % 60:02d},{(prn * 37) % 360:03d},{snr:02d}")
        text += sentence(f"GPGSV,{n_msgs},{msg + 1},{visible:02d}" + "".join("," + s for s in sats))
    return text


def _garbage(epoch: Epoch) -> bytes:
    hms = epoch.time.strftime("%H%M%S.00")
    bad = sentence(
        f"GPRMC,{hms},A,{_lat_field(GARBAGE_POSITION[0])},{_lon_field(GARBAGE_POSITION[1])},"
        f"99.0,0.00,{epoch.time.strftime('%d%m%y')},,,A"
    )
    bad = bad[:-4] + ("00" if bad[-4:-2] != "00" else "FF") + "\r\n"  # wrong checksum
    return b"\x00\xff\xfe garbage \x1b[31m not nmea\r\n" + bad.encode() + b"$GPGGA,1234\r\n"


def build_route(
    waypoints: Sequence[LatLon],
    speed_kmh: float | Sequence[float],
    *,
    start: datetime = DEFAULT_START,
    stop_start_s: int = 0,
    stop_end_s: int = 0,
    no_fix_s: int = 0,
    garbage_every: int = 0,
    sats_used: int | None = None,
    sats_visible: int = 10,
    hdop: float = 0.9,
    alt_msl_m: float = 100.0,
    geoid_sep_m: float = 47.0,
) -> Route:
    """Build the log. `speed_kmh` is one speed for every leg or one per leg; `garbage_every` > 0 inserts
    garbage before every n-th epoch. `sats_used` defaults to min(7, sats_visible)."""
    if sats_used is None:
        sats_used = min(7, sats_visible)
    points = tuple((float(lat), float(lon)) for lat, lon in waypoints)
    if not points:
        raise ValueError("at least one waypoint is needed")
    for lat, lon in points:
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
            raise ValueError(f"waypoint out of range: {lat}, {lon}")
    n_legs = len(points) - 1
    speeds = (
        [float(speed_kmh)] * n_legs if isinstance(speed_kmh, int | float) else [float(s) for s in speed_kmh]
    )
    if len(speeds) != n_legs:
        raise ValueError(f"{len(speeds)} speeds given for {n_legs} legs")
    if min(no_fix_s, stop_start_s, stop_end_s, garbage_every) < 0:
        raise ValueError("durations and garbage_every must not be negative")
    if not 0 <= sats_used <= min(12, sats_visible) or sats_visible > 99:
        raise ValueError("need 0 <= sats_used <= min(12, sats_visible), sats_visible <= 99")
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware (UTC)")

    lengths = [haversine_m(points[i], points[i + 1]) for i in range(n_legs)]
    for length, speed in zip(lengths, speeds, strict=True):
        if length > 0 and not speed > 0:
            raise ValueError("every leg with a length needs a speed > 0")
    durations = [
        length / (speed / 3.6) if length > 0 else 0.0 for length, speed in zip(lengths, speeds, strict=True)
    ]
    moving_s = sum(durations)

    def drive(t: float, when: datetime) -> Epoch | None:
        """Where we are `t` seconds into the drive; None once arrived."""
        for leg, (dur, length) in enumerate(zip(durations, lengths, strict=True)):
            if t < dur:
                a, b = points[leg], points[leg + 1]
                fraction = t / dur
                lat, lon = intermediate(a, b, fraction)
                # Course along the great circle at this point; measured towards the nearer end for accuracy.
                course = (
                    bearing_deg((lat, lon), b) if fraction < 0.5 else (bearing_deg((lat, lon), a) + 180) % 360
                )
                return Epoch(when, True, lat, lon, length / dur, course, leg)
            t -= dur
        return None

    n_drive = math.ceil(moving_s)
    n_end = max(stop_end_s, 1 if moving_s > 0 else 0)
    epochs: list[Epoch] = []
    for k in range(no_fix_s + stop_start_s + n_drive + n_end):
        when = start + timedelta(seconds=k)
        if k < no_fix_s:
            epochs.append(Epoch(when, False, *points[0], 0.0, None, None))
        elif k < no_fix_s + stop_start_s:
            epochs.append(Epoch(when, True, *points[0], 0.0, None, None))
        else:
            moving = drive(float(k - no_fix_s - stop_start_s), when)
            epochs.append(moving or Epoch(when, True, *points[-1], 0.0, None, None))

    data = bytearray()
    for k, epoch in enumerate(epochs):
        if garbage_every and k % garbage_every == garbage_every - 1:
            data += _garbage(epoch)
        data += _epoch_sentences(epoch, sats_used, sats_visible, hdop, alt_msl_m, geoid_sep_m).encode()

    return Route(
        waypoints=points,
        epochs=tuple(epochs),
        length_m=sum(lengths),
        moving_s=moving_s,
        duration_s=no_fix_s + stop_start_s + moving_s + stop_end_s,
        data=bytes(data),
        sats_used=sats_used,
        sats_visible=sats_visible,
        hdop=hdop,
        alt_msl_m=alt_msl_m,
        geoid_sep_m=geoid_sep_m,
    )


def write_route(
    path: str | Path, waypoints: Sequence[LatLon], speed_kmh: float | Sequence[float], **kwargs: Any
) -> Route:
    route = build_route(waypoints, speed_kmh, **kwargs)
    route.write(path)
    return route


def _waypoint(text: str) -> LatLon:
    try:
        lat, lon = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAT,LON, got {text!r}") from None
    return lat, lon


def _speeds(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KMH or KMH,KMH,..., got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write an NMEA 0183 log (RMC, GGA, GSA, GSV once per second) along waypoints, for gpsfake.",
        epilog="Example: nmea_route.py route.nmea -w 52.5200,13.4050 -w 52.5230,13.4130 --speed-kmh 30 "
        "--stop-start 5. Negative coordinates: -w=-33.92,18.42. Prints length and duration as JSON.",
    )
    parser.add_argument("output", type=Path, help="NMEA file to write")
    parser.add_argument(
        "-w",
        "--waypoint",
        dest="waypoints",
        type=_waypoint,
        action="append",
        required=True,
        metavar="LAT,LON",
        help="waypoint in decimal degrees; repeat, in order",
    )
    parser.add_argument(
        "--speed-kmh",
        type=_speeds,
        default=[30.0],
        help="speed for every leg, or one per leg comma-separated (default 30)",
    )
    parser.add_argument(
        "--start",
        type=datetime.fromisoformat,
        default=DEFAULT_START,
        help=f"UTC time of the first epoch, ISO 8601 (default {DEFAULT_START.isoformat()})",
    )
    parser.add_argument("--no-fix", type=int, default=0, metavar="S", help="seconds without fix at the start")
    parser.add_argument(
        "--stop-start", type=int, default=0, metavar="S", help="seconds parked before driving"
    )
    parser.add_argument("--stop-end", type=int, default=0, metavar="S", help="seconds parked at the end")
    parser.add_argument(
        "--garbage-every",
        type=int,
        default=0,
        metavar="N",
        help="insert garbage (binary bytes, bad checksum, truncated sentence) before every N-th epoch",
    )
    parser.add_argument("--sats-used", type=int, default=None, help="default min(7, visible)")
    parser.add_argument("--sats-visible", type=int, default=10)
    parser.add_argument("--hdop", type=float, default=0.9)
    args = parser.parse_args(argv)
    start = args.start if args.start.tzinfo else args.start.replace(tzinfo=UTC)
    speeds = args.speed_kmh[0] if len(args.speed_kmh) == 1 else args.speed_kmh
    try:
        route = write_route(
            args.output,
            args.waypoints,
            speeds,
            start=start,
            no_fix_s=args.no_fix,
            stop_start_s=args.stop_start,
            stop_end_s=args.stop_end,
            garbage_every=args.garbage_every,
            sats_used=args.sats_used,
            sats_visible=args.sats_visible,
            hdop=args.hdop,
        )
    except ValueError as exc:
        parser.error(str(exc))
    summary = {
        "output": str(args.output),
        "epochs": len(route.epochs),
        "length_m": round(route.length_m, 3),
        "moving_s": round(route.moving_s, 3),
        "duration_s": round(route.duration_s, 3),
        "bytes": len(route.data),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
