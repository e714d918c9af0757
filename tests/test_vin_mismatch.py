"""A gateway moved to another vehicle (docs/security.md): the ELM327 emulator answers a VIN that is not the
sessions' one, so the right PIN is refused as vin-mismatch, audited, not counted, and an alert is raised;
after a restart without the adapter, the VIN the vehicle last answered still applies."""

from __future__ import annotations

import json

from test_access_daemon import (  # noqa: F401  (pty_pairs is a fixture)
    PIN,
    RELAY_OFF,
    VIN,
    Cloud,
    access_config,
    pty_pairs,
    session,
    synced_version,
    type_pin,
)

from conftest import wait_until
from elm_emulator import ElmEmulator
from mosquitto_fixture import Mosquitto

EMULATOR_VIN = "WP0ZZZ99ZTS390000"


def sessions_view(daemon) -> dict:
    done = daemon.cli("sessions", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_moved_gateway_refuses_the_old_vehicles_pins(tmp_path, start_daemon, pty_pairs) -> None:  # noqa: F811
    assert EMULATOR_VIN != VIN
    with Mosquitto() as broker, ElmEmulator(link=tmp_path / "ttyOBD") as elm:
        cloud = Cloud(tmp_path, broker.port)
        keypad, relay = pty_pairs("keypad"), pty_pairs("relay")
        obd = f'\n[obd]\nenabled = true\nport = "{elm.port}"\nprotocol = "6"\n'
        config = access_config(tmp_path, cloud, broker.port, keypad.device, relay.device, obd)
        daemon = start_daemon(config)
        daemon.wait_ready()
        wait_until("relay off", lambda: RELAY_OFF in relay.read(0.5), timeout=20)
        cloud.publish(cloud.sign([session(3)]))
        wait_until("set applied", lambda: synced_version(daemon) == 1)
        view = wait_until("the vehicle's VIN", lambda: (v := sessions_view(daemon))["vehicle_vin"] and v, 60)
        assert view["vehicle_vin"] == EMULATOR_VIN and view["vin_mismatch"] is True
        assert type_pin(keypad, PIN) == b"R\n"
        status = daemon.cli("status", "--json")
        assert status.returncode == 4 and any(
            a.startswith("vin-mismatch") for a in json.loads(status.stdout)["alerts"]
        )
        view = sessions_view(daemon)
        assert view["access"]["lockout"]["failures"] == 0  # the right PIN: refused, not a guess
        assert not view["access"]["start_enable"]["on"]
        daemon.terminate()
        log = daemon.log
        assert "vin-mismatch" in log and PIN not in log

    # The adapter gone (powered off in the new vehicle, OBD not answering yet): the last VIN read applies.
    config.write_text(config.read_text().replace("[obd]\nenabled = true", "[obd]\nenabled = false"))
    with Mosquitto(port=broker.port):
        daemon = start_daemon(config)
        daemon.wait_ready()
        view = sessions_view(daemon)
        assert (view["vehicle_vin"], view["vehicle_vin_source"], view["vin_mismatch"]) == (
            EMULATOR_VIN,
            "saved",
            True,
        )
        assert type_pin(keypad, PIN) == b"R\n"
