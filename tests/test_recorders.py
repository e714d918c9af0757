"""Trip recorder, DTC tracker, reading sink and time correction against a real SQLite store."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from fleetgate.config.schema import TripsConfig
from fleetgate.daemon.runtime.clock import Clock, mono_ns
from fleetgate.daemon.runtime.events import Events
from fleetgate.daemon.runtime.readings import ReadingSink
from fleetgate.daemon.telemetry.dtc import DtcTracker
from fleetgate.daemon.telemetry.trip_recorder import TripRecorder
from fleetgate.sync.store import Database, Outbox, StateStore

S = 1_000_000_000


class Parts:
    def __init__(self, db: Database, boot: str = "boot-1") -> None:
        self.db = db
        self.clock = Clock()
        self.outbox = Outbox(db, boot_id=boot)
        self.state = StateStore(db)
        self.events = Events(self.outbox, self.clock)
        self.boot = boot

    def recorder(self, **overrides) -> TripRecorder:
        config = TripsConfig(ignition_on_s=1, ignition_off_s=3, **overrides)
        return TripRecorder(config, self.clock, self.events, self.state, self.boot)

    async def events_seen(self) -> list[dict]:
        batch = await self.outbox.next_batch(1000)
        return [json.loads(r.payload) for r in batch if r.stream == "events"]


def run(path, body, boot: str = "boot-1"):
    async def main():
        db = await Database.open(path)
        try:
            return await body(Parts(db, boot))
        finally:
            await db.close()

    return asyncio.run(main())


async def drive(rec: TripRecorder, start_s: int, seconds: int, kmh: float, running: bool = True) -> None:
    for t in range(start_s, start_s + seconds):
        rec.observe_speed(t * S, kmh)
        await rec.observe_running(t * S, running)


def test_trip_events_and_stats(tmp_path):
    async def body(p: Parts):
        rec = p.recorder()
        await rec.restore()
        await drive(rec, 0, 31, 36.0)
        assert rec.trip is not None
        assert await p.state.get("trip") is not None
        await drive(rec, 31, 5, 0.0, running=False)
        assert rec.trip is None
        return await p.events_seen(), await p.state.get("trip")

    events, saved = run(tmp_path / "s.db", body)
    assert [e["event"] for e in events] == ["startup", "trip-started", "shutdown", "trip-completed"]
    trip = events[3]["trip"]
    assert trip["id"] == events[1]["trip"]["id"]
    assert trip["status"] == "completed"
    # startup at t=0 (first running sample), shutdown at t=31 (first stopped sample).
    assert trip["stats"]["duration"] == 31_000
    # 36 km/h from t=0 to t=30 is 300 m, then 30 -> 31 decelerates to 0: +5 m.
    assert trip["stats"]["distanceByVSS"] == pytest.approx(305.0)
    assert trip["stats"]["hardBrakeCount"] == 1  # 36 -> 0 km/h in one second
    assert saved is None  # the completed trip's state left with its event, in one transaction


def test_trip_survives_a_restart_of_the_daemon(tmp_path):
    async def first(p: Parts):
        rec = p.recorder()
        await rec.restore()
        await drive(rec, 0, 11, 36.0)
        await rec.checkpoint()
        return rec.trip.id

    async def second(p: Parts):
        rec = p.recorder()
        await rec.restore()
        assert rec.ignition.on and rec.trip is not None
        await drive(rec, 12, 10, 36.0)
        await drive(rec, 22, 5, 0.0, running=False)
        return await p.events_seen()

    trip_id = run(tmp_path / "s.db", first)
    events = run(tmp_path / "s.db", second)
    completed = [e for e in events if e["event"] == "trip-completed"]
    assert len(completed) == 1 and completed[0]["trip"]["id"] == trip_id
    assert [e["event"] for e in events].count("trip-started") == 1
    # 36 km/h from 0 to 21 s (the 2 s gap across the restart is within max_sample_gap_s) = 210 m,
    # then 21 -> 22 s ramps down to 0: +5 m.
    assert completed[0]["trip"]["stats"]["distanceByVSS"] == pytest.approx(215.0)


def test_trip_from_an_earlier_boot_is_closed_as_orphaned(tmp_path):
    async def first(p: Parts):
        rec = p.recorder()
        await rec.restore()
        await drive(rec, 0, 5, 20.0)
        await rec.checkpoint()

    async def after_power_cut(p: Parts):
        rec = p.recorder()
        await rec.restore()
        assert rec.trip is None and not rec.ignition.on
        return await p.events_seen(), await p.state.get("trip")

    run(tmp_path / "s.db", first, boot="boot-1")
    events, saved = run(tmp_path / "s.db", after_power_cut, boot="boot-2")
    assert events[-1]["event"] == "trip-completed"
    assert events[-1]["trip"]["status"] == "orphaned"
    assert saved is None


def test_dtc_on_and_off_with_start_and_stop(tmp_path):
    async def body(p: Parts):
        dtcs = DtcTracker(p.clock, p.events, p.state)
        await dtcs.update(True, [("P0104", "Mass or Volume Air Flow Circuit Intermittent")])
        await dtcs.update(
            True, [("P0104", "Mass or Volume Air Flow Circuit Intermittent")]
        )  # still on: no event
        await dtcs.update(True, [("P0104", "x"), ("P0300", "Random Misfire")])
        await dtcs.update(False, [])
        return await p.events_seen(), await p.state.get("dtc.active")

    events, active = run(tmp_path / "s.db", body)
    assert [(e["event"], e["code"]) for e in events] == [
        ("dtc-on", "P0104"),
        ("dtc-on", "P0300"),
        ("dtc-off", "P0104"),
        ("dtc-off", "P0300"),
    ]
    assert events[2]["start"] == events[0]["start"] and "stop" in events[2]
    assert active == {}


def test_open_dtcs_survive_a_restart_without_repeating(tmp_path):
    async def first(p: Parts):
        await DtcTracker(p.clock, p.events, p.state).update(True, [("P0420", "Catalyst")])

    async def second(p: Parts):
        dtcs = DtcTracker(p.clock, p.events, p.state)
        await dtcs.update(True, [("P0420", "Catalyst")])
        return await p.events_seen()

    run(tmp_path / "s.db", first)
    assert [e["event"] for e in run(tmp_path / "s.db", second)] == ["dtc-on"]


def test_sink_batches_readings_into_the_outbox_with_catalogue_units(tmp_path):
    async def body(p: Parts):
        sink = ReadingSink(p.outbox, p.clock, flush_interval_s=60, max_pending=3)
        task = asyncio.create_task(sink.run())
        sink.add("vehicle_speed", 42.0)
        sink.add("rpm", 1800.0)
        sink.add("gps_position", {"latitude": 52.5, "longitude": 13.4, "altitude": 35.0})  # fills the batch
        for _ in range(100):
            if sink.committed == 3:
                break
            await asyncio.sleep(0.01)
        sink.add("coolant_temp", float("nan"))  # not JSON: rejected and counted, not stored
        with pytest.raises(ValueError, match="unknown signal"):
            sink.add("warp_factor", 9)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return sink, await p.outbox.next_batch(10)

    sink, batch = run(tmp_path / "s.db", body)
    assert sink.committed == 3 and sink.rejected == 1
    assert [json.loads(r.payload) for r in batch] == [
        {"signal": "vehicle_speed", "value": 42.0, "unit": "km/h"},
        {"signal": "rpm", "value": 1800.0, "unit": "rpm"},
        {
            "signal": "gps_position",
            "value": {"latitude": 52.5, "longitude": 13.4, "altitude": 35.0},
            "unit": "deg,deg,m",
        },
    ]
    assert all(r.stream == "telemetry" for r in batch)


def test_late_gps_trust_corrects_earlier_records_of_this_boot(tmp_path):
    """Guards against records taken before trust keeping a wrong wall time (no RTC on a Pi)."""
    skew_ns = 3600 * S  # the system clock is an hour behind the truth

    async def body(p: Parts):
        sink = ReadingSink(p.outbox, p.clock)
        trusted = asyncio.Event()

        async def on_trust(trust):
            await sink.flush()
            await p.outbox.correct_wall_times(trust.offset_ns, trust.since_mono_ns)
            trusted.set()

        p.clock.on_trust(on_trust)
        sink.add("vehicle_speed", 10.0)
        await sink.flush()
        sink.add("vehicle_speed", 11.0)  # still in memory when trust arrives
        for _ in range(3):  # three consistent fixes
            now_mono = mono_ns()
            p.clock.observe_gps_time(time.time_ns() + skew_ns, now_mono)
        await asyncio.wait_for(trusted.wait(), 5)
        sink.add("vehicle_speed", 12.0)
        await sink.flush()
        return await p.outbox.next_batch(10)

    before = time.time_ns()
    batch = run(tmp_path / "s.db", body)
    assert [r.time_trusted for r in batch] == [False, False, True]
    assert [r.time_corrected for r in batch] == [True, True, False]
    for record in batch:
        # Every wall time now reads about an hour ahead of the system clock, as GPS says it should.
        assert record.wall_ns - before == pytest.approx(skew_ns, abs=5 * S)


@pytest.mark.parametrize("value", [0.1, 1e16, -3.5e-9, 42, -7, True, None, 'text "q" é', {"a": [1, 2.5]}])
def test_fast_payload_encoding_equals_json(value):
    """Guards the hot-path encoder against drifting from what json.dumps would write."""
    from fleetgate.daemon.runtime.readings import _TEMPLATES, _encode_value

    prefix, suffix, unit = _TEMPLATES["rpm"]
    payload = prefix + _encode_value(value) + suffix
    assert json.loads(payload) == {"signal": "rpm", "value": value, "unit": unit}
    assert payload == json.dumps(
        {"signal": "rpm", "value": value, "unit": unit}, separators=(",", ":"), ensure_ascii=False
    )


def test_backpressure_keeps_readings_in_memory_bounded(tmp_path):
    """Guards against a fast producer piling readings up in memory while the store commits."""

    async def body(p: Parts):
        sink = ReadingSink(p.outbox, p.clock, flush_interval_s=60, max_pending=50)
        task = asyncio.create_task(sink.run())
        most = 0
        for i in range(3000):
            sink.add("rpm", float(i))
            most = max(most, sink.snapshot()["pending"])
            await sink.wait_for_room()
        await sink.flush()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return most, sink.committed, len(await p.outbox.next_batch(5000))

    most, committed, stored = run(tmp_path / "s.db", body)
    assert most <= 50
    assert committed == stored == 3000


def raw_state(db: Database, key: str, text: str):
    """Write a value into the state table as a hand edit or a disk error would: not through StateStore."""

    def write(conn):
        conn.execute(
            "INSERT OR REPLACE INTO state(key, value, updated_wall_ns) VALUES (?, ?, 1)", (key, text)
        )

    return db.run(write)


@pytest.mark.parametrize("text", ["{not json", '"a string, not a trip"', '{"id": 3}'])
def test_a_saved_trip_that_cannot_be_decoded_is_quarantined_and_the_recorder_runs(tmp_path, text):
    """Guards against a bad saved trip (non-JSON raised StateDecodeError out of restore at every start)."""

    async def body(p: Parts):
        await raw_state(p.db, "trip", text)
        rec = p.recorder()
        await rec.restore()
        keys = await p.db.run(lambda c: [r[0] for r in c.execute("SELECT key FROM state")])
        return rec, keys, await p.events_seen()

    rec, keys, events = run(tmp_path / "s.db", body)
    assert rec.trip is None
    assert "trip" not in keys and any(k.startswith("quarantine/trip/") for k in keys)
    assert [e["event"] for e in events] == ["state-quarantined"]
    assert "saved trip could not be decoded" in rec.saved.alerts()[0]


@pytest.mark.parametrize("text", ["[1, 2", '["P0300"]', '{"P0300": "misfire"}'])
def test_saved_open_dtcs_that_cannot_be_decoded_are_quarantined_not_fatal(tmp_path, text):
    async def body(p: Parts):
        await raw_state(p.db, "dtc.active", text)
        tracker = DtcTracker(p.clock, p.events, p.state)
        await tracker.update(True, [("P0420", "catalyst")])
        return tracker, await p.events_seen()

    tracker, events = run(tmp_path / "s.db", body)
    assert [e["event"] for e in events] == ["state-quarantined", "dtc-on"]
    assert set(tracker.active) == {"P0420"}
    assert tracker.saved.alerts()


def test_hard_acceleration_and_braking_are_events_with_the_trip_and_the_speeds(tmp_path):
    async def body(p: Parts):
        rec = p.recorder()
        await rec.restore()
        await drive(rec, 0, 3, 10.0)  # the trip starts
        rec.observe_fix(3 * S, 52.52, 13.405)
        for t, kmh in ((3, 40.0), (4, 42.0), (5, 10.0)):  # +30 km/h in 1 s, then -32 km/h in 1 s
            rec.observe_speed(t * S, kmh)
        await rec.flush_harsh()
        await rec.flush_harsh()  # nothing twice
        return await p.events_seen(), rec.trip

    events, trip = run(tmp_path / "s.db", body)
    harsh = [e for e in events if e["event"] in ("hard-accel", "hard-brake")]
    assert [(e["event"], e["from_kmh"], e["to_kmh"]) for e in harsh] == [
        ("hard-accel", 10.0, 40.0),
        ("hard-brake", 42.0, 10.0),
    ]
    assert harsh[0]["accel_mps2"] == pytest.approx(30 / 3.6, abs=0.01) and harsh[0]["threshold_mps2"] == 3.0
    assert harsh[1]["accel_mps2"] == pytest.approx(-32 / 3.6, abs=0.01) and harsh[1]["threshold_mps2"] == 3.5
    assert {e["trip_id"] for e in harsh} == {trip.id}
    assert harsh[1]["location"] == {"type": "Point", "coordinates": [13.405, 52.52]}
    assert (trip.hard_accel_count, trip.hard_brake_count) == (1, 1)


def test_a_signal_silent_past_its_schedule_is_reported_once_and_its_return_too(tmp_path):
    from fleetgate.daemon.runtime.readings import ReadingSink
    from fleetgate.daemon.telemetry.silence import SilenceWatch
    from fleetgate.sync.store import Stamp

    async def body(p: Parts):
        sink = ReadingSink(p.outbox, p.clock)
        expected = {"rpm": 1.0, "vehicle_speed": 10.0}
        watch = SilenceWatch(sink, p.events, lambda: dict(expected))
        base = 1_000 * S
        sink.add("rpm", 800, Stamp(base, base, False))
        sink.add("vehicle_speed", 30, Stamp(base, base, False))
        sink.add("odometer", 1.0, Stamp(base, base, False))  # not expected (e.g. the ECU stopped answering)
        await watch.check(base + 14 * S)  # rpm: 3 intervals is 3 s, but never less than 15 s
        await watch.check(base + 16 * S)  # rpm silent
        await watch.check(base + 20 * S)  # reported once
        del expected["vehicle_speed"]  # its source went down: its silence is no news
        await watch.check(base + 60 * S)
        sink.add("rpm", 900, Stamp(base + 61 * S, base + 61 * S, False))
        await watch.check(base + 62 * S)
        await watch.check(base + 63 * S)
        return [e for e in await p.events_seen() if e["event"].startswith("signal-")], watch.snapshot()

    seen, snapshot = run(tmp_path / "s.db", body)
    assert seen == [
        {"event": "signal-silent", "signal": "rpm", "silent_s": 16.0, "expected_every_s": 1.0},
        {"event": "signal-reporting", "signal": "rpm", "silent_s": 61.0},
    ]
    assert snapshot == {"silent": []}
