#!/usr/bin/env python3
"""Edge rules per reading: how many readings a second the evaluator takes with many active rules.

The rule set (issue 15's figure): ``--rules`` (1,000) geofences, each a 100-vertex polygon (a regular
100-gon, 200 m to 2 km across) scattered over a 0.5° x 0.5° area; every fourth rule also carries a speed
boundary (``vehicleSpeed`` above 30..90 km/h) and every tenth a weekly time profile and a cooldown. The
readings: a vehicle crossing that area, as the daemon's default schedule takes them: each second one
position and five OBD values (speed, rpm, coolant, load, throttle), speed varying so that speed boundaries
flip. Times the evaluator alone (daemon/rules/evaluator.py), best of ``--repeat`` runs, after one warm-up.

    python tools/bench/rules.py [--rules 1000] [--readings 300000] [--repeat 3]

Prints one JSON object: {rules, vertices_per_polygon, readings, readings_per_s, crossings, us_per_reading}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fleetgate.daemon.rules.definitions import parse_rules
from fleetgate.daemon.rules.evaluator import Evaluator

LAT0, LON0 = 52.40, 13.20
SPAN = 0.5
START_NS = 1_796_378_400 * 10**9


def polygon(lat: float, lon: float, radius_m: float, vertices: int) -> list[list[float]]:
    dlat = radius_m / 111_320
    dlon = dlat / math.cos(math.radians(lat))
    ring = [
        [lon + dlon * math.cos(2 * math.pi * k / vertices), lat + dlat * math.sin(2 * math.pi * k / vertices)]
        for k in range(vertices)
    ]
    return [[*ring, ring[0]]]


def rule_set(count: int, vertices: int, rng: random.Random) -> list[dict]:
    rules = []
    for i in range(count):
        lat, lon = LAT0 + rng.random() * SPAN, LON0 + rng.random() * SPAN
        rule: dict = {
            "id": f"rule-{i:05d}",
            "name": f"zone {i}",
            "boundaries": [
                {"type": "polygon", "coordinates": polygon(lat, lon, rng.uniform(100, 1000), vertices)}
            ],
        }
        if i % 4 == 0:
            rule["boundaries"].append(
                {"type": "parametric", "parameter": "vehicleSpeed", "min": rng.choice([30, 50, 70, 90])}
            )
        if i % 10 == 0:
            rule["timeProfile"] = {
                "entries": [
                    {"dayOfWeekUtc": d, "startTimeUtc": 6 * 3600, "endTimeUtc": 20 * 3600}
                    for d in range(1, 6)
                ]
            }
            rule["cooldown"] = 300
        rules.append(rule)
    return rules


def readings(count: int, rng: random.Random) -> list[tuple[str, object, int]]:
    out: list[tuple[str, object, int]] = []
    lat, lon, heading, speed = LAT0, LON0, 0.7, 40.0
    second = 0
    while len(out) < count:
        heading += rng.uniform(-0.2, 0.2)
        speed = min(120.0, max(0.0, speed + rng.uniform(-6, 6)))
        step = speed / 3.6 / 111_320
        lat = LAT0 + (lat - LAT0 + step * math.cos(heading)) % SPAN
        lon = LON0 + (lon - LON0 + step * math.sin(heading) / math.cos(math.radians(lat))) % SPAN
        wall = START_NS + second * 10**9
        out.append(("gps_position", {"latitude": lat, "longitude": lon, "altitude": 40.0}, wall))
        out.append(("vehicle_speed", round(speed), wall))
        out.append(("rpm", 800 + 30 * speed, wall))
        out.append(("coolant_temp", 90, wall))
        out.append(("engine_load", 20 + speed / 4, wall))
        out.append(("throttle_position", 10 + speed / 6, wall))
        second += 1
    return out[:count]


def run(rules: list, stream: list) -> tuple[float, int]:
    evaluator = Evaluator(rules)
    observe = evaluator.observe
    crossings = 0
    start = time.perf_counter()
    for signal, value, wall in stream:
        crossings += len(observe(signal, value, wall, True))
    return time.perf_counter() - start, crossings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--vertices", type=int, default=100)
    parser.add_argument("--readings", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(15)
    rules = parse_rules(rule_set(args.rules, args.vertices, rng))
    stream = readings(args.readings, rng)
    run(rules, stream[: len(stream) // 10])  # warm-up
    best, crossings = min(run(rules, stream) for _ in range(args.repeat))
    print(json.dumps({
        "rules": args.rules,
        "vertices_per_polygon": args.vertices,
        "readings": len(stream),
        "readings_per_s": round(len(stream) / best),
        "crossings": crossings,
        "us_per_reading": round(best / len(stream) * 1e6, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
