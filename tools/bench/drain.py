#!/usr/bin/env python3
"""Benchmark: readings per second the daemon drains from an outbox backlog to a broker (QoS 1, acknowledged
and deleted), time to the first delivery, and the draining process's peak memory.

The path measured is the daemon's own: ``Drain`` + ``Uplink`` (aiomqtt, MQTT 5, PUBACK reason codes
checked) under the real ``Supervisor`` (restart backoff 0.05-0.1 s instead of the configured 1-60 s), with
the real health message (``StatusSource`` + the uplink feature's ``health``, which counts the backlog), the
outbox opened with the daemon's durability (``synchronous=full``), and acknowledged records deleted.

Three processes, so each figure belongs to one phase:

1. build (not timed): a fresh process writes a backlog of N readings of a simulated drive (the default OBD
   schedule plus 1 Hz GPS, stamped as taken: ~6.6 readings per simulated second) through ``ReadingSink``
   into a temporary database, then closes it (WAL checkpointed).
2. ceiling: a local mosquitto; the same records are packed into the very messages the drain sends
   (same payload bytes, count, sizes, topics and MQTT 5 properties) before the clock starts; then a plain
   aiomqtt client publishes them at QoS 1 with the same in-flight window and no store.
3. drain: a fresh process opens the backlog and starts the supervised uplink with no broker listening; once
   the uplink has failed to connect at least once, mosquitto is started. Timed from broker start to the
   outbox being empty (every record deleted). First delivery is the first PUBACK the drain counts
   (``Drain.stats``), measured from the moment the broker's port accepts connections: a PUBACK is what lets
   the device delete a record, and counting it costs nothing. A paho subscriber in the parent process
   (never in the draining one, so it takes no GIL time there) also notes when the first message reaches a
   consumer, then disconnects so it does not load the broker (mosquitto shares the 2 cores) for the rest.
   Peak RSS is that process's VmHWM: imports, store open and the drain, but not the backlog building.

Last line of output: one JSON object.

    python tools/bench/drain.py [--readings N] [--max-inflight K] [--max-message-bytes B]
                                [--compress-min-bytes C] [--live-share S] [--synchronous full|normal]
                                [--no-ceiling] [--keep] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import logging
import math
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchlib import free_port

DEVICE = "bench-gw"
TOPIC_ROOT = "fleetgate/v1"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
BROKER_START_TIMEOUT_S = 10.0
PHASE_TIMEOUT_S = 1800.0
CEILING_RUNS = 3


# ---------------------------------------------------------------------------------------------------------
# Phase 1: the backlog, a simulated drive
# ---------------------------------------------------------------------------------------------------------


def _drive(n: int, seed: int = 7) -> Iterator[tuple[str, Any, tuple[int, int, bool]]]:
    """(signal, value, (wall_ns, mono_ns, trusted)) of a drive, as the samplers take them, until ``n``.

    OBD at the default schedule (speed and rpm every second, load and throttle every 2 s, coolant and
    voltages every 10 s ...), one query every ~45 ms; GPS position, speed and heading at 1 Hz; satellites and
    HDOP every 10 s. Values have the resolution and the float noise the decoders really produce.
    """
    from fleetgate.config.schema import DEFAULT_OBD_SCHEDULE

    schedule = {**DEFAULT_OBD_SCHEDULE, "adapter_voltage": 10.0}
    rng = random.Random(seed)
    seconds = math.ceil(n / 6.5) + 60
    wall0 = time.time_ns() - seconds * 1_000_000_000  # the backlog is the past hours of driving
    mono0 = 3_600_000_000_000
    speed, heading, odometer, fuel, soc = 40.0, 90.0, 48211.0, 70.0, 80.0
    lat, lon, alt = 52.520008, 13.404954, 34.0
    made = 0
    second = 0
    while True:
        base = second * 1_000_000_000
        speed = min(130.0, max(0.0, speed + rng.uniform(-4, 4)))
        heading = (heading + rng.uniform(-6, 6)) % 360
        step = speed / 3.6 / 111_320
        lat += step * math.cos(math.radians(heading))
        lon += step * math.sin(math.radians(heading)) / math.cos(math.radians(lat))
        alt += rng.uniform(-0.3, 0.3)
        odometer += speed / 3600
        fuel = max(5.0, fuel - 0.0004)
        soc = max(10.0, soc - 0.0002)
        values: dict[str, Any] = {
            "vehicle_speed": float(round(speed)),
            "rpm": round((780 + speed * 27 + rng.uniform(-60, 60)) * 4) / 4,
            "engine_load": rng.randrange(30, 200) * 100.0 / 255.0,
            "throttle_position": rng.randrange(20, 120) * 100.0 / 255.0,
            "coolant_temp": float(rng.randrange(86, 94)),
            "fuel_level": round(fuel * 2.55) * 100.0 / 255.0,
            "control_module_voltage": rng.randrange(13800, 14400) / 1000.0,
            "bms_pack_soc": round(soc * 2.55) * 100.0 / 255.0,
            "odometer": round(odometer, 1),
            "adapter_voltage": rng.randrange(136, 144) / 10.0,
        }
        offset = rng.randrange(0, 20_000_000)
        for signal, every in schedule.items():
            if second % round(every) == 0:
                t = base + offset
                offset += rng.randrange(38_000_000, 55_000_000)  # one ELM327 round trip
                yield signal, values[signal], (wall0 + t, mono0 + t, True)
                made += 1
                if made == n:
                    return
        t = base + 600_000_000 + rng.randrange(0, 5_000_000)
        gps = [
            (
                "gps_position",
                {"latitude": round(lat, 7), "longitude": round(lon, 7), "altitude": round(alt, 1)},
            ),
            ("gps_speed", round(speed / 3.6 * 3.6 + rng.uniform(-0.5, 0.5), 3)),
            ("gps_heading", round(heading, 2)),
        ]
        if second % 10 == 0:
            gps += [("gps_satellites", rng.randrange(7, 13)), ("gps_hdop", round(rng.uniform(0.7, 1.6), 2))]
        for signal, value in gps:
            yield signal, value, (wall0 + t, mono0 + t, True)
            made += 1
            if made == n:
                return
        second += 1


async def build_backlog(path: Path, n: int) -> dict[str, Any]:
    from fleetgate.config.schema import StoreConfig
    from fleetgate.daemon.runtime.clock import Clock
    from fleetgate.daemon.runtime.readings import ReadingSink
    from fleetgate.sync.store import Database, Outbox, Stamp

    db = await Database.open(path, "normal")  # building is not measured; the drain reopens with "full"
    outbox = Outbox(db, max_batch=5000, quotas=StoreConfig().quota_bytes)  # the daemon's default quotas
    sink = ReadingSink(outbox, Clock(), flush_interval_s=0.05, max_pending=5000)
    flusher = asyncio.create_task(sink.run())
    start = time.perf_counter()
    for i, (signal, value, stamp) in enumerate(_drive(n)):
        sink.add(signal, value, Stamp(*stamp))
        if i % 1000 == 999:
            await sink.wait_for_room()
            await asyncio.sleep(0)
    await sink.flush()
    await outbox.drain_pending()
    flusher.cancel()
    await asyncio.gather(flusher, return_exceptions=True)
    held, payload_bytes = await db.run(
        lambda c: c.execute("SELECT count(*), sum(length(payload)) FROM outbox").fetchone()
    )
    await db.close()
    if sink.committed != n or held != n:
        raise SystemExit(f"backlog: {sink.committed} of {n} readings committed, {held} kept (quota?)")
    return {
        "readings": n,
        "build_s": round(time.perf_counter() - start, 2),
        "payload_bytes_per_reading": round(payload_bytes / n, 1),
    }


async def pack_offline(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """What the daemon's packer does while the broker is unreachable: seal the backlog into segments, with
    the daemon's durability, until nothing is left to seal (the tail of less than a message stays rows)."""
    from fleetgate.sync.mqtt.drain import Drain
    from fleetgate.sync.mqtt.packer import Packer
    from fleetgate.sync.store import Database, Outbox

    cfg = mqtt_config(args)
    db = await Database.open(path, args.synchronous)
    outbox = Outbox(db)
    drain = Drain(outbox, DEVICE, 1, cfg.max_message_bytes, cfg.compress_min_bytes, 0.0, db.store_id)
    packer = Packer(outbox, drain, DEVICE, db.store_id, cfg.max_message_bytes, cfg.compress_min_bytes)
    bytes_before = sum(d.bytes for d in await outbox.depth())
    start, cpu = time.perf_counter(), _cpu_s()
    while await packer.seal_one() is not None:
        pass
    elapsed, cpu = time.perf_counter() - start, _cpu_s() - cpu
    depth = await outbox.depth()
    await db.close()
    packed = sum(d.packed for d in depth)
    return {
        "pack_s": round(elapsed, 2),
        "pack_cpu_s": round(cpu, 2),
        "packed": packed,
        "packed_per_s": round(packed / elapsed) if elapsed else None,
        "store_bytes_before": bytes_before,
        "store_bytes_after": sum(d.bytes for d in depth),
    }


# ---------------------------------------------------------------------------------------------------------
# Shared: configuration, broker
# ---------------------------------------------------------------------------------------------------------


def mqtt_config(args: argparse.Namespace) -> Any:
    from fleetgate.config.schema import MqttConfig

    overrides = {
        "max_inflight": args.max_inflight,
        "max_message_bytes": args.max_message_bytes,
        "compress_min_bytes": args.compress_min_bytes,
        "live_share": args.live_share,
    }
    return MqttConfig(
        enabled=True,
        host="127.0.0.1",
        port=args.port or 1883,
        tls=False,
        topic_root=TOPIC_ROOT,
        **{k: v for k, v in overrides.items() if v is not None},
    )


class Broker:
    """A foreground mosquitto on 127.0.0.1 with the throughput settings of TESTBED.md."""

    def __init__(self, folder: Path, port: int) -> None:
        self.port = port
        self.conf = folder / f"mosquitto-{port}.conf"
        self.log = folder / f"mosquitto-{port}.log"
        self.conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
            "max_inflight_messages 0\nmax_queued_messages 0\npersistence false\nlog_dest stderr\n"
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the broker; returns the monotonic time it was started."""
        started = time.monotonic()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        return started

    def wait_reachable(self) -> float:
        """Poll the port; returns the monotonic time it first accepted a connection."""
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.05):
                    return time.monotonic()
            except OSError:
                if self.proc is not None and self.proc.poll() is not None:
                    raise SystemExit(f"mosquitto exited: {self.log.read_text()[-2000:]}") from None
                if time.monotonic() > deadline:
                    raise SystemExit("mosquitto did not listen in time") from None
                time.sleep(0.001)

    def cpu_s(self) -> float:
        """User + system CPU the broker has used so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class FirstMessage:
    """A paho subscriber that notes when the first uplink message arrives, then leaves."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho

        self.at: float | None = None
        self.done = threading.Event()
        self._client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-first-message")
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{TOPIC_ROOT}/{DEVICE}/up/#", qos=1)
        self._client.on_message = self._on_message
        self._port = port

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if self.at is None:
            self.at = time.monotonic()
            self.done.set()
            client.disconnect()

    def start(self) -> None:
        self._client.connect("127.0.0.1", self._port)
        self._client.loop_start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()


def _vm(field: str) -> float:
    """VmHWM / VmRSS of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------------------
# Phase 2: the ceiling, the same messages from plain aiomqtt
# ---------------------------------------------------------------------------------------------------------


async def pack_like_the_drain(path: Path, cfg: Any) -> list[tuple[str, bytes, Any, int]]:
    """(topic, payload, properties, records) of every message, exactly as Drain.run sends them: rows more
    urgent than telemetry, then the sealed segments as stored, then the other rows, FETCH records at a time
    in drain order (priority, then id), per stream (priority, stream, id) split by size, compressed above
    the threshold."""
    from fleetgate.sync.mqtt.drain import FETCH
    from fleetgate.sync.mqtt.envelope import Message, pack_rows
    from fleetgate.sync.mqtt.link import _properties
    from fleetgate.sync.mqtt.topics import Topics
    from fleetgate.sync.store import Database, Priority
    from fleetgate.sync.store.segments import select_after
    from fleetgate.sync.store.wire import SELECT_ENCODED

    topics = Topics(cfg.topic_root, DEVICE)

    def read_and_pack(conn: Any, store_id: str) -> list[tuple[str, bytes, Any, int]]:
        out = []

        def rows(where: str) -> None:
            # One ordered scan (a cursor per FETCH would rescan what is not deleted here), cut into FETCH chunks.
            cursor = conn.execute(
                SELECT_ENCODED + where + " ORDER BY o.priority, o.id", (int(Priority.TELEMETRY),)
            )
            while batch := cursor.fetchmany(FETCH):
                for m in pack_rows(DEVICE, store_id, batch, cfg.max_message_bytes, cfg.compress_min_bytes):
                    out.append(
                        (topics.uplink(m.stream), m.payload, _properties(m.compressed, None), len(m.ids))
                    )

        rows("WHERE o.priority < ?")
        for g in select_after(conn, 0, 1 << 62):
            m = Message(g.stream, [], g.payload, g.compressed, g.id, g.records)
            out.append((topics.uplink(m.stream), m.payload, _properties(m.compressed, None), m.records))
        rows("WHERE o.priority >= ?")
        return out

    db = await Database.open(path, "normal")
    try:
        return await db.run(read_and_pack, db.store_id)
    finally:
        await db.close()


async def ceiling(args: argparse.Namespace) -> dict[str, Any]:
    import aiomqtt

    cfg = mqtt_config(args)
    messages = await pack_like_the_drain(Path(args.db), cfg)
    window = asyncio.Semaphore(cfg.max_inflight)

    async with aiomqtt.Client(
        cfg.host,
        cfg.port,
        identifier="bench-ceiling",
        protocol=aiomqtt.ProtocolVersion.V5,
        keepalive=cfg.keepalive_s,
        timeout=cfg.connect_timeout_s,
        max_inflight_messages=cfg.max_inflight,
        max_queued_outgoing_messages=0,
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    ) as client:

        async def send(topic: str, payload: bytes, props: Any) -> None:
            try:
                await client.publish(topic, payload, qos=1, properties=props, timeout=cfg.publish_timeout_s)
            finally:
                window.release()

        runs = []
        for _ in range(CEILING_RUNS):  # short runs: the best of a few
            tasks = []
            start, cpu = time.perf_counter(), _cpu_s()
            for topic, payload, props, _ in messages:
                await window.acquire()
                tasks.append(asyncio.create_task(send(topic, payload, props)))
            await asyncio.gather(*tasks)
            runs.append((time.perf_counter() - start, _cpu_s() - cpu))
    elapsed, cpu = min(runs)
    return {
        "ceiling_s": elapsed,
        "ceiling_runs_s": [round(r[0], 3) for r in runs],
        "ceiling_cpu_s": round(cpu, 2),
        "messages": len(messages),
        "records": sum(m[3] for m in messages),
        "payload_bytes": sum(len(m[1]) for m in messages),
        "compressed": sum(1 for m in messages if m[2].PayloadFormatIndicator == 0),
    }


# ---------------------------------------------------------------------------------------------------------
# Phase 3: the daemon's drain
# ---------------------------------------------------------------------------------------------------------


async def drain(args: argparse.Namespace) -> dict[str, Any]:
    from fleetgate.config.schema import Config, DeviceConfig, SupervisorConfig
    from fleetgate.daemon.runtime.clock import Clock
    from fleetgate.daemon.runtime.logs import setup_logging
    from fleetgate.daemon.runtime.status import StatusSource
    from fleetgate.daemon.runtime.supervisor import Supervisor
    from fleetgate.daemon.uplink.feature import health, uplink_view
    from fleetgate.sync.mqtt.drain import Drain, DrainStats
    from fleetgate.sync.mqtt.link import Uplink
    from fleetgate.sync.mqtt.topics import Topics
    from fleetgate.sync.store import Database, Outbox

    setup_logging("info", "logfmt")  # as the daemon does; stderr goes to a file the parent reads
    cfg = mqtt_config(args)
    config = Config(
        device=DeviceConfig(id=DEVICE),
        mqtt=cfg,
        supervisor=SupervisorConfig(backoff_initial_s=0.1, backoff_max_s=0.1),
    )
    marks: dict[str, float] = {}

    class TimedStats(DrainStats):
        def published(self, records: int) -> None:
            marks.setdefault("first_ack", time.monotonic())
            super().published(records)

    database = await Database.open(Path(args.db), args.synchronous)
    outbox = Outbox(database, max_batch=config.store.max_batch, quotas=config.store.quota_bytes)
    sup = config.supervisor
    supervisor = Supervisor(sup.backoff_initial_s, sup.backoff_max_s, sup.stable_after_s)
    status = StatusSource(config, Clock(), supervisor, database, outbox, time.monotonic())
    drainer = Drain(
        outbox,
        DEVICE,
        cfg.max_inflight,
        cfg.max_message_bytes,
        cfg.compress_min_bytes,
        cfg.live_share,
        database.store_id,
    )
    drainer.stats = TimedStats()

    async def timed_health() -> dict[str, Any]:
        marks.setdefault("connected", time.monotonic())
        body = await health(status)
        marks.setdefault("health_built", time.monotonic())
        return body

    uplink = Uplink(cfg, Topics(cfg.topic_root, DEVICE), drainer, timed_health)
    status.add_view("uplink", lambda snap: uplink_view(uplink.snapshot(), snap["outbox"]["total"]))
    refused = asyncio.Event()
    failures_after_connect: list[float] = []

    class Watched:
        """The uplink as the supervisor sees it; notes its first failure (no broker yet: it is trying)."""

        name = uplink.name
        expected_errors = uplink.expected_errors

        async def run(self) -> None:
            try:
                await uplink.run()
            except Exception:
                refused.set()
                if "connected" in marks:
                    failures_after_connect.append(time.monotonic())
                raise

    supervisor.add(Watched())
    supervisor.start()
    await refused.wait()
    baseline_rss = _vm("VmRSS")
    cpu, loop_cpu = _cpu_s(), time.thread_time()
    print("trying", flush=True)  # the parent starts the broker now

    def outbox_empty(conn: Any) -> bool:
        held = "SELECT NOT EXISTS (SELECT 1 FROM outbox) AND NOT EXISTS (SELECT 1 FROM segments)"
        return conn.execute(held).fetchone()[0] == 1

    while True:
        await asyncio.sleep(0.01)
        if drainer.stats.records >= args.readings and await database.run(outbox_empty):
            break
    marks["empty"] = time.monotonic()
    cpu, loop_cpu = _cpu_s() - cpu, time.thread_time() - loop_cpu
    peak_rss = _vm("VmHWM")
    await supervisor.stop(4.0)
    await database.close()
    return {
        "marks": marks,
        "messages": drainer.stats.messages,
        "records_sent": drainer.stats.records,
        "restarts_after_connect": len(failures_after_connect),
        "drain_cpu_s": round(cpu, 2),
        "loop_cpu_s": round(loop_cpu, 2),  # of which the event loop's thread (the rest: the store thread)
        "baseline_rss_mb": round(baseline_rss, 1),
        "peak_rss_mb": round(peak_rss, 1),
        "settings": {
            "max_inflight": cfg.max_inflight,
            "max_message_bytes": cfg.max_message_bytes,
            "compress_min_bytes": cfg.compress_min_bytes,
            "live_share": cfg.live_share,
            "synchronous": args.synchronous,
        },
    }


# ---------------------------------------------------------------------------------------------------------
# The parent: runs the phases in fresh processes and reports
# ---------------------------------------------------------------------------------------------------------


def _child(args: argparse.Namespace, phase: str, db: Path, port: int | None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--db", str(db)]
    cmd += ["--readings", str(args.readings), "--synchronous", args.synchronous]
    for flag in ("max_inflight", "max_message_bytes", "compress_min_bytes", "live_share"):
        value = getattr(args, flag)
        if value is not None:
            cmd += ["--" + flag.replace("_", "-"), str(value)]
    if port is not None:
        cmd += ["--port", str(port)]
    if phase == "drain" and args.profile:
        cmd += ["--profile", args.profile]
    return cmd


def _result(proc: subprocess.Popen[str], stderr: Path) -> dict[str, Any]:
    assert proc.stdout is not None
    out = proc.stdout.read()
    if proc.wait(PHASE_TIMEOUT_S) != 0 or not out.strip():
        sys.stderr.write(stderr.read_text()[-4000:])
        raise SystemExit(f"phase failed: {' '.join(proc.args)}")  # type: ignore[arg-type]
    return json.loads(out.strip().splitlines()[-1])


def run_offline(args: argparse.Namespace, tmp: Path, db: Path, phase: str) -> dict[str, Any]:
    err = tmp / f"{phase}.stderr"
    with err.open("w") as fh:
        proc = subprocess.Popen(_child(args, phase, db, None), stdout=subprocess.PIPE, stderr=fh, text=True)
        return _result(proc, err)


def run_ceiling(args: argparse.Namespace, tmp: Path, db: Path) -> dict[str, Any]:
    broker = Broker(tmp, free_port())
    broker.start()
    broker.wait_reachable()
    err = tmp / "ceiling.stderr"
    try:
        with err.open("w") as fh:
            proc = subprocess.Popen(
                _child(args, "ceiling", db, broker.port), stdout=subprocess.PIPE, stderr=fh, text=True
            )
            result = _result(proc, err)
        result["broker_cpu_s"] = round(broker.cpu_s(), 2)
        return result
    finally:
        broker.stop()


def run_drain(args: argparse.Namespace, tmp: Path, db: Path) -> dict[str, Any]:
    broker = Broker(tmp, free_port())
    err = tmp / "drain.stderr"
    subscriber: FirstMessage | None = None
    with err.open("w") as fh:
        proc = subprocess.Popen(
            _child(args, "drain", db, broker.port), stdout=subprocess.PIPE, stderr=fh, text=True
        )
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "trying":
                sys.stderr.write(err.read_text()[-4000:])
                raise SystemExit("drain process did not start")
            started = broker.start()
            reachable = broker.wait_reachable()
            subscriber = FirstMessage(broker.port)
            subscriber.start()
            subscriber.done.wait(30)
            subscriber.stop()
            result = _result(proc, err)
            result["broker_cpu_s"] = round(broker.cpu_s(), 2)
        finally:
            if subscriber is not None:
                subscriber.stop()
            if proc.poll() is None:
                proc.kill()
            broker.stop()
    log = err.read_text()
    result["pending_call_warnings"] = log.count("pending publish calls")
    result["component_failures"] = log.count("component failed")
    result["broker_started"], result["broker_reachable"] = started, reachable
    result["subscriber_first"] = subscriber.at if subscriber else None
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readings", type=int, default=1_000_000, help="backlog size (default 1000000)")
    parser.add_argument("--max-inflight", type=int, help="MqttConfig.max_inflight (default: the daemon's)")
    parser.add_argument(
        "--max-message-bytes", type=int, help="MqttConfig.max_message_bytes (default: the daemon's)"
    )
    parser.add_argument(
        "--compress-min-bytes", type=int, help="MqttConfig.compress_min_bytes (default: the daemon's)"
    )
    parser.add_argument("--live-share", type=float, help="MqttConfig.live_share (default: the daemon's)")
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full", help="store durability")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the plain-aiomqtt ceiling")
    parser.add_argument(
        "--no-pack",
        action="store_true",
        help="drain the backlog as rows, unsealed (as after an outage with untrusted wall time)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs of every process)")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the drain process (event loop thread)")
    parser.add_argument("--phase", choices=["build", "pack", "ceiling", "drain"], help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.readings < 1000:
        parser.error("--readings must be at least 1000")

    if args.phase == "build":
        print(json.dumps(asyncio.run(build_backlog(Path(args.db), args.readings))))
        return 0
    if args.phase == "pack":
        print(json.dumps(asyncio.run(pack_offline(Path(args.db), args))))
        return 0
    if args.phase == "ceiling":
        print(json.dumps(asyncio.run(ceiling(args))))
        return 0
    if args.phase == "drain":
        if args.profile:
            profiler = cProfile.Profile()
            result = profiler.runcall(asyncio.run, drain(args))
            profiler.dump_stats(args.profile)
        else:
            result = asyncio.run(drain(args))
        print(json.dumps(result))
        return 0

    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="fleetgate-drain-"))
    try:
        db = tmp / "backlog.db"
        build = run_offline(args, tmp, db, "build")
        print(f"backlog: {args.readings} readings built in {build['build_s']} s", file=sys.stderr)
        pack = None if args.no_pack else run_offline(args, tmp, db, "pack")
        if pack is not None:
            print(f"offline: {pack['packed']} readings sealed in {pack['pack_s']} s", file=sys.stderr)
        ceil = None if args.no_ceiling else run_ceiling(args, tmp, db)
        d = run_drain(args, tmp, db)
    finally:
        if args.keep:
            print(f"work folder kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    marks = d["marks"]
    drain_s = marks["empty"] - d["broker_started"]
    readings_per_s = args.readings / drain_s
    first_delivery_s = marks["first_ack"] - d["broker_reachable"]
    summary: dict[str, Any] = {"readings_per_s": round(readings_per_s)}
    if ceil is not None:
        ceiling_per_s = ceil["records"] / ceil["ceiling_s"]
        summary |= {"ceiling_per_s": round(ceiling_per_s), "ratio": round(readings_per_s / ceiling_per_s, 3)}
    else:
        summary |= {"ceiling_per_s": None, "ratio": None}
    sub = d["subscriber_first"]
    summary |= {
        "first_delivery_s": round(first_delivery_s, 3),
        "peak_rss_mb": d["peak_rss_mb"],
        "readings": args.readings,
        "drain_s": round(drain_s, 2),
        "messages": d["messages"],
        "readings_per_message": round(d["records_sent"] / max(1, d["messages"]), 1),
        "records_sent": d["records_sent"],
        "broker_reachable_after_start_s": round(d["broker_reachable"] - d["broker_started"], 3),
        "connected_after_reachable_s": round(marks.get("connected", math.nan) - d["broker_reachable"], 3),
        "health_built_s": round(marks.get("health_built", math.nan) - marks.get("connected", math.nan), 3),
        "first_seen_by_subscriber_s": None if sub is None else round(sub - d["broker_reachable"], 3),
        "ack_to_empty_s": round(marks["empty"] - marks["first_ack"], 2),
        # Like the ceiling, which times only its publishing: from the CONNACK (the health message is the
        # first thing the uplink sends) to the outbox being empty.
        "readings_per_s_connected": round(args.readings / (marks["empty"] - marks["connected"])),
        "drain_cpu_s": d["drain_cpu_s"],
        "loop_cpu_s": d["loop_cpu_s"],
        "broker_cpu_s": d["broker_cpu_s"],
        "baseline_rss_mb": d["baseline_rss_mb"],
        "restarts_after_connect": d["restarts_after_connect"],
        "pending_call_warnings": d["pending_call_warnings"],
        **d["settings"],
        "payload_bytes_per_reading": build["payload_bytes_per_reading"],
        "packed_offline": pack,
        "cpus": os.cpu_count(),
    }
    if ceil is not None:
        summary |= {
            "ceiling_s": round(ceil["ceiling_s"], 3),
            "ceiling_runs_s": ceil["ceiling_runs_s"],
            "ceiling_messages": ceil["messages"],
            "wire_bytes_per_reading": round(ceil["payload_bytes"] / ceil["records"], 1),
            "ceiling_cpu_s": ceil["ceiling_cpu_s"],
            "ceiling_broker_cpu_s": ceil["broker_cpu_s"],
        }
    print(
        f"drain: {args.readings} readings in {drain_s:.2f} s ({readings_per_s:,.0f}/s), "
        f"first delivery {first_delivery_s:.3f} s, peak RSS {d['peak_rss_mb']} MB",
        file=sys.stderr,
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
