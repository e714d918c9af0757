"""Store-and-forward with a real mosquitto: nothing is lost, whatever fails, and every record can be de-duplicated.

The consumer here is written from docs/mqtt.md alone: it inflates what is declared compressed, reads the
envelope, and keys every record by (device, stream, seq). The invariant checked after each test: for every
stream, the records delivered plus the records still in the outbox are exactly 1..last_seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sqlite3
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetgate.sync.mqtt.envelope import ZDICT, expand
from fleetgate.sync.store import Database, NewRecord, Outbox, Priority, Stamp
from fleetgate.sync.store.outbox import HOT_RESERVED_PREFIX
from fleetgate.sync.store.spool import Spool, spool_folder

from conftest import daemon_config, wait_until
from mosquitto_fixture import Mosquitto, TlsFiles, free_port
from mqtt_consumer import Consumer
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(180)

DEVICE = "test-0001"


def decode(topic: str, payload: bytes, props: dict[str, Any]) -> dict[str, Any]:
    """docs/mqtt.md: zlib when the user property content-encoding says so (with the compact envelope's preset
    dictionary, which reads the others too), then the JSON envelope."""
    if ("content-encoding", "zlib") in props.get("UserProperty", []):
        payload = zlib.decompressobj(zdict=ZDICT).decompress(payload)
    return json.loads(payload)


def delivered(messages: list) -> tuple[dict[str, set[int]], Counter]:
    """Record ids seen per stream, and how often each (stream, seq) arrived."""
    seen: dict[str, set[int]] = {}
    copies: Counter = Counter()
    for topic, payload, _qos, _retain, props in messages:
        if "/up/" not in topic:
            continue
        envelope = decode(topic, payload, props)
        assert envelope["v"] in (1, 2) and envelope["device"] == DEVICE
        assert topic.endswith(f"/up/{envelope['stream']}")
        for record in expand(envelope):
            seen.setdefault(envelope["stream"], set()).add(record["seq"])
            copies[(envelope["stream"], record["seq"])] += 1
    return seen, copies


def prefill(db: Path, telemetry: int = 0, events: int = 0) -> None:
    """Append `telemetry` telemetry records, then `events` event records, to a stopped daemon's outbox."""

    async def write() -> None:
        database = await Database.open(db, "normal")
        try:
            outbox = Outbox(database, boot_id="prefill-boot")
            stamp = Stamp(time.time_ns(), time.monotonic_ns(), True)
            for start in range(0, telemetry, 5000):
                await outbox.append(
                    [
                        NewRecord(
                            "telemetry",
                            Priority.TELEMETRY,
                            stamp,
                            b'{"signal":"rpm","value":%d,"unit":"rpm"}' % i,
                        )
                        for i in range(start, min(start + 5000, telemetry))
                    ]
                )
            if events:
                await outbox.append(
                    [
                        NewRecord.json("events", Priority.EVENT, stamp, {"event": "prefilled", "n": i})
                        for i in range(events)
                    ]
                )
        finally:
            await database.close()

    db.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(write())


def held_records(db: Path) -> tuple[dict[str, int], Counter, Counter]:
    """Last seq per stream, and how often each (stream, seq) is held: as a row, and inside a sealed segment
    (the messages the packer built while offline, read back from their bytes)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        last = dict(conn.execute("SELECT name, last_seq FROM streams"))
        rows = Counter(
            conn.execute("SELECT s.name, o.seq FROM outbox o JOIN streams s ON s.id = o.stream_id")
        )
        sealed: Counter = Counter()
        held = [
            (name, bool(compressed), payload)
            for name, compressed, payload in conn.execute(
                "SELECT s.name, g.compressed, g.payload FROM segments g JOIN streams s ON s.id = g.stream_id"
            )
        ]
        state = dict(conn.execute("SELECT key, value FROM state"))
    finally:
        conn.close()
    # The spool (sync/store/spool.py): what a start would read back, and its numbers count as handed out.
    spool = Spool(spool_folder(db))
    spool.load({k: v for k, v in state.items() if k.startswith("outbox.spool-")})
    held += [(m.stream, m.compressed, payload) for m, payload in spool.after(0, 1 << 30)]
    for name, compressed, payload in held:
        envelope = json.loads(zlib.decompress(payload) if compressed else payload)
        assert envelope["stream"] == name and envelope["device"] == DEVICE
        seqs = [r["seq"] for r in expand(envelope)]
        sealed.update((name, seq) for seq in seqs)
        last[name] = max([last.get(name, 0), *seqs])
    for key, value in state.items():  # a clean stop gives back the numbers reserved beyond the last used
        if key.startswith(HOT_RESERVED_PREFIX):
            name = key[len(HOT_RESERVED_PREFIX) :]
            last[name] = max(last.get(name, 0), int(json.loads(value)))
    return last, rows, sealed


def skipped_seqs(db: Path) -> dict[str, set[int]]:
    """The seqs each stream's records-skipped events (in the events stream, still on the gateway) give up."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        payloads = conn.execute(
            "SELECT o.payload FROM outbox o JOIN streams s ON s.id = o.stream_id WHERE s.name = 'events'"
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, set[int]] = {}
    for (payload,) in payloads:
        event = json.loads(payload)
        if event["event"] == "records-skipped":
            out.setdefault(event["stream"], set()).update(range(event["first_seq"], event["last_seq"] + 1))
    return out


def outbox_state(db: Path) -> tuple[dict[str, int], dict[str, set[int]]]:
    """Last seq per stream, and the seqs still held (rows or sealed segments)."""
    last, rows, sealed = held_records(db)
    left: dict[str, set[int]] = {}
    for stream, seq in [*rows, *sealed]:
        left.setdefault(stream, set()).add(seq)
    return last, left


def announced_skips(db: Path, messages: list) -> dict[str, set[int]]:
    """Seqs given up by records-skipped events (live records in memory at a kill -9), delivered or still held."""
    skipped = skipped_seqs(db)
    for topic, payload, _qos, _retain, props in messages:
        if topic.endswith("/up/events"):
            for record in expand(decode(topic, payload, props)):
                event = record["data"]
                if event["event"] == "records-skipped":
                    skipped.setdefault(event["stream"], set()).update(
                        range(event["first_seq"], event["last_seq"] + 1)
                    )
    return skipped


def assert_nothing_lost(db: Path, messages: list) -> Counter:
    """Every seq delivered or still held, but those an unclean stop announced as skipped (docs/mqtt.md)."""
    last, left = outbox_state(db)
    seen, copies = delivered(messages)
    skipped = announced_skips(db, messages)
    for stream, last_seq in last.items():
        have = seen.get(stream, set()) | left.get(stream, set()) | skipped.get(stream, set())
        missing = set(range(1, last_seq + 1)) - have
        assert not missing, (
            f"{stream}: {len(missing)} records neither delivered nor in the outbox, e.g. {sorted(missing)[:5]}"
        )
    return copies


def uplink_config(
    tmp_path: Path,
    port: int,
    *,
    tls: TlsFiles | None = None,
    cert: str = "client",
    trust: str = "ca",
    heartbeat_s: float = 0.005,
    max_message_bytes: int = 16384,
    backoff_s: tuple[float, float] = (0.2, 1.0),
    mqtt_extra: str = "",
) -> Path:
    """MQTT to 127.0.0.1:`port`, a dead link noticed within seconds (keepalive and publish timeout 5 s).

    With `tls`: the client certificate `cert` ("client": signed by the broker's CA; "rogue": same CN, another
    CA) and the trusted CA `trust` ("ca": the broker's; "rogue": another one)."""
    tls_lines = "tls = false\n"
    if tls is not None:
        tls_lines = (
            "tls = true\n\n[mqtt.tls_files]\n"
            f'ca_file = "{tls.ca if trust == "ca" else tls.rogue_ca}"\n'
            f'cert_file = "{getattr(tls, f"{cert}_cert")}"\n'
            f'key_file = "{getattr(tls, f"{cert}_key")}"\n'
        )
    return daemon_config(
        tmp_path,
        f"""
[supervisor]
backoff_initial_s = {backoff_s[0]}
backoff_max_s = {backoff_s[1]}

[mqtt]
enabled = true
host = "127.0.0.1"
port = {port}
keepalive_s = 5
connect_timeout_s = 2
publish_timeout_s = 5
max_message_bytes = {max_message_bytes}
{mqtt_extra}
{tls_lines}""",
        heartbeat_s=heartbeat_s,
    )


@contextlib.contextmanager
def broker_comes_up(
    port: int,
    tls: TlsFiles | None = None,
    topics: str = f"fleetgate/v1/{DEVICE}/#",
    session_expiry_s: int | None = None,
) -> Iterator:
    """A broker, and a consumer already subscribed, before the daemon (configured for `port`) can reach it.

    Starting the broker on `port` itself would race: the retrying daemon may publish before the consumer
    has subscribed, and those messages would look lost. So the broker listens on a port of its own and a
    proxy opens `port` only once the consumer listens. Yields (broker, consumer, proxy)."""
    with (
        Mosquitto(tls=tls) as broker,
        Consumer("127.0.0.1", broker.port, topics, tls=tls, session_expiry_s=session_expiry_s) as consumer,
    ):
        proxy = TcpProxy("127.0.0.1", broker.port, port=port).start()
        try:
            yield broker, consumer, proxy
        finally:
            proxy.stop()


def status(daemon) -> dict[str, Any]:
    result = daemon.cli("status", "--json")
    assert result.returncode in (0, 4), result.stderr
    return json.loads(result.stdout)


def test_a_backlog_built_offline_drains_when_the_broker_comes_up(tmp_path, start_daemon):
    port = free_port()
    db = tmp_path / "state" / "fleetgate.db"
    prefill(db, telemetry=3000)  # an earlier boot's backlog, trusted time: the packer seals it offline
    daemon = start_daemon(uplink_config(tmp_path, port))
    daemon.wait_ready()
    wait_until("a backlog", lambda: status(daemon)["outbox"]["total"] > 4500)
    wait_until("part of it sealed by the packer", lambda: status(daemon)["outbox"]["packed"] > 0)
    offline = status(daemon)
    assert offline["uplink"]["online"] is False
    assert offline["outbox"]["packer"]["records"] >= offline["outbox"]["packed"] > 0
    text = daemon.cli("status").stdout
    assert re.search(r"outbox: \d+ records waiting \(\d+ packed into messages while offline\)", text), text
    uplink = next(c for c in offline["components"] if c["name"] == "uplink")
    assert uplink["restarts"] >= 1 and "uplink" in json.dumps(offline)

    with broker_comes_up(port) as (broker, consumer, _proxy):
        backlog_end = status(daemon)["outbox"]["streams"][0]["last_seq"]

        def caught_up() -> bool:
            seen, _ = delivered(consumer.messages)
            return set(range(1, backlog_end + 1)) <= seen.get("heartbeat", set())

        wait_until("the backlog to be delivered", caught_up, timeout=90)
        online = status(daemon)["uplink"]
        assert online["online"] is True and online["last_publish"] and online["records_sent"] >= backlog_end
        with Consumer("127.0.0.1", broker.port, f"fleetgate/v1/{DEVICE}/health") as late:
            [(_t, body, _q, retained, _p)] = wait_until("the retained health message", lambda: late.messages)
        health = json.loads(body)
        assert retained and health["online"] is True and "backlog" in health and "drain_rate_per_s" in health
        daemon.terminate()
        # A clean stop sends no Last Will (the DISCONNECT is normal): the daemon says offline itself.
        with Consumer("127.0.0.1", broker.port, f"fleetgate/v1/{DEVICE}/health") as late:
            [(_t, body, _q, retained, _p)] = wait_until("the retained health message", lambda: late.messages)
        assert retained and json.loads(body) == {"online": False}
        copies = assert_nothing_lost(db, consumer.messages)
    assert max(copies.values()) == 1  # no duplicate without a failure to cause one


def test_sync_now_connects_at_once_instead_of_waiting_out_the_backoff(tmp_path, start_daemon):
    """A technician at the depot's Wi-Fi: `fleetgate sync now` must not wait for the uplink's next retry."""
    port = free_port()
    daemon = start_daemon(uplink_config(tmp_path, port, heartbeat_s=1.0, backoff_s=(60.0, 60.0)))
    daemon.wait_ready()

    def uplink_waiting() -> dict[str, Any] | None:
        component = next(c for c in status(daemon)["components"] if c["name"] == "uplink")
        return component if component["state"] == "backoff" else None

    retry_in = wait_until("the uplink to back off", uplink_waiting)["retry_in_s"]
    assert retry_in > 20  # the first delay is 30-60 s
    with broker_comes_up(port) as (_broker, consumer, _proxy):
        result = daemon.cli("sync", "now")
        assert result.returncode == 0 and "reconnecting" in result.stdout, result.stdout + result.stderr
        # Well before the retry it was waiting for (a connect takes milliseconds).
        wait_until("online", lambda: status(daemon)["uplink"]["online"], timeout=retry_in - 10)
        wait_until("the backlog delivered", lambda: delivered(consumer.messages)[0].get("heartbeat"))
        again = daemon.cli("sync", "now")
        assert again.returncode == 0 and again.stdout.strip() == "drain woken"


def test_kill_9_mid_drain_loses_nothing(tmp_path, start_daemon):
    """Guards against deleting a record before the broker acknowledged it (or never sending it)."""
    port = free_port()
    db = tmp_path / "state" / "fleetgate.db"
    config = uplink_config(tmp_path, port)
    daemon = start_daemon(config)
    daemon.wait_ready()
    wait_until("a backlog", lambda: status(daemon)["outbox"]["total"] > 3000)
    with broker_comes_up(port) as (_broker, consumer, _proxy):
        for _ in range(3):
            wait_until("some deliveries", lambda: len(consumer.messages) > 3)
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(10)
            daemon = start_daemon(config)
            daemon.wait_ready()
            assert "store corrupt" not in daemon.log, daemon.log[-2000:]  # a kill -9 is not damage
        wait_until("a caught-up outbox", lambda: status(daemon)["outbox"]["total"] < 200, timeout=90)
        daemon.terminate()
        time.sleep(0.5)  # let the consumer take the last PUBLISHes off the socket
        assert_nothing_lost(db, consumer.messages)


def test_kill_9_while_the_packer_seals_offline_loses_and_duplicates_nothing(tmp_path, start_daemon):
    """Guards against a seal that deletes its rows without keeping their segment, or keeps both: after
    every crash each record is held exactly once, as a row or inside a segment."""
    db = tmp_path / "state" / "fleetgate.db"
    prefill(db, telemetry=30_000)  # an earlier boot's: thousands of small segments to seal, one at a time
    config = uplink_config(tmp_path, free_port(), max_message_bytes=2048)  # no broker: offline throughout
    daemon = start_daemon(config)
    daemon.wait_ready()
    for _ in range(3):
        before = status(daemon)["outbox"]["packed"]

        def sealed_more(daemon=daemon, before=before) -> bool:
            return status(daemon)["outbox"]["packed"] > before

        wait_until("the packer to seal more", sealed_more)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        daemon = start_daemon(config)
        daemon.wait_ready()
        assert "store corrupt" not in daemon.log, daemon.log[-2000:]  # a kill -9 is not damage
    daemon.terminate()
    last, rows, sealed = held_records(db)
    assert sum(sealed.values()) > 0
    held = rows + sealed
    skipped = skipped_seqs(db)  # live heartbeats in memory at each kill: announced as records-skipped
    assert skipped.get("heartbeat")
    for stream, last_seq in last.items():
        seqs = {seq for (name, seq) in held if name == stream}
        missing = set(range(1, last_seq + 1)) - seqs - skipped.get(stream, set())
        assert not missing, f"{stream}: {len(missing)} records lost, e.g. {sorted(missing)[:5]}"
    twice = [key for key, n in held.items() if n > 1]
    assert not twice, f"{len(twice)} records held twice, e.g. {twice[:5]}"


def test_broker_stopped_mid_drain_and_restarted_loses_nothing(tmp_path, start_daemon):
    """The broker goes away with messages in flight; they are sent again once it is back.

    (A broker killed with SIGKILL may lose what it had already acknowledged: that is the broker's durability,
    not the gateway's, so the broker is stopped here, not killed. And the consumer keeps its session, as
    docs/mqtt.md tells consumers to: what the broker acknowledged and had not yet forwarded when it stopped
    is the consumer's once it resumes, not lost.)"""
    port = free_port()
    db = tmp_path / "state" / "fleetgate.db"
    daemon = start_daemon(uplink_config(tmp_path, port))
    daemon.wait_ready()
    wait_until("a backlog", lambda: status(daemon)["outbox"]["total"] > 3000)
    with broker_comes_up(port, session_expiry_s=3600) as (broker, consumer, proxy):
        wait_until("some deliveries", lambda: len(consumer.messages) > 3)
        broker.stop()
        wait_until("the daemon to notice", lambda: status(daemon)["uplink"]["online"] is False, timeout=30)
        consumer.stop()  # before the restart: paho would reconnect with a clean start and drop the session
        first_part = list(consumer.messages)
        proxy.cut("reset")  # the daemon stays out until the new consumer listens (see broker_comes_up)
        broker.restart()
        with Consumer(
            "127.0.0.1", broker.port, f"fleetgate/v1/{DEVICE}/#",
            client_id=consumer.client_id, session_expiry_s=3600,
        ) as again:  # fmt: skip
            proxy.restore()
            wait_until("online again", lambda: status(daemon)["uplink"]["online"], timeout=30)
            wait_until("a caught-up outbox", lambda: status(daemon)["outbox"]["total"] < 200, timeout=90)
            daemon.terminate()
            time.sleep(0.5)
            assert_nothing_lost(db, first_part + again.messages)
