"""Edge rules (daemon/rules/): definitions checked field by field, and the evaluator's states and crossings
as the connected-car seed defines them, with the insurance portal's time profiles and cooldowns. The
incremental indexes (thresholds, the geofence grid) are checked against brute force on random input."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from fleetgate.daemon.rules.definitions import RuleError, parse_rule, parse_rules
from fleetgate.daemon.rules.evaluator import Evaluator, RuleState
from fleetgate.daemon.rules.geometry import Circle, Grid, Polygon, distance_m
from fleetgate.sync.crypto.rule_set import SIGNING_PREFIX, open_rule_set
from fleetgate.sync.crypto.signed import SignedRejected, seal_signed

SQUARE = [[[13.0, 52.0], [13.1, 52.0], [13.1, 52.1], [13.0, 52.1], [13.0, 52.0]]]
HOLE = [[13.04, 52.04], [13.06, 52.04], [13.06, 52.06], [13.04, 52.06], [13.04, 52.04]]
MONDAY_NOON = int(datetime(2026, 12, 7, 12, 0, tzinfo=UTC).timestamp()) * 10**9
S = 10**9


def at(lat: float, lon: float) -> dict:
    return {"latitude": lat, "longitude": lon, "altitude": None}


def param(parameter: str = "rpm", **bounds) -> dict:
    return {"type": "parametric", "parameter": parameter, **bounds}


def rule(*boundaries: dict, **extra) -> dict:
    return {"id": "x", "boundaries": list(boundaries), **extra}


def speeding(min_kmh: float = 50, **extra) -> dict:
    return {"id": "r1", "name": "fast", "boundaries": [param("vehicleSpeed", min=min_kmh)], **extra}


def week(day: int, start: int, end: int) -> dict:
    return {"entries": [{"dayOfWeekUtc": day, "startTimeUtc": start, "endTimeUtc": end}]}


def crossings(evaluator: Evaluator, *readings, trusted: bool = True) -> list[tuple[str, bool]]:
    out = []
    for i, (signal, value) in enumerate(readings):
        out += [
            (c.direction, c.first_eval)
            for c in evaluator.observe(signal, value, MONDAY_NOON + i * S, trusted)
        ]
    return out


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (rule(), "rule.boundaries: not a list of 1..16"),
        (rule({"type": "radius", "lat": 1, "lon": 1, "radius": 5}, {"type": "polygon", "coordinates": SQUARE}),
         "at most one geospatial"),
        (rule({"type": "polygon", "coordinates": [SQUARE[0][:-1]]}), "not closed"),
        (rule(param(min=9, max=1)), "min 9.0 is above max"),
        (rule(param()), "needs min, max or both"),
        (rule(param("warp", min=1)), "'warp' is not a numeric"),
        (rule(param("gps_position", min=1)), "not a numeric"),
        (rule({"type": "radius", "lat": 91, "lon": 1, "radius": 5}), "boundaries[0].lat: 91"),
        (rule({"type": "radius", "lat": 1, "lon": 1, "radius": 0}), "must be above 0 m"),
        (rule({"type": "radius", "lat": 1, "lon": 1, "radius": True}), "radius: not a number"),
        (rule({"type": "circle"}), "'circle' is not parametric"),
        (rule(param(min=1, colour=2)), "unknown field 'colour'"),
        (speeding(timeProfile=week(8, 0, 60)), "dayOfWeekUtc: 8"),
        (speeding(timeProfile=week(1, 60, 60)), "not before"),
        (speeding(cooldown=-1), "cooldown: -1"),
        ({"id": "", "boundaries": [param(min=1)]}, "rule.id"),
    ],
)  # fmt: skip
def test_a_malformed_rule_is_refused_naming_the_field(raw, message):
    with pytest.raises(RuleError) as caught:
        parse_rule(raw)
    assert message in str(caught.value)


def test_a_rule_set_with_a_repeated_id_is_refused():
    with pytest.raises(RuleError, match=r"rules\[1\].id: 'r1' appears twice"):
        parse_rules([speeding(), speeding()])


def test_a_parametric_rule_reports_its_first_evaluation_then_each_crossing():
    evaluator = Evaluator([parse_rule(speeding())])
    got = crossings(evaluator, ("vehicle_speed", 30), ("vehicle_speed", 60), ("vehicle_speed", 70),
                    ("vehicle_speed", 50), ("vehicle_speed", 49.9), ("rpm", 3000))  # fmt: skip
    assert got == [("leave", True), ("enter", False), ("leave", False)]  # bounds are inclusive: 50 is in
    assert evaluator.states["r1"].as_json()["covered"] is False


def test_a_rule_is_unevaluated_until_known_and_uncovered_as_soon_as_one_boundary_is_false():
    both = {"id": "r2", "boundaries": [param("vehicle_speed", min=50),
                                       {"type": "radius", "lat": 52.05, "lon": 13.05, "radius": 1000}]}  # fmt: skip
    evaluator = Evaluator([parse_rule(both)])
    assert crossings(evaluator, ("vehicle_speed", 60)) == []  # the fence is unknown: unevaluated
    assert not evaluator.states["r2"].evaluated
    assert crossings(evaluator, ("gps_position", at(52.05, 13.05))) == [("enter", True)]
    assert crossings(evaluator, ("gps_position", at(52.2, 13.05))) == [("leave", False)]

    other = Evaluator([parse_rule(both)])
    assert crossings(other, ("vehicle_speed", 20)) == [("leave", True)]  # one boundary false: uncovered


def test_a_polygon_hole_is_outside_and_the_reading_that_crossed_is_reported():
    rule = {"id": "p", "name": "yard", "boundaries": [{"type": "polygon", "coordinates": [SQUARE[0], HOLE]}]}
    evaluator = Evaluator([parse_rule(rule)])
    [first] = evaluator.observe("gps_position", at(52.02, 13.02), MONDAY_NOON, True)
    assert (first.direction, first.first_eval, first.snapshot) == (
        "enter",
        True,
        {"location": {"lat": 52.02, "lon": 13.02}},
    )
    [hole] = evaluator.observe("gps_position", at(52.05, 13.05), MONDAY_NOON + S, True)
    assert (hole.direction, hole.signal, hole.rule.name) == ("leave", "gps_position", "yard")


def test_a_time_profile_reports_only_inside_its_windows_and_only_on_trusted_time():
    evaluator = Evaluator([parse_rule(speeding(timeProfile=week(1, 9 * 3600, 17 * 3600)))])
    evening = MONDAY_NOON + 6 * 3600 * S
    assert evaluator.observe("vehicle_speed", 60, evening, True) == []
    assert evaluator.suppressed["window"] == 1 and evaluator.states["r1"].covered  # the state follows anyway
    assert evaluator.observe("vehicle_speed", 10, MONDAY_NOON, False) == []
    assert evaluator.suppressed["untrusted-time"] == 1
    assert [c.direction for c in evaluator.observe("vehicle_speed", 60, MONDAY_NOON, True)] == ["enter"]


def test_a_cooldown_silences_the_same_direction_until_it_has_passed():
    evaluator = Evaluator([parse_rule(speeding(cooldown=600))])
    assert crossings(evaluator, ("vehicle_speed", 60), ("vehicle_speed", 10), ("vehicle_speed", 60)) == [
        ("enter", True), ("leave", False)]  # fmt: skip
    assert evaluator.suppressed["cooldown"] == 1
    later = MONDAY_NOON + 700 * S
    evaluator.observe("vehicle_speed", 10, later, True)
    assert [c.direction for c in evaluator.observe("vehicle_speed", 60, later + S, True)] == ["enter"]


def test_saved_states_carry_on_without_a_second_first_evaluation():
    first = Evaluator([parse_rule(speeding())])
    crossings(first, ("vehicle_speed", 60))
    saved = {k: RuleState(**v.as_json()) for k, v in first.states.items()}
    again = Evaluator([parse_rule(speeding())], saved)
    assert crossings(again, ("vehicle_speed", 70)) == []  # still covered: nothing to report
    assert crossings(again, ("vehicle_speed", 10)) == [("leave", False)]


def test_the_threshold_index_agrees_with_checking_every_boundary():
    rng = random.Random(7)
    rules = [
        parse_rule({"id": f"r{i}", "boundaries": [
            {"type": "parametric", "parameter": "vehicle_speed", "min": rng.choice([None, rng.uniform(0, 100)]),
             "max": rng.uniform(100, 150)},
            {"type": "parametric", "parameter": "rpm", "max": rng.uniform(500, 4000)}]})
        for i in range(60)
    ]  # fmt: skip
    evaluator = Evaluator(rules)
    values: dict[str, float] = {}
    for step in range(3000):
        signal = rng.choice(["vehicle_speed", "rpm"])
        value = rng.choice([rng.uniform(0, 160), rng.uniform(0, 5000), 100.0, 50.0])
        values[signal] = value
        evaluator.observe(signal, value, MONDAY_NOON + step * S, True)
        for rule in rules:
            known = [values.get(b.signal) for b in rule.parametric]
            truth = [
                b.holds(v) if v is not None else None for b, v in zip(rule.parametric, known, strict=True)
            ]
            state = evaluator.states[rule.id]
            if False in truth:
                assert state.evaluated and not state.covered, (step, rule.id)
            elif None not in truth:
                assert state.evaluated and state.covered, (step, rule.id)


def test_the_grid_finds_exactly_the_geofences_that_contain_a_position():
    rng = random.Random(3)
    shapes = {}
    for i in range(200):
        lat, lon = 52 + rng.random(), 13 + rng.random()
        if i % 2:
            shapes[f"c{i}"] = Circle(lat, lon, rng.uniform(50, 20_000))
        else:
            d = rng.uniform(0.001, 0.3)
            ring = [(lon, lat), (lon + d, lat), (lon + d, lat + d / 2), (lon, lat + d), (lon, lat)]
            shapes[f"p{i}"] = Polygon([ring])
    shapes["region"] = Polygon([[(0.0, 40.0), (30.0, 40.0), (30.0, 60.0), (0.0, 60.0), (0.0, 40.0)]])
    grid = Grid(shapes.items())
    for _ in range(2000):
        lat, lon = 51.9 + rng.random() * 1.2, 12.9 + rng.random() * 1.2
        assert grid.inside(lat, lon) == {k for k, s in shapes.items() if s.contains(lat, lon)}


def test_distance_is_the_great_circle_one():
    assert distance_m(52.5200, 13.4050, 48.8566, 2.3522) == pytest.approx(878_000, rel=0.005)  # Berlin-Paris
    assert Circle(52.0, 13.0, 1000).contains(52.0 + 0.0089, 13.0)  # ~990 m north
    assert not Circle(52.0, 13.0, 1000).contains(52.0 + 0.0091, 13.0)  # ~1012 m north


def test_the_odometer_follows_the_vehicle_then_an_anchor_and_fires_each_kind_of_trigger():
    from fleetgate.daemon.rules.odometer import Odometer, parse_anchor, parse_triggers

    triggers = parse_triggers([
        {"id": "service", "type": "specific", "threshold": 10.5, "unit": "km"},
        {"id": "leg", "type": "from_now", "threshold": 300},
        {"id": "every-km", "type": "milestone", "threshold": 1, "unit": "km"},
    ])  # fmt: skip
    odo = Odometer(triggers)
    assert odo.observe("vehicle_speed", 36.0, 0) == [] and odo.estimate_m is None  # no anchor: no estimate
    assert odo.anchor(parse_anchor({"reading": 10, "unit": "km"}), "cloud") == []
    fired = []
    for t in range(1, 101):  # 36 km/h = 10 m/s for 100 s: 1,000 m
        fired += [(trig.id, round(odo.estimate_m)) for trig in odo.observe("vehicle_speed", 36.0, t * S)]
    assert odo.estimate_m == pytest.approx(11_000)
    assert fired == [("leg", 10_300), ("service", 10_500), ("every-km", 11_000)]
    # The vehicle's own odometer (km) wins: past many kilometre marks, the milestone fires once; the one-off
    # triggers have fired already.
    assert [t.id for t in odo.observe("odometer", 11_999.95, 101 * S)] == ["every-km"]
    assert odo.state.source == "obd" and odo.estimate_m == pytest.approx(11_999_950)


def test_gps_distance_counts_only_without_fresh_vehicle_speed_and_never_a_jump():
    from fleetgate.daemon.rules.odometer import Odometer

    odo = Odometer([])
    odo.anchor(0.0, "cloud")
    odo.observe("gps_position", at(52.0, 13.0), 0)
    odo.observe("gps_position", at(52.001, 13.0), S)  # ~111 m
    assert odo.estimate_m == pytest.approx(111.2, abs=0.5)
    odo.observe("gps_position", at(52.1, 13.0), 2 * S)  # an 11 km jump in a second: a glitch
    assert odo.estimate_m == pytest.approx(111.2, abs=0.5)
    odo.observe("vehicle_speed", 0.0, 3 * S)
    odo.observe("gps_position", at(52.101, 13.0), 4 * S)  # speed is fresh: GPS does not count
    assert odo.estimate_m == pytest.approx(111.2, abs=0.5)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([{"id": "a", "type": "weekly", "threshold": 1}], "type: 'weekly'"),
        ([{"id": "a", "type": "specific", "threshold": 0}], "threshold: must be above 0"),
        ([{"id": "a", "type": "specific", "threshold": 1, "unit": "furlong"}], "unit: 'furlong'"),
        ([{"id": "a", "type": "specific", "threshold": 1}] * 2, "id: not a unique"),
    ],
)
def test_a_malformed_distance_trigger_is_refused_naming_the_field(raw, message):
    from fleetgate.daemon.rules.odometer import parse_triggers

    with pytest.raises(RuleError) as caught:
        parse_triggers(raw)
    assert message in str(caught.value)


def test_from_now_counts_distance_driven_not_a_jump_of_the_estimate():
    from fleetgate.daemon.rules.odometer import Odometer, parse_triggers

    odo = Odometer(parse_triggers([{"id": "leg", "type": "from_now", "threshold": 300}]))
    odo.anchor(10_000.0, "cloud")
    assert odo.anchor(15_000.0, "obd") == []  # +5 km at once: a new anchor, not driving
    odo.observe("vehicle_speed", 36.0, 0)
    fired = [round(odo.estimate_m) for t in range(1, 40) for _ in odo.observe("vehicle_speed", 36.0, t * S)]
    assert fired == [15_300]


KEYS = ["id", "name", "boundaries", "type", "parameter", "min", "max", "lat", "lon", "radius", "coordinates",
        "timeProfile", "entries", "dayOfWeekUtc", "startTimeUtc", "endTimeUtc", "cooldown", "threshold", "unit",
        "reading"]  # fmt: skip
WORDS = ["parametric", "radius", "polygon", "vehicleSpeed", "specific", "milestone", "km"]
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(WORDS),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.sampled_from(KEYS), children, max_size=6)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
def test_any_json_as_a_rule_set_is_accepted_or_refused_with_a_rule_error(raw):
    from fleetgate.daemon.rules.odometer import parse_anchor, parse_triggers

    for parse in (parse_rules, lambda r: parse_rules([r]), parse_triggers, parse_anchor):
        try:
            parse(raw)
        except RuleError as exc:
            assert str(exc)  # names what was wrong


KEY = SigningKey(bytes(range(32)))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode())))
def test_any_signed_body_or_any_bytes_on_down_rules_is_opened_or_refused_with_a_reason(body):
    """Signed with the pinned key (the worst case: a cloud bug, not an attacker) or not signed at all."""
    for payload in (body, seal_signed(body, prefix=SIGNING_PREFIX, signing_key=KEY)):
        try:
            opened = open_rule_set(payload, verify_keys=[KEY.verify_key], device="veh-1")
        except SignedRejected as exc:
            assert exc.reason and exc.detail
        else:
            assert opened.device == "veh-1" and isinstance(opened.rules, list)
