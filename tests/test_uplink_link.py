"""The MQTT link's economy, against a real mosquitto.

- Topic aliases: after the first message on a topic the gateway sends only the alias, the broker hands
  subscribers the full topic, and a broker that takes no aliases gets full topics every time. Byte counts are
  of plain MQTT through a counting TCP forwarder, so they are exact (no TLS record padding).
- Health: published at connect, again as soon as the state it reports changes, not before its interval
  otherwise.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import aiomqtt
import pytest

from fleetgate.config.schema import MqttConfig
from fleetgate.sync.mqtt import link
from fleetgate.sync.mqtt.link import TopicAliases, Uplink, _Client
from fleetgate.sync.mqtt.topics import Topics

from mosquitto_fixture import Mosquitto
from tcp_proxy import TcpProxy

DEVICE = "alias-0001"
TELEMETRY = f"fleetgate/v1/{DEVICE}/up/telemetry"
HEARTBEAT = f"fleetgate/v1/{DEVICE}/up/heartbeat"


def test_aliases_are_numbered_per_topic_up_to_the_broker_maximum() -> None:
    aliases = TopicAliases(2)
    assert aliases.use("a") == ("a", 1)
    assert aliases.use("a") == ("", 1)
    assert aliases.use("b") == ("b", 2)
    assert aliases.use("c") == ("c", None)  # no number left: the name every time
    assert aliases.use("c") == ("c", None)
    assert aliases.use("b") == ("", 2)
    assert TopicAliases(0).use("a") == ("a", None)


async def _publish_all(port: int, broker_port: int, sends: list[tuple[str, bytes]], proxy: TcpProxy):
    """Publish each (topic, payload) through the forwarder, QoS 1, one after the other; returns the client's
    alias maximum, the bytes each publish cost upstream, and what a subscriber on the broker received."""
    received: list[tuple[str, bytes]] = []
    async with aiomqtt.Client("127.0.0.1", broker_port, protocol=aiomqtt.ProtocolVersion.V5) as sub:
        await sub.subscribe(f"fleetgate/v1/{DEVICE}/up/+", qos=1)
        async with _Client(
            "127.0.0.1", port, identifier=DEVICE, protocol=aiomqtt.ProtocolVersion.V5, timeout=10
        ) as client:
            costs = []
            for topic, payload in sends:
                before = proxy.bytes_up
                await client.publish_checked(topic, payload, True, 10.0)
                costs.append(proxy.bytes_up - before)
            maximum = client.aliases.maximum

        async def collect() -> None:
            async for message in sub.messages:
                received.append((str(message.topic), bytes(message.payload)))
                if len(received) == len(sends):
                    return

        await asyncio.wait_for(collect(), 10)
    return maximum, costs, received


@pytest.mark.parametrize("broker_maximum", [None, 0])
def test_after_the_first_message_a_topic_costs_its_alias_only(broker_maximum: int | None) -> None:
    extra = "" if broker_maximum is None else f"max_topic_alias {broker_maximum}"
    sends = [(TELEMETRY, b"\x78\x01" + bytes([i]) * 20) for i in range(3)]
    sends += [(HEARTBEAT, b"\x78\x02" * 11), (TELEMETRY, b"\x78\x03" * 11), (HEARTBEAT, b"\x78\x04" * 11)]
    with Mosquitto(extra_conf=extra) as broker, TcpProxy("127.0.0.1", broker.port) as proxy:
        maximum, costs, received = asyncio.run(_publish_all(proxy.port, broker.port, sends, proxy))

    assert received == sends  # subscribers see full topics, in order, whatever the sender did
    if broker_maximum == 0:
        assert maximum == 0
        assert costs[1] == costs[0]  # same size, same topic: nothing saved
        return
    assert maximum == 10  # mosquitto's default
    # The first message on a topic carries its name, the next the empty name: exactly the name's bytes less
    # (payloads small enough that the remaining length takes one byte in every packet).
    assert costs[0] - costs[1] == len(TELEMETRY)
    assert costs[1] == costs[2]
    assert costs[3] - costs[5] == len(HEARTBEAT)
    assert costs[4] == costs[1]


class _IdleDrain:
    """The drain's place in the link, with nothing to send: this test is about the health message."""

    stats = SimpleNamespace(last_publish_wall=None, messages=0, records=0, rate_per_s=0.0)

    async def run(self, publish: Any) -> None:
        await asyncio.Event().wait()


async def _health_messages(broker_port: int) -> list[dict]:
    config = MqttConfig(enabled=True, host="127.0.0.1", port=broker_port, tls=False, health_interval_s=3600)
    state = {"obd": "running"}
    published: list[dict] = []

    async def health() -> dict:
        return {"components": dict(state)}

    uplink = Uplink(config, Topics("fleetgate/v1", DEVICE), _IdleDrain(), health,  # type: ignore[arg-type]
                    health_state=lambda: tuple(state.items()))  # fmt: skip
    async with aiomqtt.Client("127.0.0.1", broker_port, protocol=aiomqtt.ProtocolVersion.V5) as sub:
        await sub.subscribe(f"fleetgate/v1/{DEVICE}/health", qos=1)
        link = asyncio.create_task(uplink.run())

        async def next_health() -> dict:
            async for message in sub.messages:
                return json.loads(bytes(message.payload))
            raise AssertionError("subscription ended")

        try:
            published.append(await asyncio.wait_for(next_health(), 20))  # at connect
            # Nothing changes for several checks: nothing is published (the interval is an hour).
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(next_health(), 2.2)
            state["obd"] = "backoff"
            published.append(await asyncio.wait_for(next_health(), 20))
        finally:
            link.cancel()
            await asyncio.gather(link, return_exceptions=True)
    return published


def test_health_is_published_at_connect_and_when_a_component_changes_state_not_every_check(
    monkeypatch,
) -> None:
    monkeypatch.setattr(link, "HEALTH_CHECK_S", 0.5)  # checks every 0.5 s instead of 5 s: a shorter test
    with Mosquitto() as broker:
        published = asyncio.run(_health_messages(broker.port))
    assert [m["components"] for m in published] == [{"obd": "running"}, {"obd": "backoff"}]
    assert all(m["online"] for m in published)
