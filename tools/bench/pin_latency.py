#!/usr/bin/env python3
"""Benchmark: PIN entry to start-enable, offline. From the ``#`` written to the keypad's pty to the relay's
"on" command read on the relay's pty, through the real daemon (``fleetgate run``): keypad driver, access
decision against the synchronized sessions (keyed hash, constant-time compare), lockout state, serial
relay. p50 and p99 over ``--entries`` entries (default 1000).

Set-up (not timed): socat pty pairs for keypad and relay, a local mosquitto that delivers one signed,
PIN-sealed session set to the daemon, then is stopped: every entry is checked with no coverage at all.
Each entry waits for the keypad's "accepted" feedback before the next, which comes after the audit record
is committed (``synchronous=full``), so entries do not queue behind each other's disk writes.

Last line of output: one JSON object ``{"p50_ms": …, "p99_ms": …, "n": …, …}``.

    python tools/bench/pin_latency.py [--entries N]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchlib import free_port, wait

FLEETGATE = str(Path(sys.executable).parent / "fleetgate")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SOCAT = shutil.which("socat") or "/usr/bin/socat"
DEVICE = "bench-pin"
VIN = "1D4PT4GKXBW600841"
PIN = "739164"
RELAY_ON = bytes.fromhex("A0 01 01 A2")
STEP_TIMEOUT_S = 20.0


class Pty:
    """A socat pty pair: ``device`` for the daemon, the other end held here."""

    def __init__(self, folder: Path, name: str) -> None:
        self.device, side = str(folder / f"{name}-A"), str(folder / f"{name}-B")
        self.proc = subprocess.Popen(
            [SOCAT, "pty,raw,echo=0,link=" + self.device, "pty,raw,echo=0,link=" + side],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait(f"socat links for {name}", lambda: os.path.exists(self.device) and os.path.exists(side), 10)
        self.fd = os.open(side, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)

    def read_until(self, wanted: bytes, timeout: float = STEP_TIMEOUT_S) -> float:
        """perf_counter when ``wanted`` has arrived."""
        got = b""
        deadline = time.monotonic() + timeout
        while wanted not in got:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SystemExit(f"pin_latency: {wanted!r} did not arrive (got {got!r})")
            if select.select([self.fd], [], [], left)[0]:
                got += os.read(self.fd, 4096)
        return time.perf_counter()

    def drain(self) -> None:
        while select.select([self.fd], [], [], 0.05)[0]:
            os.read(self.fd, 4096)

    def close(self) -> None:
        os.close(self.fd)
        self.proc.terminate()
        self.proc.wait(5)


def config_text(tmp: Path, secret: Path, signing_public: str, port: int, keypad: str, relay: str) -> str:
    return f"""
[device]
id = "{DEVICE}"
secret_file = "{secret}"

[store]
state_dir = "{tmp / "state"}"

[control]
socket_path = "{tmp / "control.sock"}"

[log]
level = "warning"

[mqtt]
enabled = true
host = "127.0.0.1"
port = {port}
tls = false

[sessions]
enabled = true
vin = "{VIN}"
signing_keys = ["{signing_public}"]

[keypad]
enabled = true
port = "{keypad}"

[start_enable]
kind = "serial-relay"
port = "{relay}"
"""


def publish_session_set(port: int, signing_key: Any, device_key: str) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from fleetgate.sync.crypto.session_set import seal_session_set

    payload = seal_session_set(
        device=DEVICE,
        vin=VIN,
        version=1,
        issued_at=datetime.now(UTC),
        sessions=[
            {
                "id": 7,
                "verification_id": "bench",
                "initialization": datetime.now(UTC),
                "completion": "active",
                "pin": PIN,
            }
        ],
        signing_key=signing_key,
        device_public_key_b64=device_key,
    )
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    info = client.publish(f"fleetgate/v1/{DEVICE}/down/sessions", payload, qos=1, retain=True)
    info.wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def cli(config: Path, *args: str) -> dict[str, Any] | None:
    result = subprocess.run(
        [FLEETGATE, "--config", str(config), *args, "--json"], capture_output=True, text=True, check=False
    )
    # status exits 4 while a component fails (the uplink in backoff while offline): still an answer
    return json.loads(result.stdout) if result.returncode in (0, 4) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1000, help="PIN entries to time (default 1000)")
    args = parser.parse_args()
    if args.entries < 10:
        parser.error("--entries must be at least 10")

    from nacl.signing import SigningKey

    from fleetgate.sync.crypto.device_keys import device_public_key_b64, generate_secret_file

    with tempfile.TemporaryDirectory(prefix="fleetgate-pin-bench-") as tmp_s:
        tmp = Path(tmp_s)
        secret = tmp / "device.secret"
        generate_secret_file(secret)
        signing = SigningKey.generate()
        keypad, relay = Pty(tmp, "keypad"), Pty(tmp, "relay")
        port = free_port()
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        broker = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        config = tmp / "fleetgate.toml"
        config.write_text(
            config_text(
                tmp,
                secret,
                base64.b64encode(bytes(signing.verify_key)).decode(),
                port,
                keypad.device,
                relay.device,
            )
        )
        daemon_log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 (closed in finally)
        daemon = subprocess.Popen([FLEETGATE, "--config", str(config), "run"], stderr=daemon_log)
        try:
            wait("the daemon", lambda: cli(config, "status"))
            wait("the uplink", lambda: (cli(config, "status") or {}).get("uplink", {}).get("online"))
            publish_session_set(port, signing, device_public_key_b64(secret.read_bytes()))
            wait(
                "the session set",
                lambda: ((cli(config, "sessions") or {}).get("sync") or {}).get("mqtt_version"),
            )
            broker.terminate()
            broker.wait(10)
            wait("offline", lambda: not (cli(config, "status") or {}).get("uplink", {}).get("online", True))
            keypad.drain()
            relay.drain()
            samples = []
            for _ in range(args.entries):
                start = time.perf_counter()
                os.write(keypad.fd, PIN.encode() + b"#")
                samples.append(relay.read_until(RELAY_ON) - start)
                keypad.read_until(b"G\n")
            view = cli(config, "sessions") or {}
        finally:
            daemon.terminate()
            daemon.wait(20)
            daemon_log.close()
            if broker.poll() is None:
                broker.kill()
            keypad.close()
            relay.close()
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, round(0.99 * len(ms)) - 1)]
    print(
        f"{len(ms)} entries offline: p50 {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms, max {ms[-1]:.2f} ms",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "p50_ms": round(statistics.median(ms), 3),
                "p99_ms": round(p99, 3),
                "n": len(ms),
                "max_ms": round(ms[-1], 3),
                "mean_ms": round(statistics.fmean(ms), 3),
                "accepted": (view.get("access") or {}).get("decisions", {}).get("accepted"),
                "cpus": os.cpu_count(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
