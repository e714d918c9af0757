"""Edge rules evaluated on every reading, offline as online: the seed's states and crossings.

Per rule, as the connected-car seed defines it: *unevaluated* until it can be established whether the vehicle
is inside, *uncovered* when at least one boundary is false, *covered* when all are true (``evaluated`` and
``covered`` are the seed's two booleans). A move into covered is a ``rule-enter``, out of it a
``rule-leave``; the first evaluation that establishes either is always reported, with ``first_eval``.

The insurance portal's rule instances add a weekly UTC time profile and a cooldown. Both shape what is
*reported*, not the state: a crossing outside every window of the profile, or within ``cooldown`` of the
last reported crossing in the same direction, is counted (``suppressed``) and not reported. A time profile is
judged on trusted wall time only; with untrusted time, crossings of a rule with a profile are suppressed.

Cost per reading: a numeric reading re-checks only the boundaries whose min or max lies between its old and
new value (bisected from a sorted list of thresholds); a position, only the geofences of its grid cell
(geometry.Grid), and reports the rules whose inside/outside changed. 1,000 rules do not mean 1,000 checks.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleetgate.daemon.rules.definitions import Rule
from fleetgate.daemon.rules.geometry import Grid

POSITION = "gps_position"
NS = 1_000_000_000


@dataclass
class RuleState:
    """What survives a restart (the seed's ``evaluated``/``covered``), and when a crossing was last reported
    per direction (wall ns) for the cooldown."""

    evaluated: bool = False
    covered: bool = False
    last_reported: dict[str, int] = field(default_factory=dict)
    last_crossing: dict[str, Any] | None = None  # direction, wall_ns, trigger: for `fleetgate rules`

    def as_json(self) -> dict[str, Any]:
        return {
            "evaluated": self.evaluated,
            "covered": self.covered,
            "last_reported": dict(self.last_reported),
            "last_crossing": self.last_crossing,
        }


@dataclass(frozen=True)
class Crossing:
    rule: Rule
    direction: str  # "enter" or "leave"
    first_eval: bool
    signal: str  # the reading that caused it
    value: Any
    wall_ns: int
    snapshot: dict[str, Any]  # the values the rule was judged on: "location" {lat, lon} and parameters


class _Tracked:
    """One rule's boundaries: None (no data yet), True or False each."""

    __slots__ = ("fence", "params", "rule", "state")

    def __init__(self, rule: Rule, state: RuleState) -> None:
        self.rule = rule
        self.state = state
        self.params: list[bool | None] = [None] * len(rule.parametric)
        self.fence: bool | None = None

    def verdict(self) -> tuple[bool, bool]:
        """(evaluated, covered)."""
        known = [*self.params, *(() if self.rule.fence is None else (self.fence,))]
        if any(b is False for b in known):
            return True, False
        if any(b is None for b in known):
            return False, False
        return True, True


class Evaluator:
    def __init__(self, rules: Sequence[Rule], states: dict[str, RuleState] | None = None) -> None:
        states = states or {}
        self._tracked = {r.id: _Tracked(r, states.get(r.id) or RuleState()) for r in rules}
        # Per signal: (threshold, rule id, boundary index), sorted; and every (rule id, index) on it.
        self._thresholds: dict[str, list[tuple[float, str, int]]] = {}
        self._on_signal: dict[str, list[tuple[str, int]]] = {}
        for rule in rules:
            for k, bound in enumerate(rule.parametric):
                self._on_signal.setdefault(bound.signal, []).append((rule.id, k))
                for edge in (bound.minimum, bound.maximum):
                    if edge is not None:
                        self._thresholds.setdefault(bound.signal, []).append((edge, rule.id, k))
        for edges in self._thresholds.values():
            edges.sort(key=lambda e: e[0])
        self._edge_values = {s: [e[0] for e in edges] for s, edges in self._thresholds.items()}
        fenced = [(r.id, r.fence) for r in rules if r.fence is not None]
        self._grid = Grid(fenced)
        self._fenced = [rule_id for rule_id, _ in fenced]
        self._inside: set[str] | None = None  # fenced rules containing the last position
        self.values: dict[str, Any] = {}
        self.suppressed = {"window": 0, "cooldown": 0, "untrusted-time": 0}
        self.state_changes = 0  # every change of a rule's evaluated/covered, reported or not

    @property
    def states(self) -> dict[str, RuleState]:
        return {rule_id: t.state for rule_id, t in self._tracked.items()}

    def observe(self, signal: str, value: Any, wall_ns: int, trusted: bool) -> list[Crossing]:
        """A reading; returns the crossings to report (in rule order of the set)."""
        if signal == POSITION:
            changed = self._position(value)
        elif signal in self._on_signal and isinstance(value, int | float) and not isinstance(value, bool):
            changed = self._number(signal, float(value))
        else:
            return []
        if signal != POSITION:
            self.values[signal] = value
        out = []
        for rule_id in changed:
            crossing = self._settle(self._tracked[rule_id], signal, value, wall_ns, trusted)
            if crossing is not None:
                out.append(crossing)
        return out

    def _number(self, signal: str, value: float) -> Iterable[str]:
        old = self.values.get(signal)
        if old is None:
            touched = self._on_signal[signal]
        else:
            edges, values = self._thresholds.get(signal, []), self._edge_values.get(signal, [])
            lo, hi = (old, value) if old <= value else (value, old)
            touched = [
                (r, k) for _, r, k in edges[bisect.bisect_left(values, lo) : bisect.bisect_right(values, hi)]
            ]
        changed = []
        for rule_id, k in touched:
            tracked = self._tracked[rule_id]
            holds = tracked.rule.parametric[k].holds(value)
            if tracked.params[k] is not holds:
                tracked.params[k] = holds
                changed.append(rule_id)
        return dict.fromkeys(changed)  # once each, in order

    def _position(self, value: Any) -> Iterable[str]:
        try:
            lat, lon = float(value["latitude"]), float(value["longitude"])
        except (TypeError, KeyError, ValueError):
            return []
        self.values[POSITION] = {"lat": lat, "lon": lon}
        inside = self._grid.inside(lat, lon)
        before, self._inside = self._inside, inside
        changed = self._fenced if before is None else inside ^ before
        for rule_id in changed:
            self._tracked[rule_id].fence = rule_id in inside
        return changed

    def _settle(
        self, tracked: _Tracked, signal: str, value: Any, wall_ns: int, trusted: bool
    ) -> Crossing | None:
        state = tracked.state
        evaluated, covered = tracked.verdict()
        if not evaluated or (state.evaluated and covered == state.covered):
            return None
        first = not state.evaluated
        state.evaluated, state.covered = True, covered
        self.state_changes += 1
        direction = "enter" if covered else "leave"
        why = self._suppressed(tracked.rule, state, direction, wall_ns, trusted)
        if why is not None:
            self.suppressed[why] += 1
            return None
        state.last_reported[direction] = wall_ns
        rule = tracked.rule
        snapshot: dict[str, Any] = {b.signal: self.values.get(b.signal) for b in rule.parametric}
        if rule.fence is not None:
            snapshot["location"] = self.values.get(POSITION)
        state.last_crossing = {"direction": direction, "wall_ns": wall_ns, "signal": signal, "value": value}
        return Crossing(rule, direction, first, signal, value, wall_ns, snapshot)

    @staticmethod
    def _suppressed(rule: Rule, state: RuleState, direction: str, wall_ns: int, trusted: bool) -> str | None:
        if rule.windows:
            if not trusted:
                return "untrusted-time"
            moment = datetime.fromtimestamp(wall_ns // NS, tz=UTC)
            second = moment.hour * 3600 + moment.minute * 60 + moment.second
            day = moment.isoweekday()
            if not any(w.day == day and w.start_s <= second < w.end_s for w in rule.windows):
                return "window"
        last = state.last_reported.get(direction)
        # A clock that went back counts as the cooldown having passed: it must not silence a rule for long.
        if rule.cooldown_s and last is not None and 0 <= wall_ns - last < rule.cooldown_s * NS:
            return "cooldown"
        return None
