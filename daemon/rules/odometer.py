"""The vehicle's odometer, estimated on the vehicle, and the connected-car seed's distance triggers.

The estimate (metres) is the vehicle's own odometer (OBD PID A6) where the vehicle reports it; otherwise the
last anchor — an OBD reading, or a reading the cloud sends with the rule set (the seed's user-submitted
odometer, taken as of its arrival) — plus the distance driven since: vehicle speed integrated over time
(trapezoids, samples at most ``MAX_GAP_S`` apart), or, with no speed from the vehicle, the distance between
GPS positions (jumps over ``MAX_JUMP_M`` in one step are glitches). Without any anchor there is no estimate.

Triggers, as the seed defines them (thresholds in metres; ``km`` and ``mi`` converted when received):
``specific`` fires once when the estimate reaches the threshold; ``from_now`` once when the vehicle has
driven the threshold since the trigger arrived; ``milestone`` every time the estimate passes a multiple of
the threshold. ``from_now`` counts distance driven, so a new anchor (a jump of the estimate) does not fire
it. Each firing is a ``distance-trigger`` event with the estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fleetgate.daemon.rules.definitions import RuleError, _number, _object
from fleetgate.daemon.rules.geometry import distance_m

MAX_GAP_S = 5.0
MAX_JUMP_M = 500.0
SPEED_FRESH_S = 10.0  # vehicle speed this recent wins over GPS distance
UNITS = {"m": 1.0, "km": 1000.0, "mi": 1609.344}
TYPES = ("specific", "from_now", "milestone")
NS = 1_000_000_000


@dataclass(frozen=True)
class Trigger:
    id: str
    type: str
    threshold_m: float

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "threshold": self.threshold_m, "unit": "m"}


def parse_triggers(raw: Any) -> list[Trigger]:
    """``odometerTriggers`` of a rule set: ``[{"id", "type", "threshold", "unit"}]``; RuleError naming the field."""
    if not isinstance(raw, list) or len(raw) > 100:
        raise RuleError("odometerTriggers: not a list of at most 100 triggers")
    out, seen = [], set()
    for k, item in enumerate(raw):
        at = f"odometerTriggers[{k}]"
        _object(item, at, {"id", "type", "threshold", "unit"}, {"id", "type", "threshold"})
        if not isinstance(item["id"], str) or not 1 <= len(item["id"]) <= 128 or item["id"] in seen:
            raise RuleError(f"{at}.id: not a unique string of 1..128 characters")
        seen.add(item["id"])
        if item["type"] not in TYPES:
            raise RuleError(f"{at}.type: {item['type']!r} is not one of {', '.join(TYPES)}")
        unit = item.get("unit", "m")
        if unit not in UNITS:
            raise RuleError(f"{at}.unit: {unit!r} is not m, km or mi")
        threshold = _number(item["threshold"], f"{at}.threshold", 0, 1e10) * UNITS[unit]
        if threshold <= 0:
            raise RuleError(f"{at}.threshold: must be above 0")
        out.append(Trigger(item["id"], item["type"], threshold))
    return out


def parse_anchor(raw: Any) -> float:
    """``odometer`` of a rule set: ``{"reading", "unit"}`` (the seed's odometer reading) in metres."""
    _object(raw, "odometer", {"reading", "unit", "date"}, {"reading", "unit"})
    if raw["unit"] not in UNITS:
        raise RuleError(f"odometer.unit: {raw['unit']!r} is not m, km or mi")
    return _number(raw["reading"], "odometer.reading", 0, 1e10) * UNITS[raw["unit"]]


@dataclass
class OdometerState:
    anchor_m: float | None = None  # the last anchor
    driven_m: float = 0.0  # since the anchor
    source: str | None = None  # "obd", "cloud": what the anchor was
    distance_m: float = 0.0  # driven in all, whatever the anchors: what from_now triggers count
    trigger_base_m: dict[str, float] = field(default_factory=dict)  # from_now: distance_m when it arrived
    fired: dict[str, float] = field(default_factory=dict)  # specific/from_now: when; milestone: last multiple

    def as_json(self) -> dict[str, Any]:
        return {"anchor_m": self.anchor_m, "driven_m": round(self.driven_m, 1), "source": self.source,
                "distance_m": round(self.distance_m, 1), "trigger_base_m": dict(self.trigger_base_m),
                "fired": dict(self.fired)}  # fmt: skip


class Odometer:
    def __init__(self, triggers: list[Trigger], state: OdometerState | None = None) -> None:
        self.state = state or OdometerState()
        self.triggers = triggers
        self._last_speed: tuple[int, float] | None = None  # (mono_ns, km/h)
        self._last_fix: tuple[float, float] | None = None
        for t in triggers:
            self._arm(t)

    @property
    def estimate_m(self) -> float | None:
        s = self.state
        return None if s.anchor_m is None else s.anchor_m + s.driven_m

    def set_triggers(self, triggers: list[Trigger]) -> None:
        """A new rule set's triggers: those kept (same id) keep their base and firing; new ones arm now."""
        kept = {t.id for t in triggers}
        for table in (self.state.trigger_base_m, self.state.fired):
            for trigger_id in [k for k in table if k not in kept]:
                del table[trigger_id]
        self.triggers = triggers
        for t in triggers:
            self._arm(t)

    def _arm(self, trigger: Trigger) -> None:
        estimate = self.estimate_m
        if trigger.type == "from_now" and trigger.id not in self.state.trigger_base_m:
            self.state.trigger_base_m[trigger.id] = self.state.distance_m
        if trigger.type == "milestone" and trigger.id not in self.state.fired and estimate is not None:
            self.state.fired[trigger.id] = math.floor(
                estimate / trigger.threshold_m
            )  # no firing for the past

    def anchor(self, metres: float, source: str) -> list[Trigger]:
        self.state.anchor_m, self.state.driven_m, self.state.source = metres, 0.0, source
        for t in self.triggers:
            self._arm(t)
        return self._fired()

    def observe(self, signal: str, value: Any, mono: int) -> list[Trigger]:
        """A reading; returns the triggers it fires."""
        if signal == "odometer" and isinstance(value, int | float) and value > 0:
            return self.anchor(float(value) * 1000.0, "obd")
        if signal == "vehicle_speed" and isinstance(value, int | float):
            last, self._last_speed = self._last_speed, (mono, float(value))
            if last is not None and 0 < (mono - last[0]) / NS <= MAX_GAP_S:
                self._drive((last[1] + float(value)) / 2 / 3.6 * (mono - last[0]) / NS)
                return self._fired()
            return []
        if signal == "gps_position" and isinstance(value, dict):
            try:
                fix = (float(value["latitude"]), float(value["longitude"]))
            except (KeyError, TypeError, ValueError):
                return []
            last, self._last_fix = self._last_fix, fix
            speed_fresh = self._last_speed is not None and (mono - self._last_speed[0]) / NS <= SPEED_FRESH_S
            if last is None or speed_fresh:
                return []
            step = distance_m(*last, *fix)
            if step <= MAX_JUMP_M:
                self._drive(step)
                return self._fired()
        return []

    def _drive(self, metres: float) -> None:
        self.state.driven_m += metres
        self.state.distance_m += metres

    def _fired(self) -> list[Trigger]:
        estimate = self.estimate_m
        if estimate is None:
            return []
        out = []
        for t in self.triggers:
            self._arm(t)
            if t.type == "specific" and t.id not in self.state.fired and estimate >= t.threshold_m:
                self.state.fired[t.id] = estimate
                out.append(t)
            elif t.type == "from_now" and t.id not in self.state.fired:
                if self.state.distance_m >= self.state.trigger_base_m[t.id] + t.threshold_m:
                    self.state.fired[t.id] = estimate
                    out.append(t)
            elif t.type == "milestone":
                multiple = math.floor(estimate / t.threshold_m)
                if multiple > self.state.fired.get(t.id, multiple):
                    out.append(t)
                self.state.fired[t.id] = multiple
        return out
