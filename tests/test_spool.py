"""The spool (sync/store/spool.py): sealed backlog in append-only page-aligned files beside the database.

The format on its own (reload, torn tails, damage, any bytes), then through the outbox: spills, the drain's
order, acknowledgements deleting finished files, quotas, seq numbers after a crash, and state values carried
by a spool record never coming back over a newer value in the state table.
"""

from __future__ import annotations

import asyncio
import errno
import json
import sqlite3
import zlib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hot_tier import reading

from fleetgate.daemon.runtime.readings import STREAM
from fleetgate.sync.mqtt.packer import Packer
from fleetgate.sync.store import Database, NewRecord, Outbox, Priority, Stamp, StateStore
from fleetgate.sync.store import spool as spool_module
from fleetgate.sync.store.segments import SpilledMessage
from fleetgate.sync.store.spool import (
    DONE_PREFIX,
    FOLDED_KEY,
    HEADER,
    PAGE,
    NewMessage,
    Spool,
    is_spool_id,
    spool_folder,
)

from small_disk import fill, small_tmpfs

WALL_OFFSET = 1_796_378_400_000_000_000
BOOT = "0f7e3a52-1111-4222-8333-944455556666"


def message(stream: str, first: int, count: int, payload: bytes) -> NewMessage:
    return NewMessage(
        stream, "dev-1", SpilledMessage(first, first + count - 1, count, 10**18 + first, False, payload)
    )


def files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.spool"))


def reopened(folder: Path, state: dict[str, str] | None = None) -> Spool:
    spool = Spool(folder)
    spool.load(state or {})
    return spool


# -- the format ---------------------------------------------------------------------------------------------


def test_records_start_on_page_boundaries_and_read_back_exactly(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.load({})
    first = spool.append([message("telemetry", 1, 3, b"a" * 5000), message("heartbeat", 1, 1, b"h")])
    second = spool.append([message("telemetry", 4, 2, b"b" * 10)], {"trip": '{"id":"t1"}'})
    spool.close()
    [path] = files(tmp_path / "s")
    data = path.read_bytes()
    # 5,000 bytes and their header: 2 pages; the second record: 1 page; then blocks allocated ahead (zeros).
    assert len(data) >= 3 * PAGE and data.count(0, 3 * PAGE) == len(data) - 3 * PAGE
    assert data[: HEADER.size][:4] == b"FGS1" and data[2 * PAGE : 2 * PAGE + 4] == b"FGS1"
    again = reopened(tmp_path / "s")
    held = again.after(0, 100)
    assert [(m.stream, m.first_seq, m.last_seq, p) for m, p in held] == [
        ("telemetry", 1, 3, b"a" * 5000),
        ("heartbeat", 1, 1, b"h"),
        ("telemetry", 4, 5, b"b" * 10),
    ]
    assert [m.id for m, _ in held] == [m.id for m in first + second] and all(is_spool_id(m.id) for m in first)
    assert again.pending == {"trip": '{"id":"t1"}'}  # not yet in the state table
    assert again.report.torn_tail_bytes == 0  # the space allocated ahead is the file's end, not a torn write
    assert again.top("telemetry") == 5 and again.held()["heartbeat"][0].held_bytes > 1


def test_a_torn_last_record_is_cut_off_and_the_next_start_appends_after_the_last_whole_one(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "s"
    spool = reopened(folder)
    spool.append([message("telemetry", 1, 2, b"x" * 100)])
    spool.append([message("telemetry", 3, 2, b"y" * 6000)])
    spool.close()
    [path] = files(folder)
    with open(path, "r+b") as f:  # the cut came during the second write: only part of it reached the disk
        f.truncate(PAGE + 3000)
    again = reopened(folder)
    assert [(m.first_seq, p) for m, p in again.after(0, 10)] == [(1, b"x" * 100)]
    assert again.report.torn_tail_bytes == 3000 and again.report.damaged_records == 0
    again.append([message("telemetry", 5, 1, b"z")])
    again.close()
    assert files(folder) == [path]  # the same file: no new file's metadata
    assert path.read_bytes()[PAGE : PAGE + 4] == b"FGS1"  # right after the last whole record
    third = reopened(folder)
    assert [m.first_seq for m, _ in third.after(0, 10)] == [1, 5]
    assert third.report.torn_tail_bytes == 0 and third.report.damaged_records == 0


def test_a_damaged_record_between_good_ones_is_skipped_and_counted(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    spool = reopened(folder)
    for i in range(3):
        spool.append([message("telemetry", 1 + 10 * i, 10, bytes([65 + i]) * 50)])
    spool.close()
    [path] = files(folder)
    data = bytearray(path.read_bytes())
    data[PAGE + 40] ^= 0xFF  # a flipped bit in the middle record's body
    path.write_bytes(bytes(data))
    again = reopened(folder)
    assert [m.first_seq for m, _ in again.after(0, 10)] == [1, 21]
    assert again.report.damaged_records == 1 and "checksum" in again.report.problems[0]
    assert again.report.torn_tail_bytes == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=3 * PAGE), at=st.integers(0, 3 * PAGE), keep=st.integers(0, 4 * PAGE))
def test_any_bytes_in_a_spool_file_never_stop_a_start(
    tmp_path: Path, junk: bytes, at: int, keep: int
) -> None:
    folder = tmp_path / f"s{abs(hash((junk, at, keep)))}"
    spool = reopened(folder)
    spool.append([message("telemetry", 1, 2, b"p" * 300)])
    spool.append([message("telemetry", 3, 2, b"q" * 300)], {"trip": "1"})
    spool.close()
    [path] = files(folder)
    data = bytearray(path.read_bytes())
    data[at : at + len(junk)] = junk
    path.write_bytes(bytes(data[:keep]))
    again = reopened(folder)  # never raises
    for m, payload in again.after(0, 10):  # whatever survives is whole, as written
        assert payload == (b"p" * 300 if m.first_seq == 1 else b"q" * 300)
    snap = again.snapshot()
    assert snap["messages"] == len(again.after(0, 10))


# -- through the outbox -------------------------------------------------------------------------------------


def run(tmp_path: Path, body: Any, quotas: dict[str, int] | None = None) -> Any:
    async def main() -> Any:
        db = await Database.open(tmp_path / "fleetgate.db")
        try:
            outbox = Outbox(db, boot_id=BOOT, quotas=quotas)
            skipped = await outbox.enable_hot(STREAM, 12.0, 100_000, offline_window_s=60.0)
            packer = Packer(outbox, None, "hot-0001", "store-1", 512, 256)  # type: ignore[arg-type]
            outbox.seal_spills("hot-0001", packer.seal_spilled)
            return await body(db, outbox, skipped)
        finally:
            await db.close()

    return asyncio.run(main())


async def spill_offline(outbox: Outbox, readings: list[NewRecord]) -> int:
    await outbox.append_hot(readings)
    for record in outbox.hot[STREAM].records.values():
        record.taken -= 100.0  # older than the offline window
    return await outbox.spill(offline=True)


def state_table(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT key, value FROM state").fetchall())


def seqs_of(payload: bytes, compressed: bool) -> list[int]:
    return [r["seq"] for r in json.loads(zlib.decompress(payload) if compressed else payload)["records"]]


def test_an_offline_spill_goes_to_the_spool_and_no_database_page_changes(tmp_path: Path) -> None:
    db_path = tmp_path / "fleetgate.db"

    async def body(db: Database, outbox: Outbox, _skipped: Any) -> None:
        await outbox.append_hot([reading(0)])  # the seq reservation: a commit, once per 4,096 numbers
        changes = await db.run(lambda c: c.total_changes)
        wal = db_path.with_name(db_path.name + "-wal").stat().st_size
        assert await spill_offline(outbox, [reading(i) for i in range(1, 40)]) == 40
        assert await db.run(lambda c: c.total_changes) == changes
        assert db_path.with_name(db_path.name + "-wal").stat().st_size == wal
        [path] = files(spool_folder(db_path))
        assert path.stat().st_size % PAGE == 0
        depth = {d.stream: d for d in await outbox.depth()}[STREAM]
        assert (depth.depth, depth.packed, depth.last_seq) == (40, 40, 40) and depth.bytes > 0

    run(tmp_path, body)


def test_the_drain_reads_database_segments_first_then_the_spool_and_acks_delete_the_file(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "fleetgate.db"

    async def body(db: Database, outbox: Outbox, _skipped: Any) -> None:
        await spill_offline(outbox, [reading(i) for i in range(30)])
        await spill_offline(outbox, [reading(i) for i in range(30, 45)])
        sealed = await outbox.segments_after(0, 3)
        page2 = await outbox.segments_after(sealed[-1].id, 100)
        everything = sealed + page2
        assert [s for g in everything for s in seqs_of(g.payload, g.compressed)] == list(range(1, 46))
        assert len(files(spool_folder(db_path))) == 1
        assert await outbox.acknowledge([], [g.id for g in sealed]) == sum(g.records for g in sealed)
        assert len(files(spool_folder(db_path))) == 1  # more to deliver
        done = json.loads(state_table(db_path)[DONE_PREFIX + "1"])
        assert len(done) == len(sealed)
        await outbox.acknowledge([], [g.id for g in page2])
        # Every message delivered: the file being written waits for the next outage (no new metadata) ...
        [kept] = files(spool_folder(db_path))
        depth = {d.stream: d for d in await outbox.depth()}[STREAM]
        assert (depth.depth, depth.bytes) == (0, 0)
        await spill_offline(outbox, [reading(i) for i in range(45, 50)])
        assert files(spool_folder(db_path)) == [kept]
        assert [s for g in await outbox.segments_after(0, 100) for s in seqs_of(g.payload, g.compressed)] == [
            46, 47, 48, 49, 50,
        ]  # fmt: skip

    run(tmp_path, body)


def test_a_finished_file_is_deleted_once_a_newer_one_is_written(tmp_path: Path, monkeypatch: Any) -> None:
    db_path = tmp_path / "fleetgate.db"
    monkeypatch.setattr(spool_module, "MAX_FILE_BYTES", PAGE)  # a new file after every record

    async def body(db: Database, outbox: Outbox, _skipped: Any) -> None:
        for start in range(0, 90, 30):
            await spill_offline(outbox, [reading(i) for i in range(start, start + 30)])
        assert len(files(spool_folder(db_path))) == 3
        sealed = await outbox.segments_after(0, 100)
        await outbox.acknowledge([], [g.id for g in sealed])
        assert files(spool_folder(db_path)) == [spool_folder(db_path) / "00000003.spool"]  # the one written

    run(tmp_path, body)

    async def restarted(db: Database, outbox: Outbox, _skipped: Any) -> None:
        assert await outbox.segments_after(0, 100) == []

    run(tmp_path, restarted)
    assert [k for k in state_table(db_path) if k.startswith(DONE_PREFIX)] == [
        DONE_PREFIX + "3"
    ]  # the rest dropped


def test_acknowledged_messages_stay_delivered_across_a_restart(tmp_path: Path) -> None:
    async def first(db: Database, outbox: Outbox, _skipped: Any) -> list[int]:
        await spill_offline(outbox, [reading(i) for i in range(30)])
        sealed = await outbox.segments_after(0, 100)
        await outbox.acknowledge([], [sealed[0].id])
        return [g.id for g in sealed[1:]]

    rest = run(tmp_path, first)

    async def second(db: Database, outbox: Outbox, skipped: Any) -> None:
        assert skipped is None or skipped.first > 30  # seqs held in the spool are not reported as a gap
        again = await outbox.segments_after(0, 100)
        assert [g.id for g in again] == rest
        await outbox.acknowledge([], rest)

    run(tmp_path, second)

    async def third(db: Database, outbox: Outbox, _skipped: Any) -> None:
        assert await outbox.segments_after(0, 100) == []

    run(tmp_path, third)


def test_after_a_crash_the_numbers_in_the_spool_are_not_reported_skipped(tmp_path: Path) -> None:
    async def crashed(db: Database, outbox: Outbox, _skipped: Any) -> None:
        await spill_offline(outbox, [reading(i) for i in range(30)])
        await outbox.append_hot([reading(30)])  # in memory only when the power goes

    run(tmp_path, crashed)  # (no clean stop: nothing of memory is written)

    async def restarted(db: Database, outbox: Outbox, skipped: Any) -> None:
        assert skipped is not None and skipped.first == 31  # 1-30 are in the spool, 31 was in memory
        assert sum(g.records for g in await outbox.segments_after(0, 100)) == 30

    run(tmp_path, restarted)


def test_a_checkpoint_offline_rides_the_spill_and_an_older_spooled_value_never_wins(tmp_path: Path) -> None:
    db_path = tmp_path / "fleetgate.db"

    async def offline(db: Database, outbox: Outbox, _skipped: Any) -> None:
        state = StateStore(db, outbox)
        await spill_offline(outbox, [reading(0)])  # the outbox now knows the link is down
        await outbox.append_hot([reading(i) for i in range(1, 10)])
        changes = await db.run(lambda c: c.total_changes)
        appends = db.spool.appends
        await state.checkpoint("trip", {"id": "t1", "distance": 5})
        # No write of its own: it waits for the readings' next spill (within the offline window).
        assert await db.run(lambda c: c.total_changes) == changes and db.spool.appends == appends
        for record in outbox.hot[STREAM].records.values():
            record.taken -= 100.0
        assert await outbox.spill(offline=True) == 9
        assert db.spool.appends == appends + 1  # one write: the readings and the checkpoint
        assert await db.run(lambda c: c.total_changes) == changes
        assert await state.get("trip") == {"id": "t1", "distance": 5}
        assert await state.items("tr") == {"trip": '{"id":"t1","distance":5}'}

    run(tmp_path, offline)
    assert "trip" not in state_table(db_path)

    async def restarted(db: Database, outbox: Outbox, _skipped: Any) -> None:
        state = StateStore(db, outbox)
        assert await state.get("trip") == {"id": "t1", "distance": 5}  # from the spool
        await outbox.append([], {"trip": None})  # the trip completed: deleted in the table
        assert await state.get("trip") is None

    run(tmp_path, restarted)
    table = state_table(db_path)
    assert "trip" not in table and json.loads(table[FOLDED_KEY]) == [1, 1]

    async def third(db: Database, outbox: Outbox, _skipped: Any) -> None:
        assert await StateStore(db, outbox).get("trip") is None  # the spooled value did not come back

    run(tmp_path, third)


def test_online_a_checkpoint_is_a_commit(tmp_path: Path) -> None:
    db_path = tmp_path / "fleetgate.db"

    async def body(db: Database, outbox: Outbox, _skipped: Any) -> None:
        await StateStore(db, outbox).checkpoint("trip", {"id": "t2"})

    run(tmp_path, body)
    assert json.loads(state_table(db_path)["trip"]) == {"id": "t2"} and files(spool_folder(db_path)) == []


def test_a_quota_evicts_the_oldest_spooled_messages_and_says_so(tmp_path: Path) -> None:
    db_path = tmp_path / "fleetgate.db"

    async def body(db: Database, outbox: Outbox, _skipped: Any) -> None:
        for start in range(0, 200, 20):
            await spill_offline(outbox, [reading(i) for i in range(start, start + 20)])
        depth = {d.stream: d for d in await outbox.depth()}[STREAM]
        assert depth.bytes <= 3000
        evictions = await outbox.take_evictions()
        ev = evictions[STREAM]
        held = [s for g in await outbox.segments_after(0, 1000) for s in seqs_of(g.payload, g.compressed)]
        assert ev.first_seq == 1 and held == list(range(ev.last_seq + 1, 201))  # oldest first, no hole
        assert ev.records + len(held) == 200 and depth.evicted == ev.records

    run(tmp_path, body, quotas={STREAM: 3000})
    assert len(files(spool_folder(db_path))) == 1


def test_the_packer_leaves_a_stream_with_spooled_messages_to_the_drain(tmp_path: Path) -> None:
    """Rows newer than the spool's messages must not become a segment the drain would send before them."""

    async def body(db: Database, outbox: Outbox, _skipped: Any) -> None:
        await spill_offline(outbox, [reading(i) for i in range(20)])
        untrusted = [reading(i, trusted=False) for i in range(20, 60)]
        await spill_offline(outbox, untrusted)  # wall time may change: rows
        await outbox.correct_wall_times(WALL_OFFSET, 10**18)  # now settled
        packer = Packer(outbox, None, "hot-0001", "store-1", 512, 256)  # type: ignore[arg-type]
        assert await packer.seal_one() is None
        other = [
            NewRecord("other", Priority.TELEMETRY, Stamp(10**18 + i, i, True), b'{"v":1}') for i in range(200)
        ]
        await outbox.append(other)
        assert await packer.seal_one() is not None  # a stream without spooled messages is packed as before

    run(tmp_path, body)


def test_a_full_disk_keeps_the_records_in_memory_for_the_next_spill(tmp_path: Path) -> None:
    """The spool's file system full (a real tmpfs): the spill fails, is counted as the store's disk-full,
    and loses nothing; once there is room the same records are written."""
    with small_tmpfs(tmp_path / "disk", "2m") as disk:

        async def body(db: Database, outbox: Outbox, _skipped: Any) -> None:
            await outbox.append_hot([reading(i) for i in range(10)])
            for record in outbox.hot[STREAM].records.values():
                record.taken -= 100.0
            filler = fill(disk)
            try:
                await outbox.spill(offline=True)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            else:
                raise AssertionError("the spill should have failed")
            assert db.disk_full_since is not None and db.disk_full_errors == 1
            assert len(outbox.hot[STREAM].records) == 10  # kept, not lost
            filler.unlink()
            assert await outbox.spill(offline=True) == 10
            assert db.disk_full_since is None
            assert sum(g.records for g in await outbox.segments_after(0, 100)) == 10

        run(disk, body)


def test_a_checkpoint_kept_for_the_spill_is_written_at_a_clean_stop_or_when_the_link_returns(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "fleetgate.db"

    async def stop_offline(db: Database, outbox: Outbox, _skipped: Any) -> None:
        await spill_offline(outbox, [reading(0)])
        await StateStore(db, outbox).checkpoint("trip", {"id": "stop"})
        await outbox.spill(everything=True)  # what Core.stop does

    run(tmp_path, stop_offline)
    assert json.loads(state_table(db_path)["trip"]) == {"id": "stop"}

    async def back_online(db: Database, outbox: Outbox, _skipped: Any) -> None:
        await spill_offline(outbox, [reading(1)])
        await StateStore(db, outbox).checkpoint("trip", {"id": "online"})
        assert json.loads(state_table(db_path)["trip"]) == {"id": "stop"}  # kept for the spill
        await outbox.spill(offline=False)  # the spiller's next turn, the link back
        assert json.loads(state_table(db_path)["trip"]) == {"id": "online"}

    run(tmp_path, back_online)
