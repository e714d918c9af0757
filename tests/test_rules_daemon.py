"""Edge rules through the real daemon: gpsd fed by gpsfake drives a route out of a depot geofence and back at
two speeds, and the ELM327 emulator on a pty gives the vehicle's own speed; a signed rule set on the real
broker's ``down/rules``; a consumer checks every event against docs/mqtt.md. Crossings made with the link cut
arrive when it returns; a restart carries the rules' states on (no second first evaluation); an older set and
a set with a bad rule are refused, counted, and change nothing.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nacl.signing import SigningKey
from test_access_daemon import records

from fleetgate.sync.crypto.rule_set import seal_rule_set

from conftest import daemon_config, wait_until
from elm_emulator import ElmEmulator
from gpsfake_fixture import DRIVE_WAYPOINTS, Gpsfake, moving_route
from mosquitto_fixture import Mosquitto, free_port, publish_retained
from mqtt_consumer import Consumer
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(240)
DEVICE = "test-0001"
ROOT = f"fleetgate/v1/{DEVICE}"
START_LAT, START_LON = DRIVE_WAYPOINTS[0]
DEPOT = {"type": "radius", "lat": START_LAT, "lon": START_LON, "radius": 40}
GPS_45 = {"type": "parametric", "parameter": "gps_speed", "min": 45}
OBD_50 = {"type": "parametric", "parameter": "vehicleSpeed", "min": 50}
RULES = [
    {"id": "depot", "name": "Depot", "boundaries": [DEPOT]},
    {"id": "fast", "name": "Over 45", "boundaries": [GPS_45]},
    {"id": "obd-fast", "name": "OBD over 50", "boundaries": [OBD_50]},
]
ISSUED = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)


class Cloud:
    def __init__(self, port: int) -> None:
        self.key = SigningKey.generate()
        self.port = port

    @property
    def public_key(self) -> str:
        return base64.b64encode(bytes(self.key.verify_key)).decode()

    def publish(self, version: int, rules: list[Any], **odometer: Any) -> None:
        payload = seal_rule_set(
            device=DEVICE, version=version, issued_at=ISSUED + timedelta(minutes=version), rules=rules,
            signing_key=self.key, **odometer,
        )  # fmt: skip
        publish_retained(self.port, f"{ROOT}/down/rules", payload)


def rules_view(daemon) -> dict[str, Any]:
    result = daemon.cli("rules", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def events(consumer, *names: str) -> list[dict[str, Any]]:
    return [e for e in records(consumer, "events") if e["event"] in names]


def test_rules_are_evaluated_on_the_road_offline_and_across_a_restart_and_bad_sets_change_nothing(
    tmp_path, start_daemon
):
    route, _ = moving_route(tmp_path)
    with (
        Gpsfake(route, cycle_s=0.05) as gps,
        ElmEmulator(link=tmp_path / "ttyOBD") as elm,
        Mosquitto() as broker,
        Consumer("127.0.0.1", broker.port, f"{ROOT}/up/#") as consumer,
        TcpProxy("127.0.0.1", broker.port, port=free_port()) as proxy,
    ):
        cloud = Cloud(broker.port)
        config = daemon_config(
            tmp_path,
            f"""
[supervisor]
backoff_initial_s = 0.2
backoff_max_s = 1.0

[gps]
enabled = true
port = {gps.port}

[obd]
enabled = true
port = "{elm.port}"
protocol = "6"

[mqtt]
enabled = true
host = "127.0.0.1"
port = {proxy.port}
tls = false
keepalive_s = 5
publish_timeout_s = 5

[rules]
enabled = true
signing_keys = ["{cloud.public_key}"]
""",
        )
        # With an odometer reading to anchor on and a trigger 100 m from now (GPS distance: no OBD here).
        anchor = {"odometer": {"reading": 1000, "unit": "km"},
                  "odometer_triggers": [{"id": "leg", "type": "from_now", "threshold": 100}]}  # fmt: skip
        cloud.publish(1, RULES, **anchor)
        daemon = start_daemon(config)
        daemon.wait_ready()

        elm.set_speed(30)
        # The set arrives (retained), then the route crosses both rules, both ways.
        wait_until("the set applied", lambda: events(consumer, "rules-applied"))

        def kinds() -> set[tuple[str, str]]:
            return {(e["rule"]["id"], e["direction"]) for e in events(consumer, "rule-enter", "rule-leave")}

        both_ways = {("depot", "enter"), ("depot", "leave"), ("fast", "enter"), ("fast", "leave")}
        wait_until("every crossing", lambda: kinds() >= both_ways, timeout=90)
        crossing = events(consumer, "rule-enter", "rule-leave")[0]
        assert crossing["firstEval"] is True and crossing["rule_set_version"] == 1
        depot = next(e for e in events(consumer, "rule-enter") if e["rule"]["id"] == "depot")
        assert set(depot["snapshot"]) == {"location"} and depot["trigger"]["signal"] == "gps_position"
        fast = next(e for e in events(consumer, "rule-enter") if e["rule"]["id"] == "fast")
        assert fast["snapshot"]["gps_speed"] >= 45 and fast["trigger"]["signal"] == "gps_speed"

        # The vehicle's own speed: below 50, then above.
        def obd_crossings(name: str) -> list[dict[str, Any]]:
            return [e for e in events(consumer, name) if e["rule"]["id"] == "obd-fast"]

        below = wait_until("the OBD rule evaluated", lambda: obd_crossings("rule-leave"))
        assert below[0]["firstEval"] is True and below[0]["trigger"] == {
            "signal": "vehicle_speed",
            "value": 30,
        }
        elm.set_speed(60)
        above = wait_until("over 50", lambda: obd_crossings("rule-enter"))
        assert above[0]["snapshot"] == {"vehicle_speed": 60} and above[0]["firstEval"] is False
        elm.set_speed(30)
        [trigger] = wait_until("the distance trigger", lambda: events(consumer, "distance-trigger"))
        assert trigger["odometerTrigger"] == {
            "id": "leg",
            "type": "from_now",
            "threshold": 100.0,
            "unit": "m",
        }
        assert 1_000_100 <= trigger["estimatedOdometer"] < 1_000_400
        view = rules_view(daemon)
        assert view["odometer"]["source"] == "cloud" and view["odometer"]["estimate_m"] >= 1_000_100
        human = daemon.cli("rules")
        assert human.returncode == 0 and "rule set version 1" in human.stdout, human.stderr
        assert "depot  Depot:" in human.stdout and "last crossing" in human.stdout
        odometer_line = (
            r"odometer 1,000\.\d km \(anchored by cloud\); distance triggers: leg \(from_now 0\.1 km\)"
        )
        assert re.search(odometer_line, human.stdout), human.stdout
        assert view["version"] == 1 and [r["id"] for r in view["rules"]] == ["depot", "fast", "obd-fast"]
        assert all(r["evaluated"] and r["last_crossing"] for r in view["rules"])

        # Offline: the rules go on; their events arrive when the link returns.
        proxy.cut("reset")
        offline_from = rules_view(daemon)["counts"]["crossings"]
        wait_until(
            "crossings offline",
            lambda: rules_view(daemon)["counts"]["crossings"] >= offline_from + 4,
            timeout=90,
        )
        made = rules_view(daemon)["counts"]["crossings"]
        proxy.restore()
        wait_until(
            "the offline crossings delivered",
            lambda: len(events(consumer, "rule-enter", "rule-leave")) >= made,
            timeout=60,
        )

        # A restart: states carry on, so no rule reports a first evaluation again.
        daemon.terminate()
        daemon = start_daemon(config)
        daemon.wait_ready()
        before = len(events(consumer, "rule-enter", "rule-leave"))
        wait_until(
            "crossings after the restart",
            lambda: len(events(consumer, "rule-enter", "rule-leave")) >= before + 4,
            timeout=90,
        )
        first = [(e["rule"]["id"]) for e in events(consumer, "rule-enter", "rule-leave") if e["firstEval"]]
        assert sorted(first) == ["depot", "fast", "obd-fast"], first

        # A newer set with a bad rule, then an older set: both refused whole, counted; version 1 stays.
        bad = [*RULES, {"id": "two-fences", "boundaries": [
            {"type": "radius", "lat": 52.5, "lon": 13.4, "radius": 10},
            {"type": "radius", "lat": 52.6, "lon": 13.4, "radius": 10}]}]  # fmt: skip
        cloud.publish(2, bad)
        cloud.publish(3, RULES[:1], **anchor)  # the same reading again: not a new anchor
        wait_until("version 3 applied", lambda: rules_view(daemon)["version"] == 3)
        cloud.publish(2, RULES)  # older than 3
        wait_until("both refusals", lambda: len(rules_view(daemon)["rejected"]) == 2)
        view = rules_view(daemon)
        assert view["rejected"] == {"malformed-rule": 1, "older-version": 1} and view["version"] == 3
        assert [r["id"] for r in view["rules"]] == ["depot"]
        refusals = wait_until(
            "refusal events",
            lambda: len(events(consumer, "rule-set-rejected")) == 2 and events(consumer, "rule-set-rejected"),
        )
        assert "rules[3].boundaries[1]: a rule has at most one geospatial boundary" in refusals[0]["detail"]
        applied = events(consumer, "rules-applied")
        assert [(a["version"], a["rules"], a["kept"]) for a in applied] == [(1, 3, 0), (3, 1, 1)]
        assert rules_view(daemon)["odometer"]["estimate_m"] > trigger["estimatedOdometer"]  # not reset
        assert len(events(consumer, "distance-trigger")) == 1  # from_now fires once
        daemon.terminate()
