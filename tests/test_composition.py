"""The composition root's contract (docs/architecture.md): each feature builds itself from the core and its
parts are registered by the core alone. Nothing is started here; the daemon-level tests run the result."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fleetgate.config.schema import Config, MqttConfig, StoreConfig
from fleetgate.daemon.app import FEATURES
from fleetgate.daemon.runtime.core import Core
from fleetgate.daemon.runtime.feature import FeatureParts
from fleetgate.sync.store import Database


async def composed(config: Config) -> tuple[Core, dict[str, Any]]:
    database = await Database.open(config.store.db_path)
    core = Core.open(config, database, 0.0)
    for build in FEATURES:
        core.add(await build(core))
    snapshot = await core.status.snapshot()
    await database.close()
    return core, snapshot


def test_the_embedded_defaults_compose_the_runtime_and_every_feature(tmp_path):
    core, snap = asyncio.run(composed(Config(store=StoreConfig(state_dir=tmp_path))))
    assert core.control.commands == [
        "gps",
        "obd",
        "ping",
        "queue",
        "rules",
        "scooters",
        "sessions",
        "status",
        "store",
    ]
    assert [s["name"] for s in snap["components"]] == [
        "control",
        "readings",
        "heartbeat",
        "quota",
        "ntp-watch",
        "trips",
    ]
    assert snap["uplink"] == {"enabled": False, "online": False}
    assert snap["outbox"]["packer"] is None
    assert core.downlink == {}


def test_with_mqtt_the_uplink_adds_its_components_verb_and_status_sections(tmp_path):
    config = Config(
        store=StoreConfig(state_dir=tmp_path), mqtt=MqttConfig(enabled=True, host="127.0.0.1", tls=False)
    )
    core, snap = asyncio.run(composed(config))
    assert "sync" in core.control.commands
    names = [s["name"] for s in snap["components"]]
    assert names[-4:] == ["uplink", "packer", "net-watch", "outbox-spill"]
    assert snap["uplink"]["enabled"] is True and snap["uplink"]["online"] is False
    assert snap["uplink"]["eta_s"] == 0.0  # nothing waiting
    assert snap["outbox"]["packer"] == {"segments": 0, "records": 0, "bytes_saved": 0, "spills_sealed": 0}
    memory = snap["outbox"]["memory"]  # live records held in memory until acknowledged (sync/store/hot.py)
    assert set(memory) == {"telemetry", "heartbeat"}
    assert memory["telemetry"]["held"] == 0 and memory["telemetry"]["window_s"] == 12.0


def test_a_depot_adds_the_segway_parts_and_takes_commands_only_with_signing_keys(tmp_path):
    import base64

    from nacl.signing import SigningKey

    from fleetgate.config.schema import DeviceConfig
    from fleetgate.config.segway import SegwayCommandsConfig, SegwayConfig
    from fleetgate.sync.crypto.device_keys import generate_secret_file

    generate_secret_file(tmp_path / "device.secret")
    (tmp_path / "segway.secret").write_text("s3cret\n")
    (tmp_path / "segway.secret").chmod(0o600)
    key = base64.b64encode(bytes(SigningKey.generate().verify_key)).decode()
    for keys, downlink in (([], set()), ([key], {"scooter-commands"})):
        config = Config(
            device=DeviceConfig(role="depot", secret_file=tmp_path / "device.secret"),
            store=StoreConfig(state_dir=tmp_path),
            mqtt=MqttConfig(enabled=True, host="127.0.0.1", tls=False),
            segway=SegwayConfig(
                enabled=True,
                platform_code="E10001",
                client_secret_file=tmp_path / "segway.secret",
                commands=SegwayCommandsConfig(signing_keys=keys),
            ),
        )
        core, snap = asyncio.run(composed(config))
        assert {"scooters", "scooter"} <= set(core.control.commands)
        names = [s["name"] for s in snap["components"]]
        assert {"scooter-poller", "scooter-commands"} <= set(names) and "segway-push" not in names
        assert set(core.downlink) == downlink
        assert snap["segway"]["scooters"] == 0 and snap["segway"]["push"] == {"enabled": False}


def test_a_part_registered_twice_is_refused_and_a_status_view_sees_the_snapshot(tmp_path):
    async def main() -> tuple[dict[str, Any], list[str]]:
        config = Config(store=StoreConfig(state_dir=tmp_path))
        database = await Database.open(config.store.db_path)
        core = Core.open(config, database, 0.0)

        async def handler(payload: bytes) -> None:
            return None

        core.add(
            FeatureParts(
                control={"extra": lambda args: {}},
                downlink={"things": handler},
                status={"extra": lambda snap: {"streams": len(snap["outbox"]["streams"])}},
                alerts=[lambda: ["the extra thing needs a look"]],
            )
        )
        refused = []
        for parts in (
            FeatureParts(control={"status": lambda args: {}}),  # a runtime verb
            FeatureParts(control={"extra": lambda args: {}}),
            FeatureParts(downlink={"things": handler}),
            FeatureParts(status={"extra": lambda snap: None}),
        ):
            with pytest.raises(ValueError) as caught:
                core.add(parts)
            refused.append(str(caught.value))
        snap = await core.status.snapshot()
        await database.close()
        return snap, refused

    snap, refused = asyncio.run(main())
    assert snap["extra"] == {"streams": len(snap["outbox"]["streams"])}
    assert snap["alerts"] == ["the extra thing needs a look"]
    assert refused == [
        "control verb 'status' registered twice",
        "control verb 'extra' registered twice",
        "downlink 'things' registered twice",
        "status section 'extra' added twice",
    ]
