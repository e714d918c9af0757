"""Trip statistics and ignition debouncing, computed on the device (pure logic, exact numbers)."""

from __future__ import annotations

import math

import polyline
import pytest

from fleetgate.daemon.telemetry.trips import IgnitionDetector, Trip, TripThresholds, haversine_m

S = 1_000_000_000  # ns per second
TH = TripThresholds()


def test_ignition_needs_evidence_to_last_and_is_dated_at_its_first_sample():
    det = IgnitionDetector(on_after_s=2, off_after_s=10)
    assert det.observe(0 * S, True) is None
    assert det.observe(1 * S, True) is None
    assert det.observe(2 * S, True) == 0  # flipped on, dated at the first running sample
    assert det.on
    assert det.observe(3 * S, False) is None
    assert det.observe(8 * S, True) is None  # a stall shorter than off_after_s is bridged
    assert det.observe(9 * S, False) is None
    assert det.observe(18 * S, False) is None
    assert det.observe(19 * S, False) == 9 * S
    assert not det.on


def test_distance_by_vss_is_the_integral_of_speed():
    trip = Trip.begin("boot", 0, None)
    for t in range(0, 61):  # 60 s at 36 km/h = 600 m
        trip.add_speed(t * S, 36.0, TH)
    stats = trip.stats(60 * S)
    assert stats["distanceByVSS"] == pytest.approx(600.0)
    assert stats["distance"] == stats["distanceByVSS"]
    assert stats["duration"] == 60_000
    assert stats["maxSpeed"] == 36.0 and stats["averageSpeed"] == 36.0


def test_gaps_longer_than_the_limit_are_not_integrated():
    trip = Trip.begin("boot", 0, None)
    trip.add_speed(0, 36.0, TH)
    trip.add_speed(1 * S, 36.0, TH)  # 10 m
    trip.add_speed(30 * S, 36.0, TH)  # a 29 s hole: unknown, not 290 m
    assert trip.stats(30 * S)["distanceByVSS"] == pytest.approx(10.0)


def test_stops_moving_average_and_hard_events():
    trip = Trip.begin("boot", 0, None)
    speeds = [0, 20, 40, 40, 20, 0, 0, 30, 30, 0]  # km/h, one per second
    for t, v in enumerate(speeds):
        trip.add_speed(t * S, float(v), TH)
    stats = trip.stats(len(speeds) * S)
    assert stats["stopCount"] == 2  # 20 -> 0 and 30 -> 0
    moving = [v for v in speeds if v >= TH.moving_speed_kmh]
    assert stats["averageMovingSpeed"] == pytest.approx(sum(moving) / len(moving), abs=0.01)
    assert stats["averageSpeed"] == pytest.approx(sum(speeds) / len(speeds), abs=0.01)
    # +20 km/h in 1 s = 5.56 m/s² (hard, twice: 0->20, 20->40, 0->30 is 8.3);
    # -20 km/h in 1 s = -5.56 (hard braking: 40->20, 20->0), 30->0 = -8.3
    assert stats["hardAccelCount"] == 3
    assert stats["hardBrakeCount"] == 3


def test_gentle_driving_has_no_hard_events():
    trip = Trip.begin("boot", 0, None)
    for t in range(30):
        trip.add_speed(t * S, min(50.0, t * 5.0), TH)  # 5 km/h per second = 1.39 m/s²
    stats = trip.stats(30 * S)
    assert stats["hardAccelCount"] == 0 and stats["hardBrakeCount"] == 0


def test_gps_distance_points_and_preview():
    trip = Trip.begin("boot", 0, (52.5200, 13.4050))
    lat = 52.5200
    points = []
    for t in range(1, 101):  # 100 steps of 0.0001° latitude, ~11.1 m each, one per second
        lat = 52.5200 + t * 0.0001
        trip.add_fix(t * S, lat, 13.4050, TH)
        points.append(lat)
    expected = haversine_m(52.5200 + 0.0001, 13.4050, lat, 13.4050)  # first fix starts the measuring
    stats = trip.stats(100 * S)
    assert stats["distanceByGPS"] == pytest.approx(expected, abs=0.005)  # reported to the centimetre
    assert stats["distanceByVSS"] is None and stats["distance"] == stats["distanceByGPS"]
    assert stats["locationCount"] == 100
    decoded = polyline.decode(trip.encoded_preview(), 5)
    assert decoded[0] == pytest.approx((52.52, 13.405))
    assert decoded[-1] == pytest.approx((round(lat, 5), 13.405))
    assert 1 < len(decoded) < 100  # thinned to points at least 20 m apart


def test_gps_glitch_jump_is_not_distance():
    trip = Trip.begin("boot", 0, None)
    trip.add_fix(0, 52.0, 13.0, TH)
    trip.add_fix(1 * S, 52.1, 13.0, TH)  # 11 km in a second
    trip.add_fix(2 * S, 52.0, 13.0, TH)
    assert trip.stats(2 * S)["distanceByGPS"] == 0


def test_preview_stays_bounded_on_long_trips():
    trip = Trip.begin("boot", 0, None)
    for t in range(5000):
        trip.add_fix(t * S, 10.0 + t * 0.001, 10.0, TH)  # 111 m apart
    assert len(trip.preview) <= TH.preview_max_points


def test_trip_state_round_trips_through_json():
    import json

    trip = Trip.begin("boot", 5 * S, (1.0, 2.0))
    trip.add_speed(6 * S, 10.0, TH)
    trip.add_fix(6 * S, 1.0001, 2.0, TH)
    again = Trip.from_json(json.loads(json.dumps(trip.to_json())))
    assert again == trip
    again.add_speed(7 * S, 20.0, TH)
    assert again.stats(7 * S)["distanceByVSS"] == pytest.approx(15 / 3.6, abs=0.005)


def test_a_checkpoint_keeps_the_preview_small_and_reads_the_earlier_format():
    """The trip is rewritten every checkpoint (a minute): its preview goes as an encoded polyline."""
    import json

    trip = Trip.begin("boot", 0, None)
    for t in range(TH.preview_max_points):
        trip.add_fix(t * S, 52.5 + t * 0.0003, 13.4 + t * 0.0002, TH)
    saved = json.dumps(trip.to_json())
    listed = json.dumps({**trip.to_json(), "preview": [list(p) for p in trip.preview]})
    assert 2 * len(saved) < len(listed) and len(saved) < 4000
    assert Trip.from_json(json.loads(saved)).preview == [(round(a, 5), round(b, 5)) for a, b in trip.preview]
    assert Trip.from_json(json.loads(listed)).preview == trip.preview  # a checkpoint from before


def test_haversine_matches_a_known_distance():
    # One degree of latitude on the mean sphere: 2*pi*R/360.
    assert haversine_m(0, 0, 1, 0) == pytest.approx(2 * math.pi * 6_371_008.8 / 360)
