"""The MQTT link: one aiomqtt (MQTT 5) connection to the broker, TLS with a client certificate, a retained
health message with a Last Will, and the outbox drain running over it.

The supervisor runs ``Uplink.run``; it connects, announces the device online (retained), drains until the
link fails, and raises. The supervisor restarts it with backoff and jitter. The keepalive makes a dead link
(a silent cellular modem) show within about 1.5 keepalive periods; a publish not acknowledged within
``publish_timeout_s`` counts as a dead link too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleetgate.config.schema import MqttConfig
from fleetgate.sync.mqtt.drain import Drain
from fleetgate.sync.mqtt.envelope import CONTENT_TYPE
from fleetgate.sync.mqtt.topics import Topics

log = logging.getLogger(__name__)

OFFLINE = json.dumps({"online": False})  # the Last Will, and what a clean stop publishes too
OFFLINE_TIMEOUT_S = 2.0
HEALTH_CHECK_S = 5.0  # how often the health loop asks whether the state it reports has changed


class PublishRejected(aiomqtt.MqttError):
    """The broker answered PUBACK with a failure reason code (MQTT 5): the message was not accepted."""


class _LastError(logging.Handler):
    """Remembers paho's last ERROR line: with TLS 1.3 a refused client certificate only shows there."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()


PAHO_LOG = logging.getLogger("fleetgate.sync.paho")
_LAST_ERROR = _LastError()
PAHO_LOG.addHandler(_LAST_ERROR)
CERT_REFUSED = ("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "ALERT_CERTIFICATE")


def _closed_before_connack() -> str:
    detail = _LAST_ERROR.message or "no reason given"
    if any(mark in detail for mark in CERT_REFUSED):
        return f"the broker refused this device's client certificate ({detail})"
    if "SSL" in detail or "EOF" in detail:
        # The alert naming the reason can be lost in the close; the symptom is still the TLS session ending
        # before CONNACK, which with require_certificate brokers almost always means the certificate.
        return (
            "the broker closed the TLS connection before accepting it: most likely it refused this device's "
            f"client certificate ({detail})"
        )
    return f"connection closed before the broker accepted it ({detail})"


class _Client(aiomqtt.Client):
    """aiomqtt's client, made to honour PUBACK reason codes and to report a refused connection at once.

    aiomqtt 2.x completes ``publish`` on any PUBACK, even "not authorized" (0x87) or "quota exceeded" (0x97):
    the records would then be deleted as delivered. This subclass keeps the reason code per message id and
    raises PublishRejected for a failure. It overrides aiomqtt internals; pinned to aiomqtt < 3.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _LAST_ERROR.message = None
        super().__init__(*args, logger=PAHO_LOG, **kwargs)
        self._reasons: dict[int, ReasonCode] = {}
        self.aliases = TopicAliases(0)  # until the CONNACK says how many the broker takes
        # The drain keeps max_inflight publishes pending on purpose; aiomqtt would warn about each above 10.
        self.pending_calls_threshold = kwargs.get("max_inflight_messages", 10) + 1

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any = None
    ) -> None:
        if not self._connected.done() and reason_code == paho.CONNACK_ACCEPTED:
            self.aliases = TopicAliases(getattr(properties, "TopicAliasMaximum", 0))
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any = None
    ) -> None:
        # aiomqtt ignores a disconnect before CONNACK and lets the connect run into its timeout ("Operation
        # timed out"): under TLS 1.3 that is what a refused client certificate looks like. Fail at once, saying so.
        if not self._connected.done():
            self._connected.set_exception(aiomqtt.MqttError(_closed_before_connack()))
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        self._reasons[mid] = reason_code
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish_checked(
        self, topic: str, payload: bytes, compressed: bool, ack_timeout_s: float
    ) -> None:
        name, alias = self.aliases.use(topic)
        info = self._client.publish(name, payload, 1, False, _properties(compressed, alias))
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if not info.is_published():
            confirmation = asyncio.Event()
            with self._pending_call(info.mid, confirmation, self._pending_publishes):
                await self._wait_for(confirmation.wait(), timeout=ack_timeout_s)
        reason = self._reasons.pop(info.mid, None)
        if reason is not None and reason.is_failure:
            raise PublishRejected(f"broker refused the message on {topic}: {reason}")


Downlink = Callable[[bytes], Awaitable[None]]


async def _serve_downlink(client: aiomqtt.Client, handlers: dict[str, Downlink]) -> None:
    """Hand each downlink message to its topic's handler; returns only by raising on disconnect.

    A handler's failure is logged and the link goes on: bad input from the broker never takes it down.
    """
    for topic in handlers:
        await client.subscribe(topic, qos=1)
    async for message in client.messages:
        handler = handlers.get(str(message.topic))
        if handler is None:
            continue
        payload = message.payload
        data = payload if isinstance(payload, bytes) else str(payload if payload is not None else "").encode()
        try:
            await handler(data)
        except Exception:
            log.exception("downlink handler failed", extra={"topic": str(message.topic)})


def tls_context(config: MqttConfig) -> ssl.SSLContext:
    files = config.tls_files
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert files.key_file is not None  # the schema requires it with TLS on
    context.load_cert_chain(str(files.cert_file), str(files.key_file))
    return context


class TopicAliases:
    """MQTT 5 topic aliases for one connection's uplink topics (a handful: one per stream).

    The first message on a topic carries its name and a number the broker remembers for this connection;
    the next ones carry only the number, 2 bytes instead of ~40 (most of the framing of a live telemetry
    message). Mappings die with the connection, and every connection is a new client, so a message is never
    sent again under a number the broker does not know. Packets go out in the order they are published, so
    the broker always learns a number before it is used. ``maximum`` is the broker's Topic Alias Maximum
    (CONNACK; 0 or absent: none, every message carries its topic)."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._numbers: dict[str, int] = {}

    def use(self, topic: str) -> tuple[str, int | None]:
        """(what to put in the topic field, the alias to send or None)."""
        number = self._numbers.get(topic)
        if number is not None:
            return "", number
        if len(self._numbers) >= self.maximum:
            return topic, None
        number = len(self._numbers) + 1
        self._numbers[topic] = number
        return topic, number


def _build_properties(compressed: bool, alias: int | None) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = CONTENT_TYPE
    props.PayloadFormatIndicator = 0 if compressed else 1
    if compressed:
        props.UserProperty = [("content-encoding", "zlib")]
    if alias is not None:
        props.TopicAlias = alias
    return props


# Built once each: paho's Properties setters cost ~60 us a message, as much as the rest of the drain's work
# on it. paho only reads them; they are never changed after they are built.
_UPLINK_PROPERTIES: dict[tuple[bool, int | None], Properties] = {}


def _properties(compressed: bool, alias: int | None) -> Properties:
    props = _UPLINK_PROPERTIES.get((compressed, alias))
    if props is None:
        props = _UPLINK_PROPERTIES[compressed, alias] = _build_properties(compressed, alias)
    return props


class Uplink:
    name = "uplink"
    expected_errors = (aiomqtt.MqttError, OSError)

    def __init__(
        self,
        config: MqttConfig,
        topics: Topics,
        drain: Drain,
        health: Any,
        downlink: dict[str, Downlink] | None = None,
        connected: asyncio.Event | None = None,
        health_state: Callable[[], Hashable] = lambda: None,
    ) -> None:
        self._config = config
        self._topics = topics
        self._drain = drain
        self._health = health  # async () -> dict: the status to publish in the health message
        # Cheap: what, when it changes, makes health worth publishing before its interval is up.
        self._health_state = health_state
        # Handlers by topic name under down/; read at each connect, so a registry still being filled will do.
        self._downlink = {} if downlink is None else downlink
        # Set on every connect; who cares about reconnects clears it.
        self.connected = asyncio.Event() if connected is None else connected
        self.online = False
        self.connected_since: float | None = None
        self.last_error: str | None = None

    def _client(self) -> _Client:
        cfg = self._config
        will = aiomqtt.Will(self._topics.health, OFFLINE, qos=1, retain=True)
        return _Client(
            cfg.host,
            cfg.port,
            identifier=self._topics.device,
            protocol=aiomqtt.ProtocolVersion.V5,
            keepalive=cfg.keepalive_s,
            will=will,
            tls_context=tls_context(cfg) if cfg.tls else None,
            timeout=cfg.connect_timeout_s,
            max_inflight_messages=cfg.max_inflight,
            max_queued_outgoing_messages=0,  # unlimited in paho: the drain's window bounds it
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )

    async def run(self) -> None:
        cfg = self._config
        try:
            async with self._client() as client:
                self.online = True
                self.connected_since = time.time()
                self.connected.set()
                log.info("MQTT connected", extra={"broker": f"{cfg.host}:{cfg.port}", "tls": cfg.tls})
                await self._publish_health(client)
                drain = asyncio.create_task(
                    self._drain.run(
                        lambda m: client.publish_checked(
                            self._topics.uplink(m.stream), m.payload, m.compressed, cfg.publish_timeout_s
                        )
                    ),
                    name="mqtt-drain",
                )
                # aiomqtt leaves a publish in flight waiting for its timeout when the connection drops; the
                # message iterator, though, ends at once on a disconnect: it is the link's pulse.
                tasks = [
                    drain,
                    asyncio.create_task(self._keep_health(client), name="mqtt-health"),
                    asyncio.create_task(_serve_downlink(client, self._handlers()), name="mqtt-downlink"),
                ]
                try:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()  # raises the failure that ended the link
                    raise aiomqtt.MqttError("link ended")
                except asyncio.CancelledError:
                    # A clean stop: the broker discards the Last Will on a normal DISCONNECT, so say it ourselves.
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._publish_offline(client), OFFLINE_TIMEOUT_S)
                    raise
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
        except aiomqtt.MqttError as exc:
            self.last_error = str(exc)
            raise
        finally:
            self.online = False
            self.connected_since = None

    def _handlers(self) -> dict[str, Downlink]:
        return {self._topics.downlink(name): handler for name, handler in self._downlink.items()}

    async def _publish_health(self, client: _Client) -> None:
        body = {"online": True, **await self._health()}
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = CONTENT_TYPE
        await client.publish(
            self._topics.health, json.dumps(body, default=str), qos=1, retain=True, properties=props
        )

    async def _publish_offline(self, client: _Client) -> None:
        await client.publish(self._topics.health, OFFLINE, qos=1, retain=True)

    async def _keep_health(self, client: _Client) -> None:
        """Health again every ``health_interval_s``, and within ``HEALTH_CHECK_S`` when the state it reports
        changes (a component failing or back, wall-time trust): the cloud learns of a failure at once
        without paying ~500 bytes a minute for a status that says the same."""
        published, state = time.monotonic(), self._health_state()
        check = min(HEALTH_CHECK_S, self._config.health_interval_s)
        while True:
            await asyncio.sleep(check)
            now = self._health_state()
            if now != state or time.monotonic() - published >= self._config.health_interval_s:
                await self._publish_health(client)
                published, state = time.monotonic(), now

    def snapshot(self) -> dict[str, Any]:
        stats = self._drain.stats
        return {
            "enabled": True,
            "broker": f"{self._config.host}:{self._config.port}",
            "tls": self._config.tls,
            "online": self.online,
            "connected_since": self.connected_since,
            "last_publish": stats.last_publish_wall,
            "messages": stats.messages,
            "records_sent": stats.records,
            "drain_rate_per_s": round(stats.rate_per_s, 1),
            "last_error": self.last_error,
        }
