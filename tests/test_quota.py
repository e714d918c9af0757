"""Disk quotas: telemetry is evicted oldest first and reported; events and audit records never are."""

from __future__ import annotations

import asyncio
import json

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.events import Events
from fleetgate.daemon.runtime.quota_watch import QuotaWatch
from fleetgate.daemon.runtime.status import stream_rows
from fleetgate.sync.store import Database, NewRecord, Outbox, Priority, Stamp

STAMP = Stamp(1, 1, False)
PAYLOAD = b"x" * 936  # with the 64-byte row overhead: 1,000 bytes a record


def rec(stream: str, priority: Priority = Priority.TELEMETRY) -> NewRecord:
    return NewRecord(stream, priority, STAMP, PAYLOAD)


def test_telemetry_over_quota_loses_its_oldest_records_and_says_so(tmp_path):
    async def main():
        db = await Database.open(tmp_path / "s.db")
        outbox = Outbox(db, boot_id="b", quotas={"telemetry": 10_000})
        for _ in range(5):
            await outbox.append([rec("telemetry") for _ in range(4)])  # 20 records, 20 kB against 10 kB
        left = [r.seq for r in await outbox.next_batch(100)]
        watch = QuotaWatch(outbox, Events(outbox, Clock()))
        await watch.report()
        again = await outbox.take_evictions()
        events = [json.loads(r.payload) for r in await outbox.next_batch(100) if r.stream == "events"]
        depth = await outbox.depth()
        await db.close()
        return left, events, again, stream_rows(depth, outbox.quotas)

    left, events, again, rows = asyncio.run(main())
    assert left == list(range(11, 21))  # the newest ten fit; the oldest went first
    [event] = events
    assert event["event"] == "telemetry-evicted" and event["stream"] == "telemetry"
    assert (event["records"], event["first_seq"], event["last_seq"]) == (10, 1, 10)
    assert again == {}  # reported once
    telemetry = next(r for r in rows if r["stream"] == "telemetry")
    assert telemetry["evicted"] == 10 and telemetry["bytes"] == 10_000 and not telemetry["over_quota"]


def test_events_and_audit_are_never_evicted_and_raise_an_alert(tmp_path):
    async def main():
        db = await Database.open(tmp_path / "s.db")
        outbox = Outbox(db, boot_id="b", quotas={"events": 3_000, "audit": 1_000})
        await outbox.append([rec("events", Priority.EVENT) for _ in range(5)])
        await outbox.append([rec("audit", Priority.AUDIT) for _ in range(2)])
        kept = await outbox.next_batch(100)
        rows = stream_rows(await outbox.depth(), outbox.quotas)
        await db.close()
        return kept, rows

    kept, rows = asyncio.run(main())
    assert len(kept) == 7
    assert {r["stream"]: r["over_quota"] for r in rows} == {"audit": True, "events": True}


def test_acknowledge_frees_quota_bytes(tmp_path):
    async def main():
        db = await Database.open(tmp_path / "s.db")
        outbox = Outbox(db, boot_id="b", quotas={"telemetry": 10_000})
        await outbox.append([rec("telemetry") for _ in range(8)])
        await outbox.acknowledge([r.id for r in await outbox.next_batch(5)])
        await outbox.append(
            [rec("telemetry") for _ in range(7)]
        )  # 10 records: exactly at quota, nothing evicted
        depth = {d.stream: d for d in await outbox.depth()}
        await db.close()
        return depth["telemetry"]

    telemetry = asyncio.run(main())
    assert (telemetry.depth, telemetry.bytes, telemetry.evicted) == (10, 10_000, 0)
