"""The Segway push receiver served for real over TLS on 127.0.0.1: what it commits, what it refuses and how
it answers, as Segway would see it.

Signatures are computed here from the seed's algorithm (MD5 over the sorted ``k=v`` pairs joined by ``&``,
then ``&client_secret=...``), not with ``fleetgate.sync.segway.push.signature``: a shared mistake would pass.
The receiver runs in its own thread and event loop (``Served``), so the tests, hypothesis included, talk to it
with a plain blocking HTTPS client that trusts only the throwaway CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetgate.daemon.runtime.logs import LogfmtFormatter
from fleetgate.daemon.runtime.supervisor import Supervisor
from fleetgate.daemon.scooters.push_receiver import PushReceiver, PushSettings
from fleetgate.sync.segway.pushes import KINDS, Push

from conftest import wait_until
from mosquitto_fixture import TlsFiles, make_tls

pytestmark = pytest.mark.timeout(120)

SECRET = "e2651be5-12d3-48f3-ba6c-bc2b04a447b6"  # the seed's example client_secret
PLATFORM = "A20081"
IOT = "861477038719116"
FORM = "application/x-www-form-urlencoded"
SUCCESS = {"code": 0, "message": "success"}
STARTED = 10.0  # a deadline for the server thread to start or stop, never a timing threshold

EXAMPLES: dict[str, dict[str, str]] = {  # the seed's five pushes, with values where it has placeholders
    "/v2/vehicle/alert": {"statusUtcTime": "1591067719", "code": "3"},
    "/v2/vehicle/fault": {"statusUtcTime": "1591067719", "faultStatus": "0", "code": "12"},
    "/v2/vehicle/location": {
        "locationStatus": "valid",
        "latitude": "22.5430961234",
        "longitude": "114.0578651234",
        "satelliteNumber": "9",
        "hdop": "0.9",
        "altitude": "35",
        "gpsUtcTime": "1591067719",
    },
    "/v2/vehicle/status": {
        "online": "true",
        "locked": "false",
        "lockVoltage": "412",
        "networkSignal": "23",
        "charging": "false",
        "powerPercent": "80",
        "speedMode": "3",
        "speed": "18",
        "odometer": "1230",
        "remainderRange": "1230",
        "totalRidingSecs": "3600",
        "statusUtcTime": "1591067719",
    },
    "/v2/vehicle/components": {"type": "2", "status": "2", "statusUtcTime": "1591067719"},
}


def sign(params: dict[str, str], secret: str = SECRET) -> dict[str, str]:
    """The seed's algorithm, written out independently of the code under test."""
    text = "&".join(f"{k}={params[k]}" for k in sorted(params)) + f"&client_secret={secret}"
    return {**params, "signature": hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()}


def body_of(path: str, secret: str = SECRET, **extra: str) -> bytes:
    params = {"iotCode": IOT, "platformCode": PLATFORM, **EXAMPLES[path], **extra}
    return urlencode(sign(params, secret)).encode()


class Served:
    """A ``PushReceiver`` on 127.0.0.1 in a thread of its own; ``accept`` records pushes, and can be told to
    fail (``fail_next``) or to wait until released (``hold``)."""

    def __init__(self, tls: TlsFiles, port: int = 0, max_body_bytes: int = 16384) -> None:
        self.tls = tls
        self.calls = 0
        self.accepted: list[Push] = []
        self.fail_next = 0
        self.hold = False
        self.entered = threading.Event()
        cfg = PushSettings("127.0.0.1", port, tls.server_cert, tls.server_key, max_body_bytes)
        self.receiver = PushReceiver(cfg, SECRET, PLATFORM, self._accept)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._release: asyncio.Event | None = None
        self.error: BaseException | None = None

    async def _accept(self, push: Push) -> None:
        self.calls += 1
        self.entered.set()
        if self.hold:
            assert self._release is not None
            await self._release.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.accepted.append(push)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._release = asyncio.Event()
        self._task = asyncio.create_task(self.receiver.run())
        while self.receiver.port is None and not self._task.done():
            await asyncio.sleep(0.005)
        self._ready.set()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self.error = exc

    def release(self) -> None:
        assert self._loop is not None and self._release is not None
        self._loop.call_soon_threadsafe(self._release.set)

    @property
    def port(self) -> int:
        assert self.receiver.port is not None
        return self.receiver.port

    def client(self) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        return httpx.Client(base_url=f"https://127.0.0.1:{self.port}", verify=ctx, timeout=30)

    def __enter__(self) -> Served:
        self._thread.start()
        assert self._ready.wait(STARTED), "the receiver did not start"
        if self.receiver.port is None:
            self._thread.join(STARTED)
            raise AssertionError(f"the receiver did not start: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._task is not None
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(STARTED)
        assert not self._thread.is_alive()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def served(tls: TlsFiles) -> Iterator[Served]:
    with Served(tls) as s:
        yield s


def post(
    client: httpx.Client, path: str, body: bytes, content_type: str = FORM, **headers: str
) -> httpx.Response:
    return client.post(path, content=body, headers={"Content-Type": content_type, **headers})


def test_each_of_the_five_pushes_is_committed_typed_and_answered_success(served):
    with served.client() as client:
        for path in EXAMPLES:
            answer = post(client, path, body_of(path))
            assert (answer.status_code, answer.json()) == (200, SUCCESS)
    assert [p.kind for p in served.accepted] == ["alert", "fault", "location", "status", "components"]
    alert, fault, location, status, components = served.accepted
    assert {(p.iot_code, p.platform_code) for p in served.accepted} == {(IOT, PLATFORM)}
    assert alert.fields == {"statusUtcTime": 1591067719, "code": 3} and alert.priority == "event"
    assert location.fields["latitude"] == 22.5430961234 and location.at == 1591067719
    assert location.priority == "telemetry"
    assert status.fields["online"] is True and status.fields["remainderRange"] == 1230
    assert components.fields == {"type": 2, "status": 2, "statusUtcTime": 1591067719}
    assert fault.fields["fault"] == {
        "system": "drive",
        "description": "Motor Hall failure, please check the motor, motor controller and the connecting cables",
    }
    assert served.receiver.counters["accepted"] == 5 == served.receiver.counters["received"]


def test_a_field_segway_adds_later_still_verifies_and_is_kept(served):
    with served.client() as client:
        answer = post(client, "/v2/vehicle/status", body_of("/v2/vehicle/status", helmetInside="true"))
    assert answer.status_code == 200
    assert served.accepted[0].fields["helmetInside"] == "true"  # unknown: kept as the string received


def test_a_fault_code_appendix_2_does_not_know_is_still_committed(served):
    with served.client() as client:
        assert post(client, "/v2/vehicle/fault", body_of("/v2/vehicle/fault", code="E7")).status_code == 200
        assert post(client, "/v2/vehicle/fault", body_of("/v2/vehicle/fault", code="99")).status_code == 200
    assert served.accepted[0].fields["fault"]["description"] == "Bluetooth communication error"
    assert served.accepted[1].fields["code"] == "99" and "fault" not in served.accepted[1].fields


ALERT = "/v2/vehicle/alert"


def unsigned(path: str = ALERT) -> bytes:
    return urlencode({"iotCode": IOT, "platformCode": PLATFORM, **EXAMPLES[path]}).encode()


def refusals() -> list[tuple[str, str, bytes, str, int, str]]:
    tampered = body_of(ALERT).replace(b"code=3", b"code=4")
    other_platform = urlencode(sign({"iotCode": IOT, "platformCode": "E10001", "code": "3"})).encode()
    return [
        ("bad signature", ALERT, tampered, FORM, 403, "refused:bad-signature"),
        (
            "another secret",
            ALERT,
            body_of(ALERT, secret="another-secret"),
            FORM,
            403,
            "refused:bad-signature",
        ),
        ("missing signature", ALERT, unsigned(), FORM, 403, "refused:no-signature"),
        ("empty signature", ALERT, unsigned() + b"&signature=", FORM, 403, "refused:no-signature"),
        ("wrong platform", ALERT, other_platform, FORM, 403, "refused:wrong-platform"),
        ("not form-encoded", ALERT, b"\xff\xfe\x00 not a form", FORM, 400, "refused:not-form"),
        ("parameter twice", ALERT, body_of(ALERT) + b"&code=3", FORM, 400, "refused:not-form"),
        (
            "json",
            ALERT,
            json.dumps(EXAMPLES[ALERT]).encode(),
            "application/json",
            415,
            "refused:content-type",
        ),
        ("signed but json", ALERT, body_of(ALERT), "application/json", 415, "refused:content-type"),
        ("oversized", ALERT, body_of(ALERT, pad="x" * 17000), FORM, 413, "refused:too-large"),
        ("unknown path", "/v2/vehicle/battery", body_of(ALERT), FORM, 404, "refused:unknown-path"),
        ("path prefix", "/v2/vehicle/alert/x", body_of(ALERT), FORM, 404, "refused:unknown-path"),
        ("invalid value", ALERT, body_of(ALERT, alertStatus="maybe"), FORM, 400, "invalid"),
    ]


@pytest.mark.parametrize(
    ("why", "path", "body", "ctype", "status", "counter"), refusals(), ids=[r[0] for r in refusals()]
)
def test_a_push_that_is_not_segways_or_not_valid_is_refused_counted_and_never_committed(
    served, why, path, body, ctype, status, counter
):
    with served.client() as client:
        answer = post(client, path, body, ctype)
    assert answer.status_code == status, why
    assert answer.json()["code"] != 0 and SECRET not in answer.text
    assert served.receiver.counters[counter] == 1 and served.receiver.counters["received"] == 1
    assert served.calls == 0 and served.receiver.counters["accepted"] == 0


def test_a_get_a_compressed_body_and_a_chunked_oversized_body_are_refused(served):
    with served.client() as client:
        assert client.get(ALERT).status_code == 405
        assert post(client, ALERT, body_of(ALERT), **{"Content-Encoding": "gzip"}).status_code == 415

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is applied while reading
            yield body_of(ALERT)
            for _ in range(40):
                yield b"&pad=" + b"x" * 1000

        answer = client.post(ALERT, content=chunks(), headers={"Content-Type": FORM})
        assert answer.status_code == 413
    counters = served.receiver.counters
    assert (
        counters["refused:method"]
        == counters["refused:content-encoding"]
        == counters["refused:too-large"]
        == 1
    )
    assert served.calls == 0


def test_segways_retry_is_answered_success_but_committed_once(served):
    body = body_of(ALERT)
    with served.client() as client:
        first, retry = post(client, ALERT, body), post(client, ALERT, body)
        other = post(client, ALERT, body_of(ALERT, statusUtcTime="1591067720"))  # another event
    assert first.json() == retry.json() == SUCCESS and first.status_code == retry.status_code == 200
    assert other.status_code == 200
    assert served.calls == 2 and served.receiver.counters["duplicates"] == 1


def test_a_retry_arriving_while_the_first_is_being_committed_waits_for_it_and_is_not_committed_twice(served):
    served.hold = True
    body = body_of(ALERT)
    answers: list[int] = []
    with served.client() as client:

        def send() -> None:
            answers.append(post(client, ALERT, body).status_code)

        first = threading.Thread(target=send)
        first.start()
        assert served.entered.wait(STARTED)
        second = threading.Thread(target=send)
        second.start()
        wait_until("the retry reaching the receiver", lambda: served.receiver.counters["received"] == 2)
        served.release()
        first.join(STARTED)
        second.join(STARTED)
    assert answers == [200, 200] and served.calls == 1 and served.receiver.counters["duplicates"] == 1


def test_a_commit_that_fails_is_answered_503_and_segways_retry_is_committed(served):
    served.fail_next = 1
    body = body_of("/v2/vehicle/location")
    with served.client() as client:
        failed = post(client, "/v2/vehicle/location", body)
        retry = post(client, "/v2/vehicle/location", body)
    assert failed.status_code == 503 and failed.json()["code"] != 0
    assert (retry.status_code, retry.json()) == (200, SUCCESS)
    assert served.calls == 2 and len(served.accepted) == 1
    counters = served.receiver.counters
    assert (counters["failed"], counters["accepted"], counters["duplicates"]) == (1, 1, 0)


def test_logs_and_status_show_counts_kind_and_iot_code_but_no_other_value_nor_the_secret(served, caplog):
    caplog.set_level(logging.DEBUG)
    served.fail_next = 1
    path = "/v2/vehicle/location"
    with served.client() as client:
        for body in (body_of(path), body_of(path), body_of(path), body_of(path, secret="x"), unsigned(path)):
            post(client, path, body)
        post(client, path, body_of(path, latitude="95.5430961234"))
        post(client, "/v2/vehicle/nope?secret=zz", body_of(ALERT))
    logged = "\n".join(LogfmtFormatter().format(record) for record in caplog.records)  # the daemon's lines
    text = logged + json.dumps(served.receiver.status())
    assert SECRET not in text and repr(served.receiver).find(SECRET) == -1
    for value in ("22.5430961234", "114.0578651234", "95.5430961234", "1591067719"):
        assert value not in text
    assert f"iot_code={IOT}" in logged and "kind=location" in logged and "reason=no-signature" in logged
    status = served.receiver.status()
    assert status["listening"] and status["port"] == served.port and status["bind"] == "127.0.0.1"
    assert status["counters"] == {
        "received": 7,
        "accepted": 1,
        "duplicates": 1,
        "invalid": 1,
        "failed": 1,
        "refused:bad-signature": 1,
        "refused:no-signature": 1,
        "refused:unknown-path": 1,
    }


def tls_exchange(port: int, ca: Path, data: bytes) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(data)
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
        return received


def test_garbage_on_the_wire_never_stops_the_receiver(served):
    answer = tls_exchange(served.port, served.tls.ca, b"\x00\xff\xfe garbage \r\n\r\n" * 3)
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    answer = tls_exchange(
        served.port, served.tls.ca, b"POST /v2/vehicle/alert HTTP/1.1\r\nContent-Length: x\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as raw:  # no TLS at all
        raw.sendall(b"POST /v2/vehicle/alert HTTP/1.1\r\n\r\n")
        with contextlib.suppress(OSError):
            raw.recv(1024)
    with served.client() as client:
        assert post(client, ALERT, body_of(ALERT)).status_code == 200
    assert served.calls == 1


def test_hypothesis_bodies_never_crash_the_receiver_and_only_signed_valid_ones_are_committed(tls):
    known = sorted(
        {name for fields in EXAMPLES.values() for name in fields} | {"alertStatus", "remainingRange"}
    )
    values = st.one_of(
        st.text(max_size=30), st.sampled_from(["true", "false", "1e308", "-0", "E1", "91", ""])
    )
    signed = st.tuples(
        st.sampled_from(sorted(KINDS)),
        st.dictionaries(
            st.one_of(st.sampled_from(known), st.text(min_size=1, max_size=12)), values, max_size=8
        ),
    )

    with Served(tls) as served, served.client() as client:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.one_of(st.binary(max_size=2000).map(lambda b: (ALERT, b, False)), signed.map(signed_case)))
        def check(case: tuple[str, bytes, bool]) -> None:
            path, body, is_signed = case
            before, duplicates = served.calls, served.receiver.counters["duplicates"]
            answer = post(client, path, body)
            if is_signed:
                assert answer.status_code in (200, 400), answer.text
            else:
                assert answer.status_code in (400, 403, 413), answer.text
            committed = answer.status_code == 200 and served.receiver.counters["duplicates"] == duplicates
            assert served.calls == before + committed
            seen.add((is_signed, answer.status_code))

        seen: set[tuple[bool, int]] = set()
        check()
        assert {(True, 200), (True, 400), (False, 403)} <= seen, seen  # the cases reach every branch
        assert post(client, ALERT, body_of(ALERT, statusUtcTime="1")).status_code == 200


def signed_case(case: tuple[str, dict[str, str]]) -> tuple[str, bytes, bool]:
    path, fields = case
    params = {**fields, "iotCode": IOT, "platformCode": PLATFORM}
    params.pop("signature", None)
    return path, urlencode(sign(params)).encode(), True


def test_as_a_supervised_component_it_serves_until_cancelled_and_frees_its_port(tls):
    async def main() -> tuple[int, dict[str, Any]]:
        accepted: list[Push] = []

        async def accept(push: Push) -> None:
            accepted.append(push)

        cfg = PushSettings("127.0.0.1", 0, tls.server_cert, tls.server_key)
        receiver = PushReceiver(cfg, SECRET, PLATFORM, accept)
        supervisor = Supervisor()
        supervisor.add(receiver)
        supervisor.start()
        while receiver.port is None:
            await asyncio.sleep(0.005)
        port = receiver.port
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=ctx) as client:
            answer = await client.post(ALERT, content=body_of(ALERT), headers={"Content-Type": FORM})
        assert answer.status_code == 200 and len(accepted) == 1
        await supervisor.stop()
        assert receiver.port is None and not receiver.status()["listening"]
        return port, supervisor.status_dicts()[0]

    port, status = asyncio.run(main())
    assert status["name"] == "segway-push" and status["state"] == "stopped" and status["restarts"] == 0
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=30):
        pass
    with Served(tls, port=port) as again, again.client() as client:  # the port was released
        assert post(client, ALERT, body_of(ALERT)).status_code == 200


def test_a_port_in_use_or_a_missing_certificate_makes_run_raise_for_the_supervisors_backoff(tls, tmp_path):
    async def run(cfg: PushSettings) -> None:
        await PushReceiver(cfg, SECRET, PLATFORM, lambda push: asyncio.sleep(0)).run()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = PushSettings("127.0.0.1", taken.getsockname()[1], tls.server_cert, tls.server_key)
        with pytest.raises(OSError, match="in use"):
            asyncio.run(run(busy))
    missing = PushSettings("127.0.0.1", 0, tmp_path / "none.crt", tmp_path / "none.key")
    with pytest.raises(FileNotFoundError):
        asyncio.run(run(missing))
    key = serialization.load_pem_private_key(tls.server_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass"),
        )
    )
    with pytest.raises(ssl.SSLError):  # refused at once, no password prompt on the daemon's terminal
        asyncio.run(run(PushSettings("127.0.0.1", 0, tls.server_cert, encrypted)))
    assert issubclass(FileNotFoundError, PushReceiver.expected_errors)
    assert issubclass(ssl.SSLError, PushReceiver.expected_errors)


def test_a_charset_parameter_or_letter_case_in_the_content_type_is_still_a_form(served):
    with served.client() as client:
        assert post(client, ALERT, body_of(ALERT), f"{FORM}; charset=UTF-8").status_code == 200
        body = body_of("/v2/vehicle/status")
        assert (
            post(client, "/v2/vehicle/status", body, "Application/X-WWW-Form-URLencoded").status_code == 200
        )
    assert served.calls == 2
