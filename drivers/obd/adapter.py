"""ObdAdapter: the asyncio face of one ELM327 adapter.

python-obd is synchronous (pyserial), so every call runs on one worker thread owned by the adapter, one at a
time, and every wait for it is bounded: a call that overruns its deadline raises ObdError and leaves the
adapter failed until close() + connect().
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import obd

from .commands import PINT_UNITS, SIGNALS
from .link import Answer, Link, OpenFailed, Outcome
from .model import AdapterInfo, Dtc, ObdError, Sample

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_ATTEMPTS = 3
RETRY_PAUSE_S = 0.5  # python-obd's first ATE0 after a close() can fail; the next attempt succeeds
CONNECT_DEADLINE_S = 30.0  # ATZ alone waits 1 s; protocol auto-detection can take many seconds

# python-obd adds its own stderr handler to the "obd" logger; its records also propagate to the root
# logger, so drop the handler to keep the daemon's log one structured stream.
obd.logger.removeHandler(obd.console_handler)


class _Worker:
    """A daemon thread that runs blocking calls one at a time, in submission order.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so one stuck in a serial read
    would hold up the daemon's shutdown.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((future, fn))
        return future

    def stop(self) -> None:
        """Exit once the jobs already queued have run."""
        self._jobs.put(None)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)


class ObdAdapter:
    """One ELM327 adapter. Only ObdError escapes (adapter unreachable, unplugged, not answering); "no data",
    unsupported PIDs and undecodable answers are None and counted in `counters`."""

    def __init__(
        self, port: str, baudrate: int | None = 38400, protocol: str | None = None, timeout_s: float = 1.0
    ) -> None:
        self.port = port
        self.baudrate = baudrate
        self.protocol = protocol
        self.timeout_s = timeout_s
        # One query: the ELM answers within its own timeout (<= 1 s); python-obd reads with ours.
        self.query_deadline_s = 3 * timeout_s + 2
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "queries",  # requests sent to the adapter
                "no_data",  # the vehicle did not answer (NO DATA, ignition off, negative response)
                "decode_errors",  # an answer that could not be decoded
                "unsupported",  # samples not sent: the vehicle's PID bitmap says it lacks the PID
                "timeouts",  # calls that overran their deadline (adapter wedged)
                "disconnects",  # serial errors: the adapter vanished
                "connects",
                "connect_failures",
            ),
            0,
        )
        self._lock = asyncio.Lock()
        self._worker: _Worker | None = None
        self._overrun: Future[Any] | None = None  # the last call that overran its deadline
        self._link: Link | None = None
        self._info: AdapterInfo | None = None
        self._failed: str | None = None  # why the link is dead; every call raises this until reconnect
        self._warned: set[str] = set()

    @property
    def info(self) -> AdapterInfo | None:
        return self._info

    @property
    def connected(self) -> bool:
        return self._link is not None and self._failed is None

    async def connect(self) -> AdapterInfo:
        async with self._lock:
            await self._shutdown()
            try:
                link, worker = await self._open()
            except ObdError as exc:
                self.counters["connect_failures"] += 1
                log.warning("OBD adapter connect failed", extra={"port": self.port, "error": str(exc)})
                raise
            self._link, self._worker, self._info = link, worker, link.info
            self._failed = None
            self._warned.clear()
            self.counters["connects"] += 1
            info = link.info
            log.info(
                "OBD adapter connected",
                extra={
                    "port": self.port,
                    "protocol": info.protocol,
                    "elm": info.elm_version,
                    "vin": info.vin,
                },
            )
            return info

    async def sample(self, signal: str) -> Sample | None:
        try:
            cmd, unit = SIGNALS[signal]
        except KeyError:
            raise ValueError(f"unknown OBD signal {signal!r}; known: {', '.join(SIGNALS)}") from None
        async with self._lock:
            link = self._require()
            if link.unsupported(cmd):
                self.counters["unsupported"] += 1
                return None
            answer = await self._query(cmd)
        value = self._magnitude(answer, unit, signal)
        return None if value is None else Sample(signal, value, unit)

    async def read_dtcs(self) -> tuple[bool | None, list[Dtc]]:
        """(MIL lit, stored DTCs). (None, []) when the vehicle gave no usable answer to 0101 or 03: that read
        says nothing about which codes are set, so the caller must not treat the empty list as "cleared"."""
        async with self._lock:
            self._require()
            status = await self._query(obd.commands.STATUS)
            if status.outcome is not Outcome.OK:
                self._count(status, "mil")
                return None, []
            stored = await self._query(obd.commands.GET_DTC)
        if stored.outcome is not Outcome.OK:
            self._count(stored, "dtcs")
            return None, []
        dtcs = {code: Dtc(code, description or "") for code, description in stored.value}  # one per code
        return bool(status.value.MIL), list(dtcs.values())

    async def adapter_voltage(self) -> float | None:
        async with self._lock:
            self._require()
            answer = await self._query(obd.commands.ELM_VOLTAGE)
        return self._magnitude(answer, "V", "adapter_voltage")

    async def close(self) -> None:
        async with self._lock:
            await self._shutdown()

    # -- internals --

    async def _open(self) -> tuple[Link, _Worker]:
        if self._overrun is not None and not self._overrun.done():
            # Its thread still holds the port; opening it twice would split the adapter's answers.
            raise ObdError(f"{self.port}: a previous call is still stuck in the serial port; try again later")
        reason = ""
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            worker = _Worker(f"obd {self.port}")
            abandoned = threading.Event()
            try:
                link = await self._call(
                    worker,
                    lambda a=abandoned: Link.open(self.port, self.baudrate, self.protocol, self.timeout_s, a),
                    CONNECT_DEADLINE_S,
                )
            except OpenFailed as exc:
                worker.stop()
                reason = str(exc)
                if not exc.retryable:
                    break
                log.info("OBD adapter connect attempt failed", extra={"port": self.port, "attempt": attempt})
                if attempt < CONNECT_ATTEMPTS:
                    await asyncio.sleep(RETRY_PAUSE_S)
                continue
            except BaseException:  # overran the deadline, or cancelled: the late link closes itself
                abandoned.set()
                worker.stop()
                raise
            return link, worker
        raise ObdError(f"{self.port}: {reason}")

    def _require(self) -> Link:
        if self._failed is not None:
            raise ObdError(self._failed)
        if self._link is None:
            raise ObdError(f"{self.port}: not connected")
        return self._link

    async def _query(self, cmd: obd.OBDCommand) -> Answer:
        link, worker = self._require(), self._worker
        assert worker is not None
        self.counters["queries"] += 1
        try:
            answer = await self._call(worker, lambda: link.query(cmd), self.query_deadline_s)
        except ObdError as exc:
            self.counters["timeouts"] += 1
            self._fail(str(exc))
            raise
        if answer.outcome is Outcome.LOST:
            self.counters["disconnects"] += 1
            self._fail(f"{self.port}: adapter lost ({answer.detail})")
            raise ObdError(self._failed)
        return answer

    async def _call(self, worker: _Worker, fn: Callable[[], T], deadline_s: float) -> T:
        future = worker.submit(fn)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), deadline_s)
        except TimeoutError:
            self._overrun = future
            raise ObdError(f"{self.port}: adapter did not answer within {deadline_s:.0f} s") from None

    def _magnitude(self, answer: Answer, unit: str, what: str) -> float | None:
        """A decoded Pint quantity as a float in the catalogue `unit`; None (counted) otherwise."""
        if answer.outcome is Outcome.OK:
            try:
                value = float(answer.value.to(PINT_UNITS[unit]).magnitude)
            except Exception as exc:  # not a Pint quantity, or an incompatible unit
                answer = Answer(Outcome.DECODE_ERROR, detail=repr(exc))
            else:
                if math.isfinite(value):
                    return value
                answer = Answer(Outcome.DECODE_ERROR, detail=str(value))
        self._count(answer, what)
        return None

    def _fail(self, reason: str) -> None:
        if self._failed is None:
            self._failed = reason
            log.warning("OBD adapter failed", extra={"port": self.port, "error": reason})

    def _count(self, answer: Answer, what: str) -> None:
        if answer.outcome is Outcome.NO_DATA:
            self.counters["no_data"] += 1
            log.debug("OBD no data", extra={"port": self.port, "signal": what, "detail": answer.detail})
            return
        self.counters["decode_errors"] += 1
        level = logging.DEBUG if what in self._warned else logging.WARNING
        self._warned.add(what)
        log.log(
            level,
            "OBD answer undecodable",
            extra={"port": self.port, "signal": what, "detail": answer.detail},
        )

    async def _shutdown(self) -> None:
        link, worker = self._link, self._worker
        self._link = self._worker = None
        self._failed = None
        if worker is None:
            return
        if link is not None:
            # Queued behind any call still running, so the port is never closed under python-obd's feet.
            closing = worker.submit(link.close)
            try:
                await asyncio.wait_for(asyncio.wrap_future(closing), self.query_deadline_s)
            except TimeoutError:
                self._overrun = closing
                log.warning(
                    "OBD adapter close overran; the worker closes it when unblocked",
                    extra={"port": self.port},
                )
        worker.stop()
        log.info("OBD adapter closed", extra={"port": self.port})
