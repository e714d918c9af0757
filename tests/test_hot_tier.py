"""The outbox's hot tier (sync/store/hot.py): live telemetry in memory until the broker acknowledges it.

First with a real outbox and no broker: the encoding is the store's byte for byte, what is due spills with its
numbers, sequence numbers are reserved on disk before use and an unclean stop skips what was reserved. Then
the real daemon with gpsd (gpsfake) for readings, a real broker behind a proxy that can cut the link, and a
consumer: online, no telemetry row is ever written; offline, readings spill and drain when the link returns;
after a kill -9 the skipped range is announced and no number is used twice.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from test_telemetry_daemon import vehicle_config
from test_uplink_daemon import decode

from fleetgate.daemon.runtime.readings import STREAM, ReadingSink
from fleetgate.sync.mqtt.envelope import expand
from fleetgate.sync.mqtt.packer import Packer
from fleetgate.sync.store import Database, NewRecord, Outbox, Priority, Stamp
from fleetgate.sync.store.hot import SEQ_BLOCK, SkippedSeqs, hot_id
from fleetgate.sync.store.outbox import HOT_RESERVED_PREFIX
from fleetgate.sync.store.spool import Spool, spool_folder

from conftest import wait_until
from gpsfake_fixture import Gpsfake, moving_route
from mosquitto_fixture import Mosquitto
from mqtt_consumer import Consumer
from tcp_proxy import TcpProxy

WALL = 1_796_378_400_123_456_789  # 2026-12-04T10:00:00.123Z


def reading(i: int, trusted: bool = True) -> NewRecord:
    payload = json.dumps({"signal": "rpm", "value": 800 + i, "unit": "rpm"}, separators=(",", ":")).encode()
    return NewRecord(
        STREAM, Priority.TELEMETRY, Stamp(WALL + i * 10**9, 5 * 10**9 + i * 10**9, trusted), payload
    )


def rows(db: Path, stream: str = STREAM) -> list[tuple[int, bool]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT o.seq, o.time_corrected FROM outbox o JOIN streams s ON s.id = o.stream_id WHERE s.name = ?"
            " ORDER BY o.seq",
            (stream,),
        ).fetchall()


def with_outbox(tmp_path: Path, body: Any, window_s: float = 60.0, max_records: int = 1000) -> Any:
    async def main() -> Any:
        db = await Database.open(tmp_path / "fleetgate.db")
        try:
            outbox = Outbox(db, boot_id="0f7e3a52-1111-4222-8333-944455556666")
            skipped = await outbox.enable_hot(STREAM, window_s, max_records)
            return await body(outbox, skipped)
        finally:
            await db.close()

    return asyncio.run(main())


def test_a_hot_record_is_encoded_as_the_store_encodes_its_row(tmp_path: Path) -> None:
    async def body(outbox: Outbox, _skipped: Any) -> None:
        await outbox.append_hot([reading(0), reading(1, trusted=False)])
        hot = outbox.hot[STREAM].take(10)
        assert [r[0] for r in hot] == [hot_id(0, 1), hot_id(0, 2)] and outbox.hot[STREAM].take(
            10
        ) == []  # in flight now
        outbox.hot[STREAM].release([1, 2])
        assert await outbox.spill(everything=True) == 2
        stored = await outbox.encoded_after(-1, 0, 10)
        assert [r[3] for r in stored] == [r[3] for r in hot]
        assert json.loads(hot[0][3])["ts"] == "2026-12-04T10:00:00.123Z"

    with_outbox(tmp_path, body)


def test_nothing_is_written_until_a_record_is_due_then_it_spills_with_its_number(tmp_path: Path) -> None:
    db = tmp_path / "fleetgate.db"

    async def body(outbox: Outbox, skipped: Any) -> None:
        assert skipped is None
        commits = outbox.commits
        await outbox.append_hot([reading(i) for i in range(5)])
        assert outbox.commits == commits + 1  # the seq reservation, once for SEQ_BLOCK numbers
        await outbox.append_hot([reading(i) for i in range(5, 8)])
        assert outbox.commits == commits + 1 and rows(db) == []
        assert await outbox.spill() == 0  # nothing is older than the window
        depth = {d.stream: d for d in await outbox.depth()}[STREAM]
        assert depth.depth == 8 and depth.last_seq == 8

        # Seqs 1-3 go out and are acknowledged; 4-5 are in flight when the window passes; 6-8 wait.
        out = outbox.hot[STREAM].take(5)
        await outbox.acknowledge([r[0] for r in out[:3]])
        outbox.hot[STREAM].window_s = 0.0
        assert await outbox.spill() == 5
        assert rows(db) == [(4, 0), (5, 0), (6, 0), (7, 0), (8, 0)]
        assert outbox.hot[STREAM].take(10) == []  # in flight or stored: nothing more to send from memory
        # 4 is acknowledged after all: its row goes; 5's publish fails: the stored copy is the one left.
        assert await outbox.acknowledge([hot_id(0, 4)]) == 1
        outbox.release_hot([hot_id(0, 5)])
        assert rows(db) == [(5, 0), (6, 0), (7, 0), (8, 0)] and len(outbox.hot[STREAM].records) == 0

    with_outbox(tmp_path, body)


def test_memory_stays_bounded_while_the_link_is_down(tmp_path: Path) -> None:
    db = tmp_path / "fleetgate.db"

    async def body(outbox: Outbox, _skipped: Any) -> None:
        await outbox.append_hot([reading(i) for i in range(8)])
        assert await outbox.spill() == 0  # young, and no more than max_records
        await outbox.append_hot([reading(i) for i in range(8, 12)])
        assert await outbox.spill() == 12  # beyond max_records: everything held goes, in one commit
        assert [seq for seq, _ in rows(db)] == list(range(1, 13))
        assert outbox.hot[STREAM].records == {}

    with_outbox(tmp_path, body, max_records=10)


def test_once_the_oldest_is_due_everything_held_goes_in_one_commit(tmp_path: Path) -> None:
    db = tmp_path / "fleetgate.db"

    async def body(outbox: Outbox, _skipped: Any) -> None:
        await outbox.append_hot([reading(i) for i in range(3)])
        tier = outbox.hot[STREAM]
        for record in tier.records.values():
            record.taken -= 100.0  # older than the window
        await outbox.append_hot([reading(3)])  # young
        commits = outbox.commits
        assert await outbox.spill() == 4 and outbox.commits == commits + 1
        assert [seq for seq, _ in rows(db)] == [1, 2, 3, 4]

    with_outbox(tmp_path, body)


def test_when_one_stream_is_due_the_others_waiting_records_go_in_the_same_commit(tmp_path: Path) -> None:
    db = tmp_path / "fleetgate.db"

    async def body(outbox: Outbox, _skipped: Any) -> None:
        await outbox.enable_hot("heartbeat", 60.0, 1000)
        beat = NewRecord("heartbeat", Priority.TELEMETRY, Stamp(WALL, 5 * 10**9, True), b'{"uptime_s":1}')
        await outbox.append_hot([beat, beat])
        outbox.hot["heartbeat"].take_records(1)  # the first heartbeat is in flight: left to its ack
        await outbox.append_hot([reading(i) for i in range(2)])
        assert await outbox.spill() == 0  # nothing due
        for record in outbox.hot[STREAM].records.values():
            record.taken -= 100.0
        commits = outbox.commits
        assert await outbox.spill() == 3 and outbox.commits == commits + 1
        assert [seq for seq, _ in rows(db)] == [1, 2] and [seq for seq, _ in rows(db, "heartbeat")] == [2]
        assert list(outbox.hot["heartbeat"].records) == [1]

    with_outbox(tmp_path, body)


def test_offline_the_longer_window_applies(tmp_path: Path) -> None:
    db = tmp_path / "fleetgate.db"

    async def body(outbox: Outbox, _skipped: Any) -> None:
        tier = outbox.hot[STREAM]
        tier.offline_window_s = 60.0
        await outbox.append_hot([reading(i) for i in range(3)])
        for record in tier.records.values():
            record.taken -= 30.0  # past the online window (10 s), within the offline one
        assert await outbox.spill(offline=True) == 0 and rows(db) == []
        for record in tier.records.values():
            record.taken -= 31.0
        assert await outbox.spill(offline=True) == 3 and [seq for seq, _ in rows(db)] == [1, 2, 3]
        await outbox.append_hot([reading(3)])
        next(iter(tier.records.values())).taken -= 30.0
        assert await outbox.spill() == 1  # online again: the memory window

    with_outbox(tmp_path, body, window_s=10.0)


def test_records_in_flight_are_left_to_their_acknowledgement_unless_it_hangs(tmp_path: Path) -> None:
    """Stored while a publish of them is on its way, they would go out twice (the backlog lane sends the rows):
    only when their acknowledgement is overdue (a link gone quiet) are they stored as well."""
    db = tmp_path / "fleetgate.db"

    async def body(outbox: Outbox, _skipped: Any) -> None:
        await outbox.append_hot([reading(i) for i in range(4)])
        tier = outbox.hot[STREAM]
        sent = tier.take_records(2)
        for record in tier.records.values():
            record.taken -= 100.0  # all taken longer than the window ago
        assert await outbox.spill() == 2 and [seq for seq, _ in rows(db)] == [3, 4]
        for record in sent:
            record.sent -= 100.0  # and now their acknowledgement is overdue too
        assert await outbox.spill() == 2 and [seq for seq, _ in rows(db)] == [1, 2, 3, 4]

    with_outbox(tmp_path, body)


def _sealing(outbox: Outbox) -> Packer:
    """The packer the daemon builds (its drain is not used to seal spills), sealing the outbox's spills."""
    packer = Packer(outbox, None, "hot-0001", "store-1", 512, 256)  # type: ignore[arg-type]
    outbox.seal_spills("hot-0001", packer.seal_spilled)
    return packer


def sealed_records(db: Path) -> list[list[dict]]:
    """Per sealed message in the spool (sync/store/spool.py) not yet acknowledged, in order: its records, as
    a fresh start reads them from the files."""
    with sqlite3.connect(db) as conn:
        state = dict(conn.execute("SELECT key, value FROM state WHERE key LIKE 'outbox.spool-%'").fetchall())
        assert conn.execute("SELECT count(*) FROM segments").fetchone()[0] == 0  # spills are not segments
    spool = Spool(spool_folder(db))
    spool.load(state)
    out = []
    for message, payload in spool.after(0, 10_000):
        envelope = json.loads(zlib.decompress(payload) if message.compressed else payload)
        assert envelope["device"] == "hot-0001" and envelope["store"] == "store-1"
        seqs = [r["seq"] for r in envelope["records"]]
        assert (seqs[0], seqs[-1], len(seqs)) == (message.first_seq, message.last_seq, message.records)
        out.append(envelope["records"])
    return out


def test_spilled_live_records_are_sealed_into_messages_written_once(tmp_path: Path) -> None:
    """With the packer on, a spill stores the messages the drain will publish (segments), not rows for the
    packer to read, pack and delete: the same records, encoded as rows would be."""
    db = tmp_path / "fleetgate.db"

    async def body(outbox: Outbox, _skipped: Any) -> None:
        _sealing(outbox)
        await outbox.append_hot([reading(i) for i in range(30)])
        encoded = [outbox.hot[STREAM].encode(r) for r in outbox.hot[STREAM].records.values()]
        for record in outbox.hot[STREAM].records.values():
            record.taken -= 100.0
        assert await outbox.spill() == 30
        assert rows(db) == []
        messages = sealed_records(db)
        assert len(messages) > 1  # 512-byte messages: more than one
        assert [json.dumps(r, separators=(",", ":")).encode() for m in messages for r in m] == encoded
        depth = {d.stream: d for d in await outbox.depth()}[STREAM]
        assert (depth.depth, depth.packed, depth.last_seq) == (30, 30, 30) and depth.bytes > 0
        segments = await outbox.segments_after(0, 100)
        await outbox.acknowledge([], [g.id for g in segments])
        depth = {d.stream: d for d in await outbox.depth()}[STREAM]
        assert (depth.depth, depth.bytes) == (0, 0)

    with_outbox(tmp_path, body)


def test_a_spill_is_rows_when_wall_time_may_change_or_a_row_is_older(tmp_path: Path) -> None:
    db = tmp_path / "fleetgate.db"

    async def body(outbox: Outbox, _skipped: Any) -> None:
        _sealing(outbox)
        await outbox.append_hot([reading(0), reading(1, trusted=False)])  # one untrusted: may be corrected
        await outbox.spill(everything=True)
        assert [seq for seq, _ in rows(db)] == [1, 2] and sealed_records(db) == []
        await outbox.append_hot([reading(2), reading(3)])  # all trusted, but rows of the stream wait
        await outbox.spill(everything=True)
        assert [seq for seq, _ in rows(db)] == [1, 2, 3, 4] and sealed_records(db) == []
        await outbox.acknowledge([r[0] for r in await outbox.encoded_after(-1, 0, 10)])
        await outbox.append_hot([reading(4), reading(5)])  # the rows delivered: now they are sealed
        await outbox.spill(everything=True)
        assert rows(db) == [] and [[r["seq"] for r in m] for m in sealed_records(db)] == [[5, 6]]

    with_outbox(tmp_path, body)


def test_a_clean_stop_stores_what_is_in_memory_and_gives_the_reservation_back(tmp_path: Path) -> None:
    db = tmp_path / "fleetgate.db"

    async def first(outbox: Outbox, _skipped: Any) -> None:
        await outbox.append_hot([reading(i) for i in range(3)])
        await outbox.acknowledge([r[0] for r in outbox.hot[STREAM].take(2)])  # 1 and 2 delivered
        await outbox.spill(everything=True)

    with_outbox(tmp_path, first)
    assert rows(db) == [(3, 0)]

    async def second(outbox: Outbox, skipped: Any) -> None:
        assert skipped is None  # no gap: the next number follows the last one used
        await outbox.append_hot([reading(9)])
        assert list(outbox.hot[STREAM].records) == [4]

    with_outbox(tmp_path, second)


def test_an_unclean_stop_skips_every_reserved_number(tmp_path: Path) -> None:
    """A number handed out may have reached the broker while nothing of it reached the disk: after a crash
    none of the reserved ones is used again, and the skipped range is reported."""

    async def crashed(outbox: Outbox, _skipped: Any) -> None:
        await outbox.append_hot([reading(i) for i in range(2)])
        outbox.hot[STREAM].window_s = 0.0
        assert await outbox.spill() == 2  # stored: these must survive the crash
        await outbox.append_hot([reading(2)])  # in memory only, then the "power cut"

    with_outbox(tmp_path, crashed)
    assert rows(tmp_path / "fleetgate.db") == [(1, 0), (2, 0)]

    async def after(outbox: Outbox, skipped: SkippedSeqs | None) -> None:
        # The store opened as it was (a spill that left streams.last_seq behind its rows made the integrity
        # check move the whole database aside): the stored rows are there, the rest of the block skipped.
        assert outbox._db.recovery is None
        assert skipped == SkippedSeqs(STREAM, 3, 2 + SEQ_BLOCK)  # reserved with the first two
        await outbox.append_hot([reading(0)])
        assert list(outbox.hot[STREAM].records) == [3 + SEQ_BLOCK]
        streams = {d.stream: d for d in await outbox.depth()}
        assert streams[STREAM].last_seq == 3 + SEQ_BLOCK

    with_outbox(tmp_path, after)
    assert [seq for seq, _ in rows(tmp_path / "fleetgate.db")] == [1, 2]

    async def again(outbox: Outbox, skipped: SkippedSeqs | None) -> None:  # crashed again, right away
        assert skipped is not None and skipped.first == 3 + SEQ_BLOCK

    with_outbox(tmp_path, again)


def test_an_unreadable_reservation_skips_nothing_it_cannot_prove(tmp_path: Path) -> None:
    async def garbled(outbox: Outbox, _skipped: Any) -> None:
        await outbox.append([], {HOT_RESERVED_PREFIX + STREAM: "not a number"})

    with_outbox(tmp_path, garbled)
    assert with_outbox(tmp_path, lambda _o, skipped: asyncio.sleep(0, skipped)) is None


def test_trust_corrects_readings_in_memory_as_it_does_rows(tmp_path: Path) -> None:
    db = tmp_path / "fleetgate.db"

    async def body(outbox: Outbox, _skipped: Any) -> None:
        await outbox.append_hot([reading(0, trusted=False), reading(1, trusted=True)])
        offset = 1_000 * 10**9
        assert await outbox.correct_wall_times(offset, before_mono_ns=10**12) == 1
        first, second = (json.loads(r[3]) for r in outbox.hot[STREAM].take(2))
        assert first["corrected"] is True and first["wall_ns"] == first["mono_ns"] + offset
        assert second["corrected"] is False
        outbox.release_hot([hot_id(0, 1), hot_id(0, 2)])
        await outbox.spill(everything=True)
        assert rows(db) == [(1, 1), (2, 0)]

    with_outbox(tmp_path, body)


def test_without_a_hot_tier_the_sink_commits_as_before(tmp_path: Path) -> None:
    from fleetgate.daemon.runtime.clock import Clock

    async def main() -> None:
        db = await Database.open(tmp_path / "fleetgate.db")
        try:
            sink = ReadingSink(Outbox(db), Clock())
            sink.add("rpm", 900)
            assert await sink.flush() == 1
        finally:
            await db.close()

    asyncio.run(main())
    assert rows(tmp_path / "fleetgate.db") == [(1, 0)]


# -- the real daemon -----------------------------------------------------------------------------------------


def telemetry_seqs(messages: list) -> dict[int, set[bytes]]:
    """Each telemetry seq the consumer got, with the distinct record bodies it came with."""
    seen: dict[int, set[bytes]] = defaultdict(set)
    for topic, payload, _qos, _retain, props in messages:
        if not topic.endswith("/up/telemetry"):
            continue
        for record in expand(decode(topic, payload, props)):
            seen[record["seq"]].add(
                json.dumps(record["data"], sort_keys=True).encode() + str(record["mono_ns"]).encode()
            )
    return seen


def skipped_events(messages: list) -> list[dict[str, Any]]:
    out = []
    for topic, payload, _qos, _retain, props in messages:
        if topic.endswith("/up/events"):
            body = decode(topic, payload, props)
            out += [r["data"] for r in expand(body) if r["data"]["event"] == "records-skipped"]
    return out


@pytest.mark.timeout(240)
def test_live_telemetry_never_touches_the_store_online_and_spills_offline(tmp_path, start_daemon) -> None:
    db = tmp_path / "state" / "fleetgate.db"
    path, _route = moving_route(tmp_path)
    with (
        Gpsfake(path, cycle_s=0.05) as gps,
        Mosquitto() as broker,
        Consumer("127.0.0.1", broker.port, "fleetgate/v1/test-0001/#") as consumer,
        TcpProxy("127.0.0.1", broker.port) as proxy,
    ):
        config = vehicle_config(tmp_path, None, gps.port)
        config.write_text(
            config.read_text()
            + f"""
[mqtt]
enabled = true
host = "127.0.0.1"
port = {proxy.port}
tls = false
keepalive_s = 5
connect_timeout_s = 2
live_batch_s = 0.5
memory_window_s = 2
offline_window_s = 3
"""
        )
        daemon = start_daemon(config)
        daemon.wait_ready()

        def memory() -> dict[str, Any]:
            done = daemon.cli("status", "--json")
            return json.loads(done.stdout)["outbox"]["memory"]["telemetry"]

        wait_until("readings acknowledged from memory", lambda: memory()["acknowledged"] > 50, timeout=60)
        assert memory()["spilled"] == 0 and rows(db) == []  # online: not one telemetry row written

        proxy.cut("reset")
        wait_until("readings spilled while offline", lambda: memory()["spilled"] > 20, timeout=60)
        assert rows(db)
        proxy.restore()
        wait_until("the spilled backlog drained", lambda: rows(db) == [], timeout=60)

        last = max(telemetry_seqs(consumer.messages))
        daemon.kill()  # with live readings in memory
        daemon = start_daemon(config)
        daemon.wait_ready()
        assert "store corrupt" not in daemon.log  # what was stored is there: only the memory's range skipped
        wait_until("readings after the restart", lambda: max(telemetry_seqs(consumer.messages)) > last + 20)
        wait_until("records-skipped", lambda: len(skipped_events(consumer.messages)) == 2, timeout=30)
        by_stream = {e["stream"]: e for e in skipped_events(consumer.messages)}
        assert set(by_stream) == {"telemetry", "heartbeat"}  # each hot stream reports its own range
        skipped = by_stream["telemetry"]
        daemon.terminate()
        time.sleep(0.5)
        messages = consumer.messages

    seen = telemetry_seqs(messages)
    assert all(len(bodies) == 1 for bodies in seen.values()), "a seq was used for two different readings"
    assert skipped["stream"] == "telemetry" and skipped["first_seq"] <= last + 1 <= skipped["last_seq"]
    assert max(seen) > skipped["last_seq"]  # the restarted daemon numbers on after the skipped range
    before = sorted(s for s in seen if s <= last)
    assert before == list(range(1, last + 1)), "a reading acknowledged or spilled before the kill is missing"
