"""A serial device for tests: a `socat` pty pair, one end for the code under test, the other for the test.

    from pty_pair import PtyPair, pty_pairs_fixture

    with PtyPair(tmp_path, "keypad") as pair:   # socat -d -d pty,raw,echo=0,link=A pty,raw,echo=0,link=B
        driver opens pair.device               # the "A" link: what a daemon config names as the port
        pair.write(b"1234#")                   # the test side, "B": bytes the device sends
        pair.expect(b"G\\n")                    # bytes the device received, or AssertionError after a deadline
        pair.kill()                            # unplug: socat gone, both links removed
        pair.restart()                         # replug: same link paths, new /dev/pts numbers

    pty_pairs = pty_pairs_fixture()            # in a test module: a fixture giving a factory, closed at teardown

Notes (socat 1.7.4, Debian 12):
- The device side may be closed and reopened while socat runs; bytes written to a side nobody holds open
  are kept and read by whoever opens it next.
- SIGTERM makes socat remove both links; after that the device side's fd reports readiness to read and
  returns no data (pyserial: "device reports readiness to read but returned no data"), and writes fail
  with EIO — as an unplugged USB device does.
- Reads here wait with select() on the test-side fd; from inside an event loop use the `a…` variants (they
  run in a thread) so the code under test keeps running while the test waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SOCAT = shutil.which("socat") or "/usr/bin/socat"
START_TIMEOUT = 10.0


class PtyPair:
    """A `socat` pty pair in ``directory``: ``device`` (link ``<name>-A``) for the code under test,
    ``test_side`` (link ``<name>-B``) held open by this object for ``write``/``read``."""

    def __init__(self, directory: str | os.PathLike[str], name: str = "pty") -> None:
        self.directory = Path(directory)
        self.device = str(self.directory / f"{name}-A")
        self.test_side = str(self.directory / f"{name}-B")
        self.log_path = self.directory / f"{name}-socat.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._fd: int | None = None
        self._pending = b""  # read by `expect` past what it waited for
        self.start()

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start socat and open the test side; wait until both links exist."""
        if self.proc is not None:
            raise RuntimeError("socat already running")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    SOCAT,
                    "-d",
                    "-d",
                    f"pty,raw,echo=0,link={self.device}",
                    f"pty,raw,echo=0,link={self.test_side}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not (os.path.exists(self.device) and os.path.exists(self.test_side)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"socat exited with {self.proc.returncode}: {self.log}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"socat did not create its links within {START_TIMEOUT} s: {self.log}")
            time.sleep(0.005)
        self._fd = os.open(self.test_side, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)

    def kill(self) -> None:
        """Unplug: stop socat (SIGTERM, so it removes its links, as udev removes a device node)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pending = b""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self.proc = None
        for link in (self.device, self.test_side):  # gone already unless socat had to be SIGKILLed
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)

    def restart(self) -> None:
        """Replug: a new socat with the same link paths (the ptys behind them are new)."""
        self.kill()
        self.start()

    def close(self) -> None:
        self.kill()

    def __enter__(self) -> PtyPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- the test side ------------------------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"{self.test_side} is not open (socat not running)")
        return self._fd

    def write(self, data: bytes) -> None:
        """Send ``data`` as the device would."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fileno(), view) :]
            except BlockingIOError:
                select.select([], [self.fileno()], [], 1.0)

    def read(self, timeout: float = 5.0) -> bytes:
        """Wait up to ``timeout`` for bytes the device received; return all that are there (b"" if none)."""
        fd = self.fileno()
        if self._pending:
            timeout = 0
        ready, _, _ = select.select([fd], [], [], timeout)
        chunks, self._pending = [self._pending], b""
        if not ready:
            return chunks[0]
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def expect(self, wanted: bytes, timeout: float = 10.0) -> bytes:
        """Read until ``wanted`` arrived and return everything up to its end (what came after it is kept for
        the next read); AssertionError naming what did arrive after ``timeout``."""
        got = b""
        deadline = time.monotonic() + timeout
        while wanted not in got:
            left = deadline - time.monotonic()
            if left <= 0:
                self._pending = got
                raise AssertionError(
                    f"expected {wanted!r} on {self.test_side} within {timeout} s, got {got!r}"
                )
            got += self.read(left)
        end = got.index(wanted) + len(wanted)
        self._pending = got[end:]
        return got[:end]

    def drain(self, quiet: float = 0.05) -> bytes:
        """Read and return whatever arrives until the line is quiet for ``quiet`` seconds."""
        got = b""
        while chunk := self.read(quiet):
            got += chunk
        return got

    async def aread(self, timeout: float = 5.0) -> bytes:
        return await asyncio.to_thread(self.read, timeout)

    async def aexpect(self, wanted: bytes, timeout: float = 10.0) -> bytes:
        return await asyncio.to_thread(self.expect, wanted, timeout)


def pty_pairs_fixture() -> Callable[..., Iterator[Callable[[str], PtyPair]]]:
    """A pytest fixture (assign it to a name in a test module) that gives ``make(name) -> PtyPair``;
    every pair made is killed at teardown."""

    @pytest.fixture
    def fixture(tmp_path: Path) -> Iterator[Callable[[str], PtyPair]]:
        made: list[PtyPair] = []

        def make(name: str = "pty") -> PtyPair:
            pair = PtyPair(tmp_path, name)
            made.append(pair)
            return pair

        yield make
        for pair in made:
            pair.close()

    return fixture
