"""The MQTT test infrastructure against a real mosquitto: broker fixture, TLS files, TCP proxy, consumer.

What aiomqtt 2.5.1 (paho-mqtt 2.2.0) reports, as pinned by these tests (mosquitto 2.0.11, OpenSSL 3):
- TLS 1.3, no client certificate: `aiomqtt.MqttError("Operation timed out")` after `timeout` s; the real
  reason is only logged by logger `mqtt` at ERROR: "failed to receive on socket: [SSL:
  TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required".
- TLS 1.3, client cert from another CA: the same timeout; logged "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert
  unknown ca".
- Client capped at TLS 1.2: immediate `MqttError("[SSL: SSLV3_ALERT_HANDSHAKE_FAILURE] sslv3 alert handshake
  failure ...")` (no cert) or `MqttError("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca ...")`.
- Client trusting the wrong CA: immediate `MqttError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify
  failed: self-signed certificate in certificate chain ...")`.
- Connection reset under an in-flight QoS-1 publish: that publish still waits its full `timeout` and raises
  `MqttError("Operation timed out")` (aiomqtt does not fail pending publishes on disconnect); the next
  publish raises `MqttCodeError("[code:4] The client is not currently connected.")` at once.
- Blackhole: each QoS-1 publish raises `MqttError("Operation timed out")` after `timeout`; the TCP connection
  stays open until paho's keepalive gives up (`MqttCodeError` code 141 "Keep alive timeout", roughly
  2 x keepalive after the last packet received).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mosquitto_fixture import Mosquitto, TlsFiles, make_tls
from mqtt_consumer import Consumer
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    with Mosquitto() as b:
        yield b


@pytest.fixture
def tls_broker(tls: TlsFiles) -> Iterator[Mosquitto]:
    with Mosquitto(tls=tls) as b:
        yield b


@pytest.fixture
def proxy(broker: Mosquitto) -> Iterator[TcpProxy]:
    with TcpProxy(HOST, broker.port) as p:
        yield p


def mqtt_client(port: int, **kwargs: object) -> aiomqtt.Client:
    kwargs.setdefault("timeout", 2)
    kwargs.setdefault("identifier", f"fleetgate-test-{uuid.uuid4().hex[:8]}")
    return aiomqtt.Client(HOST, port, protocol=aiomqtt.ProtocolVersion.V5, **kwargs)  # type: ignore[arg-type]


async def wait_disconnected(client: aiomqtt.Client, timeout: float) -> aiomqtt.MqttError:
    """Block until aiomqtt notices the connection is gone; return the error it reports."""
    async with asyncio.timeout(timeout):
        try:
            async for _ in client.messages:
                pass
        except aiomqtt.MqttError as exc:
            return exc
    raise AssertionError("message iteration ended without an error")


# -- files ---------------------------------------------------------------------------------------------


def test_make_tls_writes_private_keys_0600(tls: TlsFiles) -> None:
    for key in (tls.server_key, tls.client_key, tls.rogue_key):
        assert key.stat().st_mode & 0o777 == 0o600
    client = x509.load_pem_x509_certificate(tls.client_cert.read_bytes())
    cn = client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "fleetgate-test-0001"
    key = client.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    rogue = x509.load_pem_x509_certificate(tls.rogue_cert.read_bytes())
    assert client.issuer == ca.subject
    assert rogue.issuer != ca.subject


# -- plain broker ----------------------------------------------------------------------------------


def test_plain_publish_subscribe_qos1(broker: Mosquitto) -> None:
    with Consumer(HOST, broker.port, ["fg/plain/#"]) as consumer:

        async def publish() -> None:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "application/json"
            props.UserProperty = [("device", "fleetgate-test-0001")]
            async with mqtt_client(broker.port) as client:
                for i in range(3):
                    await client.publish(f"fg/plain/{i}", b'{"n": %d}' % i, qos=1, properties=props)

        asyncio.run(publish())
        msgs = consumer.wait_for(lambda m: len(m) >= 3, timeout=10)
    assert [(t, p, q, r) for t, p, q, r, _ in msgs] == [
        (f"fg/plain/{i}", b'{"n": %d}' % i, 1, False) for i in range(3)
    ]
    assert msgs[0][4]["ContentType"] == "application/json"
    assert msgs[0][4]["UserProperty"] == [("device", "fleetgate-test-0001")]


def test_kill_and_restart_keep_retained_message_and_queued_session(broker: Mosquitto) -> None:
    session = Properties(PacketTypes.CONNECT)
    session.SessionExpiryInterval = 3600
    sub_id = "fleetgate-test-persistent-sub"
    port = broker.port

    async def subscribe_and_go_offline() -> None:
        async with mqtt_client(port, identifier=sub_id, clean_start=False, properties=session) as sub:
            await sub.subscribe("fg/session", qos=1)

    async def publish() -> None:
        async with mqtt_client(port) as client:
            await client.publish("fg/retained", b"last-known", qos=1, retain=True)
            await client.publish("fg/session", b"queued-while-offline", qos=1)

    asyncio.run(subscribe_and_go_offline())
    asyncio.run(publish())
    broker.flush_persistence()
    assert broker.kill() == -9
    broker.restart()
    assert broker.port == port
    assert broker.log.count("mosquitto version 2.0") >= 2

    with Consumer(HOST, port, ["fg/retained"]) as consumer:
        (msg,) = consumer.wait_for(lambda m: len(m) >= 1, timeout=10)
    assert msg[:4] == ("fg/retained", b"last-known", 1, True)

    async def reconnect() -> aiomqtt.Message:
        async with mqtt_client(port, identifier=sub_id, clean_start=False, properties=session) as sub:
            async with asyncio.timeout(10):
                return await anext(aiter(sub.messages))

    queued = asyncio.run(reconnect())
    assert (str(queued.topic), queued.payload, queued.qos) == ("fg/session", b"queued-while-offline", 1)


# -- TLS -------------------------------------------------------------------------------------------


def test_tls_with_client_certificate(tls: TlsFiles, tls_broker: Mosquitto) -> None:
    with Consumer(HOST, tls_broker.port, ["fg/tls"], tls=tls) as consumer:

        async def publish() -> None:
            params = aiomqtt.TLSParameters(
                ca_certs=str(tls.ca), certfile=str(tls.client_cert), keyfile=str(tls.client_key)
            )
            async with mqtt_client(tls_broker.port, tls_params=params) as client:
                await client.publish("fg/tls", b"secure", qos=1)

        asyncio.run(publish())
        (msg,) = consumer.wait_for(lambda m: len(m) >= 1, timeout=10)
    assert msg[:3] == ("fg/tls", b"secure", 1)
    # use_identity_as_username: the broker knows the device by its certificate's CN
    assert "u'fleetgate-test-0001'" in tls_broker.log


@pytest.mark.parametrize(
    ("cert", "client_log", "broker_log"),
    [
        (None, "TLSV13_ALERT_CERTIFICATE_REQUIRED", "peer did not return a certificate"),
        ("rogue", "TLSV1_ALERT_UNKNOWN_CA", "certificate verify failed"),
    ],
)
def test_tls13_refused_client_cert_is_a_timeout_in_aiomqtt(
    tls: TlsFiles,
    tls_broker: Mosquitto,
    caplog: pytest.LogCaptureFixture,
    cert: str | None,
    client_log: str,
    broker_log: str,
) -> None:
    async def connect() -> None:
        async with mqtt_client(tls_broker.port, tls_context=tls.client_context(cert=cert), timeout=2):
            pass

    with caplog.at_level(logging.ERROR, logger="mqtt"), pytest.raises(aiomqtt.MqttError) as err:
        asyncio.run(connect())
    assert str(err.value) == "Operation timed out"
    # paho logs the TLS alert (client_log) only when its network loop reads the socket again, which on a busy
    # machine may come after the timeout; the daemon's own test covers the clear message (test_uplink_network).
    assert broker_log in tls_broker.log


@pytest.mark.parametrize(
    ("cert", "message"),
    [(None, "SSLV3_ALERT_HANDSHAKE_FAILURE"), ("rogue", "TLSV1_ALERT_UNKNOWN_CA")],
)
def test_tls12_refused_client_cert_fails_at_connect(
    tls: TlsFiles, tls_broker: Mosquitto, cert: str | None, message: str
) -> None:
    ctx = tls.client_context(cert=cert)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2

    async def connect() -> None:
        async with mqtt_client(tls_broker.port, tls_context=ctx, timeout=10):
            pass

    with pytest.raises(aiomqtt.MqttError, match=message):
        asyncio.run(connect())


def test_tls_client_trusting_wrong_ca_fails_at_connect(tls: TlsFiles, tls_broker: Mosquitto) -> None:
    async def connect() -> None:
        async with mqtt_client(tls_broker.port, tls_context=tls.client_context(trust="rogue"), timeout=10):
            pass

    with pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(connect())


# -- proxy -----------------------------------------------------------------------------------------


def test_proxy_forwards_bulk_data_intact_and_stops_its_thread() -> None:
    server = socket.create_server((HOST, 0))
    received = bytearray()

    def sink() -> None:  # read everything, then answer with a checksum-ish reply and close
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)
            conn.sendall(b"got %d" % len(received))

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    payload = bytes(range(256)) * 20_000  # 5 MB: exercises backpressure and partial sends
    proxy = TcpProxy(HOST, server.getsockname()[1]).start()
    try:
        with socket.create_connection((HOST, proxy.port), timeout=10) as conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)  # the FIN must travel through the proxy too
            reply = b""
            while chunk := conn.recv(100):
                reply += chunk
        thread.join(10)
        assert bytes(received) == payload
        assert reply == b"got %d" % len(payload)
        proxy.wait_for(lambda p: p.active == 0, timeout=10)
        assert proxy.stats()["bytes_up"] == len(payload)
        assert proxy.connections == 1
    finally:
        proxy.stop()
        server.close()
    assert proxy._thread is not None
    assert not proxy._thread.is_alive()


def test_proxy_passes_mqtt_traffic(broker: Mosquitto, proxy: TcpProxy) -> None:
    with Consumer(HOST, broker.port, ["fg/proxy"]) as consumer:

        async def publish() -> None:
            async with mqtt_client(proxy.port) as client:
                for i in range(5):
                    await client.publish("fg/proxy", b"%d" % i, qos=1)

        asyncio.run(publish())
        consumer.wait_for(lambda m: len(m) >= 5, timeout=10)
    assert consumer.payloads() == [b"0", b"1", b"2", b"3", b"4"]
    assert proxy.connections == 1
    assert proxy.bytes_up > 0
    assert proxy.bytes_down > 0


def test_proxy_reset_breaks_the_connection_and_restore_lets_a_new_one_work(
    broker: Mosquitto, proxy: TcpProxy
) -> None:
    async def scenario() -> None:
        async with mqtt_client(proxy.port, timeout=2) as client:
            await client.publish("fg/reset", b"before", qos=1)
            proxy.cut("reset")
            assert proxy.active == 0
            # The in-flight publish is not failed by the disconnect: it runs into its timeout.
            with pytest.raises(aiomqtt.MqttError, match="Operation timed out"):
                await client.publish("fg/reset", b"during", qos=1)
            err = await wait_disconnected(client, timeout=10)
            assert "Disconnected" in str(err)
            with pytest.raises(aiomqtt.MqttCodeError, match="not currently connected"):
                await client.publish("fg/reset", b"after", qos=1)
        # While cut, the port refuses connections.
        with pytest.raises(aiomqtt.MqttError, match=r"\[Errno 111\] Connection refused"):
            async with mqtt_client(proxy.port, timeout=2):
                pass
        proxy.restore()
        async with mqtt_client(proxy.port, timeout=2) as client:
            await client.publish("fg/reset", b"restored", qos=1)

    with Consumer(HOST, broker.port, ["fg/reset"]) as consumer:
        asyncio.run(scenario())
        consumer.wait_for(lambda m: b"restored" in [x[1] for x in m], timeout=10)
    assert b"during" not in consumer.payloads()
    assert proxy.resets == 1
    assert proxy.connections == 2


def test_proxy_blackhole_keeps_tcp_open_but_no_puback(broker: Mosquitto, proxy: TcpProxy) -> None:
    async def scenario() -> aiomqtt.MqttError:
        async with mqtt_client(proxy.port, timeout=2, keepalive=2) as client:
            await client.publish("fg/bh", b"before", qos=1)
            proxy.cut("blackhole")
            with pytest.raises(aiomqtt.MqttError, match="Operation timed out"):
                await client.publish("fg/bh", b"lost", qos=1)
            # The PUBLISH left the client and vanished; the TCP connection is still up.
            assert proxy.active == 1
            assert proxy.discarded_up > 0
            # Only MQTT keepalive notices the dead link.
            err = await wait_disconnected(client, timeout=20)
        return err

    with Consumer(HOST, broker.port, ["fg/bh"]) as consumer:
        err = asyncio.run(scenario())
        assert isinstance(err.__cause__, aiomqtt.MqttCodeError)
        assert err.__cause__.rc == 141  # paho: "Keep alive timeout"
        # New connections are accepted during a blackhole, and get nowhere ...
        with socket.create_connection((HOST, proxy.port), timeout=5) as raw:
            proxy.wait_for(lambda p: p.connections == 2, timeout=5)
            raw.sendall(b"\x10\x00")
            proxy.restore()
            # ... and restore() resets them: their byte streams have holes.
            with pytest.raises(ConnectionResetError):
                raw.recv(1)

        async def after_restore() -> None:
            async with mqtt_client(proxy.port, timeout=2) as client:
                await client.publish("fg/bh", b"restored", qos=1)

        asyncio.run(after_restore())
        consumer.wait_for(lambda m: b"restored" in [x[1] for x in m], timeout=10)
    assert consumer.payloads() == [b"before", b"restored"]
