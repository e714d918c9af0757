"""A real gpsd fed by gpsfake from an NMEA file, on a free loopback port.

    with Gpsfake(route_path, cycle_s=0.05) as fake:
        client = GpsdClient(port=fake.port)

gpsfake (Debian's /usr/bin/python3 script from gpsd-clients) starts its own gpsd (`-N`, same process group)
and feeds the file to it through a pty. Its `-c` delay is per sentence, so one GPS second of a route with
RMC + GGA + GSA + n GSV sentences takes (3 + n) * cycle_s of wall time. It replays the file forever; with
`loop=False` it plays it once and gpsd then stays up but silent, like a receiver that stopped talking.

Left behind by gpsfake/gpsd and cleaned here: the control socket $TMPDIR/gpsfake-<pid>.sock (each instance
gets a private TMPDIR that stop() removes) and gpsd's SysV shared-memory export segment, keyed by the port.
Not cleaned: the eight fixed NTP0..NTP7 segments gpsd creates as root for ntpd/chrony (they do not
accumulate, and a real time service may be reading them).

The routes the GPS tests use are generated into a test's tmp_path by `tools/sim/nmea_route.py` (loaded here
as `nmea_route`), not committed: `moving_route`, `no_fix_route`, `garbage_route`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

GPSFAKE = shutil.which("gpsfake") or "/usr/bin/gpsfake"
NMEA_ROUTE_PY = Path(__file__).resolve().parents[1] / "tools" / "sim" / "nmea_route.py"


def _load_nmea_route() -> ModuleType:
    # tools/ is not a package: load the script by path (and register it, dataclasses look the module up).
    spec = importlib.util.spec_from_file_location("nmea_route", NMEA_ROUTE_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["nmea_route"] = module
    spec.loader.exec_module(module)
    return module


nmea_route = sys.modules.get("nmea_route") or _load_nmea_route()

# Berlin, two legs of about 150 m and 120 m, driven at 36 then 54 km/h.
DRIVE_WAYPOINTS = ((52.52000, 13.40500), (52.52100, 13.40650), (52.52050, 13.40800))


def moving_route(directory: Path, **overrides: Any) -> tuple[Path, Any]:
    """Parked 2 s, two legs, parked 2 s; 7 of 8 satellites used, HDOP 0.9. Returns (path, nmea_route.Route)."""
    params: dict[str, Any] = {
        "stop_start_s": 2,
        "stop_end_s": 2,
        "sats_used": 7,
        "sats_visible": 8,
        "hdop": 0.9,
    }
    route = nmea_route.build_route(DRIVE_WAYPOINTS, [36.0, 54.0], **(params | overrides))
    return route.write(directory / "moving.nmea"), route


def no_fix_route(directory: Path, seconds: int = 10) -> tuple[Path, Any]:
    """A receiver that sees satellites but never gets a fix."""
    route = nmea_route.build_route(DRIVE_WAYPOINTS[:1], [], no_fix_s=seconds, sats_used=0, sats_visible=4)
    return route.write(directory / "no_fix.nmea"), route


def garbage_route(directory: Path, every: int = 3) -> tuple[Path, Any]:
    """The moving route with binary junk, a bad-checksum RMC (at 0,0) and a truncated GGA every `every` s."""
    path, route = moving_route(directory, garbage_every=every)
    return path.rename(directory / "garbage.nmea"), route


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gpsfake:
    def __init__(
        self, route_path: str | Path, port: int | None = None, cycle_s: float = 0.25, loop: bool = True
    ) -> None:
        self.route_path = Path(route_path)
        self.port = port or free_port()
        self.cycle_s = cycle_s
        self.loop = loop
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = ""  # gpsfake's and gpsd's stdout/stderr, kept after stop()
        self._tmpdir: Path | None = None

    @property
    def log_path(self) -> Path | None:
        return self._tmpdir / "gpsfake.log" if self._tmpdir else None

    def read_log(self) -> str:
        log_path = self.log_path
        if log_path is not None and log_path.exists():
            return log_path.read_text(errors="replace")
        return self.output

    def start(self, timeout: float = 15.0) -> Gpsfake:
        if not Path(GPSFAKE).exists():
            raise RuntimeError("gpsfake not found: apt-get install -y gpsd gpsd-clients")
        if not self.route_path.is_file():
            raise FileNotFoundError(self.route_path)
        self._tmpdir = Path(tempfile.mkdtemp(prefix="gpsfake-"))
        cmd = [GPSFAKE, "-P", str(self.port), "-n", "-c", str(self.cycle_s)]
        if not self.loop:
            cmd.append("-1")
        cmd.append(str(self.route_path))
        # gpsfake is a Debian python3 script: keep the venv's variables away from it.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["TMPDIR"] = str(self._tmpdir)
        with open(self._tmpdir / "gpsfake.log", "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stop() kills gpsd with it
            )
        try:
            self._wait_listening(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpsfake exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                # gpsd greets every client with a VERSION line: proof it is our gpsd on that port.
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                    if sock.recv(256).startswith(b'{"class":"VERSION"'):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(
            f"gpsd (gpsfake) not listening on port {self.port} after {timeout} s:\n{self.read_log()}"
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                # Stop gpsd, not gpsfake: gpsfake sees "daemon died", reaps it and exits. A SIGTERM to gpsfake
                # can hang it: its handler reaps gpsd with Popen.poll(), which gives up while the interrupted
                # main loop holds Popen's wait lock, and then retries forever.
                gpsd = [pid for pid in group_members(proc.pid) if pid != proc.pid]
                for pid in gpsd or [proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            # Then SIGKILL whatever is left in its process group until it is empty.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                proc.poll()  # reap gpsfake, or its zombie keeps the group alive
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # session leader: its pid is the group id
                except ProcessLookupError:
                    break
                time.sleep(0.02)
            proc.wait(5)
            # gpsd leaves its SysV shared-memory export segment behind (24 KiB); gpsfake keys it by port.
            subprocess.run(
                ["ipcrm", "-M", f"0x4770{self.port:04X}"], capture_output=True, check=False, timeout=10
            )
        if self._tmpdir is not None:
            self.output = self.read_log()
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Gpsfake:
        return self.start() if self.proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def group_members(pgid: int) -> list[int]:
    """Pids of the processes (zombies included) in process group `pgid`, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses, so split after the last ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process went away meanwhile
        if int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members
