"""A real ELM327-emulator (Ircama, 4.0.0) on a pseudo-terminal, driven from its stdin.

How it works:

* `elm -s <scenario> -b -` runs the emulator in batch mode: the first stdout line is the pty path, then its
  interpreter reads commands from stdin. A line is either an interpreter command (`scenario engineoff`) or a
  Python statement run with `emulator` (the `elm.Elm` instance) in scope.
* `command()` makes each line synchronous: it is followed by `echo <token>`, and the call returns the output
  printed before the token, so the emulator has applied the change when `command()` returns.
* Answers are overridden through `emulator.answer[<entry name>] = <response>`: the emulator returns that string,
  in its own tag format (`<header>7E8</header><size>03</size><data>41 0D 37</data>`), instead of the table's
  answer for the entry that matched the request (`SPEED`, `RPM`, `STATUS`, `GET_DTC`, `ODOMETER` in the `car`
  scenario). Overrides survive ATZ and reconnects, and are ignored while a scenario such as `engineoff`
  answers the request with a higher-priority entry (its `NO DATA`).
* ELM327-emulator 4.0.0 answers mode 03 on CAN as `43 <DTC bytes>`, without the count byte that SAE J1979
  requires, so python-obd decodes garbage. `set_dtcs` overrides `GET_DTC` with a correct `43 <count> ...`
  ISO-TP answer and `STATUS` (PID 0101) with the matching MIL bit and DTC count.
* Its `car` scenario answers PID 01A6 (odometer) from 7EA with service byte 61 instead of 41; `set_odometer`
  overrides it with a correct answer from 7E8.

Other emulator behaviour worth knowing: answers given as lists (VIN, RPM, SPEED, ...) cycle through the list on
every request (sequential choice mode); counters survive ATZ; closing stdin does not stop the batch mode
(`quit` does), so `stop()` sends SIGTERM, then SIGKILL.

Do not `import elm` in the test process: its interpreter imports python-daemon as `daemon`, which the
repository's own top-level `daemon/` folder shadows when the repo root is on sys.path (as under pytest), and
it calls sys.exit(1). Read the emulator's tables through `evaluate()` instead, from the running process.
"""

from __future__ import annotations

import ast
import atexit
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

ELM = str(Path(sys.executable).parent / "elm")
ENGINE_RX = "7E8"  # CAN id of the engine ECU's answers

_LIVE: weakref.WeakSet[ElmEmulator] = weakref.WeakSet()

# Runs elm with PR_SET_PDEATHSIG=SIGKILL, so it dies with the test process even when that is killed outright
# (batch mode keeps running after its stdin closes).
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def frame(data: str, header: str = ENGINE_RX) -> str:
    """One CAN single-frame answer in the emulator's tag format; `data` is spaced hex, e.g. "41 0D 37"."""
    size = len(data.split())
    return f"<header>{header}</header><size>{size:02X}</size><data>{data}</data>"


def dtc_bytes(code: str) -> list[str]:
    """'P0104' -> ['01', '04']; 'U0100' -> ['C1', '00'] (SAE J2012 two-byte encoding)."""
    m = re.fullmatch(r"([PCBU])([0-3])([0-9A-F]{3})", code.upper())
    if m is None:
        raise ValueError(f"not a DTC: {code!r}")
    first = ("PCBU".index(m[1]) << 6) | (int(m[2]) << 4) | int(m[3][0], 16)
    return [f"{first:02X}", m[3][1:]]


def iso_tp(payload: list[str], header: str = ENGINE_RX) -> str:
    """A payload as ISO-TP CAN frames in the emulator's tag format, where <size> carries the PCI byte: a single
    frame up to 7 bytes, else a first frame (1L LL + 6 bytes) and consecutive frames (2N + 7 bytes)."""
    if len(payload) <= 7:
        return frame(" ".join(payload), header)
    first = (f"1{len(payload) >> 8:X}", [f"{len(payload) & 0xFF:02X}", *payload[:6]])
    frames = [first]
    rest = payload[6:]
    for seq, i in enumerate(range(0, len(rest), 7), 1):
        chunk = rest[i : i + 7]
        frames.append((f"2{seq & 0xF:X}", chunk + ["00"] * (7 - len(chunk))))
    return "".join(
        f"<header>{header}</header><size>{pci}</size><data>{' '.join(data)}</data>" for pci, data in frames
    )


class ElmEmulator:
    """An `elm` batch-mode process. `port` is `link` when given (a symlink kept pointing at the current pty,
    like a udev name), otherwise the pty itself."""

    def __init__(
        self,
        scenario: str = "car",
        *,
        link: str | os.PathLike[str] | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        self.scenario = scenario
        self.link = Path(link) if link is not None else None
        self.start_timeout = start_timeout
        self.pty: str | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        self._cmd_lock = threading.Lock()
        self._token = 0
        self._reader: threading.Thread | None = None
        self._log_path: Path | None = None

    @property
    def port(self) -> str:
        if self.pty is None:
            raise RuntimeError("emulator not started")
        return str(self.link) if self.link is not None else self.pty

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log(self) -> str:
        try:
            return self._log_path.read_text(errors="replace") if self._log_path else ""
        except FileNotFoundError:  # removed by stop()
            return ""

    def start(self) -> ElmEmulator:
        if self.proc is not None:
            raise RuntimeError("already started")
        argv = [ELM, "-s", self.scenario, "-b", "-"]
        if threading.current_thread() is threading.main_thread():
            # PDEATHSIG fires when the *thread* that forked exits, so only use it from the main thread.
            argv = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]
        fd, log_path = tempfile.mkstemp(prefix="elm-", suffix=".log")
        self._log_path = Path(log_path)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # a Ctrl-C in the terminal goes to pytest, which then stops us cleanly
            )
        _LIVE.add(self)
        self._reader = threading.Thread(target=self._read_stdout, name="elm-stdout", daemon=True)
        self._reader.start()
        try:
            first = self._wait_line(lambda line: line.startswith("/dev/"), 0, self.start_timeout)
            self.pty = first.strip()
            self.command("echo ready", timeout=self.start_timeout)  # the interpreter runs, scenario is set
        except BaseException:
            self.stop()
            raise
        if self.link is not None:
            tmp = self.link.with_name(f".{self.link.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.pty)
            tmp.replace(self.link)  # atomic: the path never disappears while re-pointed
        return self

    def command(self, text: str, timeout: float = 10.0) -> list[str]:
        """Run one interpreter line (no `#`: the interpreter strips comments); return what it printed."""
        if "\n" in text or "#" in text:
            raise ValueError("one line, without '#'")
        with self._cmd_lock:
            if not self.running or self.proc is None or self.proc.stdin is None:
                raise RuntimeError(f"emulator not running\n{self.log[-2000:]}")
            self._token += 1
            token = f"__fleetgate_sync_{self._token}__"
            with self._cond:
                start = len(self._lines)
            self.proc.stdin.write(f"{text}\necho {token}\n")
            self.proc.stdin.flush()
            self._wait_line(lambda line: line.strip() == token, start, timeout)
            with self._cond:
                out = [line.rstrip("\n") for line in self._lines[start:]]
            return out[: out.index(token)]

    def set_scenario(self, name: str) -> None:
        out = self.command(f"scenario {name}")
        if not any(f"'{name}'" in line for line in out):
            raise RuntimeError(f"scenario {name!r} not set: {out}")
        self.scenario = name

    def evaluate(self, expression: str) -> Any:
        """The value of a Python literal expression evaluated inside the emulator (e.g. its tables)."""
        out = self.command(f"repr({expression})")
        try:
            return ast.literal_eval("\n".join(out))
        except (SyntaxError, ValueError):
            raise RuntimeError(f"{expression!r} printed {out!r}") from None

    def configured_vins(self) -> list[str]:
        """The VINs in the running emulator's table for its scenario, in the order it serves them."""
        responses = self.evaluate(
            f"(emulator.ObdMessage[{self.scenario!r}].get('VIN') or emulator.ObdMessage['default']['VIN'])"
            "['Response']"
        )
        vins = []
        for response in [responses] if isinstance(responses, str) else responses:
            payload = bytes.fromhex(re.sub(r"<[^>]+>", "", response).replace(" ", ""))
            vins.append(payload[1:].decode("ascii"))  # first byte: number of data items (01)
        return vins

    def elm_version(self) -> str:
        """What the emulator answers to ATI."""
        return str(self.evaluate("emulator.version"))

    def override(self, entry: str, response: str) -> None:
        """Answer requests matching table entry `entry` (e.g. "SPEED") with `response` (tag format)."""
        if "'" in response or "\\" in response:
            raise ValueError("response must not contain quotes or backslashes")
        self.command(f"emulator.answer[{entry!r}] = '{response}'")

    def reset(self, entry: str) -> None:
        """Back to the emulator's own answer for `entry`."""
        self.command(f"emulator.answer.pop({entry!r}, None)")

    def set_speed(self, kmh: int) -> None:
        if not 0 <= kmh <= 255:
            raise ValueError("PID 0D is one byte of km/h")
        self.override("SPEED", frame(f"41 0D {kmh:02X}"))

    def set_rpm(self, rpm: float) -> None:
        raw = round(rpm * 4)
        if not 0 <= raw <= 0xFFFF:
            raise ValueError("PID 0C is two bytes of rpm/4")
        self.override("RPM", frame(f"41 0C {raw >> 8:02X} {raw & 0xFF:02X}"))

    def set_odometer(self, km: float) -> None:
        raw = round(km * 10)
        self.override("ODOMETER", frame("41 A6 " + " ".join(f"{b:02X}" for b in raw.to_bytes(4, "big"))))

    def set_dtcs(self, codes: list[str], mil: bool = True) -> None:
        """Store `codes` (e.g. ["P0104"]): mode 03 answers them with the count byte, PID 0101 reports the
        MIL (when `mil`) and the count. ISO-TP multi-frame when more than two codes."""
        payload = ["43", f"{len(codes):02X}"] + [b for code in codes for b in dtc_bytes(code)]
        self.override("GET_DTC", iso_tp(payload))
        status = (0x80 if mil and codes else 0) | min(len(codes), 0x7F)
        self.override("STATUS", frame(f"41 01 {status:02X} 07 A1 00"))

    def clear_dtcs(self) -> None:
        """No stored DTC and MIL off (the emulator's own answers: `43 00`, `41 01 00 ...`)."""
        self.reset("GET_DTC")
        self.reset("STATUS")

    def pause(self, timeout: float = 5.0) -> None:
        """Wedge the adapter: SIGSTOP, so the pty stays but nothing answers. Returns once every thread of
        the process is stopped (the kill(2) call returns before the signal takes effect)."""
        if self.proc is None:
            raise RuntimeError("emulator not started")
        self.proc.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self.proc.pid}/task")
        deadline = time.monotonic() + timeout
        while not all(_proc_state(task / "stat") == "T" for task in tasks.iterdir()):
            if time.monotonic() > deadline:
                raise RuntimeError("emulator did not stop")
            time.sleep(0.01)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """Pull the plug: SIGKILL, so the pty vanishes under the client (and the link goes away too)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.stop()

    def stop(self) -> None:
        """Idempotent; never leaves a zombie or a stale link to our pty."""
        proc = self.proc
        if proc is not None:
            # SIGTERM ends it at once (batch mode installs no handler); `quit` would take over a second.
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if proc.poll() is None:
                    proc.send_signal(sig)
                    proc.send_signal(signal.SIGCONT)  # a paused process acts on SIGTERM only once resumed
                try:
                    proc.wait(timeout=3)
                    break
                except subprocess.TimeoutExpired:
                    continue
            for stream in (proc.stdin, proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except (OSError, ValueError):
                    pass
        if self._reader is not None:
            self._reader.join(timeout=3)
        if self.link is not None and self.pty is not None:
            try:
                if os.readlink(self.link) == self.pty:
                    self.link.unlink()
            except OSError:
                pass
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
        _LIVE.discard(self)

    def __enter__(self) -> ElmEmulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                with self._cond:
                    self._lines.append(line)
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _wait_line(self, match: Callable[[str], bool], start: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._lines[start:]:
                    if match(line):
                        return line
                start = len(self._lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    what = "exited" if self._eof else f"did not answer within {timeout} s"
                    raise RuntimeError(
                        f"ELM327-emulator {what}; stdout: {self._lines[-20:]}\nlog:\n{self.log[-2000:]}"
                    )
                self._cond.wait(left)


def _proc_state(stat: Path) -> str:
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "T"  # the thread is gone


@atexit.register
def _stop_all() -> None:
    for emulator in list(_LIVE):
        emulator.stop()
