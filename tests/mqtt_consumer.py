"""A test-side MQTT subscriber: paho-mqtt 2.x, MQTT 5, clean start or a kept session, QoS-1 subscriptions, own thread.

    with Consumer("127.0.0.1", broker.port, ["fleetgate/#"], tls=tls) as consumer:
        ...
        consumer.wait_for(lambda msgs: len(msgs) >= 10, timeout=10)
        topic, payload, qos, retain, props = consumer.messages[0]

It is written on paho directly, not on aiomqtt, so a bug in how the daemon drives aiomqtt cannot hide
behind the same bug in the test's own client.
"""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from mosquitto_fixture import TlsFiles

Received = tuple[str, bytes, int, bool, dict[str, Any]]


def properties_dict(props: Properties | None) -> dict[str, Any]:
    """The MQTT 5 properties that are set, by paho's name ("ContentType", "UserProperty", ...)."""
    if props is None:
        return {}
    out: dict[str, Any] = {}
    for name in props.names:
        key = name.replace(" ", "")
        if hasattr(props, key):
            out[key] = getattr(props, key)
    return out


class Consumer:
    """Subscribes (QoS 1) to `topics` and records every message in `.messages`.

    `tls` is a `TlsFiles` (trusts its CA, presents its client cert) or a ready `ssl.SSLContext`.
    `.messages`: a snapshot list of (topic, payload, qos, retain, properties dict), in arrival order.
    `.connects`: how many CONNACKs it has had (paho reconnects by itself and then subscribes again).
    """

    def __init__(
        self,
        host: str,
        port: int,
        topics: str | Iterable[str],
        tls: TlsFiles | ssl.SSLContext | None = None,
        client_id: str | None = None,
        *,
        keepalive: int = 30,
        session_expiry_s: int | None = None,
    ) -> None:
        """`session_expiry_s`: a kept session, as docs/mqtt.md tells consumers to use: the broker holds the
        QoS-1 messages it accepted for it that long after a disconnect, across its own restarts, and a
        consumer with the same `client_id` takes them up. (Clean Start is then 0 from the first connect:
        mosquitto 2.0.11 does not carry a session begun with Clean Start 1 across a restart, expiry or not.)"""
        self.host = host
        self.session_expiry_s = session_expiry_s
        self.port = port
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.client_id = client_id or f"fleetgate-test-consumer-{uuid.uuid4().hex[:8]}"
        self.keepalive = keepalive
        self.connects = 0
        self.errors: list[str] = []
        self._messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
        )
        if isinstance(tls, TlsFiles):
            self._client.tls_set(
                ca_certs=str(tls.ca), certfile=str(tls.client_cert), keyfile=str(tls.client_key)
            )
        elif isinstance(tls, ssl.SSLContext):
            self._client.tls_set_context(tls)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._started = False

    # -- paho callbacks (paho's network thread) ------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        if reason.is_failure:
            self.errors.append(f"CONNACK {reason}")
            return
        self.connects += 1
        client.subscribe([(topic, 1) for topic in self.topics])

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, reasons: list[ReasonCode], props: object
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            self.errors.append(f"SUBACK {failed}")
        else:
            self._subscribed.set()
        with self._cond:
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        item = (
            msg.topic,
            bytes(msg.payload),
            msg.qos,
            bool(msg.retain),
            properties_dict(getattr(msg, "properties", None)),
        )
        with self._cond:
            self._messages.append(item)
            self._cond.notify_all()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        if reason.is_failure:
            self.errors.append(f"disconnected: {reason}")
        with self._cond:
            self._cond.notify_all()

    # -- API ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Consumer:
        """Connect, subscribe, and return once the broker has acknowledged the subscriptions."""
        props = None
        if self.session_expiry_s is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
        self._client.connect(
            self.host, self.port, keepalive=self.keepalive, clean_start=props is None, properties=props
        )
        self._client.loop_start()
        self._started = True
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._subscribed.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.stop()
                    raise TimeoutError(
                        f"consumer {self.client_id} not subscribed to {self.topics} on "
                        f"{self.host}:{self.port} within {timeout} s; errors: {self.errors}"
                    )
                self._cond.wait(min(remaining, 0.5))
        return self

    @property
    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._messages)

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [m[1] for m in self.messages if topic is None or m[0] == topic]

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 10.0) -> list[Received]:
        """Wait (bounded) until `predicate(messages)` is true; return the messages. AssertionError if not."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self._messages)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = self._messages[-5:]
                    raise AssertionError(
                        f"consumer condition not met within {timeout} s: {len(self._messages)} messages, "
                        f"last {tail}; errors: {self.errors}"
                    )
                self._cond.wait(min(remaining, 0.5))
            return list(self._messages)

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Consumer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
