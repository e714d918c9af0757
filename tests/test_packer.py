"""Sealed segments (sync/store/segments.py, sync/mqtt/packer.py): while offline, a full message's worth of a stream's
oldest telemetry becomes the very message the drain would send; nothing is lost, duplicated or reordered
against events, and the rules that keep time corrections and quotas right hold."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import zlib
from pathlib import Path
from typing import Any

import aiomqtt

from fleetgate.sync.mqtt.drain import Drain
from fleetgate.sync.mqtt.envelope import Message, pack_encoded
from fleetgate.sync.mqtt.link import _properties
from fleetgate.sync.mqtt.packer import Packer
from fleetgate.sync.store import Database, NewRecord, Outbox, Priority, Stamp

from conftest import wait_until
from mosquitto_fixture import Mosquitto
from mqtt_consumer import Consumer

DEVICE = "test-0001"
MAX_BYTES = 4096
BOOT = "boot-now"


def reading(i: int, trusted: bool = True, mono: int | None = None) -> NewRecord:
    mono = 1_000_000_000 + i * 1_000_000 if mono is None else mono
    payload = json.dumps({"signal": "rpm", "value": 800 + i % 50, "unit": "rpm"}).encode()
    return NewRecord(
        "telemetry", Priority.TELEMETRY, Stamp(1_790_000_000_000_000_000 + mono, mono, trusted), payload
    )


def event(i: int) -> NewRecord:
    return NewRecord.json("events", Priority.EVENT, Stamp(1, 1, True), {"event": "startup", "n": i})


def envelope(payload: bytes, compressed: bool) -> dict[str, Any]:
    return json.loads(zlib.decompress(payload) if compressed else payload)


def drain_for(outbox: Outbox, db: Database) -> Drain:
    return Drain(outbox, DEVICE, 4, MAX_BYTES, 512, 0.0, db.store_id)


def packer_for(outbox: Outbox, db: Database, drain: Drain | None = None) -> Packer:
    return Packer(outbox, drain or drain_for(outbox, db), DEVICE, db.store_id, MAX_BYTES, 512)


async def seal_all(packer: Packer) -> int:
    sealed = 0
    while await packer.seal_one() is not None:
        sealed += 1
    return sealed


async def drain_until_empty(outbox: Outbox, drain: Drain, publish: Any) -> None:
    """Run the drain until the outbox is empty (or the drain fails), then stop it."""
    task = asyncio.create_task(drain.run(publish))
    while not task.done() and sum(d.depth for d in await outbox.depth()) > 0:
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def backlog_sealed_as(path: Path, device: str) -> tuple[Database, Outbox, Drain, int]:
    """300 readings sealed by a packer that had ``device`` as its id; the drain has DEVICE."""
    db = await Database.open(path)
    outbox = Outbox(db, boot_id=BOOT)
    await outbox.append([reading(i) for i in range(300)])
    drain = drain_for(outbox, db)
    sealed = await seal_all(Packer(outbox, drain, device, db.store_id, MAX_BYTES, 512))
    return db, outbox, drain, sealed


def published_to(messages: list[Message]) -> Any:
    """The drain's publish, for tests that look at the messages it makes: keeps each, acknowledges at once."""

    async def publish(message: Message) -> None:
        messages.append(message)

    return publish


def segment_rows(db_path: Path) -> list[tuple[str, int, int, int, dict[str, Any]]]:
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute(
            "SELECT s.name, g.first_seq, g.last_seq, g.records, g.compressed, g.payload FROM segments g"
            " JOIN streams s ON s.id = g.stream_id ORDER BY g.id"
        ).fetchall()
    finally:
        conn.close()
    return [(n, a, b, c, envelope(p, bool(z))) for n, a, b, c, z, p in rows]


def test_full_messages_of_the_oldest_telemetry_become_the_messages_the_drain_would_send(tmp_path):
    async def main():
        db = await Database.open(tmp_path / "s.db")
        outbox = Outbox(db, boot_id=BOOT)
        await outbox.append([event(i) for i in range(3)])
        await outbox.append([reading(i) for i in range(300)])
        before = {d.stream: d for d in await outbox.depth()}
        telemetry = [(r[0], r[3]) for r in await outbox.encoded_after(-1, 0, 10_000) if r[1] == "telemetry"]
        expected = list(pack_encoded(DEVICE, "telemetry", telemetry, MAX_BYTES, 10**9, db.store_id))
        sealed = await seal_all(packer_for(outbox, db))
        after = {d.stream: d for d in await outbox.depth()}
        left = await outbox.next_batch(10_000)
        await db.close()
        return before, after, expected, sealed, left

    before, after, expected, sealed, left = asyncio.run(main())
    assert len(expected) > 3 and sealed == len(expected) - 1  # every full message; the tail stays rows
    segments = segment_rows(tmp_path / "s.db")
    assert [json.loads(m.payload) for m in expected[:-1]] == [g[4] for g in segments]  # the drain's bytes
    assert [(g[1], g[2], g[3]) for g in segments] == [
        (m_seqs[0], m_seqs[-1], len(m_seqs))
        for m_seqs in ([r["seq"] for r in g[4]["records"]] for g in segments)
    ]
    assert [r.seq for r in left if r.stream == "telemetry"] == [
        r["seq"] for r in json.loads(expected[-1].payload)["records"]
    ]
    assert sorted(r.seq for r in left if r.stream == "events") == [1, 2, 3]  # events are never sealed
    assert after["telemetry"].depth == before["telemetry"].depth == 300
    assert after["telemetry"].packed == sum(g[3] for g in segments)
    assert after["telemetry"].oldest_wall_ns == before["telemetry"].oldest_wall_ns
    assert after["telemetry"].bytes < before["telemetry"].bytes / 3  # compressed at rest too
    assert after["events"] == before["events"]


def test_rows_whose_wall_time_may_still_be_corrected_are_sealed_only_once_it_is(tmp_path):
    """Guards against sealing a record whose wall time correct_wall_times would fix later (the fix would
    never reach the sealed bytes)."""

    async def main():
        db = await Database.open(tmp_path / "s.db")
        outbox = Outbox(db, boot_id=BOOT)
        packer = packer_for(outbox, db)
        await outbox.append([reading(i, trusted=False) for i in range(100)])
        await outbox.append([reading(i) for i in range(100, 300)])  # trusted, but after the untrusted ones
        untrusted = await seal_all(packer)
        corrected = await outbox.correct_wall_times(offset_ns=5_000, before_mono_ns=10**18)
        after_trust = await seal_all(packer)
        await db.close()
        return untrusted, corrected, after_trust

    untrusted, corrected, after_trust = asyncio.run(main())
    assert untrusted == 0  # the prefix starts with rows that may still be corrected
    assert corrected == 100 and after_trust > 0
    first = segment_rows(tmp_path / "s.db")[0][4]["records"][0]
    assert (first["seq"], first["trusted"], first["corrected"]) == (1, False, True)
    assert first["wall_ns"] == first["mono_ns"] + 5_000


def test_untrusted_rows_of_an_earlier_boot_are_sealed(tmp_path):
    async def main():
        db = await Database.open(tmp_path / "s.db")
        await Outbox(db, boot_id="boot-before").append([reading(i, trusted=False) for i in range(200)])
        outbox = Outbox(db, boot_id=BOOT)  # the daemon after a reboot: no correction can reach those
        sealed = await seal_all(packer_for(outbox, db))
        await db.close()
        return sealed

    assert asyncio.run(main()) > 0
    assert {r["boot"] for g in segment_rows(tmp_path / "s.db") for r in g[4]["records"]} == {"boot-before"}


def test_the_packer_waits_while_the_drain_runs(tmp_path):
    async def main():
        db = await Database.open(tmp_path / "s.db")
        outbox = Outbox(db, boot_id=BOOT)
        await outbox.append([reading(i) for i in range(300)])
        drain = drain_for(outbox, db)
        packer = packer_for(outbox, db, drain)
        async with drain.lock:  # what Drain.run holds
            task = asyncio.create_task(packer.run())
            await asyncio.sleep(0.3)
            during = packer.segments
        for _ in range(100):
            await asyncio.sleep(0.02)
            if packer.segments:
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await db.close()
        return during, packer.segments, packer.records, packer.bytes_saved

    during, segments, records, saved = asyncio.run(main())
    assert during == 0
    assert segments > 0 and records > 0 and saved > 0


def test_quota_evicts_segments_first_and_reports_their_seq_range(tmp_path):
    async def main():
        db = await Database.open(tmp_path / "s.db")
        outbox = Outbox(db, boot_id=BOOT, quotas={"telemetry": 10**9})
        await outbox.append([reading(i) for i in range(300)])
        await seal_all(packer_for(outbox, db))
        first = segment_rows(tmp_path / "s.db")[0]
        [depth] = await outbox.depth()
        # Now a quota that the first segment's records must go for.
        outbox._writer.quotas["telemetry"] = depth.bytes - 1
        await outbox.append([reading(300)])
        evictions = await outbox.take_evictions()
        [after] = await outbox.depth()
        await db.close()
        return first, depth, evictions, after

    first, depth, evictions, after = asyncio.run(main())
    ev = evictions["telemetry"]
    assert (
        (ev.records, ev.first_seq, ev.last_seq) == (first[3], first[1], first[2]) == (first[3], 1, first[3])
    )
    assert after.depth == depth.depth + 1 - first[3] and after.evicted == first[3]
    assert after.bytes <= depth.bytes - 1
    assert segment_rows(tmp_path / "s.db")[0][1] == first[2] + 1  # the next segment is now the oldest


def test_the_drain_sends_events_then_segments_then_rows_and_each_record_once(tmp_path):
    """Against a real mosquitto: the drain publishes sealed segments as they are, deletes them on PUBACK,
    and a consumer gets every record exactly once."""
    published: list[Message] = []

    async def main(port: int):
        db = await Database.open(tmp_path / "s.db")
        outbox = Outbox(db, boot_id=BOOT)
        await outbox.append([reading(i) for i in range(300)])
        await seal_all(packer_for(outbox, db))
        await outbox.append([event(i) for i in range(3)])  # newer than the backlog, still first
        drain = drain_for(outbox, db)
        async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:

            async def publish(message: Message) -> None:
                published.append(message)
                topic = f"fleetgate/v1/{DEVICE}/up/{message.stream}"
                await client.publish(
                    topic, message.payload, 1, properties=_properties(message.compressed, None)
                )

            await drain_until_empty(outbox, drain, publish)
        depth = await outbox.depth()
        await db.close()
        return depth

    with Mosquitto() as broker, Consumer("127.0.0.1", broker.port, f"fleetgate/v1/{DEVICE}/#") as consumer:
        depth = asyncio.run(main(broker.port))

        def records_received() -> int:
            return sum(
                len(envelope(p, ("content-encoding", "zlib") in pr.get("UserProperty", []))["records"])
                for _t, p, _q, _r, pr in consumer.messages
            )

        wait_until("every record at the consumer", lambda: records_received() >= 303, timeout=10)
        received = consumer.messages

    assert all(d.depth == 0 and d.packed == 0 and d.bytes == 0 for d in depth)
    kinds = [
        "events" if m.stream == "events" else "segment" if m.segment is not None else "rows"
        for m in published
    ]
    assert kinds[0] == "events" and "segment" in kinds and kinds[-1] == "rows"
    assert kinds == sorted(kinds, key=["events", "segment", "rows"].index)
    seqs: dict[str, list[int]] = {}
    for _topic, payload, _qos, _retain, props in received:
        env = envelope(payload, ("content-encoding", "zlib") in props.get("UserProperty", []))
        seqs.setdefault(env["stream"], []).extend(r["seq"] for r in env["records"])
    assert sorted(seqs["telemetry"]) == list(range(1, 301))
    assert sorted(seqs["events"]) == [1, 2, 3]


def test_acknowledging_scrubs_less_but_leaves_the_connections_secure_delete_as_it_was(tmp_path):
    """Delivered records are deleted with secure_delete=FAST (half the flash writes); every other delete
    (state, eviction, sealing) must keep the connection's own setting."""

    async def main():
        db = await Database.open(tmp_path / "s.db")
        outbox = Outbox(db, boot_id=BOOT)
        await outbox.append([reading(i) for i in range(300)])
        await seal_all(packer_for(outbox, db))

        def setting(conn):
            return conn.execute("PRAGMA secure_delete").fetchone()[0]

        before = await db.run(setting)
        segments = await outbox.segments_after(0, 100)
        rows = await outbox.next_batch(1000)
        freed = await outbox.acknowledge([r.id for r in rows], [g.id for g in segments])
        after = await db.run(setting)
        depth = await outbox.depth()
        await db.close()
        return before, after, freed, depth

    before, after, freed, [depth] = asyncio.run(main())
    assert after == before
    assert freed == 300 and (depth.depth, depth.packed, depth.bytes) == (0, 0, 0)


def test_segments_sealed_under_an_old_device_id_go_out_under_the_current_one(tmp_path):
    """docs/mqtt.md: an envelope's device always equals the topic's. A device id changed in the configuration
    while a packed backlog waited must not send envelopes naming the old one."""
    published: list[Message] = []

    async def main():
        db, outbox, drain, sealed = await backlog_sealed_as(tmp_path / "s.db", "old-id")
        expected = [envelope(g.payload, g.compressed) for g in await outbox.segments_after(0, 100)]
        await drain_until_empty(outbox, drain, published_to(published))
        await db.close()
        return sealed, expected

    sealed, expected = asyncio.run(main())
    segments = [m for m in published if m.segment is not None]
    assert sealed > 0 and len(segments) == sealed
    got = [envelope(m.payload, m.compressed) for m in segments]
    assert {e["device"] for e in expected} == {"old-id"} and {e["device"] for e in got} == {DEVICE}
    assert [e["records"] for e in got] == [e["records"] for e in expected]


def test_a_damaged_segment_that_cannot_be_re_headed_goes_as_stored_and_the_drain_goes_on(tmp_path, caplog):
    """Guards against one bad row stalling the uplink for ever (the drain failing on it at every reconnect)."""
    published: list[Message] = []

    async def main():
        db, outbox, drain, sealed = await backlog_sealed_as(tmp_path / "s.db", "old-id")

        def damage(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE segments SET payload = x'00ff00ff' WHERE id = (SELECT min(id) FROM segments)"
            )

        await db.run(damage)
        await drain_until_empty(outbox, drain, published_to(published))
        depth = await outbox.depth()
        await db.close()
        return sealed, depth

    sealed, [depth] = asyncio.run(main())
    segments = [m for m in published if m.segment is not None]
    assert len(segments) == sealed and segments[0].payload == b"\x00\xff\x00\xff"
    assert {envelope(m.payload, m.compressed)["device"] for m in segments[1:]} == {DEVICE}
    assert depth.depth == 0
    assert any("could not be re-headed" in r.getMessage() for r in caplog.records)
