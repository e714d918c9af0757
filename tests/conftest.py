"""Shared fixtures: a real daemon process with a notify socket the test binds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

FLEETGATE = str(Path(sys.executable).parent / "fleetgate")


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy (returned), or fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class NotifySocket:
    """Plays systemd's side of sd_notify: a datagram socket whose path goes in NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        for msg in self.messages:
            if key in msg and (value is None or msg[key] == value):
                return msg
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(msg)
            if key in msg and (value is None or msg[key] == value):
                return msg
        raise AssertionError(
            f"no {key}={value or '*'} on the notify socket within {timeout} s: {self.messages}"
        )

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """A real `fleetgate run` process."""

    def __init__(
        self, tmp: Path, config: Path, env: dict[str, str] | None = None, prefix: list[str] | None = None
    ) -> None:
        self.tmp = tmp
        self.config = config
        self.stderr_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.notify = NotifySocket(tmp / f"notify-{time.monotonic_ns()}.sock")
        full_env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **(env or {})}
        full_env.pop("FLEETGATE_CONFIG", None)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*(prefix or []), FLEETGATE, "--config", str(config), "run"],  # prefix: e.g. unshare --net
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=full_env,
            )

    @property
    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> dict[str, str]:
        try:
            return self.notify.wait_for("READY", "1", timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon log ---\n{self.log}") from None

    def cli(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FLEETGATE, "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.notify.close()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator:
    started: list[Daemon] = []

    def start(config: Path, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> Daemon:
        daemon = Daemon(tmp_path, config, env, prefix)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.cleanup()


def daemon_config(tmp_path: Path, extra: str = "", heartbeat_s: float = 60.0) -> Path:
    """A config whose state and socket live in ``tmp_path``."""
    return write_config(
        tmp_path / "fleetgate.toml",
        f"""
[device]
id = "test-0001"

[store]
state_dir = "{tmp_path / "state"}"

[control]
socket_path = "{tmp_path / "control.sock"}"

[log]
level = "debug"

[heartbeat]
interval_s = {heartbeat_s}
{extra}
""",
    )
