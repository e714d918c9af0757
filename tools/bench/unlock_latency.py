#!/usr/bin/env python3
"""Benchmark: a scooter command to its confirmed outcome, over BLE and over the cloud, through the real daemon.

From the ``scooter`` request written to the daemon's control socket (what ``fleetgate scooter IOT unlock``
sends) to the committed result record coming back: over BLE, the daemon's bleak (real code) to a BlueZ of our
own on a private system bus (tests/bluez_mock.py, python-dbusmock) whose scooter speaks docs/ble-profile.md
(HELLO, CHALLENGE, AUTH with the HMAC, RESULT); over the cloud, the daemon's Segway client to the HTTPS server
of tests/segway_server.py on loopback (TLS, OAuth2 token, the seed's envelope). Unlock and lock alternate.
Neither path has radio or WAN latency here: the figures are the gateway's own cost on top of what a real
radio (a BLE connection event is 7.5-50 ms) and a real cellular round trip (100 ms-1 s) add.

``--idle-disconnect-s 0.05 --pause-s 0.5`` lets the BLE link close between commands, so each one pays for a
connection (and its GATT discovery); the default keeps it open between commands as the daemon does. The
pause is not timed.

Output: one JSON object per channel ``{"p50_ms": …, "p99_ms": …, "n": …, "via": …}``.

    python tools/bench/unlock_latency.py [--n 200] [--idle-disconnect-s 20] [--pause-s 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from fleetgate.daemon.runtime.control_protocol import ControlError, DaemonNotRunning, request
from fleetgate.sync.crypto.device_keys import generate_secret_file

from benchlib import wait
from bluez_mock import BlueZ, fleetgate_profile
from mosquitto_fixture import make_tls
from segway_server import SEED_CLIENT_ID, SEED_CLIENT_SECRET, SegwayServer

FLEETGATE = str(Path(sys.executable).parent / "fleetgate")
IOT = "861477038719116"
ADDRESS = "D0:5A:FE:00:00:01"
KEY = "abcd1234"


def config(tmp: Path, segway: SegwayServer, ca: Path, idle_s: float) -> Path:
    secret = tmp / "device.secret"
    generate_secret_file(secret)
    client_secret = tmp / "segway.secret"
    client_secret.write_text(SEED_CLIENT_SECRET)
    client_secret.chmod(0o600)
    path = tmp / "fleetgate.toml"
    path.write_text(f"""
[device]
id = "bench-ble"
role = "depot"
secret_file = "{secret}"

[store]
state_dir = "{tmp / "state"}"

[control]
socket_path = "{tmp / "control.sock"}"

[log]
level = "warning"

[segway]
enabled = true
platform_code = "{SEED_CLIENT_ID}"
client_secret_file = "{client_secret}"
api_base = "{segway.base_url}"
ca_file = "{ca}"
max_requests_per_s = 100

[segway.poll]
status_s = 3600
location_s = 3600
battery_s = 3600

[segway.ble]
enabled = true
scan_s = 1
scan_every_s = 1
idle_disconnect_s = {idle_s}

[[segway.scooters]]
iot_code = "{IOT}"
ble_address = "{ADDRESS}"
""")
    return path


def run(socket_path: Path, via: str, n: int, pause_s: float) -> dict[str, Any]:
    times = []
    for i in range(n):
        time.sleep(pause_s)
        op = "unlock" if i % 2 == 0 else "lock"
        start = time.perf_counter()
        result = request(socket_path, "scooter", {"iot_code": IOT, "op": op, "params": {}, "via": via}, 60.0)
        elapsed = time.perf_counter() - start
        if result.get("outcome") != "done" or result.get("channel") != via:
            raise SystemExit(f"unlock_latency: {op} via {via} did not succeed: {result}")
        times.append(elapsed * 1000)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2),
        "n": n,
        "via": via,
    }


def main() -> None:
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="commands per channel")
    parser.add_argument("--idle-disconnect-s", type=float, default=20.0, help="segway.ble.idle_disconnect_s")
    parser.add_argument("--pause-s", type=float, default=0.0, help="untimed pause before each command")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-unlock-") as folder:
        tmp = Path(folder)
        tls = make_tls(tmp / "pki")
        with BlueZ() as bluez, SegwayServer(tls) as segway:
            bluez.add_peripheral(ADDRESS, name="FG-bench", rssi=-55, profile=fleetgate_profile(KEY, IOT))
            segway.add_scooter(IOT, key=KEY)
            path = config(tmp, segway, tls.ca, args.idle_disconnect_s)
            socket_path = tmp / "control.sock"
            with open(tmp / "daemon.log", "wb") as log:
                daemon = subprocess.Popen(
                    [FLEETGATE, "--config", str(path), "run"], stdout=subprocess.DEVNULL, stderr=log
                )
            try:

                def ready() -> bool:
                    if daemon.poll() is not None:
                        raise SystemExit(
                            f"unlock_latency: the daemon exited:\n{(tmp / 'daemon.log').read_text()}"
                        )
                    try:
                        view = request(socket_path, "scooters", {}, 5.0)["scooters"][0]
                    except (OSError, ValueError, KeyError, IndexError, DaemonNotRunning, ControlError):
                        return False
                    return bool(view["key_cached"] and view["ble"] and view["ble"]["in_range"])

                wait("the scooter in BLE range with its key cached", ready, 60)
                for via in ("ble", "cloud"):
                    print(json.dumps(run(socket_path, via, args.n, args.pause_s)), flush=True)
            finally:
                daemon.terminate()
                daemon.wait(20)


if __name__ == "__main__":
    main()
