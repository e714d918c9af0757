"""The command runner's routing and its persistent queue, against the real HTTPS server playing Segway
(segway_server.py) and a real outbox: what is queued and for how long, the queue entry written and deleted in
the commits of the command's records, expiry on a trusted clock only, and the key rotation after a rental.
The BLE half is tested through the daemon (test_depot_ble.py) and the manager (test_ble_manager.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_segway_client import tls

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.scooters.commands import ROTATE_KEY, CommandRunner, DeferPolicy, Request, RetryPolicy
from fleetgate.daemon.scooters.dispatch import as_request
from fleetgate.daemon.scooters.key_store import KeyStore
from fleetgate.daemon.scooters.pending import PREFIX, Pending, PendingQueue
from fleetgate.daemon.scooters.yard import Scooter, Yard
from fleetgate.sync.crypto.device_keys import at_rest_box
from fleetgate.sync.segway.client import SegwayClient
from fleetgate.sync.store import Database, Outbox, StateStore

from mosquitto_fixture import TlsFiles
from segway_server import SegwayServer

IOT = "861477038719116"
KEY = "abcd1234"
__all__ = ["tls"]  # the module-scoped throwaway PKI fixture, shared with test_segway_client
DEFER = DeferPolicy(defer_s=600.0, secure_defer_s=3600.0, rotate_key_after_rental=True)


@pytest.fixture
def segway(tls: TlsFiles) -> Iterator[SegwayServer]:
    with SegwayServer(tls) as server:
        server.add_scooter(IOT, key=KEY, online=False)
        yield server


class Rig:
    def __init__(self, db: Database, runner: CommandRunner, keys: KeyStore, clock: Clock) -> None:
        self.db = db
        self.runner = runner
        self.keys = keys
        self.clock = clock

    async def results(self) -> list[dict[str, Any]]:
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT o.payload FROM outbox o JOIN streams s ON s.id = o.stream_id"
                " WHERE s.name = 'scooter-results' ORDER BY o.seq"
            ).fetchall()
        )
        return [json.loads(r[0]) for r in rows]

    async def saved_queue(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in (await StateStore(self.db).items(PREFIX)).items()}


def run(
    tmp_path: Path,
    segway: SegwayServer,
    tls: TlsFiles,
    body: Callable[[Rig], Awaitable[None]],
    *,
    trusted: bool = True,
) -> None:
    async def main() -> None:
        db = await Database.open(tmp_path / "fleetgate.db")
        client = SegwayClient(segway.base_url, segway.client_id, segway.client_secret, ca_file=tls.ca)
        try:
            clock = Clock()
            clock.set_ntp(trusted)
            yard = Yard()
            yard.add(Scooter(IOT))
            keys = KeyStore(at_rest_box(bytes(range(32))))
            outbox = Outbox(db, boot_id="boot-1")
            runner = CommandRunner(
                client, yard, keys, outbox, clock, RetryPolicy(2, 0.01), pending=PendingQueue(), defer=DEFER
            )
            await body(Rig(db, runner, keys, clock))
        finally:
            await client.aclose()
            await db.close()

    asyncio.run(main())


def cli(op: str, **kw: Any) -> Request:
    return Request(IOT, op, kw.pop("params", {}), "cli", kw.pop("id", f"cli-{op}"), **kw)


def test_a_lock_no_channel_can_run_is_queued_then_done_and_the_entry_goes_with_its_outcome(
    tmp_path: Path, segway: SegwayServer, tls: TlsFiles
) -> None:
    async def body(rig: Rig) -> None:
        record = await rig.runner.run(cli("lock"))
        assert record["outcome"] == "deferred" and record["code"] == 15301
        assert record["route"] == [{"channel": "cloud", "result": 15301}]
        queued = (await rig.saved_queue())[PREFIX + "cli-lock"]
        assert queued["op"] == "lock" and queued["tries"] == 1
        # "lock as soon as possible": it may wait secure_defer_s
        assert queued["expires_wall_ns"] - queued["queued_wall_ns"] == 3600 * 10**9

        # Still offline: the retry (one try, the queue is the retry) updates the entry, audits nothing new.
        entry = rig.runner.pending.entries["cli-lock"]
        assert (await rig.runner.run(as_request(entry)))["outcome"] == "deferred"
        assert (await rig.saved_queue())[PREFIX + "cli-lock"]["tries"] == 2
        assert [r["outcome"] for r in await rig.results()] == ["deferred"]

        segway.add_scooter(IOT, key=KEY, online=True, locked=False)
        done = await rig.runner.run(as_request(entry))
        assert done["outcome"] == "done" and done["channel"] == "cloud" and done["id"] == "cli-lock"
        assert await rig.saved_queue() == {} and rig.runner.pending.entries == {}
        assert [r["outcome"] for r in await rig.results()] == ["deferred", "done"]
        assert segway.scooter(IOT)["status"]["locked"] is True

    run(tmp_path, segway, tls, body)


def test_what_may_wait_and_for_how_long(tmp_path: Path, segway: SegwayServer, tls: TlsFiles) -> None:
    async def body(rig: Rig) -> None:
        # A query: a late answer is of no use. A key setting: a key is never stored in the queue.
        segway.fail_next(15301, path="/query/current/status", count=5)
        status = await rig.runner.run(cli("status"))
        assert status["outcome"] == "failed" and status["retryable"] is True
        setting = await rig.runner.run(cli("bluetooth-key-setting", params={"key": "Zz99Yy88"}))
        assert setting["outcome"] == "failed" and setting["retryable"] is True
        assert setting["params"] == {"key": "(secret)"}
        # Any other command waits defer_s, or until its own expiry.
        unlock = await rig.runner.run(cli("unlock"))
        assert unlock["outcome"] == "deferred"
        soon = datetime.now(UTC) + timedelta(seconds=30)
        sound = await rig.runner.run(cli("sound", params={"controlType": 1}, expires=soon))
        assert sound["outcome"] == "deferred" and sound["expires"].startswith(soon.strftime("%Y-%m-%dT%H:%M"))
        saved = await rig.saved_queue()
        assert sorted(saved) == [PREFIX + "cli-sound", PREFIX + "cli-unlock"]
        unlock_entry = saved[PREFIX + "cli-unlock"]
        assert unlock_entry["expires_wall_ns"] - unlock_entry["queued_wall_ns"] == 600 * 10**9
        assert "Zz99Yy88" not in json.dumps(await rig.results()) + json.dumps(saved)

    run(tmp_path, segway, tls, body)


def test_a_queued_command_expires_on_a_trusted_clock_only(
    tmp_path: Path, segway: SegwayServer, tls: TlsFiles
) -> None:
    def past(runner: CommandRunner) -> Request:
        entry = replace(runner.pending.entries["cli-unlock"], expires_wall_ns=time.time_ns() - 10**9)
        runner.pending.entries[entry.id] = entry
        return as_request(entry)

    async def trusted(rig: Rig) -> None:
        assert (await rig.runner.run(cli("unlock")))["outcome"] == "deferred"
        expired = await rig.runner.run(past(rig.runner))
        assert expired["outcome"] == "expired" and expired["attempts"] == 0
        assert await rig.saved_queue() == {}
        assert [r["outcome"] for r in await rig.results()] == ["deferred", "expired"]

    run(tmp_path / "a", segway, tls, trusted)

    async def untrusted(rig: Rig) -> None:
        assert (await rig.runner.run(cli("unlock")))["outcome"] == "deferred"
        assert (await rig.runner.run(past(rig.runner)))["outcome"] == "deferred"  # no trusted clock: it waits
        assert list(await rig.saved_queue()) == [PREFIX + "cli-unlock"]

    (tmp_path / "b").mkdir()
    run(tmp_path / "b", segway, tls, untrusted, trusted=False)


def test_ending_a_rental_asks_for_a_key_rotation_which_sets_and_reads_back(
    tmp_path: Path, segway: SegwayServer, tls: TlsFiles
) -> None:
    async def body(rig: Rig) -> None:
        segway.add_scooter(IOT, key=KEY, online=True)
        asked: list[Request] = []
        rig.runner.followup = asked.append
        assert (await rig.runner.run(cli("end-rental")))["outcome"] == "done"
        (rotation,) = asked
        assert rotation.op == ROTATE_KEY and rotation.source == "rotation"

        record = await rig.runner.run(rotation)
        assert record["outcome"] == "done" and record["data"] == {"key_cached": True}
        new_key = segway.scooter(IOT)["key"]["key"]
        assert new_key != KEY and rig.keys.get(IOT) == new_key
        assert [step["result"] for step in record["route"]] == [0, 0]  # set, then read back
        assert new_key not in json.dumps(await rig.results())

        # Set, but not read back: the key set is kept, and the outcome says it was not confirmed.
        segway.fail_next(15302, path="/query/current/bluetooth-key", count=5)
        partial = await rig.runner.run(replace(rotation, id="rotate-2"))
        assert partial["outcome"] == "partial" and "read back" in partial["reason"]
        assert rig.keys.get(IOT) == segway.scooter(IOT)["key"]["key"] != new_key

        # The cloud cannot reach the scooter: the rotation waits like a lock.
        segway.add_scooter(IOT, key=KEY, online=False)
        assert (await rig.runner.run(replace(rotation, id="rotate-3")))["outcome"] == "deferred"
        assert PREFIX + "rotate-3" in await rig.saved_queue()

    run(tmp_path, segway, tls, body)


def test_saved_queue_entries_that_do_not_decode_are_dropped_and_named(tmp_path: Path) -> None:
    good = Pending("cmd-1", IOT, "lock", {}, "mqtt", "auto", 7, 1, 2)

    async def main() -> None:
        db = await Database.open(tmp_path / "q.db")
        try:
            state = StateStore(db)
            await state.put(good.key, good.to_state())
            await state.put(PREFIX + "cmd-2", {**good.to_state(), "id": "cmd-2", "tries": True})
            await state.put(PREFIX + "cmd-3", {**good.to_state(), "id": "other"})
            await state.put(PREFIX + "cmd-4", ["not", "an", "entry"])
            await state.put(PREFIX + "cmd-5", {**good.to_state(), "id": "cmd-5", "via": "carrier-pigeon"})
            await state.put("scooters.pendingX", {"unrelated": True})
            queue = PendingQueue()
            bad = await queue.load(state)
            assert sorted(bad) == [PREFIX + f"cmd-{i}" for i in (2, 3, 4, 5)]
            assert queue.entries == {"cmd-1": good} and queue.dropped == 4
        finally:
            await db.close()

    asyncio.run(main())
