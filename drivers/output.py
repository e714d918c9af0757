"""The start-enable output ("the vehicle may start"): one interface, three backends.

    output = await open_output(SerialRelaySettings(port="/dev/ttyUSB2"))   # or GpioLineSettings, LogOnlySettings
    await output.set(True)          # OutputError naming the device if it cannot be switched
    output.enabled, output.describe()
    await output.close()            # switches off first

Every backend comes up off (``open`` drives the off state) and goes down off (``close``): a daemon that is not
running cannot end a session, so it does not leave the vehicle enabled. A backend that was constructed but
not opened opens on its first ``set`` (prefer ``open_output``: it switches off at start and surfaces a missing
device at once). A ``set`` that fails leaves the output commanded *off*: nothing is switched on later behind
a caller that saw the error.

- ``SerialRelay``: a USB/serial relay board driven by command bytes (default: the common LCUS-1 board,
  on ``A0 01 01 A2``, off ``A0 01 00 A1``). The port's fd is watched with the event loop's ``add_reader``;
  an unplug (readable with no data, or EIO) is noticed at once, logged, shown by ``describe()``, and the
  relay reconnects by itself every ``reconnect_interval_s`` and re-asserts the last commanded state (a board
  that lost power comes back off). A ``set`` while disconnected tries to reopen at once and raises
  ``OutputError`` if it cannot. Writes never block the loop. Bytes the board sends are read and ignored.
  A pyserial URL without a file descriptor (socket://, rfc2217://) is written from a thread instead and its
  loss is noticed only when a write fails.
- ``GpioLine``: a line of a Linux GPIO character device through libgpiod v2's Python bindings (PyPI
  ``gpiod`` >= 2, a binary wheel with libgpiod inside; kernel GPIO uAPI v2, Linux >= 5.10). The package is
  imported only when a GPIO output is opened and is not a dependency of fleetgate: install it on devices that
  use GPIO. The line is requested as an output, initially inactive; ``active_low`` makes "enabled" drive it
  low. The request is held while the output is open (another process cannot take the line).
- ``LogOnly``: development; logs "start-enable on" / "start-enable off" at INFO and keeps the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import serial

log = logging.getLogger(__name__)

LCUS1_ON = bytes.fromhex("A0 01 01 A2")
LCUS1_OFF = bytes.fromhex("A0 01 00 A1")


class OutputError(Exception):
    """The start-enable output could not be opened or switched; the message names the device."""


@runtime_checkable
class StartEnable(Protocol):
    """What the daemon needs of a start-enable output."""

    @property
    def enabled(self) -> bool:
        """The last state commanded successfully (False after a failed ``set``)."""
        ...

    async def open(self) -> None:
        """Take the device and drive it off; OutputError naming the device if it cannot be."""
        ...

    async def set(self, enabled: bool) -> None:
        """Switch the output; OutputError if the device could not be told."""
        ...

    async def close(self) -> None:
        """Switch off (best effort) and release the device."""
        ...

    def describe(self) -> str:
        """One line for status output: backend, device, state."""
        ...


# -- settings --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SerialRelaySettings:
    port: str
    baudrate: int = 9600
    on_command: bytes = LCUS1_ON
    off_command: bytes = LCUS1_OFF
    reconnect_interval_s: float = 1.0  # while unplugged, try to reopen this often
    write_timeout_s: float = 1.0  # a board that does not take a command within this is an error


@dataclass(frozen=True)
class GpioLineSettings:
    chip: str = "/dev/gpiochip0"
    line: int = 17
    active_low: bool = False
    consumer: str = "fleetgate-start-enable"  # shown by gpioinfo as the line's user


@dataclass(frozen=True)
class LogOnlySettings:
    name: str = "start-enable"


OutputSettings = SerialRelaySettings | GpioLineSettings | LogOnlySettings


async def open_output(settings: OutputSettings) -> StartEnable:
    """The backend for ``settings``, opened and switched off. OutputError (device named) if it can't be."""
    output: SerialRelay | GpioLine | LogOnly
    if isinstance(settings, SerialRelaySettings):
        output = SerialRelay(settings)
    elif isinstance(settings, GpioLineSettings):
        output = GpioLine(settings)
    elif isinstance(settings, LogOnlySettings):
        output = LogOnly(settings)
    else:
        raise TypeError(f"not start-enable output settings: {type(settings).__name__}")
    try:
        await output.open()
    except BaseException:
        await output.close()
        raise
    return output


# -- log only --------------------------------------------------------------------------------------------


class LogOnly:
    """Development backend: logs each switch at INFO."""

    def __init__(self, settings: LogOnlySettings | None = None) -> None:
        self.settings = settings or LogOnlySettings()
        self._enabled = False

    @property
    def enabled(self) -> bool:
        return self._enabled

    async def open(self) -> None:
        self._enabled = False

    async def set(self, enabled: bool) -> None:
        self._enabled = enabled
        log.info("%s %s", self.settings.name, "on" if enabled else "off")

    async def close(self) -> None:
        if self._enabled:
            await self.set(False)

    def describe(self) -> str:
        return f"log only: {'on' if self._enabled else 'off'}"


# -- serial relay ----------------------------------------------------------------------------------------


class SerialRelay:
    """A relay board on a serial port, switched by command bytes; reconnects and re-asserts by itself."""

    def __init__(self, settings: SerialRelaySettings) -> None:
        self.settings = settings
        self.port = settings.port
        self.last_error: str | None = None
        self.counters: dict[str, int] = {"commands": 0, "failures": 0, "reconnects": 0, "bytes_ignored": 0}
        self._ser: serial.Serial | None = None
        self._fd = -1  # -1: a URL port without a file descriptor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._commanded = False
        self._closed = False
        self._reconnect: asyncio.Task[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._commanded

    @property
    def connected(self) -> bool:
        return self._ser is not None

    def describe(self) -> str:
        state = "on" if self._commanded else "off"
        if self._ser is not None:
            return f"serial relay {self.port}: {state}"
        if self._closed:
            return f"serial relay {self.port}: closed"
        return (
            f"serial relay {self.port}: {state}, NOT CONNECTED ({self.last_error}); "
            f"retrying every {self.settings.reconnect_interval_s:g} s"
        )

    async def open(self) -> None:
        """Open the port and switch the relay off. OutputError if the port cannot be opened."""
        self._loop = asyncio.get_running_loop()
        self._closed = False
        async with self._lock:
            if self._ser is None:
                self._connect()
            try:
                await self._write(self.settings.off_command)
            except OutputError as exc:
                self._disconnect(str(exc), reconnect=False)
                raise
            self._commanded = False
        log.info("start-enable relay %s open, off", self.port)

    async def set(self, enabled: bool) -> None:
        async with self._lock:
            if self._closed:
                raise OutputError(f"start-enable relay {self.port} is closed")
            self._loop = asyncio.get_running_loop()
            try:
                if self._ser is None:
                    self._connect()
                await self._write(self.settings.on_command if enabled else self.settings.off_command)
            except OutputError as exc:
                self._commanded = False  # fail safe: re-asserted as off once the board is back
                self.counters["failures"] += 1
                self._disconnect(str(exc))
                raise
            self._commanded = enabled
            self.counters["commands"] += 1

    async def close(self) -> None:
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect
            self._reconnect = None
        async with self._lock:
            if self._ser is not None:
                try:
                    await self._write(self.settings.off_command)
                except OutputError as exc:
                    log.warning(
                        "start-enable relay %s: could not switch off while closing: %s", self.port, exc
                    )
            if self._commanded:
                log.info("start-enable relay %s off (closing)", self.port)
            self._commanded = False
            self._disconnect(None, reconnect=False)

    # -- port handling ------------------------------------------------------------------------------

    def _connect(self) -> None:
        ser = _open_port(self.port, self.settings.baudrate, self.settings.write_timeout_s)
        try:
            fd = ser.fileno()
        except Exception:
            fd = -1  # URL port: written from a thread, loss noticed when a write fails
        self._ser, self._fd = ser, fd
        self.last_error = None
        if fd >= 0:
            assert self._loop is not None
            self._loop.add_reader(fd, self._on_readable)

    def _disconnect(self, reason: str | None, *, reconnect: bool = True) -> None:
        """Release the port (if open); with a reason, log it and reconnect in the background."""
        if self._ser is not None:
            if self._fd >= 0 and self._loop is not None:
                self._loop.remove_reader(self._fd)
                self._loop.remove_writer(self._fd)
            with contextlib.suppress(Exception):
                self._ser.close()
            self._ser, self._fd = None, -1
            if reason is not None:
                log.warning("%s", reason)
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_exception(OutputError(reason or f"start-enable relay {self.port} closed"))
        if reason is not None:
            self.last_error = reason
        if reconnect and not self._closed and (self._reconnect is None or self._reconnect.done()):
            assert self._loop is not None
            self._reconnect = self._loop.create_task(
                self._reconnect_loop(), name=f"relay-reconnect {self.port}"
            )

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._disconnect(f"start-enable relay {self.port} failed: {_reason(exc)} (unplugged?)")
            return
        if not data:
            self._disconnect(f"start-enable relay {self.port} disconnected (device gone)")
            return
        self.counters["bytes_ignored"] += len(data)

    async def _reconnect_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.settings.reconnect_interval_s)
            async with self._lock:
                if self._ser is not None or self._closed:
                    return  # a set() got there first
                try:
                    self._connect()
                    await self._write(
                        self.settings.on_command if self._commanded else self.settings.off_command
                    )
                except OutputError as exc:
                    if self._ser is not None:
                        self._disconnect(str(exc), reconnect=False)
                    self.last_error = str(exc)
                    continue
                self.counters["reconnects"] += 1
                log.info(
                    "start-enable relay %s reconnected; re-asserted %s",
                    self.port,
                    "on" if self._commanded else "off",
                )
                return

    async def _write(self, data: bytes) -> None:
        ser = self._ser
        assert ser is not None
        if self._fd < 0:
            try:
                await asyncio.to_thread(ser.write, data)
            except (serial.SerialException, OSError) as exc:
                raise OutputError(f"start-enable relay {self.port}: write failed: {_reason(exc)}") from exc
            return
        assert self._loop is not None
        deadline = self._loop.time() + self.settings.write_timeout_s
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise OutputError(
                    f"start-enable relay {self.port}: write failed: {_reason(exc)} (unplugged?)"
                ) from exc
            if view:
                await self._until_writable(deadline)
                if self._ser is not ser:
                    raise OutputError(f"start-enable relay {self.port} disconnected during a write")

    async def _until_writable(self, deadline: float) -> None:
        assert self._loop is not None
        waiter = self._write_waiter = self._loop.create_future()
        self._loop.add_writer(self._fd, lambda: waiter.done() or waiter.set_result(None))
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except TimeoutError:
            raise OutputError(
                f"start-enable relay {self.port} did not take the command within "
                f"{self.settings.write_timeout_s:g} s"
            ) from None
        finally:
            self._write_waiter = None
            if self._ser is not None:
                self._loop.remove_writer(self._fd)


def _open_port(port: str, baudrate: int, write_timeout_s: float) -> serial.Serial:
    try:
        return serial.serial_for_url(
            port, baudrate=baudrate, timeout=0, write_timeout=write_timeout_s, exclusive=True
        )
    except (serial.SerialException, OSError, ValueError) as exc:
        code = getattr(exc, "errno", None)
        if code == errno.ENOENT:
            message = f"start-enable relay port {port} not found"
        elif code == errno.EACCES:
            message = f"start-enable relay port {port}: permission denied (is the user in the dialout group?)"
        elif code in (errno.EAGAIN, errno.EBUSY):
            message = f"start-enable relay port {port} is in use by another process"
        elif "configure port" in str(exc):
            message = f"start-enable relay port {port} is not a serial device ({_reason(exc)})"
        else:
            message = f"start-enable relay port {port} cannot be opened: {_reason(exc)}"
        raise OutputError(message) from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# -- GPIO ------------------------------------------------------------------------------------------------


class GpioLine:
    """One GPIO line as the start-enable output, through libgpiod v2 (PyPI ``gpiod``, imported lazily)."""

    def __init__(self, settings: GpioLineSettings) -> None:
        self.settings = settings
        self._request: Any = None  # gpiod.LineRequest while open
        self._values: Any = None  # gpiod.line.Value
        self._enabled = False
        self.last_error: str | None = None

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def _name(self) -> str:
        return f"GPIO {self.settings.chip} line {self.settings.line}"

    def describe(self) -> str:
        s = self.settings
        polarity = ", active low" if s.active_low else ""
        if self._request is None:
            return f"gpio {s.chip} line {s.line}{polarity}: not open ({self.last_error})"
        return f"gpio {s.chip} line {s.line}{polarity}: {'on' if self._enabled else 'off'}"

    async def open(self) -> None:
        """Request the line as an output, inactive. OutputError for a missing chip or package, a busy line."""
        self._open()  # a few syscalls on a character device: no need for a thread

    def _open(self) -> None:
        s = self.settings
        if not os.path.exists(s.chip):
            self.last_error = f"GPIO chip {s.chip} not found"
            raise OutputError(self.last_error)
        try:
            import gpiod
            from gpiod.line import Direction, Value
        except ImportError:
            self.last_error = "GPIO output needs the gpiod package (libgpiod v2 bindings: pip install gpiod)"
            raise OutputError(self.last_error) from None
        line_settings = gpiod.LineSettings(
            direction=Direction.OUTPUT, output_value=Value.INACTIVE, active_low=s.active_low
        )
        try:
            self._request = gpiod.request_lines(s.chip, config={s.line: line_settings}, consumer=s.consumer)
        except OSError as exc:
            self.last_error = self._explain(exc)
            raise OutputError(self.last_error) from exc
        except ValueError as exc:
            self.last_error = f"{self._name}: {exc}"
            raise OutputError(self.last_error) from exc
        self._values = Value
        self._enabled = False
        log.info("start-enable %s requested as output, off", self._name)

    def _explain(self, exc: OSError) -> str:
        s = self.settings
        if exc.errno == errno.ENOENT:
            return f"GPIO chip {s.chip} not found"
        if exc.errno in (errno.ENOTTY, errno.ENODEV):
            return f"{s.chip} is not a GPIO chip ({exc.strerror})"
        if exc.errno == errno.EBUSY:
            return f"{self._name} is in use by another consumer"
        if exc.errno == errno.EINVAL:
            return f"{self._name}: no such line, or it cannot be an output ({exc.strerror})"
        if exc.errno == errno.EACCES:
            return f"{self._name}: permission denied (is the user in the gpio group?)"
        return f"{self._name}: {exc.strerror or exc}"

    async def set(self, enabled: bool) -> None:
        if self._request is None:
            self._enabled = False
            self._open()  # the first set() opens a line that was not opened (OutputError if it can't be)
        value = self._values.ACTIVE if enabled else self._values.INACTIVE
        try:
            self._request.set_value(self.settings.line, value)  # one ioctl: does not block
        except Exception as exc:
            self._enabled = False
            raise OutputError(f"{self._name}: could not set the line: {exc}") from exc
        self._enabled = enabled

    async def close(self) -> None:
        if self._request is None:
            return
        with contextlib.suppress(Exception):
            self._request.set_value(self.settings.line, self._values.INACTIVE)
        with contextlib.suppress(Exception):
            self._request.release()
        self._request = None
        self._enabled = False
