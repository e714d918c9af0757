"""The SQLite store: migrations, outbox order, sequences, acknowledge, group commit, corrupt-file recovery."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from fleetgate.sync.store import Database, NewRecord, Outbox, Priority, Stamp, StoreError
from fleetgate.sync.store.migrations import MIGRATIONS, migrate, schema_version

STAMP = Stamp(wall_ns=1_700_000_000_000_000_000, mono_ns=5_000_000_000, trusted=True)


def rec(stream: str, n: int, priority: Priority = Priority.TELEMETRY) -> NewRecord:
    return NewRecord.json(stream, priority, STAMP, {"n": n})


async def open_outbox(path: Path, **kwargs) -> tuple[Database, Outbox]:
    db = await Database.open(path)
    return db, Outbox(db, boot_id="boot-a", **kwargs)


def test_fresh_database_is_migrated_to_latest(tmp_path):
    async def main():
        db = await Database.open(tmp_path / "s.db")
        await db.close()

    asyncio.run(main())
    conn = sqlite3.connect(tmp_path / "s.db")
    assert schema_version(conn) == len(MIGRATIONS)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"outbox", "streams", "boots", "state"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migrations_apply_in_order_and_only_once(tmp_path):
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    steps = [["CREATE TABLE a (x)"], ["ALTER TABLE a ADD COLUMN y"], ["CREATE TABLE b (z)"]]
    assert migrate(conn, steps[:1]) == [1]
    assert migrate(conn, steps) == [2, 3]
    assert migrate(conn, steps) == []
    assert [r[1] for r in conn.execute("PRAGMA table_info(a)")] == ["x", "y"]


def test_failed_migration_leaves_previous_version(tmp_path):
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    steps = [["CREATE TABLE a (x)"], ["CREATE TABLE b (y)", "THIS IS NOT SQL"]]
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, steps)
    assert schema_version(conn) == 1
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'b'").fetchone()[0] == 0


def test_database_from_newer_fleetgate_is_refused_not_replaced(tmp_path):
    path = tmp_path / "s.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE keep (x)")
    conn.execute("INSERT INTO keep VALUES (42)")
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this fleetgate"):
        asyncio.run(Database.open(path))
    assert sqlite3.connect(path).execute("SELECT x FROM keep").fetchone() == (42,)


def test_next_batch_is_by_priority_then_age(tmp_path):
    async def main():
        db, outbox = await open_outbox(tmp_path / "s.db")
        await outbox.append([rec("telemetry", 1), rec("events", 1, Priority.EVENT), rec("telemetry", 2)])
        await outbox.append([rec("audit", 1, Priority.AUDIT), rec("events", 2, Priority.EVENT)])
        batch = await outbox.next_batch(10)
        await db.close()
        return batch

    batch = asyncio.run(main())
    assert [(r.stream, r.seq) for r in batch] == [
        ("audit", 1),
        ("events", 1),
        ("events", 2),
        ("telemetry", 1),
        ("telemetry", 2),
    ]
    assert batch[0].payload == b'{"n":1}'
    assert batch[0].boot_id == "boot-a"
    assert batch[0].time_trusted is True
    assert batch[0].wall_ns == STAMP.wall_ns and batch[0].mono_ns == STAMP.mono_ns


def test_acknowledge_removes_exactly_the_given_records(tmp_path):
    async def main():
        db, outbox = await open_outbox(tmp_path / "s.db")
        await outbox.append([rec("t", n) for n in range(5)])
        first = await outbox.next_batch(2)
        removed = await outbox.acknowledge([r.id for r in first])
        again = await outbox.acknowledge([r.id for r in first])
        rest = await outbox.next_batch(10)
        depth = await outbox.depth()
        await db.close()
        return removed, again, rest, depth

    removed, again, rest, depth = asyncio.run(main())
    assert (removed, again) == (2, 0)
    assert [r.seq for r in rest] == [3, 4, 5]
    assert [(d.stream, d.depth, d.last_seq) for d in depth] == [("t", 3, 5)]


def test_sequence_is_never_reused_after_acknowledge_and_reopen(tmp_path):
    async def main():
        db, outbox = await open_outbox(tmp_path / "s.db")
        await outbox.append([rec("t", n) for n in range(3)])
        await outbox.acknowledge([r.id for r in await outbox.next_batch(10)])
        await db.close()
        db, outbox = await open_outbox(tmp_path / "s.db")
        appended = await outbox.append([rec("t", 9), rec("u", 1)])
        await db.close()
        return appended

    assert [(a.stream, a.seq) for a in asyncio.run(main())] == [("t", 4), ("u", 1)]


def test_concurrent_appends_share_commits(tmp_path):
    async def main():
        db, outbox = await open_outbox(tmp_path / "s.db")
        results = await asyncio.gather(*(outbox.append([rec("t", n)]) for n in range(200)))
        await db.close()
        return outbox.commits, results

    commits, results = asyncio.run(main())
    assert sorted(r[0].seq for r in results) == list(range(1, 201))
    assert commits < 200  # group commit: later appends rode along with earlier transactions


def test_failed_commit_burns_no_sequence_and_reports_the_error(tmp_path):
    """Guards against a failed transaction leaving the in-memory sequence ahead of the database."""

    async def main():
        db, outbox = await open_outbox(tmp_path / "s.db")
        await outbox.append([rec("t", 1)])
        await db.run(
            lambda c: c.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON outbox WHEN NEW.payload = CAST('{\"n\":666}' AS BLOB)"
                " BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
            )
        )
        with pytest.raises(sqlite3.IntegrityError, match="disk says no"):
            await outbox.append([rec("t", 2), rec("t", 666)])
        after = await outbox.append([rec("t", 3)])
        batch = await outbox.next_batch(10)
        await db.close()
        return after, batch

    after, batch = asyncio.run(main())
    assert after[0].seq == 2
    assert [(r.seq, r.payload) for r in batch] == [(1, b'{"n":1}'), (2, b'{"n":3}')]


def test_garbage_file_is_moved_aside_and_replaced(tmp_path):
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not a database at all" * 100)

    async def main():
        db = await Database.open(path)
        outbox = Outbox(db, boot_id="b")
        await outbox.append([rec("t", 1)])
        await db.close()
        return db.recovery

    recovery = asyncio.run(main())
    assert recovery is not None
    assert "not a database" in recovery.reason
    assert recovery.moved_to.parent == tmp_path / "corrupt"
    assert recovery.moved_to.read_bytes().startswith(b"this is not a database")
    assert sqlite3.connect(path).execute("SELECT count(*) FROM outbox").fetchone() == (1,)


def test_damaged_pages_are_detected_by_quick_check(tmp_path):
    path = tmp_path / "s.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE filler (x)")
    conn.executemany("INSERT INTO filler VALUES (?)", [(b"x" * 500,) for _ in range(200)])
    conn.commit()
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    for offset in range(2 * page, 3 * page, 7):  # scribble over an interior b-tree page
        data[offset] = 0xA5
    path.write_bytes(bytes(data))

    async def main():
        db = await Database.open(path)
        await db.close()
        return db.recovery

    recovery = asyncio.run(main())
    assert recovery is not None
    assert recovery.moved_to.exists()
    assert schema_version(sqlite3.connect(path)) == len(MIGRATIONS)


def test_sound_database_is_left_alone(tmp_path):
    async def main():
        db, outbox = await open_outbox(tmp_path / "s.db")
        await outbox.append([rec("t", 1)])
        await db.close()
        db2 = await Database.open(tmp_path / "s.db")
        await db2.close()
        return db2.recovery

    assert asyncio.run(main()) is None
    assert not (tmp_path / "corrupt").exists()
