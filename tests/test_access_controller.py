"""The access controller with a real store and the log-only output: what happens to start-enable when the
session behind it ends, and what readings are tagged with. (The daemon tests drive the same code through
the keypad and relay ptys; motion there would need a moving vehicle, so deferral is pinned down here.)"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from fleetgate.daemon.access.controller import AccessController, AccessPolicy
from fleetgate.daemon.access.lockout import Lockout, LockoutPolicy
from fleetgate.daemon.access.session_book import SessionBook
from fleetgate.daemon.access.session_policy import OfflineAge
from fleetgate.daemon.runtime.clock import Clock, mono_ns
from fleetgate.daemon.runtime.readings import ReadingSink
from fleetgate.drivers.output import LogOnly
from fleetgate.sync.store import Database, Outbox

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
