#!/usr/bin/env python3
"""Benchmark: readings per second the sampler path makes durable in the outbox.

The path measured is the daemon's own: ReadingSink.add() stamps and encodes each reading, the sink hands
batches to Outbox.append(), whose group commit writes them on the store thread with the durability the
daemon really uses (WAL, synchronous=FULL by default). The clock stops when the last append has committed.

In the same run it measures this machine's ceiling: plain sqlite3 ``executemany`` of the same rows into the
same table, in 1,000-row transactions, same durability. Last line of output: one JSON object.

    python tools/bench/ingest.py [--readings N] [--synchronous full|normal]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.readings import ReadingSink
from fleetgate.sync.store import Database, Outbox

SIGNALS = [("vehicle_speed", 42.5), ("rpm", 1830.0), ("engine_load", 31.37), ("coolant_temp", 88.0)]


async def sampler_path(path: Path, n: int, synchronous: str) -> float:
    db = await Database.open(path, synchronous)
    outbox = Outbox(db, max_batch=5000)
    sink = ReadingSink(outbox, Clock(), flush_interval_s=0.05, max_pending=5000)
    flusher = asyncio.create_task(sink.run())
    count = len(SIGNALS)
    start = time.perf_counter()
    for i in range(n):
        signal, value = SIGNALS[i % count]
        sink.add(signal, value + i % 7)
        if i % 1000 == 999:
            await sink.wait_for_room()  # what the samplers do: backpressure keeps memory bounded
            await asyncio.sleep(0)
    await sink.flush()
    await outbox.drain_pending()
    elapsed = time.perf_counter() - start
    flusher.cancel()
    await asyncio.gather(flusher, return_exceptions=True)
    committed = sink.committed
    await db.close()
    if committed != n:
        raise SystemExit(f"only {committed} of {n} readings committed")
    return elapsed


def ceiling(path: Path, n: int, synchronous: str) -> float:
    """The same rows, the same table, plain executemany in 1,000-row transactions."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY, stream_id INTEGER NOT NULL, seq INTEGER NOT NULL,"
        " priority INTEGER NOT NULL, wall_ns INTEGER NOT NULL, mono_ns INTEGER NOT NULL, boot INTEGER NOT NULL,"
        " time_trusted INTEGER NOT NULL, payload BLOB NOT NULL, time_corrected INTEGER NOT NULL DEFAULT 0)"
    )
    conn.execute("CREATE INDEX outbox_drain ON outbox(priority, id)")
    conn.execute("CREATE INDEX outbox_stream ON outbox(stream_id, id)")
    rows = [
        (1, i + 1, 2, time.time_ns(), time.monotonic_ns(), 1, 0,
         json.dumps({"signal": s, "value": v + i % 7, "unit": "x"}, separators=(",", ":")).encode())
        for i, (s, v) in enumerate(SIGNALS[i % len(SIGNALS)] for i in range(n))
    ]  # fmt: skip
    start = time.perf_counter()
    for lo in range(0, n, 1000):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO outbox(stream_id, seq, priority, wall_ns, mono_ns, boot, time_trusted, payload)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows[lo : lo + 1000],
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readings", type=int, default=500_000, help="readings to ingest (default 500000)")
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full", help="SQLite durability")
    args = parser.parse_args()
    if args.readings < 1000:
        parser.error("--readings must be at least 1000")
    with tempfile.TemporaryDirectory(prefix="fleetgate-bench-") as tmp:
        path_s = sampler_path(Path(tmp) / "sampler.db", args.readings, args.synchronous)
        sampler_s = asyncio.run(path_s)
        sampler_rss_mb = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )  # before the ceiling's rows
        ceiling_s = ceiling(Path(tmp) / "ceiling.db", args.readings, args.synchronous)
    readings_per_s = args.readings / sampler_s
    ceiling_per_s = args.readings / ceiling_s
    print(f"sampler path: {args.readings} readings in {sampler_s:.2f} s", file=sys.stderr)
    print(f"ceiling (executemany, 1000-row transactions): {ceiling_s:.2f} s", file=sys.stderr)
    print(
        json.dumps(
            {
                "readings_per_s": round(readings_per_s),
                "ceiling_per_s": round(ceiling_per_s),
                "ratio": round(readings_per_s / ceiling_per_s, 3),
                "readings": args.readings,
                "synchronous": args.synchronous,
                "sampler_peak_rss_mb": round(sampler_rss_mb, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
