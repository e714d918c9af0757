"""The blocking side: one python-obd connection. Everything here runs on the adapter's worker thread.

python-obd reports most trouble by logging and by its status rather than by raising: a serial error
(unplugged adapter, vanished pty) is swallowed inside its read/write and turns `status()` into
NOT_CONNECTED, after which every query returns an empty response. `Link.query` checks the status after each
query and reports LOST, so the adapter can raise instead of returning None forever.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import obd
from obd import OBDCommand, OBDStatus

from .commands import PID_BITMAPS, VIN_RAW
from .model import AdapterInfo

log = logging.getLogger(__name__)

# Adapter text answers that mean "the vehicle said nothing" rather than "bad bytes".
_NO_DATA_TEXT = ("NO DATA", "SEARCHING", "STOPPED", "UNABLE TO CONNECT", "BUS INIT", "CAN ERROR", "BUS ERROR")
EMPTY_ANSWER = "(empty answer)"  # stands for an answer that ended with the prompt but held no line
_PROMPT = b">"


class Outcome(enum.Enum):
    OK = "ok"
    NO_DATA = "no_data"
    DECODE_ERROR = "decode_error"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class Answer:
    outcome: Outcome
    value: Any = None
    detail: str = ""


class OpenFailed(Exception):
    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.retryable = retryable


@contextmanager
def _obd_errors() -> Iterator[list[str]]:
    """Collect the error lines python-obd logs on this thread (its only account of why a connect failed)."""
    errors: list[str] = []
    me = threading.get_ident()

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == me:
                errors.append(record.getMessage())

    handler = _Collect(logging.ERROR)
    logger = logging.getLogger("obd")
    logger.addHandler(handler)
    try:
        yield errors
    finally:
        logger.removeHandler(handler)


class Link:
    def __init__(self, conn: obd.OBD, port: str, timeout_s: float) -> None:
        self._conn = conn
        self._raw: list[Any] | None = None
        self._sizes: list[int] = []  # data bytes of each raw message as the adapter sent them
        self.supported: frozenset[int] = frozenset()  # mode 01 PIDs the vehicle says it supports
        self.known_up_to = 0  # ... and the highest PID whose support is known
        iface = conn.interface
        send = iface.send_and_parse

        # query() keeps only the messages from the command's ECU; the adapter's own text ("NO DATA",
        # garbage) is needed to tell no data from bad bytes, so keep the unfiltered list too. python-obd
        # then pads a short answer with zero bytes, in place, before decoding it ("41 0D" would read as
        # 0 km/h): keep the sizes as they came.
        def tapped(cmd: bytes) -> Any:
            self._raw = send(cmd)
            self._sizes = [len(m.data) for m in self._raw]
            return self._raw

        iface.send_and_parse = tapped
        # python-obd opens the port with a fixed 10 s read timeout (its `timeout` only applies to baud
        # detection); bound reads and writes by ours from here on.
        serial_port = getattr(iface, "_ELM327__port", None)
        if serial_port is not None:
            serial_port.timeout = timeout_s
            serial_port.write_timeout = timeout_s
            _tap_empty_answers(iface, serial_port)
        self.info = AdapterInfo(port=port, protocol=conn.protocol_name(), elm_version="", vin=None)

    @classmethod
    def open(
        cls,
        port: str,
        baudrate: int | None,
        protocol: str | None,
        timeout_s: float,
        abandoned: threading.Event,
    ) -> Link:
        if "://" not in port and not os.path.exists(port):  # pyserial URLs (socket://...) aside
            raise OpenFailed("no such device (adapter unplugged?)", retryable=False)
        with _obd_errors() as errors:
            try:
                conn = obd.OBD(port, baudrate=baudrate, protocol=protocol, fast=True, timeout=timeout_s)
            except Exception as exc:
                raise OpenFailed(f"python-obd raised {exc!r}", retryable=True) from exc
        status = conn.status()
        if abandoned.is_set() or status != OBDStatus.CAR_CONNECTED:
            _close_quietly(conn)
            if abandoned.is_set():
                raise OpenFailed("connect abandoned", retryable=False)
            reason = errors[-1] if errors else f"python-obd status {status!r}"
            if status == OBDStatus.NOT_CONNECTED:
                raise OpenFailed(f"adapter did not initialise: {reason}", retryable=True)
            raise OpenFailed(f"the adapter answers, the vehicle does not (ignition off?): {reason}", False)
        link = cls(conn, port, timeout_s)
        version = link.query(obd.commands.ELM_VERSION)
        vin = link.query(VIN_RAW)
        if Outcome.LOST in (version.outcome, vin.outcome):
            link.close()
            raise OpenFailed("adapter lost while identifying the vehicle", retryable=True)
        if vin.outcome is not Outcome.OK:
            log.info("no VIN from the vehicle", extra={"port": port, "detail": vin.detail})
        link.info = AdapterInfo(
            port=port,
            protocol=link.info.protocol,
            elm_version=str(version.value or "").strip(),
            vin=vin.value if vin.outcome is Outcome.OK else None,
        )
        link._read_supported()
        if abandoned.is_set():
            link.close()
            raise OpenFailed("connect abandoned", retryable=False)
        return link

    def unsupported(self, cmd: OBDCommand) -> bool:
        return (
            cmd.mode == 1
            and cmd.pid is not None
            and cmd.pid <= self.known_up_to
            and cmd.pid not in self.supported
        )

    def query(self, cmd: OBDCommand) -> Answer:
        conn = self._conn
        if conn.status() == OBDStatus.NOT_CONNECTED:
            return Answer(Outcome.LOST, detail="serial port closed")
        self._raw, self._sizes = None, []
        try:
            response = conn.query(cmd, force=True)
        except Exception as exc:  # a decoder tripping over bad bytes, or python-obd over a vanished port
            if conn.status() == OBDStatus.NOT_CONNECTED:
                return Answer(Outcome.LOST, detail=repr(exc))
            return Answer(Outcome.DECODE_ERROR, detail=repr(exc))
        if conn.status() == OBDStatus.NOT_CONNECTED:
            return Answer(Outcome.LOST, detail="serial port error")
        raw = self._raw or []
        if cmd.mode is None:  # an AT command: python-obd's decoder reads the adapter's own text
            if response.value is None:
                return Answer(Outcome.DECODE_ERROR, detail=_texts(raw))
            return Answer(Outcome.OK, response.value)
        return _classify(cmd, raw, self._sizes)

    def close(self) -> None:
        _close_quietly(self._conn)

    def _read_supported(self) -> None:
        supported: set[int] = set()
        for cmd in PID_BITMAPS:
            if cmd.pid and cmd.pid not in supported:  # the previous bitmap says this range is not supported
                self.known_up_to = 0xFF
                break
            answer = self.query(cmd)
            if answer.outcome is not Outcome.OK:
                break  # support beyond this range stays unknown: such PIDs are simply asked
            supported |= answer.value
            self.known_up_to = cmd.pid + 0x20
        self.supported = frozenset(supported)


def _classify(cmd: OBDCommand, raw: Sequence[Any], sizes: Sequence[int]) -> Answer:
    """What an answer to `cmd` says. `sizes`: each raw message's data bytes as received, before python-obd
    padded short ones with zeros (an answer shorter than the PID defines is a decode error, not zeros)."""
    frames = [(m, size) for m, size in zip(raw, sizes, strict=True) if m.tx_id is not None]  # CAN/legacy
    mine = [(m, size) for m, size in frames if cmd.ecu & m.ecu]
    service = 0x40 + cmd.mode
    answers = [
        (m, size)
        for m, size in mine
        if size >= 2 and m.data[0] == service and (cmd.pid is None or m.data[1] == cmd.pid)
    ]
    valid = [m for m, size in answers if size >= cmd.bytes]  # bytes 0: any length, the decoder checks
    if valid:
        try:
            value = cmd.decode(valid)
        except Exception as exc:
            return Answer(Outcome.DECODE_ERROR, detail=repr(exc))
        if value is None:
            return Answer(Outcome.DECODE_ERROR, detail=_texts(raw))
        return Answer(Outcome.OK, value)
    if answers:
        return Answer(
            Outcome.DECODE_ERROR, detail=f"shorter than the {cmd.bytes} bytes of {cmd.name}: {_texts(raw)}"
        )
    if any(m.data[:1] == b"\x7f" for m, _ in mine):
        return Answer(Outcome.NO_DATA, detail="negative response")
    if mine:
        got = ", ".join(sorted({f"{m.data[0]:02X}" for m, size in mine if size >= 1}))
        return Answer(
            Outcome.DECODE_ERROR,
            detail=f"not an answer to {cmd.command.decode(errors='replace')}: service byte {got or 'none'}, "
            f"expected {service:02X} ({_texts(raw)})",
        )
    if frames:
        return Answer(Outcome.NO_DATA, detail="only other ECUs answered")
    texts = [m.raw().strip().upper() for m in raw]
    if texts and all(any(t.startswith(marker) for marker in _NO_DATA_TEXT) for t in texts):
        return Answer(Outcome.NO_DATA, detail=_texts(raw))
    return Answer(Outcome.DECODE_ERROR, detail=_texts(raw) or "no parseable answer")


def _tap_empty_answers(iface: Any, port: Any) -> None:
    """Make an answer without a line ("\\r\\r>") one line of its own, EMPTY_ANSWER (a decode error).

    python-obd takes such an answer for silence and reads again, ten times, each waiting out the port timeout:
    ~11 s, past the query deadline, so a working adapter would be dropped as wedged. A read that sees no
    prompt at all is still silence, left to python-obd and the deadline. Installed after connect, so
    python-obd's own initialisation reads as it always did.
    """
    read_port, read_answer = port.read, iface._ELM327__read
    prompt_seen = False

    def port_read(size: int = 1) -> bytes:
        nonlocal prompt_seen
        data = read_port(size)
        prompt_seen = prompt_seen or _PROMPT in data
        return data

    def answer_read(end_marker: bytes = _PROMPT) -> list[str]:
        nonlocal prompt_seen
        prompt_seen = False
        lines = read_answer(end_marker=end_marker)
        return lines if lines or not prompt_seen else [EMPTY_ANSWER]

    port.read = port_read
    iface._ELM327__read = answer_read  # name-mangled ELM327.__read: the instance attribute wins


def _texts(raw: Sequence[Any]) -> str:
    return " | ".join(m.raw() for m in raw)[:200]


def _close_quietly(conn: obd.OBD) -> None:
    try:
        conn.close()
    except Exception as exc:  # closing a port that already vanished
        log.debug("closing python-obd connection failed", extra={"error": repr(exc)})
