"""The REEF channel end to end: a real daemon pulls this vehicle's sessions from a real mTLS HTTPS server
playing REEF (reef_server.py), a renter's PIN typed on the keypad pty switches the relay pty, and a session
ended at REEF while the vehicle was out of coverage is pulled on reconnect, applied and acknowledged, so the
cloud can answer REEF's `.../synchronized`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from test_access_daemon import (
    RELAY_OFF,
    RELAY_ON,
    VIN,
    Cloud,
    _online,
    access_config,
    acks,
    audit,
    sessions,
    type_pin,
)

from conftest import wait_until
from mosquitto_fixture import Mosquitto, TlsFiles, free_port, make_tls
from mqtt_consumer import Consumer
from pty_pair import PtyPair, pty_pairs_fixture
from reef_server import ReefServer
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(180)
pty_pairs = pty_pairs_fixture()
ROOT = "fleetgate/v1/test-0001"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("pki"))


def reef_section(reef: ReefServer, tls: TlsFiles) -> str:
    return f"""
[sessions.reef]
enabled = true
base_url = "{reef.base_url}"
ca_file = "{tls.ca}"
cert_file = "{tls.client_cert}"
key_file = "{tls.client_key}"
poll_interval_s = 600
retry_s = 1
"""


def states(daemon) -> dict[int, str]:
    return {row["id"]: row["state"] for row in sessions(daemon)["sessions"]}


@dataclass
class Rig:
    reef: ReefServer
    consumer: Consumer
    proxy: TcpProxy
    keypad: PtyPair
    relay: PtyPair
    start: Callable[[], Any]  # starts the daemon (REEF faults may be set up first); returns it
    cloud: Cloud  # signs and publishes (retained) session sets on the broker


@pytest.fixture
def rig(tmp_path, start_daemon, pty_pairs, tls) -> Iterator[Rig]:
    """REEF (mTLS), a broker behind a proxy the test can cut, a consumer, keypad and relay ptys."""
    with (
        ReefServer(tls) as reef,
        Mosquitto() as broker,
        Consumer("127.0.0.1", broker.port, f"{ROOT}/up/#") as consumer,
    ):
        proxy = TcpProxy("127.0.0.1", broker.port, port=free_port()).start()
        keypad, relay = pty_pairs("keypad"), pty_pairs("relay")
        cloud = Cloud(tmp_path, broker.port)
        config = access_config(
            tmp_path, cloud, proxy.port, keypad.device, relay.device, reef_section(reef, tls)
        )

        def start() -> Any:
            daemon = start_daemon(config)
            daemon.wait_ready()
            relay.expect(RELAY_OFF, timeout=20)
            return daemon

        try:
            yield Rig(reef, consumer, proxy, keypad, relay, start, cloud)
        finally:
            proxy.stop()


def test_a_reef_session_starts_the_vehicle_and_its_end_is_pulled_on_reconnect_and_acknowledged(rig, tls):
    reef, keypad, relay, proxy = rig.reef, rig.keypad, rig.relay, rig.proxy
    reef.add_session(VIN, completion="2026-11-30 08:00:00.000000", initialization="2026-11-30 07:00:00")
    rental = reef.start_session(VIN)
    daemon = rig.start()

    wait_until("REEF's sessions pulled", lambda: states(daemon).get(rental["id"]) == "active")
    assert type_pin(keypad, rental["pin"]) == b"G\n"
    relay.expect(RELAY_ON)
    view = sessions(daemon)
    assert view["reef"]["polls"] >= 1 and view["reef"]["last_error"] is None
    assert view["access"]["enabled_by"] == rental["id"]

    # Out of coverage, the rental ends at REEF; the vehicle learns it when coverage returns.
    proxy.cut("reset")
    wait_until("uplink offline", lambda: not _online(daemon))
    ended = reef.end_session(VIN)
    assert ended is not None and ended["id"] == rental["id"]
    assert states(daemon)[rental["id"]] == "active"  # REEF semantics: valid until the end arrives
    proxy.restore()
    wait_until("the end pulled on reconnect", lambda: states(daemon)[rental["id"]] == "ended")
    relay.expect(RELAY_OFF, timeout=20)
    assert type_pin(keypad, rental["pin"]) == b"R\n"

    def reef_ack_of_the_end():
        return next(
            (a for a in acks(rig.consumer) if a["source"] == "reef" and
             {"id": rental["id"], "from": "active", "to": "ended"} in a["changed"]),
            None,
        )  # fmt: skip

    ack = wait_until("the acknowledgement of the end", reef_ack_of_the_end)
    # The cloud's side: the latest acknowledgement is what REEF's .../synchronized compares with.
    reef.vehicle_acknowledged(VIN, {s["id"]: s["state"] for s in ack["sessions"]})
    assert reef.synchronized(VIN)
    assert ack["vin"] == VIN and len(ack["sessions"]) == 2
    assert rental["pin"] not in str(ack)

    wait_until("audit records", lambda: len(audit(rig.consumer)) >= 3)
    events = [(a["event"], a.get("session_id"), a.get("reason")) for a in audit(rig.consumer)]
    assert ("pin-accepted", rental["id"], None) in events
    assert ("start-enable-off", rental["id"], "ended") in events
    assert any(e == "pin-refused" for e, _, _ in events)  # an ended session keeps no hash to match
    assert {r.client_cn for r in reef.requests} == {tls.device_cn}
    assert all(r.path == f"/v1/managed-sessions/vehicles/{VIN}" for r in reef.requests)


def test_a_failing_reef_is_counted_and_retried_while_the_last_set_stays_in_force(rig):
    reef, proxy = rig.reef, rig.proxy
    rental = reef.start_session(VIN)
    reef.fail_next(503, count=2)
    daemon = rig.start()
    wait_until("pulled despite the faults", lambda: states(daemon).get(rental["id"]) == "active")
    view = sessions(daemon)["reef"]
    assert view["failures"] == {"ReefHttpError": 2}, view
    assert view["polls"] >= 3 and view["last_error"] is None

    # REEF goes away entirely; the next pull (on an MQTT reconnect) fails and is counted, the component
    # stays up, and the synchronized session still starts the vehicle (offline policy).
    reef.stop()
    proxy.cut("reset")
    wait_until("uplink offline", lambda: not _online(daemon))
    proxy.restore()
    wait_until("a failed pull", lambda: sessions(daemon)["reef"]["last_error"] is not None)
    view = sessions(daemon)["reef"]
    assert view["failures"].get("ReefUnavailable", 0) >= 1, view
    assert type_pin(rig.keypad, rental["pin"]) == b"G\n"
    rig.relay.expect(RELAY_ON)
    component = next(c for c in daemon_status(daemon)["components"] if c["name"] == "reef")
    assert component["state"] == "running" and component["restarts"] == 0


def daemon_status(daemon) -> dict:
    result = daemon.cli("status", "--json")
    assert result.returncode in (0, 4), result.stderr
    return json.loads(result.stdout)


def expiry(daemon, session_id: int) -> int | None:
    return next(r["expires_ns"] for r in sessions(daemon)["sessions"] if r["id"] == session_id)


def refused(daemon, session_id: int) -> str | None:
    return next(r["refused"] for r in sessions(daemon)["sessions"] if r["id"] == session_id)


def test_an_expiry_from_a_signed_set_survives_reef_pulls_reconnects_and_restarts(rig):
    """Issue 18: a REEF answer carries no expiry and must not erase the one a signed set gave, whichever
    channel speaks first, across the retained duplicate on reconnect and across a restart; the vehicle's
    acknowledgements say which expiry it enforces; and the PIN of an ended session is refused as such,
    without counting toward the lockout. (Enforcing an expiry needs trusted wall time: test_access_controller.)"""
    reef, proxy, cloud, keypad = rig.reef, rig.proxy, rig.cloud, rig.keypad
    started = datetime.now(UTC) - timedelta(minutes=5)
    rental = reef.add_session(VIN, id=41, pin="271828", initialization=started, verification_id="verif-41")
    daemon = rig.start()

    # REEF first: active, no expiry (REEF has none).
    wait_until("REEF's session pulled", lambda: states(daemon).get(41) == "active")
    assert expiry(daemon, 41) is None

    # Then a signed set lists the same session with an expiry an hour ahead.
    ends = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=250000)
    granted = {"id": 41, "verification_id": "verif-41", "initialization": started, "completion": "active",
               "pin": rental["pin"], "expires": ends}  # fmt: skip
    cloud.publish(cloud.sign([granted]))
    ends_ns = int(ends.timestamp()) * 10**9 + 250_000_000
    wait_until("the set's expiry", lambda: expiry(daemon, 41) == ends_ns)
    mqtt_ack = wait_until(
        "the set acknowledged", lambda: [a for a in acks(rig.consumer) if a["source"] == "mqtt"]
    )
    stamp = ends.strftime("%Y-%m-%dT%H:%M:%S.250000Z")
    assert mqtt_ack[-1]["sessions"] == [
        {"id": 41, "verification_id": "verif-41", "state": "active", "expires": stamp}
    ]

    # A reconnect: a REEF pull and the retained set again (a duplicate). The expiry stays.
    polls, duplicates = sessions(daemon)["reef"]["polls"], sessions(daemon)["downlink"]["counts"]["duplicate"]
    proxy.cut("reset")
    wait_until("uplink offline", lambda: not _online(daemon))
    proxy.restore()
    wait_until("a REEF pull after the reconnect", lambda: sessions(daemon)["reef"]["polls"] > polls)
    wait_until(
        "the retained duplicate", lambda: sessions(daemon)["downlink"]["counts"]["duplicate"] > duplicates
    )
    assert expiry(daemon, 41) == ends_ns

    # A restart in between, and a REEF change (a second session) so that REEF's answer is acknowledged.
    daemon.terminate()
    reef.add_session(VIN, id=42, pin="314159", initialization=datetime.now(UTC), verification_id="verif-42")
    daemon = rig.start()
    wait_until("the REEF change", lambda: states(daemon).get(42) == "active")
    assert expiry(daemon, 41) == ends_ns

    def reef_ack_of_42() -> dict | None:
        return next((a for a in acks(rig.consumer) if a["source"] == "reef" and
                     any(s["id"] == 42 for s in a["sessions"])), None)  # fmt: skip

    reef_ack = wait_until("REEF's change acknowledged", reef_ack_of_42)  # delivered after the state shows it
    assert {s["id"]: s["expires"] for s in reef_ack["sessions"]} == {41: stamp, 42: None}

    # The rentals end at REEF; the vehicle learns it on the next pull. A late renter's PIN is answered
    # "ended", audited with its session, and is no guess: typed more often than max_failures (3), it locks
    # nothing out; a wrong PIN still counts.
    reef.end_session(VIN)
    polls = sessions(daemon)["reef"]["polls"]
    proxy.cut("reset")
    wait_until("uplink offline", lambda: not _online(daemon))
    proxy.restore()
    wait_until("the end pulled", lambda: states(daemon) == {41: "ended", 42: "ended"})
    assert sessions(daemon)["reef"]["polls"] > polls
    for _ in range(4):
        assert type_pin(keypad, rental["pin"]) == b"R\n"
    assert sessions(daemon)["access"]["lockout"]["failures"] == 0
    assert type_pin(keypad, "999999") == b"R\n"
    assert sessions(daemon)["access"]["lockout"]["failures"] == 1

    def refusals() -> list[tuple]:
        return [(a["reason"], a["session_id"], a["failures"]) for a in audit(rig.consumer)
                if a["event"] == "pin-refused"]  # fmt: skip

    wait_until("the refusals audited", lambda: len(refusals()) == 5)
    assert refusals() == [("ended", 41, 0)] * 4 + [("no-match", None, 1)]
