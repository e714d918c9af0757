"""The demo (tools/sim/demo.py, ``./dev demo``): the story told end to end against the real parts, checked by
what the cloud side received; the interactive moments through ``fleetgate demo``; Ctrl-C leaves nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FLEETGATE, wait_until

DEMO = Path(__file__).resolve().parent.parent / "tools" / "sim" / "demo.py"
pytestmark = pytest.mark.timeout(240)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name ``text`` (the demo's folder): what Ctrl-C must not leave."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(cmdline)
    return found


def demo_command(work: Path, *extra: str) -> list[str]:
    return [sys.executable, str(DEMO), "--work", str(work), "--broker-port", "0", "--gps-port", "0", *extra]


def test_the_story_is_told_and_the_cloud_receives_it(tmp_path: Path) -> None:
    work, summary = tmp_path / "demo", tmp_path / "summary.json"
    done = subprocess.run(
        demo_command(work, "--exit-after-script", "--drive-offline-s", "5", "--summary", str(summary)),
        capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    told = json.loads(summary.read_text())
    assert told["moments"] == [
        "online", "session-started", "coverage-lost", "pin-offline", "drove-offline", "drained", "session-ended",
    ]  # fmt: skip
    # What the cloud side received: the PIN decisions made offline, acknowledgements, the backlog.
    assert told["audit"][:2] == ["pin-refused", "pin-accepted"]
    assert told["received"]["sessions-ack"] >= 2 and told["received"]["telemetry"] > 20
    # Readings taken during the session reach the wire tagged with it: REEF's session telemetry (docs/mqtt.md).
    # (The odometer is read once a minute, longer than this drive; GPS readings follow gpsfake's replay.)
    tagged = set(told["session_readings"])
    assert {"vehicle_speed", "rpm"} <= tagged <= set(told["signals"]), tagged
    assert "start-enable ON" in done.stdout and "The same PIN now: refused" in done.stdout
    assert not work.exists() and not processes_mentioning(str(work))


def test_interactive_moments_and_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.Popen(
        demo_command(work, "--interactive"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    env = {**os.environ, "FLEETGATE_DEMO_SOCKET": str(work / "demo.sock")}

    def demo(*args: str) -> dict:
        done = subprocess.run(
            [FLEETGATE, "demo", *args, "--json"], capture_output=True, text=True, env=env, timeout=90
        )
        assert done.returncode in (0, 1), done.stderr
        return json.loads(done.stdout)

    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if "demo: ready" in line or time.monotonic() > deadline:
                break
        assert demo("session", "start", "--pin", "665544")["session"] == 1
        wait_until(
            "the session at the gateway", lambda: demo("type-pin", "665544")["keypad"] == "accepted", 60
        )
        assert demo("coverage", "off") == {"coverage": "off"}
        wait_until("offline", lambda: demo("status")["uplink"] == "offline", 60)
        assert demo("type-pin", "123123") == {"keypad": "refused", "start_enable": "on"}
        assert demo("type-pin", "665544") == {"keypad": "accepted", "start_enable": "on"}
        assert "error" in demo("type-pin", "12ab")  # a bad request is answered, the demo goes on
        assert demo("coverage", "on") == {"coverage": "on"}
        wait_until("online", lambda: demo("status")["uplink"] == "online", 60)
        wait_until("the decisions at the cloud", lambda: demo("status")["cloud_received"]["audit"] >= 3, 60)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    assert not work.exists() and not processes_mentioning(str(work))
    missing = subprocess.run([FLEETGATE, "demo", "status"], capture_output=True, text=True, env=env)
    assert missing.returncode == 3 and "./dev demo --interactive" in missing.stderr
