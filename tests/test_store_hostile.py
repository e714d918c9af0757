"""The store against tampered files and a full disk (issue 11, findings 7, 8, 10).

``PRAGMA quick_check`` passes a database whose tables were dropped or whose values were pushed to impossible
ones; those must be treated like corruption (moved aside, a fresh store, reported). A newer fleetgate's database
is refused with EX_CONFIG so systemd stops restarting. Trouble with the machine (a full disk, a path that cannot
be opened) is never mistaken for corruption: nothing is moved, and a full disk shows as an alert while the
daemon goes on and keeps everything it committed.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetgate.sync.store.database import StoreError, StoreTooNewError, open_connection
from fleetgate.sync.store.integrity import MAX_SEQ

from conftest import daemon_config, wait_until
from small_disk import fill, small_tmpfs


def fresh_db(path: Path, records: int = 3) -> None:
    """A database as the store leaves it, with ``records`` heartbeat rows."""
    conn, recovery = open_connection(path)
    assert recovery is None
    conn.execute("INSERT INTO boots(boot_id) VALUES ('b')")
    conn.execute("INSERT INTO streams(name, last_seq) VALUES ('heartbeat', ?)", (records,))
    for seq in range(1, records + 1):
        conn.execute(
            "INSERT INTO outbox(stream_id, seq, priority, wall_ns, mono_ns, boot, time_trusted, payload)"
            " VALUES (1, ?, 1, 1, 1, 1, 0, x'7b7d')",
            (seq,),
        )
    conn.close()


def tamper(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in statements:
        conn.execute(statement)
    conn.close()


TAMPERING: dict[str, tuple[list[str], str]] = {
    "dropped outbox": (
        ["DROP TABLE outbox"],
        "missing: index outbox_drain, index outbox_stream, table outbox",
    ),
    "dropped index": (["DROP INDEX outbox_drain"], "missing: index outbox_drain"),
    "extra table": (["CREATE TABLE intruder (x)"], "unexpected: table intruder"),
    "column changed": (
        [
            "CREATE TABLE s2 (id INTEGER PRIMARY KEY, name TEXT, last_seq INTEGER, bytes INTEGER, evicted TEXT)",
            "INSERT INTO s2 SELECT * FROM streams",
            "PRAGMA foreign_keys=OFF",
            "DROP TABLE streams",
            "ALTER TABLE s2 RENAME TO streams",
        ],
        "changed: table streams",
    ),
    "empty meta": (["DELETE FROM meta"], "meta.store_id is missing"),
    "last_seq at int64 max": (["UPDATE streams SET last_seq = 9223372036854775807"], "outside 0..2^53-1"),
    "last_seq negative": (["UPDATE streams SET last_seq = -5"], "outside 0..2^53-1"),
    "last_seq behind its records": (["UPDATE streams SET last_seq = 1"], "seqs would repeat"),
    "migration that cannot apply": (["PRAGMA user_version = 2"], "duplicate column name"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampering_quick_check_misses_is_treated_like_corruption(tmp_path, case):
    """Guards against a store that opens a database it will then fail on at every append or every start."""
    statements, reason = TAMPERING[case]
    db = tmp_path / "fleetgate.db"
    fresh_db(db)
    tamper(db, *statements)
    conn, recovery = open_connection(db)
    assert recovery is not None and reason in recovery.reason, recovery
    assert recovery.moved_to.parent == tmp_path / "corrupt" and recovery.moved_to.exists()
    # the fresh store works: a stream can be appended to from seq 1
    assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
    assert conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
    conn.close()


def test_an_untouched_database_passes_every_check(tmp_path):
    db = tmp_path / "fleetgate.db"
    fresh_db(db, records=5)
    assert MAX_SEQ == 9007199254740991
    tamper(db, "UPDATE streams SET last_seq = 9007199254740991")  # the largest legal value
    conn, recovery = open_connection(db)
    assert recovery is None
    assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (5,)
    conn.close()


def test_a_path_that_cannot_be_opened_is_an_error_not_corruption(tmp_path):
    """Guards against moving a database aside (out of the uplink's reach) for a fault of the machine's."""
    db = tmp_path / "fleetgate.db"
    db.mkdir()  # SQLITE_CANTOPEN, as an unreadable file or a missing mount would give
    with pytest.raises(sqlite3.OperationalError):
        open_connection(db)
    assert db.is_dir() and not (tmp_path / "corrupt").exists()


def test_a_newer_database_is_refused_untouched(tmp_path):
    db = tmp_path / "fleetgate.db"
    fresh_db(db)
    tamper(db, "PRAGMA user_version = 99")
    before = db.read_bytes()
    with pytest.raises(StoreTooNewError, match="newer than this fleetgate") as caught:
        open_connection(db)
    assert isinstance(caught.value, StoreError)
    assert db.read_bytes() == before


def status_json(daemon) -> dict:
    result = daemon.cli("status", "--json")
    assert result.returncode in (0, 4), result.stderr + daemon.log[-2000:]
    return json.loads(result.stdout)


def test_run_exits_78_on_a_newer_database(tmp_path, start_daemon):
    """Guards against a restart loop: exit 1 made systemd start the daemon again and again on the same file."""
    (tmp_path / "state").mkdir()
    fresh_db(tmp_path / "state" / "fleetgate.db")
    tamper(tmp_path / "state" / "fleetgate.db", "PRAGMA user_version = 99")
    daemon = start_daemon(daemon_config(tmp_path))
    assert daemon.proc.wait(20) == 78
    assert "newer than this fleetgate" in daemon.log and "Traceback" not in daemon.log


@pytest.mark.parametrize(
    "statement",
    ["DROP TABLE outbox", "UPDATE streams SET last_seq = 9223372036854775807 WHERE name = 'heartbeat'"],
)
def test_the_daemon_recovers_from_a_tampered_database_and_appends(tmp_path, start_daemon, statement):
    """Guards against a daemon that stayed up with status never answering (outbox dropped) or a heartbeat
    in a restart loop (last_seq at int64 max)."""
    config = daemon_config(tmp_path, heartbeat_s=0.05)
    daemon = start_daemon(config)
    daemon.wait_ready()
    wait_until("heartbeats", lambda: streams_of(status_json(daemon))["heartbeat"]["last_seq"] >= 2)
    assert daemon.terminate() == 0
    tamper(tmp_path / "state" / "fleetgate.db", statement)

    daemon = start_daemon(config)
    daemon.wait_ready()
    status = status_json(daemon)
    assert status["store"]["recovered"] is not None
    wait_until("heartbeats again", lambda: streams_of(status_json(daemon))["heartbeat"]["last_seq"] >= 3)
    components = {c["name"]: c for c in status_json(daemon)["components"]}
    assert components["heartbeat"]["restarts"] == 0
    assert daemon.terminate() == 0
    assert "Traceback" not in daemon.log


def streams_of(status: dict) -> dict[str, dict]:
    return {s["stream"]: s for s in status["outbox"]["streams"]}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "disk", "16m") as mount:
        yield mount


def test_a_full_disk_is_an_alert_and_loses_nothing_committed(tmp_path, small_disk, start_daemon):
    """Guards against a full disk showing only as components' last errors, and against losing records."""
    config = daemon_config(tmp_path, heartbeat_s=0.05)
    config.write_text(config.read_text().replace(str(tmp_path / "state"), str(small_disk / "state")))
    daemon = start_daemon(config)
    daemon.wait_ready()
    wait_until("heartbeats", lambda: streams_of(status_json(daemon))["heartbeat"]["last_seq"] >= 3)
    filler = fill(small_disk)

    def alerted() -> dict | None:
        status = status_json(daemon)
        return status if any(a.startswith("disk-full") for a in status["alerts"]) else None

    status = wait_until("disk-full alert", alerted)
    committed = streams_of(status)["heartbeat"]["last_seq"]
    assert status["store"]["disk_full_since"] is not None and status["store"]["disk_full_errors"] >= 1
    assert "disk-full" in daemon.cli("status").stdout

    filler.unlink()
    wait_until("alert cleared", lambda: not alerted())
    wait_until(
        "appending again", lambda: streams_of(status_json(daemon))["heartbeat"]["last_seq"] > committed
    )
    assert daemon.terminate() == 0
    conn = sqlite3.connect(small_disk / "state" / "fleetgate.db")
    seqs = [
        r[0]
        for r in conn.execute(
            "SELECT seq FROM outbox o JOIN streams s ON s.id = o.stream_id WHERE s.name = 'heartbeat' ORDER BY seq"
        )
    ]
    conn.close()
    assert seqs[:committed] == list(range(1, committed + 1)), (
        "a record committed before the disk filled is gone"
    )
    assert seqs == list(range(1, len(seqs) + 1))


def crash_copy(tmp_path: Path, transactions: int = 40, open_tail: bool = False) -> Path:
    """The database and WAL as a crash leaves them: ``transactions`` committed heartbeat rows not yet
    checkpointed (and, with ``open_tail``, a big transaction in progress whose pages spilled into the WAL)."""
    live = tmp_path / "live" / "fleetgate.db"
    live.parent.mkdir()
    fresh_db(live, records=0)
    conn = sqlite3.connect(live, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # a new WAL generation holding only what follows
    for seq in range(1, transactions + 1):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO outbox(stream_id, seq, priority, wall_ns, mono_ns, boot, time_trusted, payload)"
            " VALUES (1, ?, 1, 1, 1, 1, 0, randomblob(3000))",
            (seq,),
        )
        conn.execute("UPDATE streams SET last_seq = ?", (seq,))
        conn.execute("COMMIT")
    if open_tail:
        conn.execute("PRAGMA cache_size=2")  # the transaction's pages go to the WAL before any commit
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO state(key, value, updated_wall_ns) VALUES ('x', randomblob(200000), 1)")
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-wal"):
        (crashed / f"fleetgate.db{suffix}").write_bytes(live.with_name(live.name + suffix).read_bytes())
    conn.close()
    return crashed / "fleetgate.db"


def rows(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
    finally:
        conn.close()


def test_a_crash_leaves_a_wal_that_replays_in_full_and_says_nothing(tmp_path):
    db = crash_copy(tmp_path)
    conn, recovery = open_connection(db)
    conn.close()
    assert recovery is None and rows(db) == 40


def test_a_transaction_a_crash_cut_short_is_not_reported_as_damage(tmp_path):
    db = crash_copy(tmp_path, open_tail=True)
    assert db.with_name("fleetgate.db-wal").stat().st_size > 200_000  # the open transaction's pages are there
    conn, recovery = open_connection(db)
    conn.close()
    assert recovery is None and rows(db) == 40


def damage(wal: Path, at: int, data: bytes) -> bytes:
    content = bytearray(wal.read_bytes())
    content[at : at + len(data)] = data
    wal.write_bytes(bytes(content))
    return bytes(content)


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("header", "WAL header damaged"),
        ("middle frame", "committed transactions after it not replayed"),
        ("cut mid-frame", "WAL ends in a partial frame"),
    ],
)
def test_wal_damage_is_reported_with_what_was_kept(tmp_path, where, reason):
    """Guards against SQLite silently dropping committed transactions from a damaged WAL."""
    db = crash_copy(tmp_path)
    wal = db.with_name("fleetgate.db-wal")
    frame = 24 + 4096
    if where == "header":
        damaged = damage(wal, 0, b"\xde\xad\xbe\xef" * 2)
    elif where == "middle frame":
        damaged = damage(wal, 32 + 10 * frame + 24 + 100, b"\xff\x00\xff")
    else:
        damaged = wal.read_bytes()[: 32 + 30 * frame + 1000]
        wal.write_bytes(damaged)
    conn, recovery = open_connection(db)
    conn.close()
    assert recovery is not None and reason in recovery.reason, recovery
    assert "kept: the database with every transaction before the damage" in recovery.reason
    assert recovery.moved_to.read_bytes() == damaged  # the evidence, as found
    assert rows(db) < 40


def test_an_empty_database_file_is_reported_not_taken_for_a_new_one(tmp_path):
    db = tmp_path / "fleetgate.db"
    fresh_db(db)
    db.write_bytes(b"")
    conn, recovery = open_connection(db)
    conn.close()
    assert recovery is not None and "database file is empty" in recovery.reason
