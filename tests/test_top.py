"""``fleetgate top`` in a real terminal (tmux): the live view of a daemon reading the ELM327 emulator and
gpsd (gpsfake), following a change of speed, and saying so when the daemon goes away."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_telemetry_daemon import vehicle_config

from conftest import daemon_config, wait_until
from elm_emulator import ElmEmulator
from gpsfake_fixture import Gpsfake, moving_route

FLEETGATE = str(Path(sys.executable).with_name("fleetgate"))
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="no tmux")


class Terminal:
    """A detached tmux session of a fixed size running one command; ``screen`` is what it shows."""

    def __init__(self, name: str, command: list[str]) -> None:
        self.name = name
        # The size is the terminal's: LINES/COLUMNS inherited from the test run would override it.
        size = ["env", "-u", "LINES", "-u", "COLUMNS"]
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", name, "-x", "150", "-y", "60", *size, *command], check=True
        )

    def screen(self) -> str:
        done = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True)
        return done.stdout

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytest.fixture
def terminal() -> Iterator:
    opened: list[Terminal] = []

    def open_(command: list[str]) -> Terminal:
        opened.append(Terminal(f"fleetgate-top-{time.monotonic_ns()}", command))
        return opened[-1]

    yield open_
    for t in opened:
        t.close()


def test_top_shows_the_vehicle_live_and_waits_for_a_stopped_daemon(tmp_path, start_daemon, terminal) -> None:
    route, _ = moving_route(tmp_path, start=datetime.now(UTC), stop_end_s=300)
    with ElmEmulator(link=tmp_path / "ttyOBD") as elm, Gpsfake(route, cycle_s=0.2) as gps:
        elm.set_speed(37)
        config = vehicle_config(tmp_path, elm.port, gps.port)
        daemon = start_daemon(config)
        daemon.wait_ready()
        term = terminal([FLEETGATE, "--config", str(config), "top", "--interval", "0.3"])

        def shows(*words: str) -> str | None:
            screen = term.screen()
            return screen if all(w in screen for w in words) else None

        screen = wait_until(
            "the live view",
            lambda: shows("components", "signal-watch", "rpm", "position", "sessions", "outbox and uplink"),
            60,
        )
        assert "fleetgate" in screen and "test-0001" in screen and "uplink disabled" in screen
        wait_until("speed 37", lambda: shows("vehicle_speed", "37"), 30)
        elm.set_speed(64)
        wait_until("speed 64 follows", lambda: shows("vehicle_speed", "64"), 30)
        wait_until("GPS time trusted", lambda: shows("trusted (gps)"), 60)
        daemon.terminate()
        wait_until("not running", lambda: shows("not running", "systemctl status fleetgate"), 30)


def test_top_once_prints_a_frame_or_says_the_daemon_is_not_running(tmp_path, start_daemon) -> None:
    config = daemon_config(tmp_path)
    done = subprocess.run(
        [FLEETGATE, "--config", str(config), "top", "--once"], capture_output=True, text=True
    )
    assert done.returncode == 3 and "not running" in done.stderr
    daemon = start_daemon(config)
    daemon.wait_ready()
    done = subprocess.run(
        [FLEETGATE, "--config", str(config), "top", "--once"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "components" in done.stdout and "OBD-II" in done.stdout and "uplink disabled" in done.stdout
    assert "sessions" in done.stdout and "disabled" in done.stdout
