"""Fuzzing the GPS path with hypothesis: hostile gpsd JSON into the real client and sampler, and random NMEA
through a real gpsd (gpsfake).

Cases covered:

* `test_hostile_gpsd_lines`: batches of lines from a local server speaking gpsd's protocol, read by the real
  `GpsdClient` inside the real `GpsSampler`, with a real `Clock`, `ReadingSink` (SQLite outbox) and
  `TripRecorder`. Lines are TPV and SKY reports of the right shape with one hostile value (wrong type,
  out of range, NaN/Infinity, integers of hundreds of digits, malformed or non-ASCII `time`, non-string
  `device`), TPV fixes with well-formed but implausible times (years 1..2025 and 2100..9999), random JSON
  objects of any class and field values, JSON that is no object, nesting far past the parser's recursion
  limit, bytes that are no UTF-8 or no JSON, and lines over the 64 KiB limit. Each batch ends with a valid
  fix. Asserted: the sampler never fails; every line is a report, a counted bad line or an ignored class
  (nothing else); each line that must be rejected is counted; implausible times are counted by the clock
  and never trusted; a batch that yielded no fix leaves the last fix and the time trust as they were;
  the valid fix after the noise is taken, and once GPS time is trusted it stays at the true offset.
* `test_random_nmea_through_gpsfake`: a bounded handful of files of random NMEA sentences (RMC, GGA, GSA,
  GSV, VTG, ZDA with random or hostile fields, valid or bad checksums, ZDA years 1960 and 2300) followed by
  a valid parked route dated now, played by gpsfake into a real gpsd and read by the client. Asserted: only
  GpsdError ends a read; every report is within the documented ranges; the clock never trusts a time that
  is not the route's; the valid route's fixes arrive after the noise.

What the suite found (each fixed in drivers/gps.py; run against the original parser, these are the cases
hypothesis reports):

* `{"class": "ERROR"}`, which gpsd sends for a command it refuses, raised KeyError out of the client (the log
  record's `extra` had a `message` key, which logging reserves): the sampler died on every ERROR report.
* a TPV `time` of year 0000 raised ValueError out of the client instead of being a bad line;
* `time` written with non-ASCII digits (fullwidth, Arabic-Indic) was read as a date, and such a date once
  moved GPS time trust to 2081;
* impossible dates (`2000-02-30`) were quietly read as the next month's.

Through real gpsd (not ours to fix, shown here so nobody is surprised): gpsd passes a negative RMC speed
through (`"speed":-2.57`), which the client counts as a bad line, dropping that fix; and gpsd dates a ZDA
of 1999 as 2019 (its week-rollover guess), which the clock counts as implausible.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetgate.config.schema import GpsConfig, TripsConfig
from fleetgate.daemon.runtime.clock import WALL_MAX_NS, WALL_MIN_NS, Clock
from fleetgate.daemon.runtime.events import Events
from fleetgate.daemon.runtime.readings import ReadingSink
from fleetgate.daemon.telemetry.gps_sampler import GpsSampler
from fleetgate.daemon.telemetry.trip_recorder import TripRecorder
from fleetgate.drivers.gps import MAX_LINE_BYTES, GpsdClient, GpsdError, GpsFix, GpsSky
from fleetgate.sync.store import Database, Outbox, StateStore

from gpsfake_fixture import DRIVE_WAYPOINTS, Gpsfake, nmea_route

S = 1_000_000_000
VERSION = b'{"class":"VERSION","release":"3.22","rev":"3.22","proto_major":3,"proto_minor":14}\n'
MARKER = (
    b'{"class":"PPS","device":"/dev/pps0"}\n'  # an ignored class: read means every line before it was handled
)

# --- strategies ---------------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
wrong_type = st.booleans() | st.text(max_size=10) | st.lists(json_scalars, max_size=3) | st.just({"v": 1})


def _iso(d: datetime, digits: int) -> str:
    fraction = f".{d.microsecond:06d}{'0' * 3}"[: digits + 1] if digits else ""
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}{fraction}Z"


implausible_times = st.builds(
    _iso,
    st.datetimes(max_value=datetime(2025, 12, 31, 23, 59, 59))
    | st.datetimes(min_value=datetime(2100, 1, 1, 0, 0, 1)),
    st.integers(0, 9),
)
_STRICT_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z", re.ASCII)


@st.composite
def _bad_calendar_time(draw: st.DrawFn) -> str:
    """A valid date and time with one part broken: year 0, no such month, a day past the month's end,
    hour 24+, minute 60+, second 61+ (60 is a leap second)."""
    d = draw(st.datetimes(min_value=datetime(1, 1, 1)))
    parts = [d.year, d.month, d.day, d.hour, d.minute, d.second]
    which = draw(st.integers(0, 5))
    month_days = calendar.monthrange(d.year, d.month)[1]
    if which == 0:
        parts[0] = 0
    elif which == 1:
        parts[1] = draw(st.sampled_from([0, *range(13, 100)]))
    elif which == 2:  # 30 February, 31 April ... as often as days no month has
        beyond = range(month_days + 1, 32) if month_days < 31 else range(32, 100)
        parts[2] = draw(st.sampled_from(beyond) | st.sampled_from([0, *range(32, 100)]))
    else:
        parts[which] = draw(st.integers([24, 60, 61][which - 3], 99))
    year, month, day, hour, minute, second = parts
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}Z"


malformed_times = (
    _bad_calendar_time()
    | _bad_calendar_time()  # twice: the subtle ones are what a hand-written parser gets wrong
    | st.from_regex("\\A[\u0660-\u0669\uff10-\uff19]{4}-0[1-9]-1[0-9]T1[0-9]:[0-5][0-9]:[0-5][0-9]Z\\Z")
    | st.text(max_size=40).filter(lambda t: not _STRICT_TIME.fullmatch(t))
    | st.from_regex(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{10,14})?Z?\Z").filter(
        lambda t: not _STRICT_TIME.fullmatch(t)
    )
)

# TPV fields and values outside what the client accepts for each.
_RANGES = {
    "lat": (-90, 90),
    "lon": (-180, 180),
    "altMSL": (-12_000, 100_000),
    "speed": (0, 1_000),
    "track": (0, 360),
    "climb": (-1_000, 1_000),
    "eph": (0, 1e7),
}


def _out_of(low: float, high: float) -> st.SearchStrategy[Any]:
    return (
        st.floats(min_value=high, exclude_min=True, allow_infinity=True)
        | st.floats(max_value=low, exclude_max=True, allow_infinity=True)
        | st.just(float("nan"))
        | st.integers(min_value=int(high) + 1, max_value=10**400)
        | st.integers(min_value=-(10**400), max_value=int(low) - 1)
    )


def _good_tpv(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "class": "TPV",
        "device": "/dev/ttyACM0",
        "mode": draw(st.sampled_from([2, 3])),
        "lat": draw(st.floats(-90, 90)),
        "lon": draw(st.floats(-180, 180)),
        "altMSL": draw(st.floats(-12_000, 100_000)),
        "speed": draw(st.floats(0, 1_000)),
        "track": draw(st.floats(0, 360)),
        "climb": draw(st.floats(-1_000, 1_000)),
        "eph": draw(st.floats(0, 1e7)),
    }


def _line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"  # NaN and Infinity written as gpsd's C printf never would


@st.composite
def bad_tpv(draw: st.DrawFn) -> bytes:
    tpv = _good_tpv(draw)
    field = draw(st.sampled_from([*_RANGES, "alt", "mode", "time", "device"]))
    if field == "mode":
        tpv["mode"] = draw(wrong_type | st.floats() | st.integers().filter(lambda m: not 0 <= m <= 3))
    elif field == "time":
        tpv["time"] = draw(malformed_times | st.integers() | st.lists(st.text(max_size=3), max_size=2))
    elif field == "device":
        tpv["device"] = draw(st.integers() | st.booleans() | st.lists(st.text(max_size=3), max_size=2))
    elif field == "alt":  # only looked at without altMSL (older gpsd)
        del tpv["altMSL"]
        tpv["alt"] = draw(wrong_type | _out_of(*_RANGES["altMSL"]))
    else:
        tpv[field] = draw(wrong_type | _out_of(*_RANGES[field]))
    return _line(tpv)


@st.composite
def bad_sky(draw: st.DrawFn) -> bytes:
    field = draw(st.sampled_from(["uSat", "nSat", "hdop", "satellites", "used"]))
    sky: dict[str, Any] = {"class": "SKY", "hdop": 0.9, "satellites": [{"PRN": 1, "used": True}]}
    if field in ("uSat", "nSat"):
        sky[field] = draw(wrong_type | st.floats() | st.integers().filter(lambda n: not 0 <= n <= 1000))
    elif field == "hdop":
        sky["hdop"] = draw(wrong_type | _out_of(0, 100))
    elif field == "satellites":
        sky["satellites"] = draw(
            st.text(max_size=5)
            | st.integers()
            | st.lists(json_scalars.filter(lambda v: v is not None), min_size=1)
        )
    else:
        sky["satellites"] = [{"PRN": 1, "used": draw(wrong_type.filter(lambda v: not isinstance(v, bool)))}]
    return _line(sky)


def _not_json(data: bytes) -> bool:
    try:
        json.loads(data.strip().decode("utf-8"))
    except (ValueError, RecursionError):
        return bool(data.strip())
    return False


def _nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth + b"\n"
    return b'{"class":"TPV","x":' + b'{"a":' * depth + b"1" + b"}" * (depth + 1) + b"\n"


@st.composite
def bad_time_tpv(draw: st.DrawFn) -> bytes:
    return _line(_good_tpv(draw) | {"time": draw(malformed_times)})


must_be_bad = st.one_of(
    bad_time_tpv(),
    bad_time_tpv(),
    bad_tpv(),
    bad_sky(),
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")).filter(_not_json).map(lambda b: b + b"\n"),
    st.builds(
        lambda b: b'{"class":"TPV","device":"' + b + b'"}\n',
        st.binary(min_size=1, max_size=8).map(lambda b: b.replace(b"\n", b"")),
    ).filter(_not_json),  # not UTF-8 inside a report
    json_values.filter(lambda v: not isinstance(v, dict)).map(_line),
    st.builds(_nested, st.integers(2_000, 30_000), st.sampled_from(["list", "dict"])),
    st.integers(MAX_LINE_BYTES + 1, MAX_LINE_BYTES + 5_000).map(
        lambda n: b'{"class":"TPV","pad":"' + b"x" * n + b'"}\n'
    ),
)


@st.composite
def implausible_fix(draw: st.DrawFn) -> bytes:
    return _line(_good_tpv(draw) | {"time": draw(implausible_times)})


@st.composite
def anything(draw: st.DrawFn) -> bytes:
    body = draw(
        st.dictionaries(
            st.sampled_from(
                ["mode", "lat", "lon", "alt", "altMSL", "speed", "uSat", "nSat", "hdop", "satellites"]
            )
            | st.text(max_size=6),
            json_values,
            max_size=6,
        )
    )
    body["class"] = draw(
        st.sampled_from(["TPV", "SKY", "VERSION", "ERROR", "DEVICES", "WATCH"]) | json_scalars
    )
    if body["class"] == "TPV":  # a time that could move trust would be valid input, not noise
        body["time"] = draw(st.none() | implausible_times | malformed_times)
    return _line(body)


tagged_lines = st.lists(
    st.tuples(st.just("bad"), must_be_bad)
    | st.tuples(st.just("implausible"), implausible_fix())
    | st.tuples(st.just("any"), anything()),
    min_size=1,
    max_size=6,
)


def ignored(line: bytes) -> bool:
    """Lines the client reads and drops without counting them: blank, or a JSON object of another class."""
    text = line.strip()
    if not text:
        return True
    try:
        report = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    return isinstance(report, dict) and report.get("class") not in ("TPV", "SKY")


# --- the rig: a fake gpsd and the real sampler on one event loop ---------------------------------------------


class Rig:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.clock = Clock(trust_gps=True)
        outbox = Outbox(db, boot_id="boot-fuzz")
        self.sink = ReadingSink(outbox, self.clock)
        trips = TripRecorder(
            TripsConfig(), self.clock, Events(outbox, self.clock), StateStore(db), "boot-fuzz"
        )
        self.to_gpsd: asyncio.Queue[bytes | None] = asyncio.Queue()  # the current connection's
        self.sentinels = 0
        self.trusted_offset: int | None = None
        self.trips = trips

    @classmethod
    async def open(cls, path: Path) -> Rig:
        rig = cls(await Database.open(path))
        rig.server = await asyncio.start_server(rig._serve, "127.0.0.1", 0)
        port = rig.server.sockets[0].getsockname()[1]
        config = GpsConfig(enabled=True, port=port, silence_timeout_s=60, sample_interval_s=0.001)
        rig.sampler = GpsSampler(config, rig.clock, rig.sink, trips=rig.trips)
        rig.tasks = [asyncio.create_task(rig.sink.run(), name="sink")]
        await rig.ensure_running()
        return rig

    async def ensure_running(self) -> None:
        """(Re)start the sampler, as the daemon's supervisor would after a failure, and wait for VERSION.
        So a failure is reported with the example that caused it, not with every example after it."""
        if self.tasks[1:] and not self.tasks[1].done():
            return
        lines = self.sampler.client.counters["lines"]
        self.tasks[1:] = [asyncio.create_task(self.sampler.run(), name="sampler")]
        await self.until("connected", lambda: self.sampler.client.counters["lines"] > lines)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.to_gpsd.put_nowait(None)  # retire the previous connection's writer
        queue = self.to_gpsd = asyncio.Queue()
        try:
            await reader.readline()
            writer.write(VERSION)
            while (data := await queue.get()) is not None:
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # the client hung up (a failed sampler); the rig restarts it
        finally:
            writer.close()

    async def until(self, what: str, check: Any) -> None:
        async with asyncio.timeout(20):
            while not check():
                for task in self.tasks:
                    if task.done():
                        raise AssertionError(f"{task.get_name()} ended: {task.exception()!r}")
                await asyncio.sleep(0.002)
        assert check(), what

    async def check(self, batch: list[tuple[str, bytes]]) -> None:
        await self.ensure_running()
        client, clock = self.sampler.client, self.clock
        counters, clock_counters = dict(client.counters), dict(clock.counters)
        fix_before, trust_before = self.sampler.fix, clock.trust
        lines = [line for _, line in batch]
        await self.to_gpsd.put(b"".join(lines) + MARKER)
        wanted = counters["lines"] + len(lines) + 1
        await self.until("the batch read", lambda: client.counters["lines"] >= wanted)
        moved = {k: v - counters[k] for k, v in client.counters.items()}
        moved_clock = {k: v - clock_counters[k] for k, v in clock.counters.items()}

        tags = [tag for tag, _ in batch]
        handled = moved["tpv"] + moved["sky"] + moved["bad_lines"] + sum(map(ignored, lines))
        assert handled == len(lines), (moved, batch)  # every line accounted for, exactly once
        assert moved["bad_lines"] >= tags.count("bad"), (moved, batch)
        assert moved["tpv"] >= tags.count("implausible"), (moved, batch)
        assert moved_clock["gps_time_implausible"] >= tags.count("implausible")
        if "any" not in tags:
            assert (moved["bad_lines"], moved["tpv"], moved["sky"]) == (
                tags.count("bad"),
                tags.count("implausible"),
                0,
            ), batch
            assert moved_clock["gps_time_implausible"] == tags.count("implausible")
        assert clock.trust == trust_before  # noise never moves time trust
        if moved["tpv"] == 0:
            assert self.sampler.fix is fix_before  # nor, when rejected, the last fix
        fix = self.sampler.fix
        if fix is not None:
            assert fix.time_ns is None or isinstance(fix.time_ns, int)
            if fix.mode < 2:
                assert (fix.lat, fix.lon, fix.alt_m) == (None, None, None)

        # A valid fix after the noise is taken, and GPS time trust, once there, stays at the true offset.
        self.sentinels += 1
        lat = round(10 + self.sentinels * 1e-5, 6)
        now = datetime.now(UTC)
        await self.to_gpsd.put(
            _line({"class": "TPV", "mode": 3, "time": _iso(now, 6), "lat": lat, "lon": 20.0})
        )
        await self.until(
            "the valid fix", lambda: self.sampler.fix is not None and self.sampler.fix.lat == lat
        )
        trust = clock.trust
        if trust.trusted:
            assert trust.source == "gps" and trust.offset_ns is not None
            if self.trusted_offset is None:
                self.trusted_offset = trust.offset_ns
            assert abs(trust.offset_ns - self.trusted_offset) <= S
        stamp = clock.stamp()
        assert WALL_MIN_NS <= stamp.wall_ns <= WALL_MAX_NS

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.to_gpsd.put_nowait(None)
        self.server.close()
        await self.db.close()


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # the over-long lines
def test_hostile_gpsd_lines(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    rig = loop.run_until_complete(Rig.open(tmp_path / "fuzz.db"))
    try:

        @settings(
            max_examples=400,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(batch=tagged_lines)
        def check(batch: list[tuple[str, bytes]]) -> None:
            loop.run_until_complete(rig.check(batch))

        check()
        # Over the whole run: one connection, nothing lost, trust reached from the valid fixes alone.
        client = rig.sampler.client
        assert client.counters["connects"] == 1
        assert client.counters["bad_lines"] > 100 and rig.clock.counters["gps_time_implausible"] > 50
        assert rig.clock.trust.source == "gps"
        loop.run_until_complete(rig.sink.flush())
        assert rig.sink.rejected == 0 and rig.sink.dropped == 0
    finally:
        loop.run_until_complete(rig.close())
        loop.close()


# --- random NMEA through a real gpsd -------------------------------------------------------------------------

_field = st.text(alphabet="0123456789.-+ABCDEFGHIJKLMNOPQRSTUVWXYZ ", max_size=12)


def _checksum(body: str) -> str:
    xor = 0
    for char in body.encode("ascii"):
        xor ^= char
    return f"{xor:02X}"


@st.composite
def nmea_sentence(draw: st.DrawFn) -> str:
    kind = draw(
        st.sampled_from(["RMC", "GGA", "GSA", "GSV", "VTG", "ZDA", *["ZDA-hostile", "RMC-hostile"] * 2])
    )
    if kind == "ZDA-hostile":  # a 4-digit year gpsd may take as it is
        year = draw(st.sampled_from([1960, 1999, 2300, 9999]))
        body = f"GPZDA,{draw(st.sampled_from(['120000.00', '235960.00', '246000.00']))},01,06,{year},00,00"
    elif kind == "RMC-hostile":
        body = (
            f"GPRMC,{draw(st.sampled_from(['120000.00', '999999.99', '']))},A,"
            f"{draw(st.sampled_from(['9959.9999', '5231.2000', '0000.0000']))},{draw(st.sampled_from('NSX'))},"
            f"{draw(st.sampled_from(['18059.9999', '01324.3000']))},{draw(st.sampled_from('EWQ'))},"
            f"{draw(st.sampled_from(['999999.9', '-5.0', '0.0']))},{draw(st.sampled_from(['361.0', '', '-1']))},"
            f"{draw(st.sampled_from(['010160', '311299', '320126', '000000', '290226']))},,,A"
        )
    else:
        fields = draw(st.lists(_field, min_size=3, max_size=16))
        body = f"{draw(st.sampled_from(['GP', 'GN', 'GL']))}{kind},{','.join(fields)}"
    checksum = (
        _checksum(body) if draw(st.booleans()) or "hostile" in kind else draw(st.sampled_from(["00", "ZZ"]))
    )
    return f"${body}*{checksum}\r\n"


def _report_in_range(report: GpsFix | GpsSky) -> None:
    if isinstance(report, GpsSky):
        for n in (report.satellites_used, report.satellites_visible):
            assert n is None or 0 <= n <= 1000
        assert report.hdop is None or 0 <= report.hdop <= 100
        return
    assert 0 <= report.mode <= 3
    assert report.lat is None or -90 <= report.lat <= 90
    assert report.lon is None or -180 <= report.lon <= 180
    assert report.speed_mps is None or 0 <= report.speed_mps <= 1000
    assert report.track_deg is None or 0 <= report.track_deg <= 360


@pytest.mark.timeout(120)
def test_random_nmea_through_gpsfake(tmp_path: Path) -> None:
    @settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(noise=st.lists(nmea_sentence(), min_size=5, max_size=25))
    def check(noise: list[str]) -> None:
        start = datetime.now(UTC).replace(microsecond=0)
        route = nmea_route.build_route(DRIVE_WAYPOINTS[:1], [], start=start, stop_start_s=30, sats_visible=4)
        path = tmp_path / "fuzz.nmea"
        path.write_bytes("".join(noise).encode("ascii") + route.data)
        true_offset_ns = int(start.timestamp()) * S - time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        here = DRIVE_WAYPOINTS[0]

        async def read(port: int) -> tuple[list[GpsFix | GpsSky], Clock, GpsdClient]:
            clock, client, got = Clock(), GpsdClient(port=port, silence_timeout_s=5), []
            with contextlib.suppress(GpsdError):  # the only error a read may end with
                async with asyncio.timeout(30), contextlib.aclosing(client.reports()) as reports:
                    async for report in reports:
                        got.append(report)
                        _report_in_range(report)
                        if isinstance(report, GpsFix) and report.mode >= 2 and report.time_ns is not None:
                            clock.observe_gps_time(report.time_ns, report.received_mono_ns)
                        on_route = [
                            f
                            for f in got
                            if isinstance(f, GpsFix)
                            and f.lat is not None
                            and f.mode >= 2
                            and abs(f.lat - here[0]) < 1e-5
                            and abs(f.lon - here[1]) < 1e-5
                        ]
                        if len(on_route) >= 3:
                            break
            return got, clock, client

        with Gpsfake(path, cycle_s=0.01, loop=False) as fake:
            got, clock, client = asyncio.run(read(fake.port))
        on_route = [f for f in got if isinstance(f, GpsFix) and f.mode >= 2 and f.lat is not None]
        assert len(on_route) >= 3, (client.counters, client.last_error, got[-5:])
        if clock.trust.trusted:  # only ever from the route's true time (gpsfake plays it a little late)
            assert clock.trust.offset_ns is not None
            assert abs(clock.trust.offset_ns - true_offset_ns) < 60 * S
        assert (
            client.counters["tpv"] + client.counters["sky"] + client.counters["bad_lines"]
            <= client.counters["lines"]
        )

    check()
