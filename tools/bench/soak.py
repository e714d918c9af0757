#!/usr/bin/env python3
"""Soak: the real daemon for a long while at an accelerated rate, with the broker flapping.

Runs ``fleetgate run`` against the simulated vehicle (tools/sim/vehicle.py: the ELM327 emulator on a pty and
gpsfake), every OBD signal scheduled every ``--obd-every`` seconds (the default schedule reads most every
1-30 s), heartbeat every second, the uplink to a local mosquitto that is stopped for ``--outage-s`` seconds at
random every ``--outage-every-s`` seconds. A consumer written from docs/mqtt.md (a kept MQTT 5 session, QoS 1,
mosquitto with persistence so its queue survives the broker's restarts) records every (stream, seq) it gets.

Every ``--sample-s`` seconds a line: elapsed time, the daemon's RSS and open file descriptors, records
committed and waiting, whether the broker is up. At the end the broker stays up until the outbox is empty, the
daemon stops, and every record the store ever numbered is looked for among those received. Goal: RSS and fds
flat after warm-up, 0 records lost.

Last line of output: one JSON object ``{"minutes": …, "records": …, "lost": …, "rss_mb": {…}, "fds": {…}, …}``.

    python tools/bench/soak.py [--minutes 30] [--sample-s 30]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleetgate.config.schema import DEFAULT_OBD_SCHEDULE
from fleetgate.sync.mqtt.envelope import ZDICT, expand

from benchlib import free_port, wait

REPO = Path(__file__).resolve().parent.parent.parent
FLEETGATE = str(Path(sys.executable).parent / "fleetgate")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
DEVICE = "soak-0001"


class Broker:
    """mosquitto on loopback with persistence, so a consumer's queued messages survive its restarts."""

    def __init__(self, folder: Path, port: int) -> None:
        self.port = port
        self.conf = folder / "mosquitto.conf"
        self.log = folder / "mosquitto.log"
        self.conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {folder}/\nmax_queued_messages 0\nlog_dest stderr\n"
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        wait("mosquitto listening", self._listening, 10)

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.up:
            assert self.proc is not None
            self.proc.terminate()  # a clean stop saves the persistence file
            self.proc.wait(10)


class Consumer:
    """The docs/mqtt.md consumer: a kept session, QoS 1, inflate when declared, count each record."""

    def __init__(self, port: int) -> None:
        self.seen: set[tuple[str, str, int]] = set()  # (store, stream, seq)
        self.duplicates = 0
        self.messages = 0
        self._lock = threading.Lock()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, "soak-consumer", protocol=mqtt.MQTTv5)
        self._client.on_connect = lambda c, u, f, r, p: c.subscribe(f"fleetgate/v1/{DEVICE}/up/+", qos=1)
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.2, 2)
        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = 24 * 3600
        self._client.connect_async("127.0.0.1", port, clean_start=False, properties=session)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        user = getattr(msg.properties, "UserProperty", None) or []
        payload = msg.payload
        if ("content-encoding", "zlib") in user:  # with the compact envelope's dictionary: reads both
            payload = zlib.decompressobj(zdict=ZDICT).decompress(payload)
        body = json.loads(payload)
        with self._lock:
            self.messages += 1
            for record in expand(body):
                key = (body["store"], body["stream"], record["seq"])
                if key in self.seen:
                    self.duplicates += 1
                self.seen.add(key)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def config_text(tmp: Path, obd_link: Path, gps_port: int, broker_port: int, obd_every: float) -> str:
    schedule = ", ".join(f"{name} = {obd_every}" for name in DEFAULT_OBD_SCHEDULE)
    return f"""
[device]
id = "{DEVICE}"

[store]
state_dir = "{tmp / "state"}"

[control]
socket_path = "{tmp / "control.sock"}"

[heartbeat]
interval_s = 1

[supervisor]
backoff_initial_s = 0.5
backoff_max_s = 5

[obd]
enabled = true
port = "{obd_link}"
protocol = "6"
schedule = {{ {schedule} }}

[gps]
enabled = true
port = {gps_port}

[trips]
ignition_off_s = 5

[mqtt]
enabled = true
host = "127.0.0.1"
port = {broker_port}
tls = false
"""


def status(config: Path) -> dict[str, Any] | None:
    done = subprocess.run(
        [FLEETGATE, "--config", str(config), "status", "--json"], capture_output=True, text=True, timeout=30
    )
    return json.loads(done.stdout) if done.returncode in (0, 4) else None  # 4: running, degraded


def proc_figures(pid: int) -> tuple[float, int]:
    """The process's resident memory (MB) and open file descriptors."""
    status_lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss_kb = next(int(line.split()[1]) for line in status_lines if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def spread(values: list[float]) -> dict[str, float]:
    return {
        "first": round(values[0], 1),
        "last": round(values[-1], 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of value over time, per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    den = sum((t - mean_t) ** 2 for t, _ in points)
    return 0.0 if den == 0 else sum((t - mean_t) * (v - mean_v) for t, v in points) / den * 3600


def stored_numbers(db: Path) -> tuple[str, dict[str, tuple[int, int]]]:
    """The store id and, per stream, (last seq numbered, records evicted under quota)."""
    conn = sqlite3.connect(db)
    try:
        store = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
        streams = {
            name: (last, evicted)
            for name, last, evicted in conn.execute("SELECT name, last_seq, evicted FROM streams")
        }
        return store, streams
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to soak (default 30)")
    parser.add_argument("--sample-s", type=float, default=30.0, help="seconds between samples (default 30)")
    parser.add_argument(
        "--obd-every", type=float, default=0.1, help="seconds between reads of each OBD signal"
    )
    parser.add_argument(
        "--outage-every-s", type=float, default=90.0, help="mean seconds between broker outages"
    )
    parser.add_argument(
        "--outage-s", type=float, nargs=2, default=(5.0, 45.0), help="outage length range (s)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs of every process)")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    tmp = Path(tempfile.mkdtemp(prefix="fleetgate-soak-"))
    obd_link, gps_port, broker_port = tmp / "ttyOBD", free_port(), free_port()
    config = tmp / "fleetgate.toml"
    config.write_text(config_text(tmp, obd_link, gps_port, broker_port, args.obd_every))
    sim_log = (tmp / "vehicle.log").open("wb")
    sim = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tools/sim/vehicle.py"),
            "--obd-link",
            str(obd_link),
            "--gps-port",
            str(gps_port),
            "--engine-cycle",
            "120",
        ],
        stdout=sim_log,
        stderr=sim_log,
    )
    broker = Broker(tmp, broker_port)
    broker.start()
    consumer = Consumer(broker_port)
    daemon_log = (tmp / "daemon.log").open("wb")
    daemon: subprocess.Popen[bytes] | None = None
    samples: list[dict[str, Any]] = []
    try:
        wait("the simulated vehicle", obd_link.exists, 30)
        daemon = subprocess.Popen(
            [FLEETGATE, "--config", str(config), "run"], stdout=daemon_log, stderr=daemon_log
        )
        wait("the daemon", lambda: status(config) is not None, 30)
        started = time.monotonic()
        end = started + args.minutes * 60
        next_sample = started
        next_outage = started + rng.expovariate(1 / args.outage_every_s)
        outage_ends: float | None = None
        outages = 0
        while time.monotonic() < end:
            now = time.monotonic()
            if outage_ends is None and now >= next_outage:
                broker.stop()
                outages += 1
                outage_ends = now + rng.uniform(*args.outage_s)
            elif outage_ends is not None and now >= outage_ends:
                broker.start()
                outage_ends = None
                next_outage = now + rng.expovariate(1 / args.outage_every_s)
            if now >= next_sample:
                rss, fds = proc_figures(daemon.pid)
                snap = status(config) or {}
                outbox = snap.get("outbox", {})
                sample = {
                    "t_s": round(now - started),
                    "rss_mb": round(rss, 1),
                    "fds": fds,
                    "committed": outbox.get("records_committed"),
                    "waiting": outbox.get("total"),
                    "broker_up": broker.up,
                    "restarts": sum(c["restarts"] for c in snap.get("components", [])),
                }
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                next_sample += args.sample_s
            time.sleep(0.2)
        if not broker.up:
            broker.start()
        wait("the outbox to drain", lambda: (status(config) or {}).get("outbox", {}).get("total") == 0, 300)
        final = status(config) or {}
        daemon.send_signal(signal.SIGTERM)
        daemon_rc = daemon.wait(30)
        time.sleep(2)  # the consumer's last messages
        consumer.stop()
        store, streams = stored_numbers(tmp / "state" / "fleetgate.db")
        expected = {(store, name, seq) for name, (last, _) in streams.items() for seq in range(1, last + 1)}
        lost = expected - consumer.seen
        evicted = sum(ev for _, ev in streams.values())
        warm = [s for s in samples if s["t_s"] >= min(300, args.minutes * 60 / 3)] or samples
        result = {
            "minutes": args.minutes,
            "records": len(expected),
            "records_per_s": round(len(expected) / (args.minutes * 60), 1),
            "lost": len(lost) - evicted,  # records evicted under quota are not delivered, by design
            "evicted": evicted,
            "duplicates": consumer.duplicates,
            "messages": consumer.messages,
            "outages": outages,
            "rss_mb": spread([s["rss_mb"] for s in samples]),
            "rss_mb_per_h_after_warmup": round(slope_per_hour([(s["t_s"], s["rss_mb"]) for s in warm]), 2),
            "fds": spread([s["fds"] for s in samples]),
            "fds_per_h_after_warmup": round(slope_per_hour([(s["t_s"], s["fds"]) for s in warm]), 2),
            "component_restarts": sum(c["restarts"] for c in final.get("components", [])),
            "daemon_exit": daemon_rc,
            "traceback_in_log": "Traceback" in (tmp / "daemon.log").read_text(errors="replace"),
            "cpus": os.cpu_count(),
        }
        if len(lost) > evicted:
            print(f"soak: {len(lost)} records lost, e.g. {sorted(lost)[:10]}", file=sys.stderr)
        print(json.dumps(result), flush=True)
        return 0 if result["lost"] == 0 and daemon_rc == 0 else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        broker.stop()
        sim.send_signal(signal.SIGTERM)
        try:
            sim.wait(15)
        except subprocess.TimeoutExpired:
            sim.kill()
        if args.keep:
            print(f"soak: work folder kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
