"""Time stamps and time trust.

A Pi has no real-time clock: after boot its wall clock may be days off until NTP sets it, or until a GPS fix
tells the true time. Every record carries the wall clock, the boot-relative monotonic clock (CLOCK_BOOTTIME,
which also counts suspend) and whether wall time was trusted when it was taken. Timers use the monotonic clock.

Trust sources, best first:
- **ntp**: the kernel reports the clock synchronised (adjtimex); wall time is the system clock.
- **gps**: a few consistent GPS fixes give ``offset = gps_time - mono``; wall time is then ``mono + offset``,
  whatever the system clock says (the daemon may not set the clock: the unit has ProtectClock=).
When trust arrives, listeners are told the offset so records taken earlier in this boot can be corrected.

Plausibility: a time source is believed only for a time inside [WALL_MIN_NS, WALL_MAX_NS] (2026 to 2100, see
docs/telemetry.md "Time"); a GPS fix or an NTP-synchronised system clock outside it is counted, logged at
most once a minute, and never trusted. Whatever the sources say, every wall time the clock hands out is
clamped into [0, WALL_MAX_NS], so a record is always storable (SQLite INTEGER is int64) and never negative.
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
S = 1_000_000_000
# Floor: fleetgate 0.1.0 was released in 2026, so no time before that can be now (also rejects GPS week
# rollover, which dates fixes 1024 weeks = 19.6 years back). Ceiling: 2100, 162 years inside int64
# nanoseconds (2262-04-11), so mono_ns + offset cannot overflow in any device's life.
WALL_MIN_NS = 1_767_225_600 * S  # 2026-01-01T00:00:00Z
WALL_MAX_NS = 4_102_444_800 * S  # 2100-01-01T00:00:00Z
LOG_INTERVAL_S = 60.0  # at most one log record per interval about each kind of implausible time


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


def plausible(wall_ns: int) -> bool:
    """Whether a wall time can be now: inside [WALL_MIN_NS, WALL_MAX_NS]."""
    return WALL_MIN_NS <= wall_ns <= WALL_MAX_NS


def _iso(wall_ns: int) -> str:
    """For log records: years outside datetime's 1..9999 are written as seconds."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_ns // S))
    except (OverflowError, OSError, ValueError):
        return f"{wall_ns / S:.0f} s since 1970"


class _Throttle:
    """Logs a warning at most once per LOG_INTERVAL_S; says how many went unlogged in between."""

    def __init__(self, message: str) -> None:
        self._message = message
        self._logged_at: float | None = None
        self._unlogged = 0

    def warn(self, **fields: object) -> None:
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL_S:
            self._unlogged += 1
            return
        log.warning(self._message, extra={**fields, "unlogged_since_last": self._unlogged})
        self._logged_at, self._unlogged = now, 0


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
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "gps_time_implausible",  # fixes whose time is outside [WALL_MIN_NS, WALL_MAX_NS]
                "gps_time_inconsistent",  # confirmation windows whose offsets disagreed
                "ntp_time_implausible",  # NTP said synchronised, the system clock was outside the window
                "wall_clamped",  # wall times handed out clamped into [0, WALL_MAX_NS]
            ),
            0,
        )
        self._gps_warning = _Throttle("implausible GPS time ignored")
        self._ntp_warning = _Throttle("NTP synchronised but the system clock is implausible; not trusted")
        self._clamp_warning = _Throttle("wall time outside what can be stored; clamped")

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
            wall, trusted = mono + self._trust.offset_ns, True
        else:
            wall, trusted = time.time_ns() - (mono_ns() - mono), False
        return (wall if 0 <= wall <= WALL_MAX_NS else self._clamp(wall)), trusted

    def _wall(self, mono: int) -> int:
        if self._trust.source == "gps" and self._trust.offset_ns is not None:
            wall = mono + self._trust.offset_ns
        else:
            wall = time.time_ns()
        return wall if 0 <= wall <= WALL_MAX_NS else self._clamp(wall)

    def _clamp(self, wall: int) -> int:
        # The system clock can be set to anything (untrusted stamps take it as it is): keep every stamp
        # inside int64 and >= 0, so the store can hold it and consumers can rely on it (docs/mqtt.md).
        self.counters["wall_clamped"] += 1
        self._clamp_warning.warn(wall=_iso(wall), trusted_source=self._trust.source)
        return 0 if wall < 0 else WALL_MAX_NS

    def set_ntp(self, synced: bool) -> None:
        if synced:
            now_ns = time.time_ns()
            if not plausible(now_ns):
                self.counters["ntp_time_implausible"] += 1
                self._ntp_warning.warn(system_clock=_iso(now_ns))
                if self._trust.source == "ntp":
                    self._trust = UNTRUSTED
                return
            if self._trust.source != "ntp":
                now_mono = mono_ns()
                self._become(Trust(True, "ntp", now_mono, now_ns - now_mono))
        elif self._trust.source == "ntp":
            log.warning("NTP sync lost; wall time untrusted until NTP or GPS trust returns")
            self._trust = UNTRUSTED

    def observe_gps_time(self, gps_time_ns: int, received_mono_ns: int) -> bool:
        """Feed the GPS time of a fix (mode 2 or 3) and when it arrived. False when the time is implausible:
        it is counted and ignored, and the confirmation window is left as it was."""
        if not plausible(gps_time_ns):
            self.counters["gps_time_implausible"] += 1
            self._gps_warning.warn(gps_time=_iso(gps_time_ns))
            return False
        if not self._trust_gps or self._trust.source == "ntp":
            return True
        offset = gps_time_ns - received_mono_ns
        self._gps_offsets = [*self._gps_offsets, offset][-self._gps_confirmations :]
        if len(self._gps_offsets) < self._gps_confirmations:
            return True
        if max(self._gps_offsets) - min(self._gps_offsets) > self._gps_max_spread_ns:
            # Inconsistent fixes (replayed, rolled-over week ...): keep waiting.
            self.counters["gps_time_inconsistent"] += 1
            return True
        median = sorted(self._gps_offsets)[len(self._gps_offsets) // 2]
        if self._trust.source == "gps":
            self._trust = Trust(True, "gps", self._trust.since_mono_ns, median)  # follow drift quietly
        else:
            self._become(Trust(True, "gps", received_mono_ns, median))
        return True

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
