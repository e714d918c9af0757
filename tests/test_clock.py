"""The clock's time trust and stamps against implausible time: GPS and NTP time outside the plausible window
is never trusted (counted, logged without flooding), and every stamp the clock makes is storable and >= 0
even when the system clock itself has been set absurdly.

The system clock cannot be set from a test (no CAP_SYS_TIME), so those tests replace ``time.time_ns``;
the stamps they make are then appended to a real SQLite outbox.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time

import pytest

from fleetgate.daemon.runtime import clock as clock_module
from fleetgate.daemon.runtime.clock import WALL_MAX_NS, WALL_MIN_NS, Clock, mono_ns
from fleetgate.sync.store import Database, NewRecord, Outbox, Priority

S = 1_000_000_000
INT64_MAX = 2**63 - 1


def utc_ns(year: int, month: int = 1, day: int = 1) -> int:
    return calendar.timegm((year, month, day, 0, 0, 0, 0, 0, 0)) * S


def feed(clock: Clock, gps_time_ns: int, fixes: int = 5) -> None:
    """`fixes` consistent fixes, one second apart in both GPS time and the monotonic clock."""
    base = mono_ns()
    for i in range(fixes):
        clock.observe_gps_time(gps_time_ns + i * S, base + i * S)


def test_bounds_are_what_docs_say_and_inside_int64() -> None:
    assert utc_ns(2026) == WALL_MIN_NS
    assert utc_ns(2100) == WALL_MAX_NS
    # Far enough inside int64 that mono_ns + offset cannot overflow in any device's life.
    assert INT64_MAX - WALL_MAX_NS > 100 * 365 * 86_400 * S


@pytest.mark.parametrize("year", [2300, 1960, 1970, 2025, 2101])
def test_gps_time_outside_the_window_is_not_trusted_and_is_counted(year: int) -> None:
    async def main() -> Clock:
        clock = Clock()
        feed(clock, utc_ns(year, 6, 1))
        return clock

    clock = asyncio.run(main())
    assert clock.trust.trusted is False and clock.trust.source == "none"
    assert clock.counters["gps_time_implausible"] == 5
    assert clock.counters["gps_time_inconsistent"] == 0
    stamp = clock.stamp()
    assert 0 <= stamp.wall_ns <= WALL_MAX_NS and stamp.trusted is False


def test_gps_time_at_the_edges_of_the_window() -> None:
    async def main() -> tuple[Clock, Clock, Clock]:
        low, high, outside = Clock(), Clock(), Clock()
        feed(low, WALL_MIN_NS, fixes=3)
        feed(high, WALL_MAX_NS - 3 * S, fixes=3)
        feed(outside, WALL_MIN_NS - 1, fixes=1)
        feed(outside, WALL_MAX_NS + 1, fixes=1)
        return low, high, outside

    low, high, outside = asyncio.run(main())
    assert low.trust.source == "gps" and high.trust.source == "gps"
    assert outside.counters["gps_time_implausible"] == 2


def test_implausible_fixes_leave_trust_alone_and_valid_ones_still_work() -> None:
    async def main() -> tuple[Clock, list[object]]:
        clock = Clock()
        feed(clock, utc_ns(2300))
        feed(clock, utc_ns(1960))
        untrusted = clock.trust
        truth = time.time_ns() + 3600 * S  # the system clock is an hour behind
        feed(clock, truth, fixes=3)
        trusted = clock.trust
        feed(clock, utc_ns(2300))  # after trust: ignored, counted, trust unchanged
        return clock, [untrusted, trusted, clock.trust]

    clock, (untrusted, trusted, after) = asyncio.run(main())
    assert untrusted == clock_module.UNTRUSTED
    assert trusted.source == "gps" and after == trusted
    assert clock.counters["gps_time_implausible"] == 15
    assert clock.stamp().wall_ns - time.time_ns() == pytest.approx(3600 * S, abs=5 * S)


def test_implausible_gps_time_is_logged_without_flooding(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> Clock:
        clock = Clock()
        for _ in range(20):
            feed(clock, utc_ns(2300))
        return clock

    with caplog.at_level(logging.WARNING, logger="fleetgate.daemon.runtime.clock"):
        clock = asyncio.run(main())
    assert clock.counters["gps_time_implausible"] == 100
    warnings = [r for r in caplog.records if r.getMessage() == "implausible GPS time ignored"]
    assert len(warnings) == 1
    assert "2300-01-01" in warnings[0].gps_time


@pytest.mark.parametrize(
    "system_ns",
    [utc_ns(2300), utc_ns(1960), -1, 2**70, utc_ns(1971)],
    ids=["2300", "1960", "minus-1ns", "2^70", "1971"],
)
def test_ntp_sync_with_an_absurd_system_clock_is_not_trusted(
    monkeypatch: pytest.MonkeyPatch, system_ns: int
) -> None:
    async def main() -> Clock:
        clock = Clock()
        monkeypatch.setattr(time, "time_ns", lambda: system_ns)
        clock.set_ntp(True)
        return clock

    clock = asyncio.run(main())
    assert clock.trust.trusted is False
    assert clock.counters["ntp_time_implausible"] == 1


def test_ntp_trust_is_dropped_when_the_system_clock_jumps_out_of_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def main() -> tuple[bool, Clock]:
        clock = Clock()
        clock.set_ntp(True)
        first = clock.trust.trusted
        monkeypatch.setattr(time, "time_ns", lambda: utc_ns(2300))
        clock.set_ntp(True)
        return first, clock

    first, clock = asyncio.run(main())
    assert first is True
    assert clock.trust.trusted is False and clock.counters["ntp_time_implausible"] == 1


@pytest.mark.parametrize(
    "system_ns",
    [utc_ns(2300), utc_ns(1960), -5 * S, 2**70, utc_ns(2262, 4, 12)],
    ids=["2300", "1960", "minus-5s", "2^70", "past-int64"],
)
def test_untrusted_stamps_stay_storable_whatever_the_system_clock_says(
    tmp_path, monkeypatch: pytest.MonkeyPatch, system_ns: int
) -> None:
    """Guards against an absurd system clock making records SQLite cannot hold (or wall_ns < 0)."""

    async def main() -> tuple[Clock, list[int]]:
        clock = Clock()
        monkeypatch.setattr(time, "time_ns", lambda: system_ns)
        stamps = [clock.stamp(), clock.stamp()]
        earlier = clock.wall_for(mono_ns() - 10 * S)
        monkeypatch.undo()
        db = await Database.open(tmp_path / "s.db")
        try:
            outbox = Outbox(db, boot_id="boot-1")
            await outbox.append([NewRecord.json("events", Priority.EVENT, s, {"event": "x"}) for s in stamps])
            stored = [r.wall_ns for r in await outbox.next_batch(10)]
        finally:
            await db.close()
        assert earlier[1] is False and 0 <= earlier[0] <= WALL_MAX_NS
        return clock, stored

    clock, stored = asyncio.run(main())
    assert len(stored) == 2
    assert all(0 <= wall <= WALL_MAX_NS for wall in stored)
    assert clock.counters["wall_clamped"] == 3
    # Clamped to the nearer edge of what can be stored, not to an arbitrary value.
    edge = 0 if system_ns < 0 else WALL_MAX_NS
    assert stored == [edge, edge]


def test_a_plausible_system_clock_is_stamped_as_is() -> None:
    clock = Clock()
    before = time.time_ns()
    stamp = clock.stamp()
    assert before <= stamp.wall_ns <= time.time_ns()
    assert clock.counters["wall_clamped"] == 0
