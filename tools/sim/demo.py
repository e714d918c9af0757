#!/usr/bin/env python3
"""The demo: the mission end to end on a laptop, narrated (``./dev demo``).

A local cloud (mosquitto on 127.0.0.1:18830, a REEF-like managed-sessions API over mTLS, and the cloud's
signer, with a throwaway CA, certificates, signing key and device secret made on start), a simulated
vehicle (tools/sim/vehicle.py: the ELM327 emulator and gpsd replaying a drive), a PIN keypad and a
start-enable relay on socat ptys, and the daemon between them, its links to MQTT and REEF running through
forwarders that play the cellular coverage. Then the moments, each checked against what the
gateway and the cloud really saw:

    a session starts (signed, its PIN sealed to the gateway)   coverage is lost
    a wrong PIN, then the right one: the relay switches        the vehicle drives offline
    coverage returns: the backlog drains                       the session ends: its PIN is refused

``--interactive`` leaves the moments to you, from another shell::

    fleetgate demo session start [--pin 482916]   fleetgate demo coverage off|on
    fleetgate demo type-pin 482916                fleetgate demo session end
    fleetgate demo status

Ctrl-C stops everything it started and removes its folder (.run/demo); a second run starts clean.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socketserver
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the real components' wrappers, shared with the tests

from nacl.signing import SigningKey  # noqa: E402
from test_uplink_daemon import decode  # noqa: E402

from fleetgate.sync.crypto.device_keys import device_public_key_b64, generate_secret_file  # noqa: E402
from fleetgate.sync.crypto.session_set import seal_session_set  # noqa: E402
from fleetgate.sync.mqtt.envelope import expand  # noqa: E402

from mosquitto_fixture import Mosquitto, free_port, make_tls, publish_retained  # noqa: E402
from mqtt_consumer import Consumer  # noqa: E402
from pty_pair import PtyPair  # noqa: E402
from reef_server import ReefServer  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402

FLEETGATE = str(Path(sys.executable).with_name("fleetgate"))
DEVICE = "demo-0001"
VIN = "WP0ZZZ99ZTS390000"  # what the ELM327 emulator's car answers to 09 02
PIN = "482916"
WRONG_PIN = "111111"
RELAY_ON = bytes.fromhex("A0 01 01 A2")
RELAY_OFF = bytes.fromhex("A0 01 00 A1")


class Demo:
    def __init__(self, work: Path, broker_port: int, gps_port: int, drive_offline_s: float) -> None:
        self.work = work
        self.broker_port = broker_port
        self.gps_port = gps_port
        self.drive_offline_s = drive_offline_s
        self.started = time.monotonic()
        self.key = SigningKey.generate()
        self.set_version = 0
        self.session_id = 0
        self.pin = PIN
        self.procs: list[subprocess.Popen[Any]] = []
        self.relay_on = False
        self.keypad_lines: list[bytes] = []
        self.summary: dict[str, Any] = {"moments": []}
        self._stop = threading.Event()

    # -- the set-up --------------------------------------------------------------------------------------

    def start(self) -> None:
        self.work.mkdir(parents=True)
        self.secret_file = self.work / "device.secret"
        generate_secret_file(self.secret_file)
        self.broker = Mosquitto(port=self.broker_port).start()
        # REEF's managed-sessions API over mTLS, with a throwaway CA and certificates made now.
        self.tls = make_tls(self.work / "pki", device_cn=f"fleetgate-{DEVICE}")
        self.reef = ReefServer(self.tls).start()
        # The cellular coverage: both of the gateway's links to the cloud go through forwarders cut together.
        self.coverage = TcpProxy("127.0.0.1", self.broker.port, port=free_port()).start()
        self.reef_coverage = TcpProxy("127.0.0.1", self.reef.port, port=free_port()).start()
        self.cloud = Consumer("127.0.0.1", self.broker.port, f"fleetgate/v1/{DEVICE}/up/#").start()
        self.keypad = PtyPair(self.work, "keypad")
        self.relay = PtyPair(self.work, "relay")
        threading.Thread(target=self._watch_ptys, daemon=True).start()
        vehicle_log = open(self.work / "vehicle.log", "w")  # noqa: SIM115 (closed with the process)
        self.procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "tools/sim/vehicle.py"), "--obd-link", str(self.work / "ttyOBD"),
                 "--gps-port", str(self.gps_port)],
                stdout=vehicle_log, stderr=vehicle_log, start_new_session=True,
                env={**os.environ, "TMPDIR": str(self.work)},
            )
        )  # fmt: skip
        self.config = self.work / "fleetgate.toml"
        self.config.write_text(self._config())
        daemon_log = open(self.work / "daemon.log", "w")  # noqa: SIM115
        self.daemon = subprocess.Popen(
            [FLEETGATE, "--config", str(self.config), "run"], stdout=daemon_log, stderr=daemon_log,
            start_new_session=True,
        )  # fmt: skip
        self.procs.append(self.daemon)

    def _config(self) -> str:
        public = base64.b64encode(bytes(self.key.verify_key)).decode()
        w = self.work
        return f"""# Written by tools/sim/demo.py for this run; removed when it stops.
[device]
id = "{DEVICE}"
role = "vehicle"
secret_file = "{self.secret_file}"

[store]
state_dir = "{w / "state"}"

[control]
socket_path = "{w / "control.sock"}"

[heartbeat]
interval_s = 10

[supervisor]
backoff_initial_s = 0.5
backoff_max_s = 2.0

[obd]
enabled = true
port = "{w / "ttyOBD"}"
protocol = "6"

[gps]
enabled = true
port = {self.gps_port}

[trips]
ignition_off_s = 5

[mqtt]
enabled = true
host = "127.0.0.1"
port = {self.coverage.port}
tls = false  # development only: a device talks TLS with a client certificate
keepalive_s = 5
publish_timeout_s = 5
live_batch_s = 2
offline_window_s = 10

[sessions]
enabled = true
vin = "{VIN}"
signing_keys = ["{public}"]

[sessions.reef]
enabled = true
base_url = "https://127.0.0.1:{self.reef_coverage.port}/v1"
ca_file = "{self.tls.ca}"
cert_file = "{self.tls.client_cert}"
key_file = "{self.tls.client_key}"
poll_interval_s = 15
retry_s = 2

[keypad]
enabled = true
port = "{self.keypad.device}"

[start_enable]
kind = "serial-relay"
port = "{self.relay.device}"
"""

    def _watch_ptys(self) -> None:
        while not self._stop.is_set():
            for pair, handle in ((self.keypad, self._keypad_bytes), (self.relay, self._relay_bytes)):
                try:
                    data = pair.read(0.05)
                except (OSError, AssertionError):
                    data = b""
                if data:
                    handle(data)

    def _keypad_bytes(self, data: bytes) -> None:
        self.keypad_lines += [line for line in data.split(b"\n") if line]

    def _relay_bytes(self, data: bytes) -> None:
        at_on, at_off = data.rfind(RELAY_ON), data.rfind(RELAY_OFF)
        if at_on >= 0 or at_off >= 0:
            self.relay_on = at_on > at_off

    def stop(self) -> None:
        self._stop.set()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(Exception):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(Exception):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for part in ("cloud", "coverage", "reef_coverage", "reef", "keypad", "relay", "broker"):
            obj = getattr(self, part, None)
            if obj is not None:
                with contextlib.suppress(Exception):
                    obj.close() if part in ("keypad", "relay", "broker") else obj.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- what the gateway and the cloud say ----------------------------------------------------------------

    def ask(self, view: str) -> dict[str, Any]:
        done = subprocess.run(
            [FLEETGATE, "--config", str(self.config), view, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode not in (
            0,
            4,
        ):  # 4: status of a daemon running degraded (offline: the uplink backs off)
            raise RuntimeError(f"fleetgate {view}: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def received(self, stream: str) -> list[dict[str, Any]]:
        out = []
        for topic, payload, _q, _r, props in list(self.cloud.messages):
            if topic.endswith(f"/up/{stream}"):
                out += [r["data"] for r in expand(decode(topic, payload, props))]
        return out

    def online(self) -> bool:
        try:
            return bool(self.ask("status").get("uplink", {}).get("online"))
        except RuntimeError:
            return False

    def wait(self, what: str, predicate: Any, timeout: float = 90.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited ({self.daemon.returncode}): see {self.work / 'daemon.log'}"
                )
            value = predicate()
            if value:
                return value
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what}")

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    # -- the moments (also the interactive commands) ------------------------------------------------------

    def session(self, action: str, pin: str | None = None) -> dict[str, Any]:
        """Start a new session (``pin`` or the demo's) or end the current one, at REEF and on the signed
        downlink (a signed set, the PIN sealed to the gateway): the REEF bridge's part (issue 17) played here."""
        now = datetime.now(UTC)
        if action == "start":
            if pin is not None and not (pin.isascii() and pin.isdigit() and 4 <= len(pin) <= 12):
                raise ValueError("a PIN is 4 to 12 digits")
            self.reef.end_session(VIN)
            self.session_id += 1
            self.pin = pin or PIN
            completion: Any = "active"
            self.reef.add_session(VIN, id=self.session_id, pin=self.pin, initialization=now - timedelta(minutes=1),
                                  verification_id=f"demo-{self.session_id}")  # fmt: skip
        elif self.session_id:
            completion = now
            self.reef.end_session(VIN)
        else:
            raise ValueError("no session to end: start one first")
        self.set_version += 1
        payload = seal_session_set(
            device=DEVICE, vin=VIN, version=self.set_version, issued_at=now,
            sessions=[{"id": self.session_id, "verification_id": f"demo-{self.session_id}",
                       "initialization": now - timedelta(minutes=1), "completion": completion, "pin": self.pin}],
            signing_key=self.key, device_public_key_b64=device_public_key_b64(self.secret_file.read_bytes()),
        )  # fmt: skip
        publish_retained(self.broker.port, f"fleetgate/v1/{DEVICE}/down/sessions", payload)
        return {"session": self.session_id, "action": action, "set_version": self.set_version}

    def set_coverage(self, on: bool) -> dict[str, Any]:
        for link in (self.coverage, self.reef_coverage):
            if on:
                link.restore()
            else:
                link.cut("reset")
        return {"coverage": "on" if on else "off"}

    def type_pin(self, pin: str) -> dict[str, Any]:
        if not (pin.isascii() and pin.isdigit()):
            raise ValueError("a PIN is digits")
        before = len(self.keypad_lines)
        self.keypad.write(pin.encode() + b"#")
        line = self.wait(
            "the keypad's answer", lambda: self.keypad_lines[before:] and self.keypad_lines[-1], 20
        )
        time.sleep(0.3)  # the relay's command follows the keypad's answer
        feedback = {b"G": "accepted", b"R": "refused", b"L": "locked out"}.get(
            line[:1], line.decode(errors="replace")
        )
        return {"keypad": feedback, "start_enable": "on" if self.relay_on else "off"}

    def status(self) -> dict[str, Any]:
        status = self.ask("status")
        return {
            "uplink": "online" if status.get("uplink", {}).get("online") else "offline",
            "outbox_total": status["outbox"]["total"],
            "start_enable": "on" if self.relay_on else "off",
            "cloud_received": {
                s: len(self.received(s)) for s in ("telemetry", "audit", "sessions-ack", "events")
            },
        }

    def script(self) -> None:
        """The scripted story, each moment checked."""
        moments = self.summary["moments"]
        self.say("Starting the gateway: simulated vehicle, keypad and relay on ptys, a local cloud ...")
        self.wait("the uplink", self.online)
        self.wait("readings at the cloud", lambda: len(self.received("telemetry")) >= 20)
        self.say(f"The vehicle is online: {len(self.received('telemetry'))} readings have reached the cloud.")
        moments.append("online")

        acks_before = len(self.received("sessions-ack"))
        self.session("start")
        self.wait("the session set acknowledged", lambda: len(self.received("sessions-ack")) > acks_before)
        self.say(f"A renter books: session {self.session_id} starts at REEF and on the signed downlink, its PIN "
                 "sealed to this gateway. The gateway acknowledges it.")  # fmt: skip
        moments.append("session-started")

        self.set_coverage(False)
        self.wait("the uplink to notice", lambda: not self.online(), 60)
        self.say("Coverage is lost (an underground car park): the gateway is offline.")
        moments.append("coverage-lost")

        wrong = self.type_pin(WRONG_PIN)
        self.say(f"The renter types a wrong PIN: {wrong['keypad']}, start-enable {wrong['start_enable']}.")
        right = self.type_pin(self.pin)
        self.say(f"Then the right one: {right['keypad']}, start-enable {right['start_enable'].upper()}: "
                 "decided on the gateway, with no coverage.")  # fmt: skip
        if right["start_enable"] != "on" or wrong["keypad"] != "refused":
            raise RuntimeError(f"the PIN moment went wrong: {wrong}, {right}")
        moments.append("pin-offline")

        self.say(f"The vehicle drives off, still without coverage, for {self.drive_offline_s:.0f} s ...")
        time.sleep(self.drive_offline_s)
        held = self.ask("status")["outbox"]["total"]
        self.say(f"Readings, trip and PIN decisions wait on the gateway: {held} records, nothing lost.")
        moments.append("drove-offline")

        received_before = len(self.received("telemetry"))
        t0 = time.monotonic()
        self.set_coverage(True)
        self.wait("the uplink", self.online, 60)
        self.wait("the backlog to drain", lambda: self.ask("status")["outbox"]["total"] < 30, 90)
        audits = [a for a in self.received("audit") if str(a.get("event", "")).startswith("pin")]
        self.say(f"Coverage returns: the backlog reached the cloud in {time.monotonic() - t0:.1f} s "
                 f"({len(self.received('telemetry')) - received_before} readings), with the PIN decisions: "
                 + ", ".join(a.get("event", "?") for a in audits))  # fmt: skip
        moments.append("drained")
        self.summary["audit"] = [a.get("event") for a in audits]
        tagged = [r for r in self.received("telemetry") if r.get("session") == self.session_id]
        # What REEF's session telemetry is fed from (docs/mqtt.md), and every signal the cloud received.
        self.summary["session_readings"] = sorted({r["signal"] for r in tagged})
        self.summary["signals"] = sorted({r["signal"] for r in self.received("telemetry")})

        self.session("end")
        self.wait(
            "the end acknowledged", lambda: self.ask("sessions")["sessions"][0]["state"] != "active", 30
        )
        late = self.type_pin(self.pin)
        self.say(f"The session ends at the cloud. The same PIN now: {late['keypad']}.")
        if late["keypad"] != "refused":
            raise RuntimeError(f"an ended session's PIN was not refused: {late}")
        moments.append("session-ended")
        self.summary["received"] = self.status()["cloud_received"]
        self.say("That is the story. The gateway keeps running: try `fleetgate --config "
                 f"{self.config} top` in another shell; Ctrl-C here stops everything.")  # fmt: skip


def serve(demo: Demo, path: Path) -> socketserver.UnixStreamServer:
    """The interactive commands (``fleetgate demo ...``): one JSON line in, one JSON line out."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            try:
                req = json.loads(self.rfile.readline())
                cmd = req.get("cmd")
                if cmd == "type-pin":
                    reply = demo.type_pin(str(req["pin"]))
                elif cmd == "coverage":
                    reply = demo.set_coverage(req["state"] == "on")
                elif cmd == "session":
                    reply = demo.session(req["action"], req.get("pin"))
                elif cmd == "status":
                    reply = demo.status()
                else:
                    reply = {"error": f"unknown demo command {cmd!r}"}
            except Exception as exc:  # a bad request is answered, never the end of the demo
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--interactive", action="store_true", help="no script: the moments are yours (fleetgate demo)"
    )
    p.add_argument(
        "--work", type=Path, default=REPO / ".run" / "demo", help="its folder (removed at the end)"
    )
    p.add_argument(
        "--broker-port", type=int, default=18830, help="the local cloud's broker (0: any free port)"
    )
    p.add_argument("--gps-port", type=int, default=29470, help="gpsd's (0: any free port)")
    p.add_argument("--drive-offline-s", type=float, default=30.0)
    p.add_argument("--exit-after-script", action="store_true", help="stop when the story is told (tests)")
    p.add_argument("--summary", type=Path, help="write what the cloud received, as JSON, before stopping")
    args = p.parse_args(argv)
    if args.work.exists():  # what an earlier run left (it was killed, not stopped)
        shutil.rmtree(args.work)
    # 0: any free port (the tests run it beside other brokers)
    demo = Demo(
        args.work, args.broker_port or free_port(), args.gps_port or free_port(), args.drive_offline_s
    )
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    code = 0
    try:
        demo.start()
        if args.interactive:
            serve(demo, args.work / "demo.sock")
            demo.wait("the uplink", demo.online)
            print(f"demo: ready. In another shell: fleetgate demo session start | coverage off | type-pin {PIN} "
                  "| coverage on | session end | status.  Ctrl-C stops.", flush=True)  # fmt: skip
            while True:
                time.sleep(1)
        demo.script()
        if args.summary:
            args.summary.write_text(json.dumps(demo.summary, indent=2))
        while not args.exit_after_script:
            time.sleep(1)
    except KeyboardInterrupt:
        print("\ndemo: stopping ...", flush=True)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        log = args.work / "daemon.log"
        if log.exists():
            sys.stderr.write(log.read_text()[-3000:])
        code = 1
    finally:
        demo.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
