"""The access controller with a real store and the log-only output: what happens to start-enable when the
session behind it ends, and what readings are tagged with. (The daemon tests drive the same code through
the keypad and relay ptys; motion there would need a moving vehicle, so deferral is pinned down here.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from fleetgate.daemon.access.controller import AccessController, AccessPolicy
from fleetgate.daemon.access.lockout import Lockout, LockoutPolicy
from fleetgate.daemon.access.session_book import SessionBook
from fleetgate.daemon.access.session_policy import OfflineAge
from fleetgate.daemon.runtime.clock import Clock, mono_ns
from fleetgate.daemon.runtime.readings import ReadingSink
from fleetgate.drivers.output import LogOnly
from fleetgate.sync.store import Database, NewRecord, Outbox, Priority, StateStore
from fleetgate.sync.store.state import StateDecodeError, write_state

KEY = bytes(range(32))
T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)


@dataclass
class Incoming:
    id: int
    verification_id: str
    initialization: datetime
    completion: datetime | None = None
    pin: str | None = None


async def _audit(db: Database) -> list[dict]:
    rows = await db.run(
        lambda c: c.execute(
            "SELECT o.payload FROM outbox o JOIN streams s ON s.id = o.stream_id WHERE s.name = 'audit' ORDER BY o.id"
        ).fetchall()
    )
    return [json.loads(r[0]) for r in rows]


def test_a_session_ending_while_moving_switches_off_once_stopped_and_readings_carry_the_session(tmp_path):
    async def main() -> None:
        db = await Database.open(tmp_path / "s.db")
        outbox = Outbox(db, boot_id="b")
        clock = Clock()
        sink = ReadingSink(outbox, clock)
        book = SessionBook()
        book.merge([Incoming(3, "v3", T0, pin="4711")], 0, KEY, {})
        output = LogOnly()
        moving = [False]
        access = AccessController(
            book, KEY, Lockout(LockoutPolicy(), "b"), OfflineAge(0.0, mono_ns()), output, outbox, clock,
            AccessPolicy(3600, "defer"), lambda: moving[0], sink.set_session,
        )  # fmt: skip
        await output.open()
        assert (await access.enter("4711")).outcome == "accepted" and output.enabled
        await access.review()
        sink.add("vehicle_speed", 30.0)
        assert json.loads(sink._pending[-1].payload)["session"] == 3

        moving[0] = True
        book.merge([Incoming(3, "v3", T0, completion=T0)], 0, KEY, {})
        await access.review()
        assert output.enabled and access.off_deferred, "a moving vehicle is not cut off"
        await access.review()
        moving[0] = False
        await access.review()
        assert not output.enabled and access.enabled_by is None
        sink.add("vehicle_speed", 0.0)
        assert "session" not in json.loads(sink._pending[-1].payload)

        events = [(a["event"], a.get("reason")) for a in await _audit(db)]
        assert events == [
            ("pin-accepted", None),
            ("start-enable-off-deferred", "ended"),
            ("start-enable-off", "ended"),
        ], "one deferral record, not one per review"
        await db.close()

    asyncio.run(main())


def test_immediate_policy_switches_off_even_while_moving(tmp_path):
    async def main() -> None:
        db = await Database.open(tmp_path / "s.db")
        outbox = Outbox(db, boot_id="b")
        book = SessionBook()
        book.merge([Incoming(3, "v3", T0, pin="4711")], 0, KEY, {})
        output = LogOnly()
        access = AccessController(
            book, KEY, Lockout(LockoutPolicy(), "b"), OfflineAge(0.0, mono_ns()), output, outbox, Clock(),
            AccessPolicy(3600, "immediate"), lambda: True, lambda s: None,
        )  # fmt: skip
        await output.open()
        await access.enter("4711")
        book.merge([], 10**19, KEY, {})  # a newer set without session 3: removed
        await access.review()
        assert not output.enabled
        assert (await _audit(db))[-1]["reason"] == "ended"
        await db.close()

    asyncio.run(main())


def _controller(db: Database, book: SessionBook, policy: LockoutPolicy) -> tuple[AccessController, LogOnly]:
    output = LogOnly()
    access = AccessController(
        book, KEY, Lockout(policy, "b"), OfflineAge(0.0, mono_ns()), output, Outbox(db, boot_id="b"), Clock(),
        AccessPolicy(3600, "defer"), lambda: False, lambda s: None,
    )  # fmt: skip
    return access, output


def test_refusals_while_locked_out_are_tallied_into_few_records_that_add_up(tmp_path):
    """A keypad hammered during a lockout wrote one audit record per entry (never evicted: the disk fills).
    The first refusal of a lockout is audited at once; the rest are counted and written as one record when
    the lockout ends (here: before the next decision's record, in the same commit), or when due."""

    async def main() -> None:
        db = await Database.open(tmp_path / "s.db")
        book = SessionBook()
        book.merge([Incoming(3, "v3", T0, pin="4711")], 0, KEY, {})
        access, output = _controller(db, book, LockoutPolicy(max_failures=1, base_delay_s=3600))
        await output.open()
        assert (await access.enter("0000")).outcome == "refused"
        for _ in range(250):
            assert (await access.enter("1")).outcome == "locked-out"
        assert (await access.enter("4711", source="cli", actuate=False)).outcome == "locked-out"
        assert access.lockout.refused_while_locked == 251
        assert len(await _audit(db)) == 2, "the wrong PIN and the first refusal of the lockout"
        assert access.snapshot()["locked_out_unwritten"] == 250
        assert not access.tally_due(mono_ns()), "neither over nor a minute old"
        assert access.tally_due(mono_ns() + 61 * 10**9)

        access.lockout.locked_until_mono_ns = mono_ns()  # the lockout ends
        assert access.tally_due(mono_ns())
        assert (await access.enter("4711")).outcome == "accepted"
        audit = await _audit(db)
        assert [(a["event"], a["reason"], a["source"], a["count"]) for a in audit] == [
            ("pin-refused", "no-match", "keypad", 1),
            ("pin-refused", "locked-out", "keypad", 1),
            ("pin-refused", "locked-out", "cli", 1),
            ("pin-refused", "locked-out", "keypad", 249),
            ("pin-accepted", None, "keypad", 1),
        ]
        assert sum(a["count"] for a in audit if a["reason"] == "locked-out") == 251
        assert access.snapshot()["locked_out_unwritten"] == 0
        await db.close()

    asyncio.run(main())


def test_a_tally_is_written_by_itself_when_due_and_when_the_controller_stops(tmp_path):
    async def main() -> None:
        db = await Database.open(tmp_path / "s.db")
        access, _ = _controller(db, SessionBook(), LockoutPolicy(max_failures=1, base_delay_s=3600))
        await access.enter("0000")
        for _ in range(10):
            await access.enter("1")
        assert await access.flush_tally()
        for _ in range(5):
            await access.enter("1")
        task = asyncio.create_task(access.run())
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        counts = [a["count"] for a in await _audit(db) if a["reason"] == "locked-out"]
        assert counts == [1, 9, 5]
        await db.close()

    asyncio.run(main())


async def _fill_store(db: Database, outbox: Outbox) -> int:
    """SQLite's own "database or disk is full": no page beyond those the file has now, and the audit stream's
    last pages filled with small records until one does not fit (so no audit record fits any more)."""
    pages = await db.run(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await db.run(lambda c: c.execute(f"PRAGMA max_page_count = {pages}"))
    filled = 0
    with pytest.raises(sqlite3.OperationalError) as caught:
        while True:
            record = NewRecord.json("audit", Priority.AUDIT, Clock().stamp(), {"event": "filler"})
            await outbox.append([record])
            filled += 1
    # (SQLite may roll back by itself on a full disk: the store's ROLLBACK then fails, the cause as context)
    assert "database or disk is full" in f"{caught.value} {caught.value.__context__}"
    return filled


async def _lift(db: Database) -> None:
    await db.run(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))


def test_a_full_store_refuses_with_store_unavailable_and_the_failure_still_counts(tmp_path):
    """The refusal's count must be durable before the keypad says "wrong": when the store cannot commit, the
    answer is store-unavailable (it was an OperationalError out of the control verb: "internal error")."""

    async def main() -> None:
        db = await Database.open(tmp_path / "s.db")
        book = SessionBook()
        book.merge([Incoming(3, "v3", T0, pin="4711")], 0, KEY, {})
        access, output = _controller(db, book, LockoutPolicy(max_failures=3, base_delay_s=600))
        await output.open()
        await access.enter("0000")
        await _fill_store(db, access._outbox)

        refused = await access.enter("0001")
        assert (refused.outcome, refused.reason) == ("refused", "store-unavailable")
        assert refused.lockout_started_s == 0 and refused.session_id is None
        assert access.lockout.failures == 2, "counted in memory: the lockout holds while the daemon runs"
        tested = await access.enter("4711", actuate=False, source="cli")
        assert (tested.outcome, tested.reason) == ("refused", "store-unavailable"), "no unaudited oracle"
        snap = access.snapshot()
        assert snap["store_failures"] == 2 and "full" in snap["store_error"]
        accepted = await access.enter("4711")
        assert accepted.outcome == "accepted" and output.enabled, (
            "the relay is on: the renter is not stranded"
        )

        await _lift(db)
        await access.enter("0002")
        await access.enter("0003")
        locked = await access.enter("0004")
        assert locked.outcome == "refused" and locked.lockout_started_s == 600
        assert access.snapshot()["store_error"] is None
        audit = [(a["event"], a["reason"]) for a in await _audit(db) if a["event"] != "filler"]
        assert audit == [
            ("pin-refused", "no-match"),
            ("pin-refused", "no-match"),
            ("pin-refused", "no-match"),
            ("pin-refused", "no-match"),
        ], "what the store could not take is not in the audit; nothing claims it is"
        await db.close()

    asyncio.run(main())


def digits(zero: int, ascii_digits: str) -> str:
    """``ascii_digits`` in another script's digits (``zero``: its code point for 0); str.isdigit() is true."""
    return "".join(chr(zero + int(d)) for d in ascii_digits)


def test_digits_that_are_not_ascii_are_not_a_pin_and_never_count(tmp_path):
    async def main() -> None:
        db = await Database.open(tmp_path / "s.db")
        book = SessionBook()
        book.merge([Incoming(3, "v3", T0, pin="1234")], 0, KEY, {})
        access, output = _controller(db, book, LockoutPolicy(max_failures=2, base_delay_s=600))
        await output.open()
        other_scripts = [digits(zero, "1234") for zero in (0xFF10, 0x0660, 0x06F0, 0x0966)]  # fullwidth, ...
        for pin in [*other_scripts, "12" + digits(0xFF10, "3") + "4", "\u00b2\u00b3", "", "12 4"]:
            decision = await access.enter(pin)
            assert (decision.outcome, decision.reason) == ("refused", "not-a-pin"), pin
        assert access.lockout.failures == 0 and not output.enabled
        assert await _audit(db) == []
        assert (await access.enter("1234")).outcome == "accepted"
        await db.close()

    asyncio.run(main())


def test_state_that_is_not_json_is_a_typed_error_naming_the_key(tmp_path):
    async def main() -> None:
        db = await Database.open(tmp_path / "s.db")
        state = StateStore(db)
        await state.put("a", {"x": 1})
        assert await state.get("a") == {"x": 1} and await state.get("missing") is None
        for stored in ("{not json", b"\xff\xfe", "", "NaN]"):
            await db.run(lambda c, v=stored: write_state(c, {"a": v}))
            with pytest.raises(StateDecodeError) as caught:
                await state.get("a")
            assert caught.value.key == "a" and "not JSON" in caught.value.reason
            assert caught.value.text is not None and "{not json" not in str(caught.value)
        await db.close()

    asyncio.run(main())


def test_a_right_pin_refused_by_policy_neither_counts_toward_the_lockout_nor_resets_it(tmp_path):
    """Issue 18: the PIN of an expired session (trusted clock) is answered `expired`, of an ended one `ended`,
    each audited with its session; neither counts as a guess (a late renter cannot lock the keypad), and
    neither wipes a guesser's count. A wrong PIN still counts; an active session's PIN wins over an ended
    session that happens to have the same one."""

    async def main() -> None:
        db = await Database.open(tmp_path / "s.db")
        now = datetime.now(UTC)
        book = SessionBook()
        book.merge(
            [Incoming(3, "v3", T0, pin="1111"), Incoming(4, "v4", T0, pin="2222"), Incoming(5, "v5", T0, pin="3333")],
            0, KEY, {3: int((now - timedelta(minutes=1)).timestamp()) * 10**9},
        )  # fmt: skip
        book.merge([Incoming(4, "v4", T0, completion=T0), Incoming(5, "v5", T0, pin="3333")], 0, KEY, None)
        book.merge([Incoming(6, "v6", T0, pin="2222"), Incoming(5, "v5", T0, completion=T0)], 0, KEY, None)
        assert book.sessions[3].expires_ns is not None  # REEF-like merges (None) kept the expiry
        access, output = _controller(db, book, LockoutPolicy(max_failures=3, base_delay_s=3600))
        access._clock.set_ntp(True)
        await output.open()

        assert (await access.enter("9999")).reason == "no-match"
        for pin, reason, session in [("1111", "expired", 3), ("3333", "ended", 5)] * 3:
            decision = await access.enter(pin)
            assert (decision.outcome, decision.reason, decision.session_id) == ("refused", reason, session)
        assert access.lockout.failures == 1  # the wrong PIN only: not counted, not reset
        accepted = await access.enter("2222")  # session 6's PIN; ended session 4 had it too
        assert (accepted.outcome, accepted.session_id) == ("accepted", 6)

        refused = [
            (a["reason"], a["session_id"], a["failures"])
            for a in await _audit(db)
            if a["event"] == "pin-refused"
        ]
        assert refused == [("no-match", None, 1)] + [("expired", 3, 1), ("ended", 5, 1)] * 3
        await db.close()

    asyncio.run(main())


def test_a_vehicle_answering_another_vin_refuses_every_session_pin_without_counting(tmp_path):
    """A gateway moved to another vehicle: the right PIN is refused as vin-mismatch (audited), no guess is
    counted for it; once the VIN matches again (or is unknown) the same PIN opens."""

    async def main() -> None:
        db = await Database.open(tmp_path / "s.db")
        outbox = Outbox(db, boot_id="b")
        book = SessionBook()
        book.merge([Incoming(3, "v3", T0, pin="4711")], 0, KEY, {})
        output = LogOnly()
        seen: list[str | None] = ["WVWZZZ1JZXW000001"]
        access = AccessController(
            book, KEY, Lockout(LockoutPolicy(), "b"), OfflineAge(0.0, mono_ns()), output, outbox, Clock(),
            AccessPolicy(3600, "defer"), lambda: False, lambda s: None, None, lambda: seen[0],
        )  # fmt: skip
        await output.open()
        refused = await access.enter("4711")
        assert (refused.outcome, refused.reason, refused.session_id) == ("refused", "vin-mismatch", 3)
        assert not output.enabled and access.lockout.failures == 0
        seen[0] = None  # the VIN matches (or is unknown): the PIN opens
        assert (await access.enter("4711")).outcome == "accepted" and output.enabled
        audit = [(a["event"], a.get("reason")) for a in await _audit(db)]
        assert audit == [("pin-refused", "vin-mismatch"), ("pin-accepted", None)]
        await db.close()

    asyncio.run(main())
