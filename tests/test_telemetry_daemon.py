"""The real daemon with the ELM327 emulator on a pty and gpsd fed by gpsfake: telemetry, trips, DTCs, recovery.

Each test starts its own emulator, gpsd and daemon; they share nothing.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import daemon_config, wait_until
from elm_emulator import ElmEmulator
from gpsfake_fixture import DRIVE_WAYPOINTS, Gpsfake, moving_route, nmea_route

pytestmark = pytest.mark.timeout(180)

SPEED_KMH = 36


def records(db: Path, stream: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute(
            "SELECT o.seq, o.wall_ns, o.mono_ns, o.time_trusted, o.time_corrected, o.payload FROM outbox o"
            " JOIN streams s ON s.id = o.stream_id WHERE s.name = ? ORDER BY o.seq",
            (stream,),
        ).fetchall()
    finally:
        conn.close()
    return [
        {
            "seq": seq,
            "wall_ns": wall,
            "mono_ns": mono,
            "trusted": bool(t),
            "corrected": bool(c),
            **json.loads(p),
        }
        for seq, wall, mono, t, c, p in rows
    ]


def events(db: Path, name: str | None = None) -> list[dict[str, Any]]:
    return [e for e in records(db, "events") if name is None or e["event"] == name]


def cli_json(daemon, *args: str) -> dict[str, Any]:
    result = daemon.cli(*args, "--json")
    # status: 4 while a component fails (these tests unplug adapters on purpose), else 0
    assert result.returncode in ((0, 4) if args[0] == "status" else (0,)), result.stderr
    return json.loads(result.stdout)


def vehicle_config(
    tmp_path: Path,
    obd_port: str | None,
    gps_port: int | None,
    trust_gps: bool = True,
    heartbeat_s: float = 60.0,
) -> Path:
    sections = f"""
[supervisor]
backoff_initial_s = 0.2
backoff_max_s = 1.0

[trips]
ignition_on_s = 1
ignition_off_s = 2
checkpoint_interval_s = 1

[time]
trust_ntp = false
trust_gps = {str(trust_gps).lower()}
"""
    if obd_port is not None:
        sections += f"""
[obd]
enabled = true
port = "{obd_port}"
protocol = "6"
dtc_interval_s = 1
adapter_voltage_interval_s = 2
"""
    if gps_port is not None:
        sections += f"""
[gps]
enabled = true
port = {gps_port}
silence_timeout_s = 2
"""
    return daemon_config(tmp_path, sections, heartbeat_s=heartbeat_s)


@pytest.fixture
def emulator(tmp_path):
    with ElmEmulator(link=tmp_path / "ttyOBD") as emu:
        emu.set_speed(SPEED_KMH)
        yield emu


def test_a_drive_gives_signals_trip_events_and_stats_matching_the_route(tmp_path, start_daemon, emulator):
    # A long parked start so gpsd's first fixes and the daemon's reconnect both fall before the car moves.
    route_path, route = moving_route(tmp_path, stop_start_s=20, stop_end_s=600)
    db = tmp_path / "state" / "fleetgate.db"
    daemon = start_daemon(vehicle_config(tmp_path, emulator.port, None, trust_gps=False))
    daemon.wait_ready()
    wait_until("trip-started", lambda: events(db, "trip-started"))

    with Gpsfake(route_path, cycle_s=0.05, loop=False) as gps:
        daemon.terminate()
        # The same daemon, now with GPS too: the trip continues across the restart.
        daemon = start_daemon(vehicle_config(tmp_path, emulator.port, gps.port, trust_gps=False))
        daemon.wait_ready()
        end = DRIVE_WAYPOINTS[-1]

        def at_route_end() -> bool:
            fix = cli_json(daemon, "gps")["fix"]
            return bool(
                fix
                and fix["latitude"]
                and abs(fix["latitude"] - end[0]) < 1e-5
                and abs(fix["longitude"] - end[1]) < 1e-5
            )

        wait_until("the GPS to reach the end of the route", at_route_end, timeout=90)
        obd = cli_json(daemon, "obd")
        assert obd["state"] == "connected"
        assert obd["vin"] in emulator.configured_vins()
        assert obd["values"]["vehicle_speed"] == {
            "value": float(SPEED_KMH),
            "unit": "km/h",
            "age_s": pytest.approx(0, abs=5),
        }
        assert obd["trips"]["ignition"] == "on"
        gps_view = cli_json(daemon, "gps")
        assert gps_view["fix"]["mode"] == 3 and gps_view["sky"]["satellites_used"] == 7

        emulator.set_scenario("engineoff")
        completed = wait_until("trip-completed", lambda: events(db, "trip-completed"))
    daemon.terminate()

    names = [
        e["event"]
        for e in events(db)
        if e["event"] in ("startup", "trip-started", "shutdown", "trip-completed")
    ]
    assert names == ["startup", "trip-started", "shutdown", "trip-completed"]
    [started] = events(db, "trip-started")
    [done] = completed
    trip = done["trip"]
    assert trip["id"] == started["trip"]["id"] and trip["status"] == "completed"
    stats = trip["stats"]

    # GPS: the whole drive happened within the trip (see docs/telemetry.md for the tolerances).
    assert stats["distanceByGPS"] == pytest.approx(route.length_m, abs=0.02 * route.length_m + 15)
    stop_lon, stop_lat = trip["stopPoint"]["coordinates"]
    assert nmea_route.haversine_m((stop_lat, stop_lon), end) < 15
    # The trip started before gpsd ran, so its start point is the first fix: the parked start of the route.
    start_lon, start_lat = trip["startPoint"]["coordinates"]
    assert nmea_route.haversine_m((start_lat, start_lon), DRIVE_WAYPOINTS[0]) < 15

    # Vehicle speed: 36 km/h throughout, sampled every second, over the whole trip (restart gap included).
    duration_s = stats["duration"] / 1000
    assert stats["maxSpeed"] == SPEED_KMH and stats["averageSpeed"] == SPEED_KMH
    assert stats["distanceByVSS"] == pytest.approx(SPEED_KMH / 3.6 * duration_s, abs=SPEED_KMH / 3.6 * 2 + 1)
    assert stats["distance"] == stats["distanceByVSS"]
    assert trip["preview"]

    telemetry = records(db, "telemetry")
    units = {(r["signal"], r["unit"]) for r in telemetry}
    for expected in [
        ("vehicle_speed", "km/h"),
        ("rpm", "rpm"),
        ("engine_load", "%"),
        ("throttle_position", "%"),
        ("coolant_temp", "degC"),
        ("fuel_level", "%"),
        ("control_module_voltage", "V"),
        ("adapter_voltage", "V"),
        ("gps_position", "deg,deg,m"),
        ("gps_speed", "km/h"),
        ("gps_fix_mode", "mode"),
    ]:
        assert expected in units, f"no {expected} reading"
    position = next(r for r in telemetry if r["signal"] == "gps_position")["value"]
    assert set(position) == {"latitude", "longitude", "altitude"}
    assert all(r["value"] == SPEED_KMH for r in telemetry if r["signal"] == "vehicle_speed")


def test_dtcs_give_dtc_on_and_clearing_them_dtc_off(tmp_path, start_daemon, emulator):
    db = tmp_path / "state" / "fleetgate.db"
    daemon = start_daemon(vehicle_config(tmp_path, emulator.port, None))
    daemon.wait_ready()
    wait_until("OBD connected", lambda: cli_json(daemon, "obd")["state"] == "connected")
    emulator.set_dtcs(["P0104", "C0300"])
    on = wait_until("two dtc-on", lambda: len(events(db, "dtc-on")) == 2 and events(db, "dtc-on"))
    assert sorted(e["code"] for e in on) == ["C0300", "P0104"]
    assert all(e["start"] for e in on)
    assert next(e for e in on if e["code"] == "P0104")[
        "description"
    ]  # python-obd knows P0104; C0300 it does not
    view = cli_json(daemon, "obd")["dtc"]
    assert view["mil"] is True and [d["code"] for d in view["active"]] == ["C0300", "P0104"]
    text = daemon.cli("obd").stdout
    assert "MIL: ON" in text and "P0104" in text

    emulator.clear_dtcs()
    off = wait_until("two dtc-off", lambda: len(events(db, "dtc-off")) == 2 and events(db, "dtc-off"))
    for event in off:
        assert event["stop"] >= event["start"]
    assert len(events(db, "dtc-on")) == 2  # nothing re-opened
    daemon.terminate()


def test_adapter_unplugged_and_plugged_back_recovers(tmp_path, start_daemon, emulator):
    db = tmp_path / "state" / "fleetgate.db"
    daemon = start_daemon(vehicle_config(tmp_path, emulator.port, None))
    daemon.wait_ready()
    wait_until("OBD connected", lambda: cli_json(daemon, "obd")["state"] == "connected")
    emulator.kill()  # the pty and its symlink vanish, as when the adapter is pulled out
    wait_until("OBD noticed", lambda: cli_json(daemon, "obd")["state"] != "connected")
    status = cli_json(daemon, "status")
    obd = next(c for c in status["components"] if c["name"] == "obd")
    assert obd["restarts"] >= 1 and obd["last_error"]
    before = len([r for r in records(db, "telemetry") if r["signal"] == "rpm"])

    with ElmEmulator(link=tmp_path / "ttyOBD"):
        wait_until("OBD reconnected", lambda: cli_json(daemon, "obd")["state"] == "connected", timeout=60)
        wait_until(
            "new rpm readings",
            lambda: len([r for r in records(db, "telemetry") if r["signal"] == "rpm"]) > before,
        )
        assert daemon.proc.poll() is None
    daemon.terminate()
    plug = [(e["event"], e["reason"]) for e in events(db) if e["event"].startswith("obd-plugged")]
    assert [name for name, _ in plug] == ["obd-plugged-in", "obd-plugged-out", "obd-plugged-in"], plug
    assert plug[1][1] in ("the adapter link was lost", "the adapter does not answer"), plug

    # A restart with the adapter where it was announces nothing new.
    with ElmEmulator(link=tmp_path / "ttyOBD"):
        daemon = start_daemon(vehicle_config(tmp_path, emulator.port, None))
        daemon.wait_ready()
        wait_until("OBD connected", lambda: cli_json(daemon, "obd")["state"] == "connected", timeout=60)
        daemon.terminate()
    assert len([e for e in events(db) if e["event"].startswith("obd-plugged")]) == 3


def test_a_silent_gpsd_does_not_hang_the_daemon(tmp_path, start_daemon):
    """Guards against gpsd-py3's failure: a gpsd that accepts and never speaks blocked its callers forever."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_stay_silent() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    try:
        daemon = start_daemon(vehicle_config(tmp_path, None, port))
        daemon.wait_ready()

        def gps_failed_for_silence():
            gps = next(c for c in cli_json(daemon, "status")["components"] if c["name"] == "gps")
            return gps["restarts"] >= 2 and "no line" in (gps["last_error"] or "") and gps

        wait_until("the gps component to give up on the silent gpsd", gps_failed_for_silence, timeout=30)
        assert len(accepted) >= 2  # it reconnected, not hung on the first connection
        assert cli_json(daemon, "gps")["connected"] is False
        assert daemon.terminate() == 0
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in accepted:
            conn.close()


def test_late_gps_trust_corrects_wall_times_taken_before_it(tmp_path, start_daemon):
    """Guards against readings from before the first fix keeping a wrong wall clock (a Pi has no RTC)."""
    from datetime import UTC, datetime, timedelta

    db = tmp_path / "state" / "fleetgate.db"
    skew = timedelta(hours=3)  # GPS says the system clock is 3 h behind
    route = nmea_route.build_route(
        DRIVE_WAYPOINTS[:1], [], start=datetime.now(UTC) + skew, stop_start_s=600, sats_visible=8
    )
    path = route.write(tmp_path / "parked.nmea")
    # GGA, RMC, GSA and two GSV per second at 0.2 s a sentence: GPS time runs in real time.
    with Gpsfake(path, cycle_s=0.2, loop=False) as gps:
        daemon = start_daemon(vehicle_config(tmp_path, None, gps.port, heartbeat_s=0.2))
        daemon.wait_ready()
        [trusted] = wait_until("time-trusted", lambda: events(db, "time-trusted"), timeout=60)
        assert trusted["source"] == "gps"
        # The route's clock started when it was written; gpsfake takes a second or two to start playing it.
        assert trusted["system_clock_error_s"] == pytest.approx(-skew.total_seconds(), abs=5)
        wait_until("heartbeats after trust", lambda: records(db, "heartbeat")[-1]["trusted"])
        daemon.terminate()

    beats = records(db, "heartbeat")
    early = [b for b in beats if not b["trusted"]]
    late = [b for b in beats if b["trusted"]]
    assert early and late
    assert all(b["corrected"] for b in early)
    assert trusted["corrected_records"] >= len(early)
    # Corrected or taken after trust, every wall time now follows GPS time: system clock + 3 h.
    for beat in beats:
        offset_s = (beat["wall_ns"] - beat["mono_ns"]) / 1e9
        first_offset_s = (beats[0]["wall_ns"] - beats[0]["mono_ns"]) / 1e9
        assert offset_s == pytest.approx(first_offset_s, abs=1.5)
    assert (beats[0]["wall_ns"] - time.time_ns()) / 1e9 == pytest.approx(skew.total_seconds(), abs=120)


class ThreadedGpsd:
    """A fake gpsd on a loopback port, for what gpsd itself never sends. Each connection is served by
    `serve(conn, index)` on a thread of its own, after the client's first command; the listener closes
    after `connections` connections (later connects are refused), or when the context ends."""

    def __init__(self, serve: Callable[[socket.socket, int], None], connections: int | None = None) -> None:
        self.serve = serve
        self.connections = connections
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.served = 0  # connections whose `serve` returned
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> ThreadedGpsd:
        self._accepter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.listener.close()
        for thread in [self._accepter, *self._threads]:
            thread.join(10)

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        index = 0
        while not self.stop.is_set() and (self.connections is None or index < self.connections):
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve_one, args=(conn, index), daemon=True)
            thread.start()
            self._threads.append(thread)
            index += 1
        self.listener.close()

    def _serve_one(self, conn: socket.socket, index: int) -> None:
        with conn:
            try:
                conn.settimeout(5)
                conn.recv(1024)  # ?WATCH=...
                conn.sendall(b'{"class":"VERSION","release":"3.22","proto_major":3,"proto_minor":14}\n')
                self.serve(conn, index)
            except OSError:
                pass  # the daemon hung up
            finally:
                self.served += 1


def tpv_line(when: str, lat: float = 52.52, lon: float = 13.405) -> bytes:
    tpv = {"class": "TPV", "device": "/dev/ttyACM0", "mode": 3, "time": when, "lat": lat, "lon": lon}
    return json.dumps(tpv).encode() + b"\n"


def iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_now() -> str:
    return iso(datetime.now(UTC))


def gps_component(daemon, name: str = "gps") -> dict[str, Any]:
    return next(c for c in cli_json(daemon, "status")["components"] if c["name"] == name)


WALL_MAX_NS = 4_102_444_800 * 1_000_000_000  # 2100-01-01, docs/telemetry.md "Time"


@pytest.mark.parametrize("year", [2300, 1960])
def test_implausible_gps_time_is_not_trusted_and_telemetry_goes_on(tmp_path, start_daemon, year):
    """Guards against issue 11 finding 1: a fix dated 2300 made wall_ns overflow SQLite (readings restarting
    forever, telemetry stopped, SIGTERM exit 1); one dated 1960 made wall_ns negative."""
    db = tmp_path / "state" / "fleetgate.db"
    truthful = threading.Event()  # set: the receiver tells the true time again

    def serve(conn: socket.socket, index: int) -> None:
        start = time.monotonic()
        while not gpsd.stop.is_set():
            # GPS time runs in real time, as a receiver's does: consistent fixes, only the date is absurd.
            when = datetime(year, 6, 1, 12, tzinfo=UTC) + timedelta(seconds=time.monotonic() - start)
            conn.sendall(tpv_line(iso_now() if truthful.is_set() else iso(when)))
            time.sleep(0.1)

    with ThreadedGpsd(serve) as gpsd:
        daemon = start_daemon(vehicle_config(tmp_path, None, gpsd.port, heartbeat_s=0.2))
        daemon.wait_ready()
        wait_until("fixes received", lambda: cli_json(daemon, "gps")["counters"].get("tpv", 0) >= 10)
        stored = len(records(db, "telemetry"))
        wait_until("more telemetry stored", lambda: len(records(db, "telemetry")) > stored + 3)
        readings = gps_component(daemon, "readings")
        assert (readings["state"], readings["restarts"]) == ("running", 0), readings
        view = cli_json(daemon, "gps")
        assert view["time"]["trusted"] is False
        assert view["counters"]["time_implausible"] >= 10
        assert view["fix"]["latitude"] == 52.52  # the position of such a fix is still a position
        text = daemon.cli("gps").stdout
        assert "time_implausible=" in text and "UNTRUSTED" in text

        truthful.set()  # a valid fix after the noise still gives trust
        [trusted] = wait_until("time-trusted", lambda: events(db, "time-trusted"))
        assert trusted["source"] == "gps"
        assert cli_json(daemon, "gps")["time"]["trusted"] is True
        assert daemon.terminate() == 0

    rows = records(db, "telemetry") + records(db, "heartbeat")
    assert rows
    assert all(0 <= r["wall_ns"] <= WALL_MAX_NS for r in rows)
    # Untrusted or corrected, every wall time is within a day of now: none was taken from the fixes' date.
    assert all(abs(r["wall_ns"] - time.time_ns()) < 86_400 * 1_000_000_000 for r in rows)


def test_gpsd_counters_add_up_across_reconnects(tmp_path, start_daemon):
    """Guards against issue 11 finding 9: each reconnect made a new client, so bad_lines read 0 after 27
    hostile gpsd connections."""
    connections, bad_per_connection = 4, 5

    def serve(conn: socket.socket, index: int) -> None:
        bad = [
            b"not json\n",
            b"[1]\n",
            b"\xff\xfe\n",
            tpv_line("0000-01-01T00:00:00Z"),
            b'{"class":"TPV","lat":"x"}\n',
        ]
        assert len(bad) == bad_per_connection
        conn.sendall(b"".join(bad) + tpv_line(iso_now()))  # then hang up

    with ThreadedGpsd(serve, connections=connections) as gpsd:
        daemon = start_daemon(vehicle_config(tmp_path, None, gpsd.port))
        daemon.wait_ready()

        def all_served_then_refused() -> bool:
            gps = gps_component(daemon)
            return gpsd.served == connections and "cannot connect" in (gps["last_error"] or "")

        wait_until("every hostile connection served, then a refused connect", all_served_then_refused)
        counters = cli_json(daemon, "gps")["counters"]
        assert daemon.terminate() == 0
    assert counters["connects"] == connections
    assert counters["bad_lines"] == connections * bad_per_connection
    assert counters["tpv"] == connections
    assert counters["lines"] == connections * (bad_per_connection + 2)  # + VERSION + the good TPV


def test_obd_counters_add_up_across_reconnects(tmp_path, start_daemon):
    """Guards against issue 11 finding 9 for OBD: each reconnect made a new adapter and zeroed its counters."""
    garbage = "<writeln>$%GARBAGE</writeln>"  # adapter text that is no ELM message: a decode error
    link = tmp_path / "ttyOBD"
    first = ElmEmulator(link=link).start()
    try:
        first.override("RPM", garbage)
        daemon = start_daemon(vehicle_config(tmp_path, str(link), None))
        daemon.wait_ready()
        before = wait_until(
            "decode errors on the first connection",
            lambda: (c := cli_json(daemon, "obd")["counters"]).get("decode_errors", 0) >= 2 and c,
        )
        assert before["connects"] == 1
        first.kill()  # unplugged
        wait_until("OBD noticed", lambda: cli_json(daemon, "obd")["state"] != "connected")
    finally:
        first.stop()
    with ElmEmulator(link=link) as second:
        second.override("RPM", garbage)

        def reconnected_with_new_errors() -> dict[str, int] | None:
            view = cli_json(daemon, "obd")
            c = view["counters"]
            done = view["state"] == "connected" and c["decode_errors"] > before["decode_errors"]
            return c if done and c["connects"] >= 2 else None

        after = wait_until("the second connection counted on top of the first", reconnected_with_new_errors)
        assert daemon.terminate() == 0
    assert after["connects"] == 2
    assert after["disconnects"] >= 1
    assert after["queries"] > before["queries"]
