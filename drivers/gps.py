"""Asyncio client for gpsd's JSON protocol.

gpsd speaks JSON lines over TCP: after `?WATCH={"enable":true,"json":true}` it streams reports, one object
per line. We read them with asyncio streams so a silent or stuck gpsd can never block the event loop (the
synchronous gpsd-py3 waits forever on a gpsd that accepts and never answers). Reconnecting is the caller's
job: `GpsdClient.reports()` raises `GpsdError` and the supervisor restarts the component with backoff.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import datetime
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024  # gpsd's longest reports (SKY with many satellites) are a few KiB
BAD_LINE_LOG_INTERVAL_S = 60.0  # at most one log record per interval about bad input
_WATCH = b'?WATCH={"enable":true,"json":true}\n'
# ASCII digits only: \d alone also matches other scripts' digits, which int() would read.
_TIME_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z", re.ASCII)


@dataclass(frozen=True, slots=True)
class GpsFix:
    """A TPV report. Position fields are None unless mode >= 2."""

    mode: int  # 0 unknown, 1 no fix, 2 2D, 3 3D
    time_ns: int | None  # GPS UTC time as Unix ns: any year 1..9999 (whether it is plausible is not ours)
    lat: float | None  # degrees
    lon: float | None
    alt_m: float | None  # metres above mean sea level: "altMSL", else "alt" (older gpsd)
    speed_mps: float | None
    track_deg: float | None  # course over ground, degrees true
    climb_mps: float | None
    eph_m: float | None  # horizontal error estimate (gpsd's "eph")
    received_mono_ns: int  # CLOCK_BOOTTIME when the line arrived
    device: str | None


@dataclass(frozen=True, slots=True)
class GpsSky:
    """A SKY report."""

    satellites_used: int | None  # "uSat", else satellites[] with used=true
    satellites_visible: int | None  # "nSat", else len(satellites)
    hdop: float | None
    received_mono_ns: int


class GpsdError(Exception):
    """gpsd cannot be reached, closed the connection, or went silent."""


class _BadReport(ValueError):
    pass


def _number(report: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = report.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadReport(f"{key} is not a number")
    # Compare before float(): a huge JSON integer would overflow it; NaN fails every comparison.
    if not low <= value <= high:
        raise _BadReport(f"{key} out of range")
    return float(value)


def _integer(report: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = report.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadReport(f"{key} is not an integer")
    if not low <= value <= high:
        raise _BadReport(f"{key} out of range")
    return value


def _time_ns(report: dict[str, Any]) -> int | None:
    value = report.get("time")
    if value is None:
        return None
    match = _TIME_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise _BadReport("time is not ISO 8601 UTC")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    try:
        datetime.date(year, month, day)  # a real day (no year 0, no 30 February)
    except ValueError:
        raise _BadReport("time is not a calendar date") from None
    if not (hour < 24 and minute < 60 and second <= 60):  # 60: a leap second
        raise _BadReport("time out of range")
    fraction = match.group(7) or ""
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    return seconds * 1_000_000_000 + int(fraction.ljust(9, "0"))


def _fix(report: dict[str, Any], received_mono_ns: int) -> GpsFix:
    mode = _integer(report, "mode", 0, 3) or 0
    device = report.get("device")
    if device is not None and not isinstance(device, str):
        raise _BadReport("device is not a string")
    lat = _number(report, "lat", -90.0, 90.0)
    lon = _number(report, "lon", -180.0, 180.0)
    alt = _number(report, "altMSL", -12_000.0, 100_000.0)
    if alt is None:
        alt = _number(report, "alt", -12_000.0, 100_000.0)
    fix = GpsFix(
        mode=mode,
        time_ns=_time_ns(report),
        lat=lat,
        lon=lon,
        alt_m=alt,
        speed_mps=_number(report, "speed", 0.0, 1_000.0),
        track_deg=_number(report, "track", 0.0, 360.0),
        climb_mps=_number(report, "climb", -1_000.0, 1_000.0),
        eph_m=_number(report, "eph", 0.0, 1e7),
        received_mono_ns=received_mono_ns,
        device=device,
    )
    if mode < 2 and (lat is not None or lon is not None or alt is not None):
        # Without a fix any position is stale or invented; do not let a consumer store it as a location.
        return replace(fix, lat=None, lon=None, alt_m=None)
    return fix


def _sky(report: dict[str, Any], received_mono_ns: int) -> GpsSky:
    used = _integer(report, "uSat", 0, 1_000)
    visible = _integer(report, "nSat", 0, 1_000)
    satellites = report.get("satellites")
    if satellites is not None:
        if not isinstance(satellites, list) or not all(isinstance(sat, dict) for sat in satellites):
            raise _BadReport("satellites is not a list of objects")
        if any(not isinstance(sat.get("used", False), bool) for sat in satellites):
            raise _BadReport("satellites[].used is not a boolean")
        if used is None:
            used = sum(1 for sat in satellites if sat.get("used"))
        if visible is None:
            visible = len(satellites)
    return GpsSky(used, visible, _number(report, "hdop", 0.0, 100.0), received_mono_ns)


class GpsdClient:
    """Streams TPV and SKY reports from gpsd. Counters and `last_error` survive across `reports()` calls."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 2947,
        silence_timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.silence_timeout_s = silence_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.counters: dict[str, int] = {"lines": 0, "tpv": 0, "sky": 0, "bad_lines": 0, "connects": 0}
        self.last_error: str | None = None
        self._bad_logged_at: float | None = None
        self._bad_unlogged = 0

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _error(self, message: str) -> GpsdError:
        self.last_error = message
        return GpsdError(message)

    async def reports(self) -> AsyncIterator[GpsFix | GpsSky]:
        """Connect, ask gpsd to stream JSON, yield TPV and SKY reports as they come.

        Raises GpsdError when gpsd cannot be reached, closes the connection, or sends no line for
        `silence_timeout_s`. Bad input is counted in `counters["bad_lines"]` and skipped. The socket is closed
        when the iterator is closed: use `contextlib.aclosing(client.reports())` when breaking out early.
        """
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:  # before OSError: TimeoutError is one of its subclasses
            raise self._error(
                f"cannot connect to gpsd at {self.address}: no answer within {self.connect_timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise self._error(f"cannot connect to gpsd at {self.address}: {exc.strerror or exc}") from None
        self.counters["connects"] += 1
        log.info("connected to gpsd", extra={"gpsd": self.address})
        try:
            writer.write(_WATCH)
            await writer.drain()
            async with contextlib.aclosing(self._lines(reader)) as lines:
                async for line, received_mono_ns in lines:
                    report = self._parse(line, received_mono_ns)
                    if report is not None:
                        yield report
        except OSError as exc:
            raise self._error(f"connection to gpsd at {self.address} lost: {exc.strerror or exc}") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _lines(self, reader: asyncio.StreamReader) -> AsyncIterator[tuple[bytes, int]]:
        # Own line splitting instead of StreamReader.readline(): on an over-long line readline() drops the
        # buffered part and then hands us the tail as if it were a line of its own.
        loop = asyncio.get_running_loop()
        pending = b""
        discarding = False  # inside an over-long line, skipping to its end
        # Only time spent waiting on gpsd counts as silence, not time the consumer spends between reports.
        waited = 0.0
        while True:
            started = loop.time()
            try:
                async with asyncio.timeout(self.silence_timeout_s - waited):
                    chunk = await reader.read(MAX_LINE_BYTES)
            except TimeoutError:
                raise self._error(
                    f"gpsd at {self.address} sent no line for {self.silence_timeout_s:g} s"
                ) from None
            waited += loop.time() - started
            if not chunk:
                raise self._error(f"gpsd at {self.address} closed the connection")
            received_mono_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
            *complete, pending = (pending + chunk).split(b"\n")
            if complete:
                waited = 0.0
            for line in complete:
                self.counters["lines"] += 1
                if discarding:
                    discarding = False
                    self._bad("line too long", b"")
                elif len(line) > MAX_LINE_BYTES:
                    self._bad("line too long", line)
                else:
                    yield line, received_mono_ns
            if len(pending) > MAX_LINE_BYTES:
                discarding, pending = True, b""

    def _parse(self, line: bytes, received_mono_ns: int) -> GpsFix | GpsSky | None:
        line = line.strip()
        if not line:
            return None
        try:
            report = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and over-long integers
            self._bad("not JSON", line)
            return None
        if not isinstance(report, dict):
            self._bad("not a JSON object", line)
            return None
        kind = report.get("class")
        try:
            if kind == "TPV":
                fix = _fix(report, received_mono_ns)
                self.counters["tpv"] += 1
                return fix
            if kind == "SKY":
                sky = _sky(report, received_mono_ns)
                self.counters["sky"] += 1
                return sky
        except _BadReport as exc:
            self._bad(f"bad {kind}: {exc}", line)
            return None
        if kind == "VERSION":
            log.info("gpsd version", extra={"gpsd": self.address, "release": str(report.get("release"))[:40]})
        elif kind == "ERROR":
            # "message" is a LogRecord attribute: as an `extra` key it raised KeyError out of the client.
            log.warning("gpsd error", extra={"gpsd": self.address, "error": str(report.get("message"))[:200]})
        return None

    def _bad(self, reason: str, line: bytes) -> None:
        self.counters["bad_lines"] += 1
        now = time.monotonic()
        if self._bad_logged_at is not None and now - self._bad_logged_at < BAD_LINE_LOG_INTERVAL_S:
            self._bad_unlogged += 1
            return
        log.warning(
            "bad line from gpsd",
            extra={
                "gpsd": self.address,
                "reason": reason,
                "sample": line[:120].decode("utf-8", "backslashreplace"),
                "length": len(line),
                "bad_since_last_log": self._bad_unlogged,
                "bad_lines": self.counters["bad_lines"],
            },
        )
        self._bad_logged_at, self._bad_unlogged = now, 0
