#!/usr/bin/env python3
"""Footprint of a day on the road: what a fleet pays for in the steady state, per telemetry reading.

Runs the real daemon (``fleetgate --config X run``) against the simulated vehicle of ``./dev demo``
(tools/sim/vehicle.py: the ELM327 emulator on a pty, engine running, and gpsfake replaying a drive), with the
daemon's default OBD schedule, GPS sampling and heartbeat. The uplink is the production one: MQTT 5 over TLS
with a client certificate, to a local mosquitto (``require_certificate true``, certificates from
tests/mosquitto_fixture.make_tls), **through a counting TCP forwarder** (tests/tcp_proxy.TcpProxy) that
stands for the cellular link: it counts every byte both ways (TLS records, MQTT framing, PUBACKs, pings,
handshakes) and can cut the link.

After a warm-up (uplink connected, wall time trusted, readings flowing), three phases:

- ``online``: link up for ``--online-s`` (default 180 s).
- ``offline``: the forwarder resets the connection and refuses new ones for ``--offline-s`` (default 180 s);
  the backlog builds up and the packer seals it.
- ``drain``: the link is restored and the daemon asked to reconnect at once (``fleetgate sync now``, what
  its network watch does when a modem's route comes back; ``--no-sync-now`` waits out the backoff), until
  every record that was waiting has reached the cloud and has been deleted from the outbox.

Per phase, one JSON line; every figure is a delta over the phase, divided by its readings:

- ``readings``: telemetry readings the reading sink handed to the outbox in the phase (it does so every
  second; the sink's own counters are not in ``status``): with live telemetry kept in memory
  (``mqtt.memory_window_s`` > 0) the delta of ``taken`` in ``fleetgate status --json`` outbox.memory, else
  the delta of the ``telemetry`` stream's ``last_seq`` in outbox.streams (each reading is one record of
  that stream). In the drain the per-reading figures are divided by ``delivered_readings`` instead:
  distinct telemetry records a second MQTT client, subscribed on the broker itself, received during the
  drain (the backlog plus the few readings taken meanwhile).
- ``flash_bytes_per_reading``: delta of ``write_bytes`` in /proc/PID/io of the daemon: bytes its page-cache
  writes sent towards the block device (SQLite's WAL frames, checkpoints into the database file), counted
  in whole 4 KiB pages each time a clean page is dirtied: a WAL frame is 4,120 bytes (24-byte header and
  the page), so a commit of n frames dirties n + 1 or n + 2 pages, and the next commit dirties the page
  the last one ended in again. The file system's own journal commits (jbd2, a kernel thread) are not in
  it. ``write_bytes`` is 0 on tmpfs, so
  the work folder (state dir included) must be on a disk file system: it is made under ``--work-dir``
  (default /var/tmp, which the FHS keeps on disk even where /tmp is a tmpfs) and the bench refuses tmpfs.
- ``flash_write_syscall_bytes_per_reading``: the daemon's ``wchar`` (bytes handed to write-family syscalls)
  less what it wrote to the MQTT socket (the forwarder's upstream count), its log pipe and the control
  socket: file writes as SQLite issues them (plus a few bytes a second of OBD commands to the pty).
- ``wire_bytes_per_reading``: bytes through the forwarder, both directions.
- ``cpu_ms_per_reading``: delta of utime + stime of the daemon (/proc/PID/stat, all threads).
- ``rss_mb``: the daemon's VmRSS at the end of the phase.
- ``records_stored``, ``store_commits``: records written to SQLite (every stream) and the outbox's commits
  that wrote them, from ``status`` outbox (records_committed, commits); the commits that delete
  acknowledged records and the state-only ones (a trip's checkpoint every minute) are not counted there.
- ``log_bytes_per_reading``: what the daemon wrote to stderr (journald's input under systemd; a pipe here,
  so not in the daemon's flash figure).
- ``mqtt_payload_bytes``: application payload per topic (telemetry, heartbeat, events, health) as received
  by the subscriber; the rest of the wire is MQTT, TLS and TCP-stream overhead.
- ``live_latency_s`` (online): from a reading's stamp to its arrival at the subscriber, on CLOCK_BOOTTIME
  (the record's ``mono_ns``: same machine, so no wall-clock trust involved): p50, p90, max.

Last line: one JSON object with every phase and the set-up. Every process (daemon, simulated vehicle and its
gpsfake, mosquitto, forwarder) is stopped and the work folder deleted on exit and on Ctrl-C (``--keep``
keeps the folder: logs, database).

    python tools/bench/footprint.py [--online-s 180] [--offline-s 180] [--quick] [--work-dir /var/tmp]
                                    [--mqtt memory_window_s=0] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from fleetgate.daemon.runtime.control_protocol import MAX_LINE_BYTES, PROTOCOL_VERSION, ControlError, encode
from fleetgate.sync.mqtt.envelope import ZDICT, expand

from benchlib import free_port, wait
from mosquitto_fixture import Mosquitto, TlsFiles, make_tls
from tcp_proxy import TcpProxy

REPO = Path(__file__).resolve().parent.parent.parent
FLEETGATE = str(Path(sys.executable).parent / "fleetgate")
DEVICE = "footprint-0001"
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
NOT_FLASH = ("tmpfs", "ramfs", "devtmpfs")
PROGRESS_S = 30.0
# The preset dictionary of compact live telemetry (docs/mqtt.md, envelope version 2), if this checkout has one.


def fs_of(path: Path) -> tuple[str, str, str]:
    """(mount point, file system type, source) of the mount that holds ``path`` (/proc/self/mountinfo)."""
    real = os.path.realpath(path)
    best = ("/", "?", "?")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount = left.split()[4].replace("\\040", " ")
        fstype, source = right.split()[:2]
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[0]):
            best = (mount, fstype, source)
    return best


def proc_figures(pid: int) -> dict[str, int]:
    """The daemon's I/O counters, CPU ticks and resident memory."""
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 (state) is fields[0]
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return {
        "write_bytes": int(io["write_bytes"]),
        "cancelled_write_bytes": int(io["cancelled_write_bytes"]),
        "wchar": int(io["wchar"]),
        "syscw": int(io["syscw"]),
        "cpu_ticks": int(fields[11]) + int(fields[12]),  # utime, stime (fields 14 and 15)
        "rss_kb": rss_kb,
    }


class Control:
    """Asks the daemon over its control socket (what the CLI does) and counts the bytes it answers, since
    they are part of the daemon's write syscalls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reply_bytes = 0

    def ask(self, cmd: str, timeout_s: float = 10.0) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(self.path))
            sock.sendall(encode({"v": PROTOCOL_VERSION, "cmd": cmd, "args": {}}))
            with sock.makefile("rb") as stream:
                line = stream.readline(MAX_LINE_BYTES * 64)
        self.reply_bytes += len(line)
        reply = json.loads(line)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise ControlError(str(error.get("code", "error")), str(error.get("message", "")))
        return reply["result"]

    def status(self) -> dict[str, Any] | None:
        try:
            return self.ask("status")
        except (OSError, ControlError, ValueError):
            return None


class LogPipe:
    """Reads the daemon's stderr (journald's part under systemd) into a file, counting bytes."""

    def __init__(self, stream: IO[bytes], path: Path) -> None:
        self.bytes = 0
        self.lines = 0
        self._stream = stream
        self._out = path.open("wb")
        self._thread = threading.Thread(target=self._run, name="daemon-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for line in iter(self._stream.readline, b""):
            self.bytes += len(line)
            self.lines += 1
            self._out.write(line)
            self._out.flush()

    def close(self) -> None:
        self._thread.join(5)
        self._out.close()


@dataclass
class Received:
    boot_ns: int  # CLOCK_BOOTTIME at receipt
    kind: str  # last topic level: telemetry, heartbeat, events, health ...
    payload_bytes: int
    records: list[tuple[str, int, int]]  # (stream, seq, record mono_ns)


def records_of(payload: bytes, compressed: bool) -> list[tuple[str, int, int]]:
    """(stream, seq, mono_ns) of every record of an uplink message, as docs/mqtt.md tells a consumer: inflate
    when the user property content-encoding is zlib (with the preset dictionary: it reads messages made
    without it too), and expand a compact envelope (version 2) with the gateway's own ``expand``."""
    if compressed:
        payload = zlib.decompressobj(zdict=ZDICT).decompress(payload)
    body = json.loads(payload)
    return [(body["stream"], r["seq"], r["mono_ns"]) for r in expand(body)]


class Subscriber:
    """The cloud side: a second TLS client on the broker itself (not through the forwarder), reading every
    message of the device. A message it cannot read is counted (``undecodable``), not fatal."""

    def __init__(self, port: int, tls: TlsFiles) -> None:
        self.got: list[Received] = []
        self.undecodable = 0
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, "footprint-cloud", protocol=mqtt.MQTTv5)
        self._client.tls_set_context(tls.client_context())
        self._client.on_connect = lambda c, u, f, r, p: c.subscribe(f"fleetgate/v1/{DEVICE}/#", qos=1)
        self._client.on_subscribe = lambda c, u, m, r, p: self.subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        kind = msg.topic.rsplit("/", 1)[-1]
        records: list[tuple[str, int, int]] = []
        if "/up/" in msg.topic:
            user = getattr(msg.properties, "UserProperty", None) or []
            try:
                records = records_of(msg.payload, ("content-encoding", "zlib") in user)
            except (ValueError, KeyError, TypeError, zlib.error) as exc:
                self.undecodable += 1
                print(f"footprint: undecodable message on {msg.topic}: {exc!r}", file=sys.stderr)
        with self._lock:
            self.got.append(Received(now, kind, len(msg.payload), records))

    def between(self, start_ns: int, end_ns: int) -> list[Received]:
        with self._lock:
            return [r for r in self.got if start_ns <= r.boot_ns < end_ns]

    def seqs(self, stream: str) -> set[int]:
        with self._lock:
            return {seq for r in self.got for s, seq, _ in r.records if s == stream}

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@dataclass
class Mark:
    """Every counter at one moment."""

    boot_ns: int
    proc: dict[str, int]
    streams: dict[str, dict[str, Any]]
    records_committed: int
    commits: int
    wire_up: int
    wire_down: int
    log_bytes: int
    control_bytes: int
    taken: int | None  # the memory tier's counter, if the daemon has one

    def last_seq(self, stream: str) -> int:
        return int(self.streams.get(stream, {}).get("last_seq", 0))

    @property
    def readings(self) -> int:
        """Telemetry readings the sink has handed to the outbox so far: the memory tier's ``taken`` counter
        when the daemon keeps live telemetry in memory (``status`` outbox.memory), else the telemetry
        stream's last seq (every reading is one record of it)."""
        return self.taken if self.taken is not None else self.last_seq("telemetry")


def _terminate(proc: subprocess.Popen[Any] | None, timeout_s: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited within ``timeout_s``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def config_text(
    work: Path, tls: TlsFiles, obd_link: Path, gps_port: int, proxy_port: int, mqtt_extra: list[str]
) -> str:
    """The daemon's defaults (OBD schedule, GPS sampling, heartbeat, MQTT), with the vehicle and the link;
    ``mqtt_extra``: ``key = value`` lines added to [mqtt]."""
    extra = "".join(f"{line}\n" for line in mqtt_extra)
    return f"""
[device]
id = "{DEVICE}"

[store]
state_dir = "{work / "state"}"

[control]
socket_path = "{work / "control.sock"}"

[obd]
enabled = true
port = "{obd_link}"
protocol = "6"

[gps]
enabled = true
port = {gps_port}

[mqtt]
enabled = true
host = "127.0.0.1"
port = {proxy_port}
tls = true
{extra}
[mqtt.tls_files]
ca_file = "{tls.ca}"
cert_file = "{tls.client_cert}"
key_file = "{tls.client_key}"
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        parent = Path(args.work_dir)
        parent.mkdir(parents=True, exist_ok=True)
        mount, fstype, source = fs_of(parent)
        if fstype in NOT_FLASH:
            raise SystemExit(
                f"footprint: {parent} is on {fstype} ({mount}): write_bytes would be 0; "
                "pass --work-dir on a disk file system"
            )
        self.fs = {"mount": mount, "type": fstype, "source": source}
        self.work = Path(tempfile.mkdtemp(prefix="fleetgate-footprint-", dir=parent))
        self.broker: Mosquitto | None = None
        self.proxy: TcpProxy | None = None
        self.subscriber: Subscriber | None = None
        self.sim: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.log: LogPipe | None = None
        self.control = Control(self.work / "control.sock")
        self.mqtt_extra = [" = ".join(part.strip() for part in kv.split("=", 1)) for kv in args.mqtt]

    # -- set-up and tear-down ------------------------------------------------------------------------

    def start(self) -> None:
        work = self.work
        self.tls = make_tls(work / "tls", device_cn=DEVICE)
        self.broker = Mosquitto(tls=self.tls, persistence_dir=work / "broker", autosave_interval=60).start()
        self.proxy = TcpProxy("127.0.0.1", self.broker.port).start()
        self.subscriber = Subscriber(self.broker.port, self.tls)
        wait("the subscriber", self.subscriber.subscribed.is_set, 10)
        obd_link, gps_port = work / "ttyOBD", free_port()
        sim_log = (work / "vehicle.log").open("wb")
        self.sim = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tools/sim/vehicle.py"),
                "--obd-link",
                str(obd_link),
                "--gps-port",
                str(gps_port),
                "--engine-cycle",
                str(self.args.engine_cycle),
            ],
            stdin=subprocess.DEVNULL,
            stdout=sim_log,
            stderr=sim_log,
            env={**os.environ, "TMPDIR": str(work)},  # the emulator's elm.log, gpsfake's route and socket
            start_new_session=True,  # a Ctrl-C reaches the bench only; it stops everything in order
        )
        sim_log.close()
        wait("the simulated vehicle", lambda: obd_link.exists() and self._alive(), 30)
        self.config = work / "fleetgate.toml"
        self.config.write_text(
            config_text(work, self.tls, obd_link, gps_port, self.proxy.port, self.mqtt_extra)
        )
        self.daemon = subprocess.Popen(
            [FLEETGATE, "--config", str(self.config), "run"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert self.daemon.stdout is not None
        self.log = LogPipe(self.daemon.stdout, work / "daemon.log")

    def _alive(self) -> bool:
        for name, proc in (("daemon", self.daemon), ("simulated vehicle", self.sim)):
            if proc is not None and proc.poll() is not None:
                tail = ""
                log = self.work / ("daemon.log" if name == "daemon" else "vehicle.log")
                if log.exists():
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise SystemExit(f"footprint: the {name} exited with {proc.returncode}:\n{tail}")
        return True

    def close(self) -> None:
        _terminate(self.daemon, 30)
        if self.log is not None:
            self.log.close()
        _terminate(self.sim, 15)  # it stops the emulator and gpsfake (with its gpsd)
        if self.subscriber is not None:
            self.subscriber.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self.broker is not None:
            self.broker.close()
        if self.args.keep:
            print(f"footprint: work folder kept: {self.work}", file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- measuring -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        self._alive()
        snap = self.control.status()
        if snap is None:
            raise SystemExit("footprint: the daemon did not answer status")
        return snap

    def mark(self) -> Mark:
        snap = self.status()
        assert self.daemon is not None and self.proxy is not None and self.log is not None
        outbox = snap["outbox"]
        return Mark(
            boot_ns=time.clock_gettime_ns(time.CLOCK_BOOTTIME),
            proc=proc_figures(self.daemon.pid),
            streams={s["stream"]: s for s in outbox["streams"]},
            records_committed=outbox["records_committed"],
            commits=outbox["commits"],
            wire_up=self.proxy.bytes_up,
            wire_down=self.proxy.bytes_down,
            log_bytes=self.log.bytes,
            control_bytes=self.control.reply_bytes,
            taken=((outbox.get("memory") or {}).get("telemetry") or {}).get("taken"),
        )

    def hold(self, seconds: float, phase: str, start: Mark) -> None:
        """Let the daemon run, with a progress line on stderr now and then."""
        began = time.monotonic()
        next_progress = began + PROGRESS_S
        while (left := began + seconds - time.monotonic()) > 0:
            time.sleep(min(left, 1.0))
            self._alive()
            if time.monotonic() >= next_progress and left > 5:
                now = self.mark()
                print(
                    f"footprint: {phase} {time.monotonic() - began:.0f}/{seconds:.0f} s, "
                    f"{now.readings - start.readings} readings, "
                    f"{now.proc['write_bytes'] - start.proc['write_bytes']} bytes written",
                    file=sys.stderr,
                    flush=True,
                )
                next_progress += PROGRESS_S

    def figures(self, phase: str, a: Mark, b: Mark, denominator: int | None = None) -> dict[str, Any]:
        assert self.subscriber is not None
        seconds = (b.boot_ns - a.boot_ns) / 1e9
        readings = b.readings - a.readings
        per = denominator if denominator is not None else readings
        d = {k: b.proc[k] - a.proc[k] for k in ("write_bytes", "cancelled_write_bytes", "wchar", "syscw")}
        wire_up, wire_down = b.wire_up - a.wire_up, b.wire_down - a.wire_down
        log_bytes = b.log_bytes - a.log_bytes
        control_bytes = b.control_bytes - a.control_bytes
        file_writes = d["wchar"] - wire_up - log_bytes - control_bytes
        cpu_ms = (b.proc["cpu_ticks"] - a.proc["cpu_ticks"]) * TICK_S * 1000
        got = self.subscriber.between(a.boot_ns, b.boot_ns)
        payload: dict[str, int] = {}
        for r in got:
            payload[r.kind] = payload.get(r.kind, 0) + r.payload_bytes
        commits = b.commits - a.commits

        def each(total: float) -> float | None:
            return round(total / per, 1) if per else None

        out: dict[str, Any] = {
            "phase": phase,
            "seconds": round(seconds, 1),
            "readings": readings,
            "readings_per_s": round(readings / seconds, 2) if seconds else None,
            "flash_bytes_per_reading": each(d["write_bytes"]),
            "flash_write_syscall_bytes_per_reading": each(file_writes),
            "wire_bytes_per_reading": each(wire_up + wire_down),
            "cpu_ms_per_reading": round(cpu_ms / per, 2) if per else None,
            "rss_mb": round(b.proc["rss_kb"] / 1024, 1),
            "log_bytes_per_reading": each(log_bytes),
            "records_stored": b.records_committed - a.records_committed,  # written to SQLite, every stream
            "store_commits": commits,
            "flash_bytes_per_commit": round(d["write_bytes"] / commits) if commits else None,
            "mqtt_payload_bytes": dict(sorted(payload.items())),
            "totals": {
                "flash_bytes": d["write_bytes"],
                "flash_cancelled_bytes": d["cancelled_write_bytes"],
                "flash_write_syscall_bytes": file_writes,
                "write_syscalls": d["syscw"],
                "wire_bytes_up": wire_up,
                "wire_bytes_down": wire_down,
                "cpu_ms": round(cpu_ms),
                "log_bytes": log_bytes,
                "flash_bytes_per_s": round(d["write_bytes"] / seconds) if seconds else None,
                "wire_bytes_per_s": round((wire_up + wire_down) / seconds) if seconds else None,
            },
        }
        if phase == "online":
            lat = [
                (r.boot_ns - mono) / 1e9
                for r in got
                for stream, _, mono in r.records
                if stream == "telemetry"
            ]
            out["live_latency_s"] = (
                {
                    "p50": round(statistics.median(lat), 3),
                    "p90": round(percentile(lat, 0.9), 3),
                    "max": round(max(lat), 3),
                    "n": len(lat),
                }
                if lat
                else None
            )
        return out

    # -- the run -------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        wait("the daemon's control socket", lambda: self._alive() and self.control.status() is not None, 60)
        wait("the uplink to connect", lambda: self.status()["uplink"]["online"], 60, every=0.5)
        wait("readings", lambda: self.mark().readings > 0, 60, every=0.5)
        wait("wall time to be trusted (GPS)", lambda: self.status()["time"]["trusted"], 60, every=0.5)
        time.sleep(self.args.warmup_s)

    def run(self) -> dict[str, Any]:
        args = self.args
        assert self.proxy is not None and self.subscriber is not None
        self.warm_up()
        phases: list[dict[str, Any]] = []

        start = self.mark()
        self.hold(args.online_s, "online", start)
        end = self.mark()
        phases.append(self.figures("online", start, end))
        print(json.dumps(phases[-1]), flush=True)

        start = self.mark()
        self.proxy.cut("reset")
        self.hold(args.offline_s, "offline", start)
        end = self.mark()
        phases.append(self.figures("offline", start, end))
        phases[-1]["packer"] = self.status()["outbox"].get("packer")
        print(json.dumps(phases[-1]), flush=True)

        start = self.mark()
        backlog = {
            s: {
                "depth": row["depth"],
                "packed": row["packed"],
                "bytes": row["bytes"],
                "last_seq": row["last_seq"],
            }
            for s, row in start.streams.items()
            if row["depth"]
        }
        self.proxy.restore()
        restored = time.monotonic()
        if not args.no_sync_now:
            self.control.ask("sync")
        wait("the uplink to reconnect", lambda: self.status()["uplink"]["online"], 120, every=0.1)
        reconnect_s = time.monotonic() - restored
        wait("the backlog to drain", lambda: self._drained(backlog), args.drain_timeout_s, every=0.2)
        end = self.mark()
        delivered = len(
            {
                seq
                for r in self.subscriber.between(start.boot_ns, end.boot_ns)
                for stream, seq, _ in r.records
                if stream == "telemetry"
            }
        )
        drain = self.figures("drain", start, end, denominator=delivered)
        tele = backlog.get("telemetry", {})
        drain.update(
            {
                "delivered_readings": delivered,
                "backlog_readings": tele.get("depth", 0),
                "backlog_packed_readings": tele.get("packed", 0),
                "backlog_bytes": sum(b["bytes"] for b in backlog.values()),
                "backlog_bytes_per_reading": round(tele["bytes"] / tele["depth"], 1) if tele else None,
                "backlog_records": {s: b["depth"] for s, b in backlog.items()},
                "reconnect_s": round(reconnect_s, 2),
            }
        )
        phases.append(drain)
        print(json.dumps(drain), flush=True)
        return {
            "phases": phases,
            "device": DEVICE,
            "state_fs": self.fs,
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "sqlite": sqlite3.sqlite_version,
            "engine_cycle_s": args.engine_cycle,
            "warmup_s": args.warmup_s,
            "sync_now": not args.no_sync_now,
            "mqtt_settings": self.mqtt_extra,
            "memory_tier": self.status()["outbox"].get("memory"),
            "daemon_log_lines": self.log.lines if self.log else None,
            "undecodable_messages": self.subscriber.undecodable,
        }

    def _drained(self, backlog: dict[str, dict[str, Any]]) -> bool:
        """Every record that waited at the restore has reached the subscriber and left the outbox."""
        assert self.subscriber is not None
        snap = self.status()
        if snap["outbox"]["total"] == 0:
            return True
        rows = {s["stream"]: s for s in snap["outbox"]["streams"]}
        for stream, before in backlog.items():
            last = before["last_seq"]
            got = self.subscriber.seqs(stream)
            if sum(1 for seq in range(last - before["depth"] + 1, last + 1) if seq in got) < before["depth"]:
                return False
            now = rows.get(stream, {})
            depth = now.get("depth", 0)
            if depth and depth > now.get("last_seq", 0) - last:  # acknowledged, not yet deleted
                return False
        return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--online-s", type=float, default=180.0, help="online phase (default 180 s)")
    parser.add_argument("--offline-s", type=float, default=180.0, help="offline phase (default 180 s)")
    parser.add_argument(
        "--warmup-s", type=float, default=20.0, help="after the first readings (default 20 s)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 s phases, 5 s warm-up")
    parser.add_argument(
        "--engine-cycle", type=float, default=0, help="seconds between engine on/off (default 0: always on)"
    )
    parser.add_argument("--no-sync-now", action="store_true", help="after the outage, wait out the backoff")
    parser.add_argument("--drain-timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--work-dir", default="/var/tmp", help="where the work folder is made: a disk file system (not tmpfs)"
    )
    parser.add_argument(
        "--mqtt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for the daemon's [mqtt] section, in TOML (e.g. memory_window_s=0); repeatable",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, database)")
    args = parser.parse_args()
    if args.quick:
        args.online_s = args.offline_s = 20.0
        args.warmup_s = 5.0

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell starts background jobs ignoring it
        signal.signal(signum, interrupted)
    bench = Bench(args)
    try:
        bench.start()
        result = bench.run()
    except KeyboardInterrupt:
        print("footprint: interrupted", file=sys.stderr)
        return 130
    finally:
        bench.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
