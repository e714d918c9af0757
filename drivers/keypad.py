"""Serial PIN keypad (UART / USB-CDC): keys in, LED / buzzer feedback out, over one pyserial port.

    keypad = Keypad(KeypadSettings(port="/dev/ttyUSB1"))
    async with keypad:                                  # open(): KeypadError naming the port if it can't
        async for event in keypad.entries():            # PinEntered | EntryAbandoned | BadInput
            if isinstance(event, PinEntered):
                decision = await access.enter(event.digits)
                await keypad.feedback(decision.outcome)  # "accepted" | "refused" | "locked-out"

Protocols (``KeypadSettings.protocol``):
- ``"keys"``: one ASCII byte per key. ``0``-``9`` are digits, ``*`` clears the entry, ``#`` enters it;
  CR, LF, space and tab are ignored.
- ``"line"``: an entry is a line of digits ended by CR and/or LF (CRLF is one end; empty lines are ignored);
  space and tab are ignored.
Anything else is bad input: counted, reported as one ``BadInput`` per run of bad bytes, never fatal. A bad
byte inside an entry spoils it: the entry ends as ``EntryAbandoned("bad-input")`` where it would have been
submitted, so a corrupted PIN never reaches the PIN check. A partial entry with no key for
``inter_key_timeout_s`` ends as ``EntryAbandoned("timeout")``; one with more than ``max_digits`` digits as
``EntryAbandoned("too-long")`` when it is entered (its digits are not kept). Bytes typed while the port was
closed are stale: pyserial's open flushes them. Events nobody reads pile up to ``QUEUE_SIZE``; more are
dropped and counted (``events_dropped``). Log lines for bad input, abandoned entries and a full queue come at
most once per ``LOG_INTERVAL_S`` each and tell how many were held back; the counters count everything.

Feedback goes out on the same port; the defaults are a small ASCII protocol (one command per line):
``G\\n`` accepted (green LED, short beep), ``R\\n`` refused (red LED, long beep), ``L\\n`` locked out,
``C\\n`` entry abandoned (timeout or ``*``), and no key click. The caller sends the outcome of a PIN it
checked (``feedback("accepted" | "refused" | "locked-out")``); the driver itself sends the abandoned
command for a timeout or a clear, the refused command for a too-long or spoiled entry, and the key click.

Latency: the port's fd is watched with the event loop's ``add_reader`` (no polling): the ``#`` is parsed in
the same loop iteration that the kernel reports it readable, and ``PinEntered.at_mono_ns`` is taken then
(``CLOCK_BOOTTIME``, as ``fleetgate.daemon.runtime.clock.mono_ns``). Feedback writes never block the loop.

Unplug and reconnect: the driver does not reconnect by itself. An unplugged device (the fd reports readable
and returns no data, or an I/O error) ends ``entries()`` with ``KeypadError`` naming the port; the owner
(the daemon's supervisor, with its backoff) calls ``open()`` again on the same object or makes a new one.
``open()`` works again as soon as the device node is back.

Secrecy: digits are kept only in ``PinEntered.digits`` (``repr=False``) and the parser's buffer; no log
record, repr, event description or exception message of this module contains a digit that was typed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, cast

import serial

log = logging.getLogger(__name__)

KeypadProtocol = Literal["keys", "line"]
Outcome = Literal["accepted", "refused", "locked-out", "abandoned", "key"]
AbandonReason = Literal["timeout", "cleared", "too-long", "bad-input"]

DIGITS = frozenset(b"0123456789")
WHITESPACE = frozenset(b" \t\r\n\x0b\x0c")
LINE_ENDS = frozenset(b"\r\n")
ENTER = frozenset(b"#")
CLEAR = frozenset(b"*")
KEY_BYTES = DIGITS | frozenset(b"*#")
READ_SIZE = 4096
QUEUE_SIZE = 256  # events waiting for the consumer; more are dropped and counted
MAX_PENDING_OUT = 1024  # feedback bytes the device has not taken yet; more are dropped and counted
LOG_INTERVAL_S = 10.0  # at most one line per interval and kind (a noisy or hammered keypad must not flood)


def mono_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class KeypadError(Exception):
    """The keypad cannot be used: not found, not a serial device, in use, or unplugged. ``port`` names it."""

    def __init__(self, port: str, message: str) -> None:
        super().__init__(message)
        self.port = port


@dataclass(frozen=True)
class KeypadSettings:
    """How to talk to one keypad. Feedback fields are the raw bytes sent; empty bytes send nothing."""

    port: str
    baudrate: int = 9600
    protocol: KeypadProtocol = "keys"
    inter_key_timeout_s: float = 5.0
    max_digits: int = 12
    feedback_accepted: bytes = b"G\n"
    feedback_refused: bytes = b"R\n"
    feedback_locked_out: bytes = b"L\n"
    feedback_abandoned: bytes = b"C\n"
    feedback_key: bytes = b""

    def __post_init__(self) -> None:
        if self.protocol not in ("keys", "line"):
            raise ValueError(f"keypad protocol must be 'keys' or 'line', not {self.protocol!r}")
        if self.max_digits < 1:
            raise ValueError("keypad max_digits must be at least 1")
        if self.inter_key_timeout_s <= 0:
            raise ValueError("keypad inter_key_timeout_s must be positive")

    def feedback_bytes(self, outcome: Outcome) -> bytes:
        return {
            "accepted": self.feedback_accepted,
            "refused": self.feedback_refused,
            "locked-out": self.feedback_locked_out,
            "abandoned": self.feedback_abandoned,
            "key": self.feedback_key,
        }[outcome]


@dataclass(frozen=True)
class PinEntered:
    """A complete entry. ``digits`` is the PIN: it is left out of repr; never log it."""

    digits: str = field(repr=False)
    at_mono_ns: int  # CLOCK_BOOTTIME when the byte that ended the entry was read


@dataclass(frozen=True)
class EntryAbandoned:
    """A partial entry that ended without being submitted: no key for too long, ``*``, too many digits,
    or a bad byte inside it."""

    reason: AbandonReason
    at_mono_ns: int


@dataclass(frozen=True)
class BadInput:
    """Bytes that are not part of the protocol (one event per run). ``description`` shows at most a few of
    them in hex; digits are never among them."""

    byte_count: int
    description: str


KeypadEvent = PinEntered | EntryAbandoned | BadInput


class EntryParser:
    """Bytes to events for one protocol; no I/O and no clock of its own (times are passed in)."""

    def __init__(self, protocol: KeypadProtocol, max_digits: int, inter_key_timeout_s: float) -> None:
        self.protocol = protocol
        self.max_digits = max_digits
        self.timeout_ns = int(inter_key_timeout_s * 1e9)
        self._digits = bytearray()
        self._overflow = False  # more than max_digits: the rest is counted, not kept
        self._spoiled = False  # a bad byte arrived inside the entry
        self._last_key_ns = 0

    @property
    def pending(self) -> bool:
        """A partial entry exists."""
        return bool(self._digits) or self._overflow or self._spoiled

    @property
    def deadline_ns(self) -> int | None:
        """When the partial entry times out (None without one)."""
        return self._last_key_ns + self.timeout_ns if self.pending else None

    def reset(self) -> None:
        self._wipe()
        self._overflow = self._spoiled = False

    def _wipe(self) -> None:
        self._digits[:] = b"\0" * len(self._digits)  # do not leave digits in the freed buffer
        self._digits.clear()

    def feed(self, data: bytes, now_ns: int) -> list[KeypadEvent]:
        """Parse ``data`` that arrived at ``now_ns``; return the events it completes, in stream order
        (a run of bad bytes is one ``BadInput``)."""
        events: list[KeypadEvent] = []
        bad = bytearray()
        enters, clears = (LINE_ENDS, frozenset()) if self.protocol == "line" else (ENTER, CLEAR)
        for byte in data:
            if byte in DIGITS:
                kind = "digit"
            elif byte in enters:
                kind = "enter"
            elif byte in clears:
                kind = "clear"
            elif byte in WHITESPACE:
                continue
            else:
                bad.append(byte)
                if self.pending:
                    self._spoiled = True
                continue
            if bad:
                events.append(self._bad_input(bad))
                bad = bytearray()
            if kind == "digit":
                if len(self._digits) < self.max_digits and not self._overflow:
                    self._digits.append(byte)
                else:
                    self._overflow = True
                    self._wipe()
            elif self.pending:
                events.append(self._end(now_ns) if kind == "enter" else EntryAbandoned("cleared", now_ns))
                self.reset()
            self._last_key_ns = now_ns
        if bad:
            events.append(self._bad_input(bad))
        return events

    def _bad_input(self, bad: bytearray) -> BadInput:
        shown = " ".join(f"{b:02x}" for b in bad[:8]) + (" ..." if len(bad) > 8 else "")
        expected = "digits and CR/LF" if self.protocol == "line" else "0-9, * and #"
        return BadInput(len(bad), f"{len(bad)} unexpected byte(s) (expected {expected}): {shown}")

    def expire(self, now_ns: int) -> list[KeypadEvent]:
        """Abandon the partial entry if its inter-key timeout has passed."""
        deadline = self.deadline_ns
        if deadline is None or now_ns < deadline:
            return []
        self.reset()
        return [EntryAbandoned("timeout", now_ns)]

    def _end(self, now_ns: int) -> KeypadEvent:
        if self._spoiled:
            return EntryAbandoned("bad-input", now_ns)
        if self._overflow:
            return EntryAbandoned("too-long", now_ns)
        return PinEntered(self._digits.decode("ascii"), now_ns)


class _Throttle:
    """At most one log line per ``interval_s``; the lines held back are counted and told in the next one."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last = -float("inf")
        self.held = 0

    def due(self) -> int | None:
        """Lines held back since the last one written if a line may be written now, else None (counted)."""
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self.held += 1
            return None
        self._last = now
        held, self.held = self.held, 0
        return held


_WAKE = object()  # put in the queue to wake a waiting consumer (close or failure)


class Keypad:
    """One serial keypad. ``open()``/``close()`` or ``async with``; events from ``entries()`` or
    ``next_event()``; ``feedback(outcome)``; ``counters`` and ``describe()`` for status."""

    def __init__(self, settings: KeypadSettings) -> None:
        self.settings = settings
        self.port = settings.port
        self.counters: dict[str, int] = {
            "bytes": 0,
            "entries": 0,
            "abandoned_timeout": 0,
            "abandoned_cleared": 0,
            "abandoned_too_long": 0,
            "abandoned_bad_input": 0,
            "bad_input_events": 0,
            "bad_bytes": 0,
            "events_dropped": 0,
            "feedback_sent": 0,
            "feedback_dropped": 0,
            "opens": 0,
            "failures": 0,
        }
        self._ser: serial.Serial | None = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parser = self._new_parser()
        self._queue: asyncio.Queue[object] = asyncio.Queue(QUEUE_SIZE)
        self._timer: asyncio.TimerHandle | None = None
        self._out = bytearray()
        self._writing = False
        self._error: KeypadError | None = None
        self._bad_log = _Throttle()
        self._abandoned_log = _Throttle()
        self._queue_full_log = _Throttle()

    def _new_parser(self) -> EntryParser:
        s = self.settings
        return EntryParser(s.protocol, s.max_digits, s.inter_key_timeout_s)

    def __repr__(self) -> str:
        return f"Keypad({self.port!r}, {self.settings.protocol}, {self.state})"

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """One of "open", "closed" (never opened, or closed on purpose) and "failed" (see ``describe()``)."""
        if self._ser is not None:
            return "open"
        return "failed" if self._error is not None else "closed"

    @property
    def is_open(self) -> bool:
        return self._ser is not None

    def describe(self) -> str:
        """One line for status output."""
        s = self.settings
        text = f"keypad {self.port} ({s.protocol}, {s.baudrate} baud): {self.state}"
        return f"{text}: {self._error}" if self._error is not None and self._ser is None else text

    async def open(self) -> None:
        """Open the port and start reading. KeypadError with a clear message if it cannot be opened."""
        if self._ser is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._error = None
        self._parser = self._new_parser()
        self._queue = asyncio.Queue(QUEUE_SIZE)
        self._out.clear()
        ser = _open_serial(self.port, self.settings.baudrate)
        try:
            fd = ser.fileno()
        except Exception:
            ser.close()
            raise KeypadError(
                self.port, f"keypad port {self.port} has no file descriptor to wait on; use a device path"
            ) from None
        self._ser, self._fd = ser, fd
        self._loop.add_reader(fd, self._on_readable)
        self.counters["opens"] += 1
        log.info("keypad %s open (%s, %d baud)", self.port, self.settings.protocol, self.settings.baudrate)

    async def close(self) -> None:
        """Stop reading and close the port; ``entries()`` ends. ``open()`` may be called again."""
        self._release()
        if not self._queue.full():  # a full queue has no waiting consumer to wake
            self._queue.put_nowait(_WAKE)

    async def __aenter__(self) -> Keypad:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._parser.reset()
        if self._ser is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._writing = False
        self._out.clear()
        with contextlib.suppress(Exception):
            self._ser.close()
        self._ser, self._fd = None, -1

    def _fail(self, message: str, cause: BaseException | None = None) -> None:
        error = KeypadError(self.port, message)
        error.__cause__ = cause
        self._error = error
        self.counters["failures"] += 1
        self._release()
        log.warning("%s", message)
        if not self._queue.full():  # a full queue has no waiting consumer to wake
            self._queue.put_nowait(_WAKE)

    # -- events -------------------------------------------------------------------------------------

    async def next_event(self) -> KeypadEvent | None:
        """The next event; None once the keypad was closed; KeypadError if the port failed."""
        while True:
            if self._queue.empty():
                if self._error is not None:
                    raise self._error
                if self._ser is None:
                    return None
            item = await self._queue.get()
            if item is not _WAKE:
                return cast(KeypadEvent, item)

    async def entries(self) -> AsyncIterator[KeypadEvent]:
        """Events until the keypad is closed; raises KeypadError when the port fails (e.g. unplugged)."""
        while (event := await self.next_event()) is not None:
            yield event

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(f"keypad port {self.port} failed: {_reason(exc)} (unplugged?)", exc)
            return
        if not data:
            self._fail(
                f"keypad port {self.port} disconnected (device reports readiness to read but returned no data)"
            )
            return
        now = mono_ns()
        self.counters["bytes"] += len(data)
        if self.settings.feedback_key and not KEY_BYTES.isdisjoint(data):
            self._send(self.settings.feedback_key)
        for event in self._parser.feed(data, now):
            self._emit(event)
        self._schedule_timeout()

    def _on_timer(self) -> None:
        self._timer = None
        for event in self._parser.expire(mono_ns()):
            self._emit(event)
        self._schedule_timeout()

    def _schedule_timeout(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self._parser.deadline_ns
        if deadline is not None and self._loop is not None and self._ser is not None:
            self._timer = self._loop.call_later(max(0.0, (deadline - mono_ns()) / 1e9), self._on_timer)

    def _emit(self, event: KeypadEvent) -> None:
        if isinstance(event, PinEntered):
            self.counters["entries"] += 1
            log.debug("keypad %s: entry submitted", self.port)
        elif isinstance(event, EntryAbandoned):
            counter = "abandoned_" + event.reason.replace("-", "_")
            self.counters[counter] += 1
            if (held := self._abandoned_log.due()) is not None:
                log.info(
                    "keypad %s: entry abandoned (%s; %d so far, %d not logged since the last line)",
                    self.port,
                    event.reason,
                    self.counters[counter],
                    held,
                )
            feedback = "abandoned" if event.reason in ("timeout", "cleared") else "refused"
            self._send(self.settings.feedback_bytes(feedback))
        else:
            self.counters["bad_input_events"] += 1
            self.counters["bad_bytes"] += event.byte_count
            if (held := self._bad_log.due()) is not None:
                log.warning(
                    "keypad %s: %s (%d bad bytes so far, %d runs not logged since the last line)",
                    self.port,
                    event.description,
                    self.counters["bad_bytes"],
                    held,
                )
        if self._queue.full():  # nobody has been reading events for a long while
            self.counters["events_dropped"] += 1
            if (held := self._queue_full_log.due()) is not None:
                log.warning(
                    "keypad %s: event queue full, %s dropped (%d dropped in all, %d not logged since the last"
                    " line)",
                    self.port,
                    type(event).__name__,
                    self.counters["events_dropped"],
                    held,
                )
            return
        self._queue.put_nowait(event)

    # -- feedback -----------------------------------------------------------------------------------

    async def feedback(self, outcome: Outcome) -> None:
        """Send the feedback command for ``outcome`` ("accepted", "refused", "locked-out", "abandoned",
        "key"). Does not wait for the device; KeypadError if the port is not open or fails."""
        data = self.settings.feedback_bytes(outcome)
        if self._ser is None:
            raise self._error or KeypadError(self.port, f"keypad port {self.port} is not open")
        if data:
            self._send(data)
        if self._error is not None:
            raise self._error

    def _send(self, data: bytes) -> None:
        if self._ser is None or not data:
            return
        if len(self._out) + len(data) > MAX_PENDING_OUT:
            self.counters["feedback_dropped"] += 1
            return
        self._out += data
        self.counters["feedback_sent"] += 1
        self._flush()

    def _flush(self) -> None:
        try:
            written = os.write(self._fd, self._out)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError as exc:
            self._fail(f"keypad port {self.port} failed: {_reason(exc)} (unplugged?)", exc)
            return
        del self._out[:written]
        assert self._loop is not None
        if self._out and not self._writing:
            self._loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _open_serial(port: str, baudrate: int) -> serial.Serial:
    """Open ``port`` non-blocking and exclusively; KeypadError naming it and the cause if that fails."""
    try:
        return serial.serial_for_url(port, baudrate=baudrate, timeout=0, write_timeout=0, exclusive=True)
    except (serial.SerialException, OSError, ValueError) as exc:
        code = getattr(exc, "errno", None)
        if code == errno.ENOENT:
            message = f"keypad port {port} not found"
        elif code == errno.EACCES:
            message = f"keypad port {port}: permission denied (is the user in the dialout group?)"
        elif code in (errno.EAGAIN, errno.EBUSY):
            message = f"keypad port {port} is in use by another process"
        elif "configure port" in str(exc):
            message = f"keypad port {port} is not a serial device ({_reason(exc)})"
        elif isinstance(exc, ValueError):
            message = f"keypad port {port}: bad settings: {exc}"
        else:
            message = f"keypad port {port} cannot be opened: {_reason(exc)}"
        raise KeypadError(port, message) from exc
