"""The depot's Bluetooth LE path end to end: a real daemon whose bleak talks to a BlueZ of our own on a private
system bus (bluez_mock.py), where a scooter implements docs/ble-profile.md independently of the gateway's code;
the Segway cloud is the real HTTPS server of segway_server.py and the MQTT side a real broker.

Commands route BLE → cloud → the persistent queue: in range with a cached key they go over BLE (the cloud sees
no control request), out of range (or out of range mid-command) they go through the cloud, and with neither
they wait in the queue, across a kill -9, until the scooter comes back into range.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from nacl.signing import SigningKey
from test_depot_daemon import (
    KEY,
    MOPED,
    ROOT,
    SCOOTER,
    Depot,
    depot_config,
    results,
    tls,
    wait_until,
)

from bluez_mock import BlueZ, Peripheral, fleetgate_profile
from mosquitto_fixture import Mosquitto, free_port
from mqtt_consumer import Consumer
from segway_server import SegwayServer

pytestmark = pytest.mark.timeout(240)
ADDRESS = "D0:5A:FE:00:00:01"
UNLOCK, LOCK, END_RENTAL = 0x01, 0x02, 0x04

BLE = """pending_retry_s = 2
secure_defer_s = 3600

[segway.ble]
enabled = true
scan_s = 1
scan_every_s = 1
range_timeout_s = 3
connect_timeout_s = 3
connect_attempts = 2
command_timeout_s = 2
idle_disconnect_s = 2
"""


@pytest.fixture
def yard(tmp_path, start_daemon, tls) -> Iterator[tuple[Depot, Peripheral, Any]]:
    with (
        BlueZ() as bluez,
        SegwayServer(tls) as segway,
        Mosquitto() as broker,
        Consumer("127.0.0.1", broker.port, f"{ROOT}/up/#") as consumer,
    ):
        scooter = bluez.add_peripheral(
            ADDRESS, name="FG-moped", rssi=-60, profile=fleetgate_profile(KEY, MOPED)
        )
        segway.add_scooter(MOPED, key=KEY)
        segway.add_scooter(SCOOTER, online=False)
        signer = SigningKey.generate()
        push_port = free_port()
        config = depot_config(
            tmp_path,
            segway,
            tls,
            broker.port,
            push_port,
            signer,
            extra=BLE,
            moped=f'ble_address = "{ADDRESS}"',
        )
        depot = Depot(segway, consumer, broker, tls, signer, push_port, config, start_daemon(config))
        depot.wait_ready()
        yield depot, scooter, start_daemon


__all__ = ["tls"]  # the module-scoped certificate fixture, shared with test_depot_daemon


def moped(depot: Depot) -> dict[str, Any]:
    return depot.scooters()[MOPED]


def ready_over_ble(depot: Depot) -> dict[str, Any]:
    return wait_until(
        "the moped in BLE range with its key cached",
        lambda: (m := moped(depot))["key_cached"] and m["ble"] and m["ble"]["in_range"] and m,
    )


def scooter_cli(depot: Depot, *args: str) -> dict[str, Any]:
    done = depot.daemon.cli("scooter", MOPED, *args, "--json", timeout=60)
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


def cloud_controls(depot: Depot) -> list[str]:
    return [r.path.rsplit("/", 1)[-1] for r in depot.segway.api_requests() if "/control/" in r.path]


def test_in_range_with_a_cached_key_a_command_goes_over_ble_and_the_cloud_sees_none(yard) -> None:
    depot, scooter, _ = yard
    view = ready_over_ble(depot)
    assert isinstance(view["ble"]["rssi"], int) and view["ble"]["rssi"] <= -60
    assert view["pending"] == []

    result = scooter_cli(depot, "unlock")
    assert result["outcome"] == "done" and result["channel"] == "ble", result
    assert result["ble_status"] == "ok" and result["scooter_state"] == {"locked": False, "rental": False}
    assert scooter.profile_state()["ops"] == ["unlock"]
    assert cloud_controls(depot) == []

    # The outcome is audited on the result topic (checked against docs/mqtt.md's schema by records()).
    published = wait_until("the BLE unlock published", lambda: results(depot, result["id"]))
    assert [(r["outcome"], r["channel"], r["source"]) for r in published] == [("done", "ble", "cli")]
    shown = depot.daemon.cli("scooters").stdout
    assert "dBm" in shown and "unlock: done via ble" in shown
    assert KEY not in depot.daemon.log


def test_out_of_range_even_mid_command_the_cloud_runs_it(yard) -> None:
    depot, scooter, _ = yard
    ready_over_ble(depot)

    # The scooter drops the link as the unlock's AUTH arrives and leaves range: BLE fails, the cloud unlocks.
    scooter.drop_on(UNLOCK)
    scooter.go_out_of_range()
    result = scooter_cli(depot, "unlock")
    assert result["outcome"] == "done" and result["channel"] == "cloud", result
    assert result["route"][0]["channel"] == "ble" and result["route"][-1] == {"channel": "cloud", "result": 0}
    assert cloud_controls(depot) == ["unlock"]
    assert depot.segway.scooter(MOPED)["status"]["locked"] is False

    # Known out of range: BLE is not even tried.
    wait_until("out of range", lambda: not moped(depot)["ble"]["in_range"])
    result = scooter_cli(depot, "lock")
    assert result["channel"] == "cloud" and result["route"][0] == {
        "channel": "ble",
        "result": "not in BLE range",
    }
    assert scooter.profile_state()["ops"] == []

    # Bad frames from the scooter: counted, the daemon stays up, the cloud does it.
    scooter.come_back()
    ready_over_ble(depot)
    scooter.garble_next(20)
    result = scooter_cli(depot, "unlock")
    assert result["outcome"] == "done" and result["channel"] == "cloud", result
    assert result["route"][0] == {"channel": "ble", "result": "protocol-error"}
    assert depot.segway_status()["ble"]["profile"]["bad_frames"] > 0
    assert depot.daemon.proc.poll() is None


def test_via_pins_the_channel(yard) -> None:
    depot, scooter, _ = yard
    ready_over_ble(depot)
    assert scooter_cli(depot, "lock", "--via", "cloud")["channel"] == "cloud"
    assert scooter.profile_state()["ops"] == []
    assert scooter_cli(depot, "unlock", "--via", "ble")["channel"] == "ble"
    assert scooter.profile_state()["ops"] == ["unlock"]
    refused = scooter_cli(depot, "speed-mode", "speedMode=2", "--via", "ble")
    assert refused["outcome"] == "refused" and "does not go over BLE" in refused["reason"]


def test_a_lock_no_channel_can_run_waits_in_the_queue_across_a_kill_9(yard, tmp_path) -> None:
    depot, scooter, start_daemon = yard
    ready_over_ble(depot)
    scooter.go_out_of_range()
    wait_until("out of range", lambda: not moped(depot)["ble"]["in_range"])
    depot.segway.stop()  # the cloud unreachable

    depot.command("lock")
    deferred = wait_until(
        "the lock deferred", lambda: [r for r in results(depot, "cmd-1") if r["outcome"] == "deferred"]
    )
    assert deferred[0]["route"][0] == {"channel": "ble", "result": "not in BLE range"}
    assert [p["op"] for p in moped(depot)["pending"]] == ["lock"]

    depot.daemon.kill()
    depot.daemon = start_daemon(depot.config)
    depot.daemon.wait_ready()
    assert [p["op"] for p in moped(depot)["pending"]] == ["lock"]  # from the state table, after SIGKILL

    scooter.come_back()
    done = wait_until("the lock done", lambda: [r for r in results(depot, "cmd-1") if r["outcome"] == "done"])
    assert done[0]["channel"] == "ble"
    assert scooter.profile_state()["ops"] == ["lock"] and scooter.profile_state()["locked"] is True
    assert [r["outcome"] for r in results(depot, "cmd-1")] == ["accepted", "deferred", "done"]
    assert moped(depot)["pending"] == []
    assert depot.segway_status()["commands"]["pending"] == 0


def test_ending_a_rental_rotates_the_key_and_the_old_one_stops_working(yard) -> None:
    depot, scooter, _ = yard
    ready_over_ble(depot)
    assert scooter_cli(depot, "start-rental")["channel"] == "ble"
    assert scooter_cli(depot, "end-rental")["channel"] == "ble"

    def rotated() -> list[dict[str, Any]]:
        return [r for r in results(depot) if r["op"] == "rotate-key" and r["outcome"] == "done"]

    (rotation,) = wait_until("the key rotated", rotated)
    assert rotation["source"] == "rotation" and rotation["data"] == {"key_cached": True}
    new_key = depot.segway.scooter(MOPED)["key"]["key"]
    assert new_key != KEY
    writes = [r for r in depot.segway.api_requests() if r.path.endswith("/setting/bluetooth-key")]
    assert len(writes) == 1  # set once, then read back (a GET)
    assert new_key not in depot.daemon.log and KEY not in depot.daemon.log

    # The cloud hands the scooter its new key; the gateway opens it with the key it read back.
    scooter.set_profile_key(new_key)
    result = scooter_cli(depot, "unlock", "--via", "ble")
    assert result["outcome"] == "done" and result["channel"] == "ble", result


def test_a_key_the_scooter_refuses_is_fetched_again(yard) -> None:
    depot, scooter, _ = yard
    ready_over_ble(depot)
    fetches = len([r for r in depot.segway.api_requests() if r.path.endswith("/bluetooth-key")])
    scooter.set_profile_key("Zz99Yy88")  # rotated behind the gateway's back
    result = scooter_cli(depot, "unlock")
    assert result["channel"] == "cloud" and result["route"][0] == {"channel": "ble", "result": "auth-failed"}
    wait_until(
        "the key fetched again",
        lambda: len([r for r in depot.segway.api_requests() if r.path.endswith("/bluetooth-key")]) > fetches,
    )
