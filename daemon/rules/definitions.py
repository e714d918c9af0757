"""Edge rules as the cloud defines them, checked strictly: the connected-car seed's rules and boundaries
(../shared/seeds/digests/vinli.md §4) with the insurance portal's time profile and cooldown
(../shared/seeds/digests/mobility-and-scope.md, RuleInstances ``Params``).

    {"id": "<uuid>", "name": "Depot", "boundaries": [
        {"type": "parametric", "parameter": "vehicleSpeed", "min": 35, "max": null},
        {"type": "radius", "lat": 29.9508, "lon": -90.0811, "radius": 500},
        {"type": "polygon", "coordinates": [[[lon, lat], ..., [lon, lat]]]}],
     "timeProfile": {"entries": [{"dayOfWeekUtc": 1, "startTimeUtc": 28800, "endTimeUtc": 64800}]},
     "cooldown": 900}

A rule is an AND of its boundaries, at most one of them geospatial (the seed's constraint). ``parameter`` is
a signal of docs/signals.md by its name or its Vinli key, in the signal's unit (``vehicleSpeed`` is km/h);
bounds are inclusive and either may be null or absent, not both. A polygon is GeoJSON: rings of
``[lon, lat]``, closed, the first the outline and any others holes. ``timeProfile`` and ``cooldown`` are
optional. Anything else is refused with a ``RuleError`` naming the field (``rules[2].boundaries[0].min``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from fleetgate.config.signals import CATALOGUE
from fleetgate.daemon.rules.geometry import Circle, Polygon

MAX_RULES = 5000
MAX_BOUNDARIES = 16
MAX_VERTICES = 10_000  # per polygon, all rings
MAX_RADIUS_M = 1_000_000.0
MAX_COOLDOWN_S = 7 * 86400
WEEK_DAYS = range(1, 8)  # dayOfWeekUtc: Monday = 1
# Numeric signals a parametric boundary may name, by our name and by Vinli's key.
PARAMETERS = {s.name: s.name for s in CATALOGUE.values() if s.name != "gps_position"} | {
    s.vinli: s.name for s in CATALOGUE.values() if s.vinli and s.name != "gps_position"
}


class RuleError(ValueError):
    """A rule (set) that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class Parametric:
    signal: str  # our signal name
    minimum: float | None
    maximum: float | None

    def holds(self, value: float) -> bool:
        return (self.minimum is None or value >= self.minimum) and (
            self.maximum is None or value <= self.maximum
        )


@dataclass(frozen=True, slots=True)
class Window:
    day: int  # 1 (Monday) .. 7
    start_s: int  # seconds since midnight UTC
    end_s: int


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    parametric: tuple[Parametric, ...]
    fence: Circle | Polygon | None
    windows: tuple[Window, ...]  # empty: always
    cooldown_s: float
    source: dict[str, Any]  # the definition as received (the seed's events carry the full rule)

    @property
    def boundaries(self) -> int:
        return len(self.parametric) + (self.fence is not None)


def _number(value: Any, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RuleError(f"{where}: not a number")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise RuleError(f"{where}: an integer of {len(str(abs(value)))} digits is outside {lo}..{hi}")
    if not math.isfinite(value):
        raise RuleError(f"{where}: not a number")
    if not lo <= value <= hi:
        raise RuleError(f"{where}: {value} is outside {lo}..{hi}")
    return float(value)


def _object(value: Any, where: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RuleError(f"{where}: not an object")
    unknown, missing = set(value) - allowed, required - set(value)
    if unknown:
        raise RuleError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    if missing:
        raise RuleError(f"{where}: missing {sorted(missing)[0]!r}")
    return value


def _parametric(raw: dict[str, Any], where: str) -> Parametric:
    _object(raw, where, {"type", "id", "parameter", "min", "max"}, {"type", "parameter"})
    name = raw["parameter"]
    if not isinstance(name, str) or name not in PARAMETERS:
        raise RuleError(f"{where}.parameter: {name!r} is not a numeric signal (docs/signals.md)")
    lo = None if raw.get("min") is None else _number(raw["min"], f"{where}.min", -1e12, 1e12)
    hi = None if raw.get("max") is None else _number(raw["max"], f"{where}.max", -1e12, 1e12)
    if lo is None and hi is None:
        raise RuleError(f"{where}: needs min, max or both")
    if lo is not None and hi is not None and lo > hi:
        raise RuleError(f"{where}: min {lo} is above max {hi}")
    return Parametric(PARAMETERS[name], lo, hi)


def _ring(raw: Any, where: str) -> list[tuple[float, float]]:
    if not isinstance(raw, list) or len(raw) < 4:
        raise RuleError(f"{where}: a ring needs at least 4 [lon, lat] points (closed)")
    points = []
    for k, point in enumerate(raw):
        if not isinstance(point, list) or len(point) != 2:
            raise RuleError(f"{where}[{k}]: not a [lon, lat] pair")
        points.append(
            (_number(point[0], f"{where}[{k}][0]", -180, 180), _number(point[1], f"{where}[{k}][1]", -90, 90))
        )
    if points[0] != points[-1]:
        raise RuleError(f"{where}: not closed (the last point must equal the first)")
    if any(abs(a[0] - b[0]) > 180 for a, b in itertools.pairwise(points)):
        raise RuleError(f"{where}: crosses the antimeridian (split the geofence in two rules)")
    return points


def _fence(raw: dict[str, Any], where: str) -> Circle | Polygon:
    if raw["type"] == "radius":
        _object(raw, where, {"type", "id", "lat", "lon", "radius"}, {"type", "lat", "lon", "radius"})
        radius = _number(raw["radius"], f"{where}.radius", 0, MAX_RADIUS_M)
        if radius <= 0:
            raise RuleError(f"{where}.radius: must be above 0 m")
        return Circle(
            _number(raw["lat"], f"{where}.lat", -90, 90),
            _number(raw["lon"], f"{where}.lon", -180, 180),
            radius,
        )
    _object(raw, where, {"type", "id", "coordinates"}, {"type", "coordinates"})
    rings = raw["coordinates"]
    if not isinstance(rings, list) or not rings:
        raise RuleError(f"{where}.coordinates: not a list of rings")
    parsed = [_ring(ring, f"{where}.coordinates[{k}]") for k, ring in enumerate(rings)]
    if sum(len(r) for r in parsed) > MAX_VERTICES:
        raise RuleError(f"{where}.coordinates: more than {MAX_VERTICES} points")
    return Polygon(parsed)


def _windows(raw: Any, where: str) -> tuple[Window, ...]:
    body = _object(raw, where, {"entries"}, {"entries"})
    entries = body["entries"]
    if not isinstance(entries, list) or not entries:
        raise RuleError(f"{where}.entries: not a non-empty list")
    out = []
    for k, entry in enumerate(entries):
        at = f"{where}.entries[{k}]"
        _object(
            entry,
            at,
            {"dayOfWeekUtc", "startTimeUtc", "endTimeUtc"},
            {"dayOfWeekUtc", "startTimeUtc", "endTimeUtc"},
        )
        day = entry["dayOfWeekUtc"]
        if isinstance(day, bool) or day not in WEEK_DAYS:
            raise RuleError(f"{at}.dayOfWeekUtc: {day!r} is not 1 (Monday) .. 7")
        start = _number(entry["startTimeUtc"], f"{at}.startTimeUtc", 0, 86400)
        end = _number(entry["endTimeUtc"], f"{at}.endTimeUtc", 0, 86400)
        if start >= end:
            raise RuleError(f"{at}: startTimeUtc {start:g} is not before endTimeUtc {end:g}")
        out.append(Window(day, int(start), int(end)))
    return tuple(out)


def parse_rule(raw: Any, where: str = "rule") -> Rule:
    body = _object(raw, where, {"id", "name", "boundaries", "timeProfile", "cooldown"}, {"id", "boundaries"})
    rule_id = body["id"]
    if not isinstance(rule_id, str) or not 1 <= len(rule_id) <= 128:
        raise RuleError(f"{where}.id: not a string of 1..128 characters")
    name = body.get("name", "")
    if not isinstance(name, str) or len(name) > 256:
        raise RuleError(f"{where}.name: not a string of at most 256 characters")
    bounds = body["boundaries"]
    if not isinstance(bounds, list) or not 1 <= len(bounds) <= MAX_BOUNDARIES:
        raise RuleError(f"{where}.boundaries: not a list of 1..{MAX_BOUNDARIES} boundaries")
    parametric: list[Parametric] = []
    fence = None
    for k, bound in enumerate(bounds):
        at = f"{where}.boundaries[{k}]"
        kind = bound.get("type") if isinstance(bound, dict) else None
        if kind == "parametric":
            parametric.append(_parametric(bound, at))
        elif kind in ("radius", "polygon"):
            if fence is not None:
                raise RuleError(f"{at}: a rule has at most one geospatial boundary")
            fence = _fence(bound, at)
        else:
            raise RuleError(f"{at}.type: {kind!r} is not parametric, radius or polygon")
    windows = _windows(body["timeProfile"], f"{where}.timeProfile") if "timeProfile" in body else ()
    cooldown = _number(body.get("cooldown", 0), f"{where}.cooldown", 0, MAX_COOLDOWN_S)
    return Rule(rule_id, name, tuple(parametric), fence, windows, cooldown, raw)


def parse_rules(raw: Any) -> list[Rule]:
    """A whole rule set (a list of rules, ids unique)."""
    if not isinstance(raw, list) or len(raw) > MAX_RULES:
        raise RuleError(f"rules: not a list of at most {MAX_RULES} rules")
    rules = [parse_rule(r, f"rules[{k}]") for k, r in enumerate(raw)]
    seen: set[str] = set()
    for k, rule in enumerate(rules):
        if rule.id in seen:
            raise RuleError(f"rules[{k}].id: {rule.id!r} appears twice")
        seen.add(rule.id)
    return rules
