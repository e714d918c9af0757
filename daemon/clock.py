"""Time stamps and time trust.

A Pi has no real-time clock: after boot its wall clock may be days off until NTP (or, later, a GPS fix)
sets it. Every record carries the wall clock, the boot-relative monotonic clock (CLOCK_BOOTTIME, which also
counts suspend) and whether wall time was trusted when it was taken. Timers use the monotonic clock.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from dataclasses import dataclass

from fleetgate.sync.store import Stamp

log = logging.getLogger(__name__)

TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>: we only need `modes` zeroed (read-only query) and room for the rest.
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 512)]


def ntp_synchronized() -> bool | None:
    """True when the kernel says an NTP daemon has synchronised the clock; None if it cannot be asked."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        tx = _Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != TIME_ERROR


@dataclass(frozen=True)
class Trust:
    trusted: bool
    source: str  # "ntp", "gps", "none"
    since_mono_ns: int | None


class Clock:
    """Stamps records and knows whether wall time can be believed."""

    def __init__(self) -> None:
        self._trust = Trust(False, "none", None)

    @staticmethod
    def mono_ns() -> int:
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    @property
    def trust(self) -> Trust:
        return self._trust

    def stamp(self) -> Stamp:
        return Stamp(time.time_ns(), self.mono_ns(), self._trust.trusted)

    def set_trust(self, trusted: bool, source: str) -> None:
        if trusted == self._trust.trusted and source == self._trust.source:
            return
        self._trust = Trust(trusted, source if trusted else "none", self.mono_ns() if trusted else None)
        log.info("time trust changed", extra={"trusted": trusted, "source": self._trust.source})


class NtpWatch:
    """Supervised component: polls the kernel's NTP sync state and feeds the clock's trust."""

    name = "ntp-watch"

    def __init__(self, clock: Clock, interval_s: float = 10.0) -> None:
        self._clock = clock
        self._interval_s = interval_s

    async def run(self) -> None:
        while True:
            synced = ntp_synchronized()
            if synced:
                self._clock.set_trust(True, "ntp")
            elif self._clock.trust.source == "ntp":
                self._clock.set_trust(False, "none")
            await asyncio.sleep(self._interval_s)
