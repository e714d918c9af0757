"""The yard: which scooters this depot serves, and what is known of each now (for ``fleetgate scooters``).

Scooters come from the configuration (``[[segway.scooters]]``) and from pushes: Segway pushes every scooter of
the platform that is set to push to this receiver, so a scooter that pushes is added ("learnt") and kept in
the state table. The seed has no endpoint that lists a platform's scooters. Nothing here is durable except
the learnt list: the rest is the latest answer, repeated by the next poll after a restart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fleetgate.daemon.runtime.clock import mono_ns
from fleetgate.daemon.runtime.supervisor import Backoff

LEARNT_KEY = "scooters.learnt"


@dataclass
class Latest:
    """An answer or push of one kind: its fields, when it came (monotonic ns) and Segway's own time."""

    fields: dict[str, Any]
    mono_ns: int
    at: int | None  # statusUtcTime / gpsUtcTime, seconds, as Segway sent it

    def age_s(self, now_ns: int) -> float:
        return round((now_ns - self.mono_ns) / 1e9, 1)


@dataclass
class Scooter:
    iot_code: str
    vin: str | None = None
    sn: str | None = None
    model: str | None = None
    learnt: bool = False
    latest: dict[str, Latest] = field(
        default_factory=dict
    )  # by kind: status, extra-status, location, battery
    last_command: dict[str, Any] | None = None  # the last result record (op, outcome, code, op_id ...)
    key_fetched_wall_ns: int | None = None
    failures: int = 0
    last_error: str | None = None
    backoff: Backoff | None = None
    next_due: dict[str, float] = field(default_factory=dict)  # by query kind, monotonic seconds

    def view(self, now_ns: int) -> dict[str, Any]:
        status = self.latest.get("status")
        battery = self.latest.get("battery")
        location = self.latest.get("location")
        return {
            "iot_code": self.iot_code,
            "vin": self.vin,
            "sn": self.sn,
            "model": self.model,
            "learnt": self.learnt,
            "online": status.fields.get("online") if status else None,
            "locked": status.fields.get("locked") if status else None,
            "status_age_s": status.age_s(now_ns) if status else None,
            "battery_percent": _battery_percent(status, battery),
            "battery_age_s": battery.age_s(now_ns) if battery else None,
            "location": _position(location),
            "location_age_s": location.age_s(now_ns) if location else None,
            "last_command": self.last_command,
            "key_cached": self.key_fetched_wall_ns is not None,
            "key_age_s": None
            if self.key_fetched_wall_ns is None
            else round((time.time_ns() - self.key_fetched_wall_ns) / 1e9),
            "failures": self.failures,
            "last_error": self.last_error,
        }


def _battery_percent(status: Latest | None, battery: Latest | None) -> int | None:
    if battery is not None and isinstance(battery.fields.get("vehiclePercent"), int):
        return battery.fields["vehiclePercent"]
    if status is not None and isinstance(status.fields.get("powerPercent"), int):
        return status.fields["powerPercent"]
    return None


def _position(location: Latest | None) -> dict[str, Any] | None:
    if location is None:
        return None
    return {k: location.fields.get(k) for k in ("latitude", "longitude", "hdop", "satelliteNumber")}


class Yard:
    def __init__(self) -> None:
        self.scooters: dict[str, Scooter] = {}

    def add(self, scooter: Scooter) -> None:
        self.scooters.setdefault(scooter.iot_code, scooter)

    def get(self, iot_code: str) -> Scooter | None:
        return self.scooters.get(iot_code)

    def learn(self, iot_code: str) -> bool:
        """Add a scooter first seen in a push; True if it is new (the caller saves ``learnt_codes``)."""
        if iot_code in self.scooters:
            return False
        self.scooters[iot_code] = Scooter(iot_code, learnt=True)
        return True

    def learnt_codes(self) -> list[str]:
        return sorted(code for code, s in self.scooters.items() if s.learnt)

    def view(self) -> list[dict[str, Any]]:
        now = mono_ns()
        return [self.scooters[code].view(now) for code in sorted(self.scooters)]

    def summary(self) -> dict[str, Any]:
        scooters = list(self.scooters.values())
        return {
            "scooters": len(scooters),
            "online": sum(
                1 for s in scooters if "status" in s.latest and s.latest["status"].fields.get("online")
            ),
            "failing": sum(1 for s in scooters if s.failures),
            "keys_cached": sum(1 for s in scooters if s.key_fetched_wall_ns is not None),
        }


def learnt_from_state(raw: Any) -> list[str]:
    """The saved list of learnt iot codes; ``ValueError`` if it is not a list of short strings."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(c, str) and 1 <= len(c) <= 32 for c in raw):
        raise ValueError("learnt scooters are not a list of iot codes")
    return raw
