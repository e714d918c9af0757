#!/usr/bin/env python3
"""A simulated vehicle for the demo: an ELM327 emulator on a pty and gpsd replaying a looped drive.

    python tools/sim/vehicle.py --obd-link .run/demo/ttyOBD --gps-port 29470

The emulator (ELM327-emulator, `car` scenario, its speed replaced by a smooth 15-65 km/h drive) answers
OBD-II like a running car; a symlink at --obd-link points at its pty, as udev would name a USB adapter.
gpsfake replays an NMEA drive around a block (written by nmea_route.py with the current time, at real-time
pace, looping) on --gps-port. `--engine-cycle S` switches the emulator between `car` and `engineoff` every
S seconds, so trips start and complete. Runs until SIGTERM or SIGINT, then stops both.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import nmea_route  # a sibling script, not a package

# A loop around a block in Berlin-Mitte, about 1.3 km.
BLOCK = (
    (52.52000, 13.40500),
    (52.52250, 13.40900),
    (52.52050, 13.41350),
    (52.51800, 13.40950),
    (52.52000, 13.40500),
)
SENTENCES_PER_EPOCH = 5  # GGA, RMC, GSA and two GSV (8 satellites in view)


SPEED_STEP_S = 1.0
ENGINE_RX = "7E8"  # CAN id of the engine ECU's answers


ODOMETER_START_KM = 5999.6  # the emulator's own reading, as a vehicle would answer it


def odometer_command(km: float) -> str:
    """PID A6 as a vehicle answers it (service byte 41; the emulator's `car` scenario answers 61, which is no
    mode 01 answer and which the gateway refuses), counting up with the distance driven."""
    raw = round(km * 10).to_bytes(4, "big").hex(" ").upper()
    return f"emulator.answer['ODOMETER'] = '<header>{ENGINE_RX}</header><size>06</size><data>41 A6 {raw}</data>'\n"


def speed_kmh(t: float) -> int:
    """A plausible drive at ``t`` seconds: between 15 and 65 km/h, changing by at most ~1.3 km/h a second (the
    `car` scenario's own speed jumps by tens of km/h from one answer to the next, which no vehicle does:
    every sample would be a hard acceleration)."""
    return round(40 + 25 * math.sin(2 * math.pi * t / 120))


def speed_command(kmh: int) -> str:
    """The emulator command that makes PID 0D answer ``kmh``."""
    return f"emulator.answer['SPEED'] = '<header>{ENGINE_RX}</header><size>03</size><data>41 0D {kmh:02X}</data>'\n"


def start_emulator(link: Path) -> subprocess.Popen[str]:
    elm = shutil.which("elm") or str(Path(sys.executable).parent / "elm")
    proc = subprocess.Popen(
        [elm, "-s", "car", "-b", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=tempfile.gettempdir(),  # it writes elm.log into its working directory
    )
    assert proc.stdout is not None
    pty = proc.stdout.readline().strip()
    if not pty.startswith("/dev/"):
        proc.kill()
        raise SystemExit(f"ELM327 emulator did not report a pty (got {pty!r})")
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()  # keep its pipe drained
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(pty)
    tmp.replace(link)
    return proc


def start_gpsfake(port: int, folder: Path) -> subprocess.Popen[bytes]:
    route = nmea_route.build_route(
        BLOCK, 30.0, start=datetime.now(UTC), stop_start_s=5, stop_end_s=20, sats_visible=8
    )
    path = route.write(folder / "block.nmea")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["TMPDIR"] = str(folder)
    return subprocess.Popen(
        ["gpsfake", "-P", str(port), "-n", "-c", str(1 / SENTENCES_PER_EPOCH), str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"gpsd did not listen on port {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--obd-link", type=Path, required=True, help="symlink to keep pointing at the emulator's pty"
    )
    parser.add_argument("--gps-port", type=int, default=29470, help="port gpsd listens on (default 29470)")
    parser.add_argument(
        "--engine-cycle", type=float, default=0, help="seconds between engine on/off (0: never off)"
    )
    args = parser.parse_args()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    folder = Path(tempfile.mkdtemp(prefix="fleetgate-sim-"))
    emulator = start_emulator(args.obd_link)
    gps: subprocess.Popen[bytes] | None = None
    try:
        if shutil.which("gpsfake"):
            gps = start_gpsfake(args.gps_port, folder)
            wait_port(args.gps_port)
        else:
            print(
                "vehicle: gpsfake not installed (apt-get install gpsd gpsd-clients): no GPS", file=sys.stderr
            )
        print(
            f"vehicle: OBD-II at {args.obd_link}, gpsd at 127.0.0.1:{args.gps_port}",
            file=sys.stderr,
            flush=True,
        )
        engine_on = True
        odometer_km = ODOMETER_START_KM
        started = time.monotonic()
        next_switch = started + args.engine_cycle if args.engine_cycle else float("inf")
        while not stop.wait(SPEED_STEP_S):
            now = time.monotonic()
            if emulator.stdin is None:
                continue
            if now >= next_switch:
                engine_on = not engine_on
                next_switch = now + args.engine_cycle
                emulator.stdin.write(f"scenario {'car' if engine_on else 'engineoff'}\n")
                print(f"vehicle: engine {'on' if engine_on else 'off'}", file=sys.stderr, flush=True)
            if engine_on:
                kmh = speed_kmh(now - started)
                odometer_km += kmh * SPEED_STEP_S / 3600
                emulator.stdin.write(speed_command(kmh) + odometer_command(odometer_km))
                emulator.stdin.flush()
    finally:
        emulator.terminate()
        if gps is not None:
            os.killpg(gps.pid, signal.SIGKILL)  # gpsfake's own SIGTERM handler can hang; take gpsd with it
        for proc in (emulator, gps):
            if proc is not None:
                proc.wait(5)
        args.obd_link.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
