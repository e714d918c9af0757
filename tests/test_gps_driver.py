"""GPS driver against a real gpsd fed by gpsfake, and against small fake gpsd servers for what gpsd never
sends (bad JSON, silence, a dropped connection). Also the NMEA route writer the GPS tests are built on."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from fleetgate.drivers.gps import GpsdClient, GpsdError, GpsFix, GpsSky

from gpsfake_fixture import (
    NMEA_ROUTE_PY,
    Gpsfake,
    free_port,
    garbage_route,
    group_members,
    moving_route,
    nmea_route,
    no_fix_route,
)

R = 6_371_008.8
Report = GpsFix | GpsSky


# --- independent geometry (deliberately not nmea_route's own functions) ---------------------------------


def haversine(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * R * math.asin(math.sqrt(h))


def bearing(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    y = math.sin(lon2 - lon1) * math.cos(lat2)
    x = math.cos(lat1) * math.sin(lat2) - math.sin(lat1) * math.cos(lat2) * math.cos(lon2 - lon1)
    return math.degrees(math.atan2(y, x)) % 360


def distance_to_polyline(p: tuple[float, float], line: tuple[tuple[float, float], ...]) -> float:
    """Metres from p to the nearest great-circle segment of `line` (cross-track, clamped to the segment)."""
    best = min(haversine(p, vertex) for vertex in line)
    for a, b in itertools.pairwise(line):
        d13 = haversine(a, p) / R
        theta = math.radians(bearing(a, p) - bearing(a, b))
        xt = math.asin(math.sin(d13) * math.sin(theta))
        along = math.acos(max(-1.0, min(1.0, math.cos(d13) / math.cos(xt)))) * R
        if math.cos(theta) > 0 and along <= haversine(a, b):
            best = min(best, abs(xt) * R)
    return best


def angle_diff(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


# --- helpers ---------------------------------------------------------------------------------------------


async def collect(
    client: GpsdClient, done: Callable[[list[Report]], bool], timeout: float = 30.0
) -> list[Report]:
    """Reports until `done(reports)`; the bound only guards against a hang."""
    got: list[Report] = []
    try:
        async with asyncio.timeout(timeout), contextlib.aclosing(client.reports()) as reports:
            async for report in reports:
                got.append(report)
                if done(got):
                    break
    except TimeoutError:
        raise AssertionError(
            f"not done after {timeout} s: {len(got)} reports, counters {client.counters}, last {got[-3:]}"
        ) from None
    return got


def epoch_ns(epoch) -> int:
    return int(epoch.time.timestamp()) * 1_000_000_000


def fixes(reports: list[Report]) -> list[GpsFix]:
    return [r for r in reports if isinstance(r, GpsFix)]


def seen_all_epochs(route) -> Callable[[list[Report]], bool]:
    wanted = {epoch_ns(e) for e in route.epochs}
    return lambda got: wanted <= {f.time_ns for f in fixes(got) if f.mode == 3}


# --- real gpsd via gpsfake -------------------------------------------------------------------------------


def check_fixes_on_route(route, got: list[Report]) -> None:
    truth = {epoch_ns(e): e for e in route.epochs}
    legs = list(itertools.pairwise(route.waypoints))
    for fix in fixes(got):
        assert fix.mode in (2, 3), fix
        assert fix.time_ns in truth, f"GPS time {fix.time_ns} is not one of the NMEA times: {fix}"
        epoch = truth[fix.time_ns]
        assert fix.lat is not None and fix.lon is not None
        assert distance_to_polyline((fix.lat, fix.lon), route.waypoints) < 2.0, fix
        assert haversine((fix.lat, fix.lon), (epoch.lat, epoch.lon)) < 1.0, (fix, epoch)
        assert fix.speed_mps == pytest.approx(epoch.speed_mps, abs=0.01), (fix, epoch)
        if epoch.leg is None:
            assert fix.track_deg is None, fix  # stationary: the RMC course field is empty
        else:
            assert fix.track_deg is not None
            assert angle_diff(fix.track_deg, bearing(*legs[epoch.leg])) < 0.1, (fix, epoch)
        if fix.mode == 3:
            # altMSL, not altHAE (= MSL + geoid separation, 47 m more in these routes)
            assert fix.alt_m == pytest.approx(route.alt_msl_m)
        assert fix.device is not None and fix.device.startswith("/dev/")
        assert fix.received_mono_ns > 0


@pytest.mark.timeout(60)
def test_moving_route_fixes_follow_the_route(tmp_path: Path) -> None:
    path, route = moving_route(tmp_path)
    with Gpsfake(path, cycle_s=0.04) as fake:
        assert fake.proc is not None and fake.log_path is not None
        pgid, tmpdir = fake.proc.pid, fake.log_path.parent
        assert len(group_members(pgid)) == 2  # gpsfake and its gpsd
        client = GpsdClient(port=fake.port, silence_timeout_s=10)
        got = asyncio.run(collect(client, seen_all_epochs(route)))
    assert group_members(pgid) == []  # no gpsd left, no zombie
    assert not tmpdir.exists()  # with gpsfake's control socket in it

    check_fixes_on_route(route, got)
    moving = [f for f in fixes(got) if f.speed_mps]
    assert {round(f.speed_mps, 2) for f in moving} == {10.0, 15.0}  # 36 and 54 km/h
    skies = [r for r in got if isinstance(r, GpsSky)]
    assert skies
    for sky in skies:
        assert (sky.satellites_used, sky.satellites_visible, sky.hdop) == (7, 8, pytest.approx(0.9))
    assert client.counters["bad_lines"] == 0
    assert client.counters["connects"] == 1
    assert client.counters["tpv"] == len(fixes(got))
    # VERSION, DEVICES, WATCH, DEVICE lines are read and ignored.
    assert client.counters["lines"] > client.counters["tpv"] + client.counters["sky"]


@pytest.mark.timeout(60)
def test_no_fix_route_gives_no_position(tmp_path: Path) -> None:
    path, _route = no_fix_route(tmp_path)
    with Gpsfake(path, cycle_s=0.04) as fake:
        client = GpsdClient(port=fake.port)
        got = asyncio.run(collect(client, lambda got: len(fixes(got)) >= 6))

    for fix in fixes(got):
        assert fix.mode <= 1, fix
        assert (fix.lat, fix.lon, fix.alt_m) == (None, None, None)
    assert client.counters["bad_lines"] == 0


@pytest.mark.timeout(60)
def test_garbage_in_the_nmea_does_not_stop_fixes(tmp_path: Path) -> None:
    path, route = garbage_route(tmp_path, every=3)
    data = path.read_bytes()
    assert b"\x00\xff\xfe garbage" in data and b"$GPGGA,1234\r\n" in data and b",0000.0000000,N," in data

    with Gpsfake(path, cycle_s=0.04) as fake:
        client = GpsdClient(port=fake.port)
        got = asyncio.run(collect(client, seen_all_epochs(route)))

    # Every epoch still gave a 3D fix, and none came from the bad-checksum RMC at 0,0 (99 kn): gpsfake's own
    # lexer drops the binary line, gpsd rejects the bad checksum and the truncated GGA, and the client only
    # ever sees well-formed JSON.
    check_fixes_on_route(route, got)
    assert all(f.speed_mps is None or f.speed_mps < 20 for f in fixes(got))
    assert client.counters["bad_lines"] == 0


@pytest.mark.timeout(60)
def test_gpsd_dying_mid_stream_raises(tmp_path: Path) -> None:
    path, _route = moving_route(tmp_path)
    fake = Gpsfake(path, cycle_s=0.04).start()
    try:

        async def run() -> tuple[list[Report], BaseException]:
            client = GpsdClient(port=fake.port)
            got: list[Report] = []
            with pytest.raises(GpsdError) as raised:
                async with asyncio.timeout(30):
                    async for report in client.reports():
                        got.append(report)
                        if len(got) == 1:
                            await asyncio.to_thread(fake.stop)
            return got, raised.value

        got, error = asyncio.run(run())
    finally:
        fake.stop()
    assert got
    assert f"127.0.0.1:{fake.port}" in str(error)


@pytest.mark.timeout(60)
def test_real_gpsd_going_quiet_raises(tmp_path: Path) -> None:
    # With loop=False gpsfake plays the file once and keeps gpsd running: a receiver that stopped talking.
    # 200 m at 10 m/s: 21 epochs of 4 sentences, about 3.4 s of wall time.
    route = nmea_route.build_route([(52.52, 13.405), (52.5218, 13.405)], 36.0, sats_visible=4)
    with Gpsfake(route.write(tmp_path / "once.nmea"), cycle_s=0.04, loop=False) as fake:
        # gpsd's first fix comes ~1.5 s after it starts: wait for it before arming the short timeout.
        asyncio.run(collect(GpsdClient(port=fake.port), lambda got: bool(fixes(got))))
        client = GpsdClient(port=fake.port, silence_timeout_s=1.0)
        with pytest.raises(GpsdError, match="sent no line"):
            asyncio.run(collect(client, lambda got: False))
    assert client.counters["tpv"] > 0
    assert client.last_error == f"gpsd at 127.0.0.1:{fake.port} sent no line for 1 s"


# --- fake gpsd servers -----------------------------------------------------------------------------------

VERSION = b'{"class":"VERSION","release":"3.22","rev":"3.22","proto_major":3,"proto_minor":14}\n'
GOOD_TPV = {
    "class": "TPV",
    "device": "/dev/ttyACM0",
    "mode": 3,
    "time": "2024-05-01T12:00:07.250Z",
    "lat": 52.5203,
    "lon": 13.4055,
    "altHAE": 147.0,
    "altMSL": 100.0,
    "alt": 100.0,
    "speed": 10.0,
    "track": 42.39,
    "climb": 0.5,
    "eph": 17.1,
}
GOOD_SKY = {"class": "SKY", "hdop": 0.9, "satellites": [{"PRN": 1, "used": True}, {"PRN": 2, "used": False}]}


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def tpv(**changes: object) -> bytes:
    return line(GOOD_TPV | changes)


BAD_LINES = [
    b"not json at all\n",
    b"[1, 2, 3]\n",
    b'"a string"\n',
    b"\xff\xfe\x00{}\n",
    b"[" * 50_000 + b"\n",  # nesting deeper than the JSON parser's recursion limit
    tpv(lat="52.5"),
    tpv(lat=500.0),
    tpv(lon=-181),
    tpv(speed=-3.0),
    tpv(mode=True),
    tpv(mode=7),
    tpv(time="yesterday"),
    tpv(climb=10**400),
    b'{"class":"TPV","mode":3,"lat":NaN,"lon":13.4}\n',
    b'{"class":"TPV","mode":3,"lat":Infinity,"lon":13.4}\n',
    line({"class": "SKY", "satellites": "many"}),
    line({"class": "SKY", "satellites": [{"PRN": 1, "used": "yes"}]}),
    line({"class": "SKY", "uSat": 3.5}),
]
OVERLONG = b'{"class":"TPV","pad":"' + b"x" * 200_000 + b'"}\n'


class FakeGpsd:
    """A TCP server on a free loopback port; `handler(server, reader, writer)` plays gpsd for a connection,
    after the server has read the client's first command line."""

    def __init__(
        self, handler: Callable[[FakeGpsd, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    ) -> None:
        self.handler = handler
        self.commands: list[bytes] = []
        self.closed_by_client = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.commands.append(await reader.readline())
        try:
            await self.handler(self, reader, writer)
        finally:
            writer.close()

    async def __aenter__(self) -> FakeGpsd:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def until_client_closes(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(1024):
            pass
        self.closed_by_client.set()


@pytest.mark.timeout(30)
def test_bad_json_is_counted_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(server: FakeGpsd, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(VERSION)
        for bad in BAD_LINES:
            writer.write(bad)
        writer.write(line({"class": "PPS", "device": "/dev/pps0"}))  # unknown class: ignored, not bad
        writer.write(tpv(mode=1))  # no fix but a stale position: position dropped
        await writer.drain()
        for start in range(0, len(OVERLONG), 30_000):  # in pieces, so it spans several reads
            writer.write(OVERLONG[start : start + 30_000])
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(tpv() + line(GOOD_SKY) + line({"class": "SKY", "uSat": 9, "nSat": 12, "satellites": []}))
        await writer.drain()
        await server.until_client_closes(reader)

    async def run() -> tuple[GpsdClient, list[Report]]:
        async with FakeGpsd(handler) as server:
            client = GpsdClient(port=server.port, silence_timeout_s=5)
            got = await collect(client, lambda got: len(got) == 4, timeout=10)
            # Closing the iterator closed the socket.
            await asyncio.wait_for(server.closed_by_client.wait(), 5)
            assert server.commands == [b'?WATCH={"enable":true,"json":true}\n']
            return client, got

    with caplog.at_level(logging.WARNING, logger="fleetgate.drivers.gps"):
        client, got = asyncio.run(run())

    no_fix, good, sky, sky_counts = got
    assert isinstance(no_fix, GpsFix) and no_fix.mode == 1
    assert (no_fix.lat, no_fix.lon, no_fix.alt_m) == (None, None, None)
    assert good == GpsFix(
        mode=3,
        time_ns=1714564807_250_000_000,
        lat=52.5203,
        lon=13.4055,
        alt_m=100.0,
        speed_mps=10.0,
        track_deg=42.39,
        climb_mps=0.5,
        eph_m=17.1,
        received_mono_ns=good.received_mono_ns,
        device="/dev/ttyACM0",
    )
    assert sky == GpsSky(
        satellites_used=1, satellites_visible=2, hdop=0.9, received_mono_ns=sky.received_mono_ns
    )
    assert (sky_counts.satellites_used, sky_counts.satellites_visible, sky_counts.hdop) == (9, 12, None)
    assert client.counters["bad_lines"] == len(BAD_LINES) + 1  # + the over-long line, counted once
    assert client.counters["lines"] == 1 + len(BAD_LINES) + 2 + 1 + 3
    assert (client.counters["tpv"], client.counters["sky"]) == (2, 2)
    bad_records = [r for r in caplog.records if r.getMessage() == "bad line from gpsd"]
    assert len(bad_records) == 1  # rate-limited: one record for the whole burst
    assert bad_records[0].reason == "not JSON"
    assert bad_records[0].gpsd == f"127.0.0.1:{client.port}"


BAD_TIMES = [
    "0000-01-01T00:00:00Z",  # there is no year 0: the calendar raised ValueError out of the client
    "2026-02-30T12:00:00Z",  # no such day (timegm would quietly make it 2 March)
    "2026-04-31T12:00:00Z",
    "2026-13-01T12:00:00Z",
    "2026-01-01T24:00:00Z",
    "2026-01-01T12:00:61Z",
    "\u0662\u0660\u0662\u0666-01-01T12:00:00Z",  # Arabic-Indic digits: \d matches them, gpsd never sends them
    "\uff12\uff10\uff12\uff16-01-01T12:00:00Z",  # fullwidth digits
    "2026-01-01T12:00:00.1234567890Z",  # more than nanoseconds
    "2026-01-01T12:00:00+00:00",
    "2026-01-01T12:00:00Z\n",
    "",
    "9" * 5000,
]
# Well-formed but implausible times are fixes: judging them is the clock's job (daemon/runtime/clock.py).
EXTREME_TIMES = {
    "0001-01-01T00:00:00Z": -62135596800 * 1_000_000_000,
    "1960-01-01T00:00:00Z": -315619200 * 1_000_000_000,
    "2300-01-01T00:00:00Z": 10413792000 * 1_000_000_000,
    "9999-12-31T23:59:60.999999999Z": 253402300800_999_999_999,  # a leap second: the next minute's :00
}


@pytest.mark.timeout(30)
def test_malformed_tpv_times_are_bad_lines_and_extreme_ones_pass_to_the_clock() -> None:
    """Guards against a hostile gpsd's `time` raising out of the client (year 0 did) or being misread."""

    async def handler(server: FakeGpsd, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(VERSION + b"".join(tpv(time=t) for t in BAD_TIMES))
        writer.write(b"".join(tpv(time=t) for t in EXTREME_TIMES) + tpv())
        await writer.drain()
        await server.until_client_closes(reader)

    async def run() -> tuple[GpsdClient, list[Report]]:
        async with FakeGpsd(handler) as server:
            client = GpsdClient(port=server.port, silence_timeout_s=5)
            return client, await collect(client, lambda got: len(got) == len(EXTREME_TIMES) + 1, timeout=10)

    client, got = asyncio.run(run())
    assert client.counters["bad_lines"] == len(BAD_TIMES)
    assert [f.time_ns for f in fixes(got)] == [*EXTREME_TIMES.values(), 1714564807_250_000_000]
    assert all(f.lat == GOOD_TPV["lat"] for f in fixes(got))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("first", [b"", VERSION], ids=["silent", "silent-after-version"])
def test_silent_gpsd_raises_without_blocking_the_loop(first: bytes) -> None:
    async def handler(server: FakeGpsd, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(first)
        await writer.drain()
        await server.until_client_closes(reader)  # accept, then say nothing more

    async def run() -> tuple[GpsdError, int, float, GpsdClient]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async with FakeGpsd(handler) as server:
            client = GpsdClient(port=server.port, silence_timeout_s=0.5)
            tick_task = asyncio.create_task(ticker())
            started = time.monotonic()
            with pytest.raises(GpsdError) as raised:
                await collect(client, lambda got: False, timeout=10)
            elapsed = time.monotonic() - started
            tick_task.cancel()
            return raised.value, ticks, elapsed, client

    error, ticks, elapsed, client = asyncio.run(run())
    assert "sent no line for 0.5 s" in str(error)
    assert f"127.0.0.1:{client.port}" in str(error)
    assert client.last_error == str(error)
    assert elapsed >= 0.5  # never early
    assert ticks >= 3  # the event loop kept running while the client waited


@pytest.mark.timeout(30)
def test_gpsd_not_listening_raises_with_address() -> None:
    port = free_port()
    client = GpsdClient(port=port, connect_timeout_s=5)
    with pytest.raises(GpsdError, match=f"cannot connect to gpsd at 127.0.0.1:{port}"):
        asyncio.run(collect(client, lambda got: True, timeout=10))
    assert client.counters["connects"] == 0
    assert client.last_error is not None and f"127.0.0.1:{port}" in client.last_error


@pytest.mark.timeout(30)
def test_connection_dropped_mid_stream_raises() -> None:
    async def handler(server: FakeGpsd, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(VERSION + tpv() + b'{"class":"TPV","mo')  # then gone, mid-line
        await writer.drain()

    async def run() -> tuple[list[Report], GpsdError, GpsdClient]:
        async with FakeGpsd(handler) as server:
            client = GpsdClient(port=server.port, silence_timeout_s=5)
            got: list[Report] = []
            with pytest.raises(GpsdError) as raised:
                async with asyncio.timeout(10):
                    async for report in client.reports():
                        got.append(report)
            return got, raised.value, client

    got, error, client = asyncio.run(run())
    assert len(got) == 1 and isinstance(got[0], GpsFix)
    assert str(error) == f"gpsd at 127.0.0.1:{client.port} closed the connection"
    assert client.counters["connects"] == 1


# --- nmea_route ------------------------------------------------------------------------------------------


def sentences(data: bytes) -> list[str]:
    return [s for s in data.decode("ascii").split("\r\n") if s]


def test_nmea_checksums_are_valid() -> None:
    route = nmea_route.build_route(
        [(-33.92, 18.42), (-33.921, 18.419)], 40, stop_start_s=1, stop_end_s=1, no_fix_s=2
    )
    lines = sentences(route.data)
    assert lines
    for text in lines:
        assert text.startswith("$") and text[-3] == "*", text
        xor = 0
        for char in text[1:-3].encode():
            xor ^= char
        assert text[-2:] == f"{xor:02X}", text
    per_epoch = 3 + math.ceil(route.sats_visible / 4)  # RMC, GGA, GSA, GSV...
    assert len(lines) == per_epoch * len(route.epochs)


def test_two_waypoint_route_length_and_duration() -> None:
    a, b = (52.5200, 13.4050), (52.5300, 13.4200)
    route = nmea_route.build_route([a, b], 36.0, stop_start_s=3, stop_end_s=4, no_fix_s=2)
    expected_m = haversine(a, b)
    # Sanity of the test's own haversine: the flat-earth estimate agrees to a few millimetres over 1.5 km.
    planar_m = math.radians(R) * math.hypot(
        b[0] - a[0], (b[1] - a[1]) * math.cos(math.radians(a[0] + b[0]) / 2)
    )
    assert expected_m == pytest.approx(planar_m, rel=1e-5)
    assert route.length_m == pytest.approx(expected_m, rel=1e-12)
    assert route.moving_s == pytest.approx(expected_m / 10.0, rel=1e-12)
    assert route.duration_s == pytest.approx(2 + 3 + expected_m / 10.0 + 4, rel=1e-12)
    assert len(route.epochs) == 2 + 3 + math.ceil(expected_m / 10.0) + 4
    # Times advance 1 s per epoch from the start time.
    assert [(e.time - route.epochs[0].time).total_seconds() for e in route.epochs] == list(
        range(len(route.epochs))
    )
    assert route.epochs[0].time == nmea_route.DEFAULT_START
    # One degree of latitude along a meridian: closed form, no haversine at all.
    meridian = nmea_route.build_route([(10.0, 5.0), (11.0, 5.0)], 3600.0)
    assert meridian.length_m == pytest.approx(R * math.pi / 180, rel=1e-12)


def test_route_epochs_follow_the_legs_at_their_speeds() -> None:
    waypoints = ((-33.9200, 18.4200), (-33.9210, 18.4190), (-33.9230, 18.4210))
    route = nmea_route.build_route(waypoints, [18.0, 72.0], stop_start_s=2, stop_end_s=2)
    legs = list(itertools.pairwise(waypoints))
    assert route.length_m == pytest.approx(sum(haversine(*leg) for leg in legs), rel=1e-12)
    assert route.moving_s == pytest.approx(haversine(*legs[0]) / 5.0 + haversine(*legs[1]) / 20.0, rel=1e-12)
    for epoch in route.epochs:
        assert distance_to_polyline((epoch.lat, epoch.lon), waypoints) < 0.01
        if epoch.leg is not None:
            assert epoch.speed_mps == pytest.approx([5.0, 20.0][epoch.leg])
            assert angle_diff(epoch.course_deg, bearing(*legs[epoch.leg])) < 0.01
    assert (route.epochs[0].lat, route.epochs[0].lon) == waypoints[0]
    assert (route.epochs[-1].lat, route.epochs[-1].lon) == waypoints[-1]
    # Consecutive epochs on the same leg are one second of driving apart.
    for prev, cur in itertools.pairwise(route.epochs):
        if prev.leg is not None and prev.leg == cur.leg:
            assert haversine((prev.lat, prev.lon), (cur.lat, cur.lon)) == pytest.approx(
                prev.speed_mps, rel=1e-6
            )
    # The RMC sentences carry those positions, south/west hemispheres included, and speed in knots.
    rmcs = [s.split(",") for s in sentences(route.data) if s.startswith("$GPRMC")]
    for fields, epoch in zip(rmcs, route.epochs, strict=True):
        lat = (int(fields[3][:2]) + float(fields[3][2:]) / 60) * (-1 if fields[4] == "S" else 1)
        lon = (int(fields[5][:3]) + float(fields[5][3:]) / 60) * (-1 if fields[6] == "W" else 1)
        assert haversine((lat, lon), (epoch.lat, epoch.lon)) < 0.01
        assert float(fields[7]) == pytest.approx(epoch.speed_mps * 3600 / 1852, abs=0.001)
        assert fields[9] == epoch.time.strftime("%d%m%y")


def test_no_fix_and_garbage_options() -> None:
    route = nmea_route.build_route([(1.0, 2.0), (1.001, 2.0)], 30, no_fix_s=3, garbage_every=2)
    assert [e.fix for e in route.epochs[:4]] == [False, False, False, True]
    text = route.data.decode("ascii", "replace")
    assert text.count(",V,,,,,,,") == 3  # RMC status V, no position
    assert text.count(",,,,,0,00,") == 3  # GGA quality 0
    assert route.data.count(b" garbage ") == len(route.epochs) // 2
    with pytest.raises(ValueError, match="speeds given"):
        nmea_route.build_route([(1.0, 2.0), (1.001, 2.0)], [30, 40])


def test_cli_writes_a_route_and_reports_its_length(tmp_path: Path) -> None:
    out = tmp_path / "cli.nmea"
    help_text = subprocess.run(
        [sys.executable, str(NMEA_ROUTE_PY), "--help"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert "--waypoint" in help_text and "--no-fix" in help_text
    done = subprocess.run(
        [
            sys.executable,
            str(NMEA_ROUTE_PY),
            str(out),
            "-w",
            "52.52,13.405",
            "-w=52.53,13.42",
            "--speed-kmh",
            "36",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    summary = json.loads(done.stdout)
    assert summary["length_m"] == pytest.approx(haversine((52.52, 13.405), (52.53, 13.42)), abs=0.001)
    assert out.read_bytes().startswith(b"$GPRMC,120000.00,A,5231.2000000,N,01324.3000000,E,")
