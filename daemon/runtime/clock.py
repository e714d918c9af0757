"""Time stamps and time trust.

A Pi has no real-time clock: after boot its wall clock may be days off until NTP sets it, or until a GPS fix
tells the true time. Every record carries the wall clock, the boot-relative monotonic clock (CLOCK_BOOTTIME,
which also counts suspend) and whether wall time was trusted when it was taken. Timers use the monotonic clock.

Trust sources, best first:
- **ntp**: the kernel reports the clock synchronised (adjtimex); wall time is the system clock.
- **gps**: a few consistent GPS fixes give ``offset = gps_time - mono``; wall time is then ``mono + offset``,
  whatever the system clock says (the daemon may not set the clock: the unit has ProtectClock=).
When trust arrives, listeners are told the offset so records taken earlier in this boot can be corrected.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fleetgate.sync.store import Stamp

log = logging.getLogger(__name__)

TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>: only `modes` matters (0 = read-only query); the rest is room to spare.
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 512)]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # find_library runs `ldconfig -p` in a subprocess: do it once, not on every poll.
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


def ntp_synchronized() -> bool | None:
    """True when the kernel says an NTP daemon has synchronised the clock; None if it cannot be asked.

    adjtimex(2) with modes 0 only reads; glibc issues it as clock_adjtime, which the unit's syscall filter allows.
    """
    libc = _libc()
    if libc is None:
        return None
    try:
        state = libc.adjtimex(ctypes.byref(_Timex()))
    except AttributeError:
        return None
    if state < 0:
        return None
    return state != TIME_ERROR


def mono_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class Trust:
    trusted: bool
    source: str  # "ntp", "gps", "none"
    since_mono_ns: int | None
    offset_ns: int | None  # true wall time minus mono_ns, once known

    def as_dict(self) -> dict[str, object]:
        return {
            "trusted": self.trusted,
            "source": self.source,
            "since_mono_ns": self.since_mono_ns,
            "system_clock_error_s": None
            if self.offset_ns is None
            else round((time.time_ns() - (mono_ns() + self.offset_ns)) / 1e9, 3),
        }


UNTRUSTED = Trust(False, "none", None, None)
TrustListener = Callable[[Trust], Awaitable[None]]


class Clock:
    """Stamps records and knows whether wall time can be believed."""

    def __init__(
        self, gps_confirmations: int = 3, gps_max_spread_s: float = 1.0, trust_gps: bool = True
    ) -> None:
        self._trust = UNTRUSTED
        self._trust_gps = trust_gps
        self._listeners: list[TrustListener] = []
        self._gps_confirmations = gps_confirmations
        self._gps_max_spread_ns = int(gps_max_spread_s * 1e9)
        self._gps_offsets: list[int] = []
        self.gps_time_rejections = 0

    @property
    def trust(self) -> Trust:
        return self._trust

    def on_trust(self, listener: TrustListener) -> None:
        """``listener(trust)`` runs whenever wall time becomes trusted."""
        self._listeners.append(listener)

    def stamp(self) -> Stamp:
        mono = mono_ns()
        return Stamp(self._wall(mono), mono, self._trust.trusted)

    def wall_for(self, mono: int) -> tuple[int, bool]:
        """Best wall time for a moment of this boot, and whether it is trusted."""
        if self._trust.offset_ns is not None:
            return mono + self._trust.offset_ns, True
        return time.time_ns() - (mono_ns() - mono), False

    def _wall(self, mono: int) -> int:
        if self._trust.source == "gps" and self._trust.offset_ns is not None:
            return mono + self._trust.offset_ns
        return time.time_ns()

    def set_ntp(self, synced: bool) -> None:
        if synced and self._trust.source != "ntp":
            now_mono = mono_ns()
            self._become(Trust(True, "ntp", now_mono, time.time_ns() - now_mono))
        elif not synced and self._trust.source == "ntp":
            log.warning("NTP sync lost; wall time untrusted until NTP or GPS trust returns")
            self._trust = UNTRUSTED

    def observe_gps_time(self, gps_time_ns: int, received_mono_ns: int) -> None:
        """Feed the GPS time of a fix (mode 2 or 3) and when it arrived."""
        if not self._trust_gps or self._trust.source == "ntp":
            return
        offset = gps_time_ns - received_mono_ns
        self._gps_offsets = [*self._gps_offsets, offset][-self._gps_confirmations :]
        if len(self._gps_offsets) < self._gps_confirmations:
            return
        if max(self._gps_offsets) - min(self._gps_offsets) > self._gps_max_spread_ns:
            self.gps_time_rejections += 1  # inconsistent fixes (replayed, rolled-over week ...): keep waiting
            return
        median = sorted(self._gps_offsets)[len(self._gps_offsets) // 2]
        if self._trust.source == "gps":
            self._trust = Trust(True, "gps", self._trust.since_mono_ns, median)  # follow drift quietly
        else:
            self._become(Trust(True, "gps", received_mono_ns, median))

    def _become(self, trust: Trust) -> None:
        self._trust = trust
        log.info("wall time trusted", extra={"source": trust.source, **trust.as_dict()})
        for listener in self._listeners:
            task = asyncio.get_running_loop().create_task(listener(trust), name="time-trust-listener")
            task.add_done_callback(_log_listener_failure)


def _log_listener_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("time trust listener failed", exc_info=task.exception())


class NtpWatch:
    """Supervised component: polls the kernel's NTP sync state and feeds the clock's trust."""

    name = "ntp-watch"

    def __init__(self, clock: Clock, interval_s: float = 10.0) -> None:
        self._clock = clock
        self._interval_s = interval_s

    async def run(self) -> None:
        while True:
            self._clock.set_ntp(bool(ntp_synchronized()))
            await asyncio.sleep(self._interval_s)
