"""When a synchronized session may open the vehicle with no coverage (docs/security.md, "Offline policy").

- The last synchronized set is authoritative. An active session whose end the vehicle has not learned stays
  valid (REEF semantics: a session is active until ended).
- A session with an expiry stops at its expiry, judged by wall time only when wall time is trusted (NTP or
  GPS): an untrusted clock can be set forward or back by anyone with a shell or a GPS spoofer.
- However long the vehicle has not heard from the cloud, no set is trusted for longer than
  ``max_offline_age_s``. That age is measured on clocks that cannot be wound back: trusted wall time when
  there is one, else the gateway's own running time since the sync, saved every minute so that restarts
  and reboots do not reset it (time spent powered off then does not count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleetgate.daemon.access.session_book import LocalSession, SyncMark, fields

STATE_KEY = "sessions.offline_age"


@dataclass
class OfflineAge:
    """Seconds since the last successful sync, on clocks that only move forward."""

    floor_s: float  # age already proven when this process started (saved by earlier runs)
    base_mono_ns: int  # monotonic time at which ``floor_s`` was the age

    def age_s(self, now_mono_ns: int, now_wall_ns: int, wall_trusted: bool, mark: SyncMark | None) -> float:
        running = self.floor_s + max(0, now_mono_ns - self.base_mono_ns) / 1e9
        if mark is not None and wall_trusted and mark.wall_trusted:
            return max(running, (now_wall_ns - mark.wall_ns) / 1e9)
        return running

    def synced(self, now_mono_ns: int) -> None:
        self.floor_s = 0.0
        self.base_mono_ns = now_mono_ns

    def as_state(self, now_mono_ns: int) -> dict[str, Any]:
        return {"floor_s": round(self.floor_s + max(0, now_mono_ns - self.base_mono_ns) / 1e9, 3)}

    @classmethod
    def restore(cls, saved: Any, now_mono_ns: int, ever_synced: bool) -> OfflineAge:
        """The age as saved; None (never saved) is ``lost``. ValueError naming what is wrong if ``saved`` is
        not what ``as_state`` wrote (the caller then treats the age as lost)."""
        if saved is None:
            return cls.lost(now_mono_ns, ever_synced)
        fields(saved, "offline age", {"floor_s"})
        floor = saved["floor_s"]
        # inf is a legitimate saved age (lost after a sync, then saved); NaN and negatives are not
        if isinstance(floor, bool) or not isinstance(floor, int | float) or not floor >= 0:
            raise ValueError("offline age floor_s is not a number of seconds >= 0")
        return cls(float(floor), now_mono_ns)

    @classmethod
    def lost(cls, now_mono_ns: int, ever_synced: bool) -> OfflineAge:
        """No usable saved age. Never synchronized: nothing to age. Synchronized: assume the worst."""
        return cls(float("inf") if ever_synced else 0.0, now_mono_ns)


def refusal_reason(
    session: LocalSession,
    *,
    now_wall_ns: int,
    wall_trusted: bool,
    offline_age_s: float,
    max_offline_age_s: float,
) -> str | None:
    """Why ``session`` may not open the vehicle now, or None if it may."""
    if session.ended is not None:
        return "ended"
    if session.pin_hash is None:
        return "no-pin"
    if session.expires_ns is not None and wall_trusted and now_wall_ns >= session.expires_ns:
        return "expired"
    if offline_age_s > max_offline_age_s:
        return "sync-too-old"
    return None
