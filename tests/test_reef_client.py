"""The REEF client (fleetgate.sync.reef.client) against a real mTLS aiohttp server playing REEF (reef_server.py).

Refused client certificates are tested twice: against aiohttp, which closes without a TLS alert, and against
a blocking OpenSSL server that sends one, under TLS 1.3 and TLS 1.2 each.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import ssl
import threading
import tracemalloc
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from fleetgate.sync.reef.client import (
    MAX_BODY_BYTES,
    ManagedSession,
    ReefClient,
    ReefConfigError,
    ReefError,
    ReefHttpError,
    ReefResponseError,
    ReefUnavailable,
    parse_sessions,
    parse_timestamp,
)

from conftest import wait_until
from mosquitto_fixture import TlsFiles, free_port, make_tls
from reef_server import ReefServer

pytestmark = pytest.mark.timeout(60)

VIN = "1D4PT4GKXBW600841"
OTHER_VIN = "7F7ATR312KER0400"

# The seed's "Managed Sessions List" example, verbatim.
SEED_SESSIONS: list[dict[str, Any]] = [
    {
        "id": 1,
        "vin": VIN,
        "pin": "163063",
        "initialization": "2021-06-09 22:03:49.508408",
        "completion": "2021-06-09 22:06:56.232012",
        "verification_id": "fg56thd8f41c945091156ty7",
    },
    {
        "id": 2,
        "vin": VIN,
        "pin": "062309",
        "initialization": "2021-06-09 22:07:26.955043",
        "completion": "2021-06-09 22:07:39.099169",
        "verification_id": "c24gt2d8f41c9450911e7890",
    },
    {
        "id": 3,
        "vin": VIN,
        "pin": "633911",
        "initialization": "2021-06-09 22:07:39.113810",
        "completion": "active",
        "verification_id": "60c252d8f41c9450911e8926",
    },
    {
        "id": 4,
        "vin": OTHER_VIN,
        "pin": "086403",
        "initialization": "2021-05-09 22:15:04.907120",
        "completion": "2021-05-12 22:15:04.907120",
        "verification_id": "60c252d8f4324550911e896e",
    },
]
SEED_PINS = {s["pin"] for s in SEED_SESSIONS}


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def reef(tls: TlsFiles) -> Iterator[ReefServer]:
    with ReefServer(tls) as server:
        yield server


def client_for(base_url: str, tls: TlsFiles, **overrides: Any) -> ReefClient:
    args: dict[str, Any] = {
        "ca_file": tls.ca,
        "cert_file": tls.client_cert,
        "key_file": tls.client_key,
        "timeout_s": 5.0,
    }
    args.update(overrides)
    return ReefClient(base_url, **args)


def fetch(base_url: str, tls: TlsFiles, vin: str = VIN, **overrides: Any) -> list[ManagedSession]:
    async def main() -> list[ManagedSession]:
        async with client_for(base_url, tls, **overrides) as client:
            return await client.get_vehicle_sessions(vin)

    return asyncio.run(main())


def failure(base_url: str, tls: TlsFiles, vin: str = VIN, **overrides: Any) -> ReefError:
    with pytest.raises(ReefError) as caught:
        fetch(base_url, tls, vin, **overrides)
    return caught.value


def assert_no_pin(exc: BaseException, pins: set[str]) -> None:
    text = f"{exc} {exc!r}"
    leaked = [p for p in pins if p in text]
    assert not leaked, f"a PIN appears in the exception message: {text}"


def seed(reef: ReefServer) -> None:
    for s in SEED_SESSIONS:
        reef.add_session(s["vin"], **{k: v for k, v in s.items() if k != "vin"})


# -- the happy path ----------------------------------------------------------------------------------------


def test_vehicle_sessions_are_parsed_exactly_and_the_server_saw_our_client_cn(
    reef: ReefServer, tls: TlsFiles
):
    seed(reef)
    got = fetch(reef.base_url, tls)
    assert got == [
        ManagedSession(
            1, VIN, "163063", utc("2021-06-09 22:03:49.508408"), utc("2021-06-09 22:06:56.232012"),
            "fg56thd8f41c945091156ty7",
        ),
        ManagedSession(
            2, VIN, "062309", utc("2021-06-09 22:07:26.955043"), utc("2021-06-09 22:07:39.099169"),
            "c24gt2d8f41c9450911e7890",
        ),
        ManagedSession(3, VIN, "633911", utc("2021-06-09 22:07:39.113810"), None, "60c252d8f41c9450911e8926"),
    ]  # fmt: skip
    assert [s.active for s in got] == [False, False, True]
    assert all(s.initialization.tzinfo is UTC for s in got)
    assert "633911" not in repr(got)  # the PIN field is left out of repr
    [request] = reef.requests
    assert request.path == f"/v1/managed-sessions/vehicles/{VIN}"
    assert request.client_cn == tls.device_cn
    assert request.status == 200


def test_start_shows_an_active_session_with_its_pin_and_end_shows_its_completion(
    reef: ReefServer, tls: TlsFiles
):
    """Drives the server's own routes over mTLS (start, end, by id, list, synchronized), reads with the client."""

    async def main() -> None:
        async with httpx.AsyncClient(verify=tls.client_context(), base_url=reef.base_url) as http:
            first = (await http.post(f"/managed-sessions/vehicles/{VIN}/start")).json()
            assert set(first) == {"vin", "verification_id", "id", "pin"}
            assert first["vin"] == VIN and len(first["pin"]) == 6 and first["pin"].isdigit()
            async with client_for(reef.base_url, tls) as client:
                [active] = await client.get_vehicle_sessions(VIN)
                assert (active.id, active.pin, active.verification_id) == (
                    first["id"],
                    first["pin"],
                    first["verification_id"],
                )
                assert active.active and active.completion is None

                # A second start ends the first session (REEF: "also ends any existing open managed sessions").
                second = (await http.post(f"/managed-sessions/vehicles/{VIN}/start")).json()
                ended, now_active = await client.get_vehicle_sessions(VIN)
                assert (ended.id, ended.active) == (first["id"], False)
                assert (now_active.id, now_active.pin, now_active.active) == (
                    second["id"],
                    second["pin"],
                    True,
                )

                end = await http.post(f"/managed-sessions/vehicles/{VIN}/end")
                assert end.status_code == 200
                end_body = end.json()
                assert set(end_body) == {"vin", "verification_id", "id", "initialization", "completion"}
                assert end_body["id"] == second["id"]
                _, closed = await client.get_vehicle_sessions(VIN)
                assert closed.completion == parse_timestamp(end_body["completion"])
                assert closed.completion >= closed.initialization
                assert (await http.post(f"/managed-sessions/vehicles/{VIN}/end")).status_code == 404

            by_id = (await http.get(f"/managed-sessions/{second['id']}")).json()
            assert [s["id"] for s in by_id["managed_sessions"]] == [second["id"]]
            assert (await http.get("/managed-sessions/999")).status_code == 404
            reef.start_session(OTHER_VIN)
            listed = (await http.get("/managed-sessions")).json()["managed_sessions"]
            assert [s["vin"] for s in listed] == [VIN, VIN, OTHER_VIN]
            assert listed[2]["completion"] == "active"

            async def synchronized() -> bool:
                answer = (await http.get(f"/managed-sessions/vehicles/{VIN}/synchronized")).json()
                assert set(answer) == {"vehicle_synchronized"}
                return answer["vehicle_synchronized"]

            assert await synchronized() is False  # the vehicle never acknowledged anything
            reef.vehicle_acknowledged(VIN, {first["id"]: "ended", second["id"]: "active"})
            assert await synchronized() is False  # it still holds the second session as active
            reef.vehicle_acknowledged(VIN, [(first["id"], "ended"), (second["id"], "ended")])
            assert await synchronized() is True
            reef.start_session(VIN)
            assert await synchronized() is False  # a new session the vehicle has not acknowledged

    asyncio.run(main())
    assert {r.client_cn for r in reef.requests} == {tls.device_cn}


def test_the_server_runs_in_the_callers_event_loop_too(tls: TlsFiles):
    async def main() -> list[ManagedSession]:
        async with ReefServer(tls) as server:
            pin = server.start_session(VIN)["pin"]
            async with client_for(server.base_url, tls) as client:
                sessions = await client.get_vehicle_sessions(VIN)
            assert [s.pin for s in sessions] == [pin]
            return sessions

    assert len(asyncio.run(main())) == 1


def test_the_vin_is_url_quoted(reef: ReefServer, tls: TlsFiles):
    odd = "A B?C#D/E"
    pin = reef.start_session(odd)["pin"]
    assert [s.pin for s in fetch(reef.base_url, tls, vin=odd)] == [pin]
    assert (
        reef.requests[-1].path == f"/v1/managed-sessions/vehicles/{odd}"
    )  # one segment; no query, no fragment


# -- TLS: who refused whom ---------------------------------------------------------------------------------

TLS_VERSIONS = {"tls1.3": None, "tls1.2": ssl.TLSVersion.TLSv1_2}


@pytest.mark.parametrize("version", list(TLS_VERSIONS))
@pytest.mark.parametrize("cert", ["none", "other-ca"])
def test_a_refused_client_certificate_is_named_as_such(tls: TlsFiles, version: str, cert: str):
    """aiohttp (asyncio TLS) closes such connections without an alert: during the handshake under TLS 1.2,
    right after it under TLS 1.3. Either way the error must say the client certificate was refused."""
    files = {"none": (None, None), "other-ca": (tls.rogue_cert, tls.rogue_key)}[cert]
    with ReefServer(tls, tls_max=TLS_VERSIONS[version]) as server:
        server.start_session(VIN)
        exc = failure(server.base_url, tls, cert_file=files[0], key_file=files[1])
        assert server.requests == []  # never reached the application
    assert isinstance(exc, ReefUnavailable), repr(exc)
    assert exc.kind == "client-certificate-refused"
    message = str(exc)
    assert "refused" in message and "client certificate" in message, message
    assert ("we sent none" in message) == (cert == "none")
    assert "Traceback" not in message and "_ssl.c" not in message


class AlertingTlsServer:
    """A blocking OpenSSL server that sends its TLS alert when it refuses a client certificate, then closes
    gently (stops writing, reads the client's bytes to EOF) so that the alert is not lost to a reset."""

    def __init__(self, tls: TlsFiles, tls_max: ssl.TLSVersion | None) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
        self.ctx.load_cert_chain(str(tls.server_cert), str(tls.server_key))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        if tls_max is not None:
            self.ctx.maximum_version = tls_max
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"https://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.refused: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            conn.settimeout(10)
            # The handshake is started by hand: a failing wrap_socket() closes the socket at once, and closing
            # with the client's request unread makes the kernel send a reset that can overtake the alert.
            with self.ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False) as tls_conn:
                try:
                    tls_conn.do_handshake()
                    tls_conn.recv(65536)
                    tls_conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                except (ssl.SSLError, OSError) as exc:
                    self.refused.append(getattr(exc, "reason", None) or type(exc).__name__)
                    with contextlib.suppress(OSError):
                        tls_conn.shutdown(socket.SHUT_WR)  # after the alert; then plain reads to EOF
                        while tls_conn.recv(65536):
                            pass

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        self.sock.close()
        self.thread.join(10)


@pytest.mark.parametrize("version", list(TLS_VERSIONS))
@pytest.mark.parametrize(
    ("cert", "expected"),
    [
        ("none", {"tls1.3": "certificate required", "tls1.2": "we sent none; TLS alert: handshake failure"}),
        ("other-ca", {"tls1.3": "TLS alert: unknown ca", "tls1.2": "TLS alert: unknown ca"}),
    ],
)
def test_a_tls_alert_about_our_certificate_is_reported_with_its_reason(
    tls: TlsFiles, version: str, cert: str, expected: dict[str, str]
):
    files = {"none": (None, None), "other-ca": (tls.rogue_cert, tls.rogue_key)}[cert]
    server = AlertingTlsServer(tls, TLS_VERSIONS[version])
    try:
        exc = failure(server.base_url, tls, cert_file=files[0], key_file=files[1])
    finally:
        server.close()
    assert isinstance(exc, ReefUnavailable), repr(exc)
    assert exc.kind == "client-certificate-refused"
    assert "refused" in str(exc) and "client certificate" in str(exc)
    assert expected[version] in str(exc), str(exc)
    assert "most likely" not in str(exc)  # an alert is certain
    assert server.refused, "the server did not see the handshake fail"


def test_an_untrusted_server_certificate_is_named_as_such(reef: ReefServer, tls: TlsFiles):
    exc = failure(
        reef.base_url, tls, ca_file=tls.rogue_ca
    )  # trust another CA than the one that signed REEF's
    assert isinstance(exc, ReefUnavailable) and exc.kind == "server-certificate-untrusted"
    assert "server certificate is not trusted" in str(exc)
    assert str(tls.rogue_ca) in str(exc)
    assert reef.requests == []


def test_nothing_listening_is_connection_refused_and_a_restarted_server_answers_again(tls: TlsFiles):
    server = ReefServer(tls).start()
    server.start_session(VIN)
    server.stop()
    exc = failure(server.base_url, tls)
    assert isinstance(exc, ReefUnavailable) and exc.kind == "connection-refused"
    assert f"127.0.0.1:{server.port}" in str(exc)
    with server:  # same port, same state
        assert [s.active for s in fetch(server.base_url, tls)] == [True]


def test_a_server_that_does_not_answer_in_time_is_a_timeout(reef: ReefServer, tls: TlsFiles):
    reef.delay_next(30)
    exc = failure(reef.base_url, tls, timeout_s=0.5)
    assert isinstance(exc, ReefUnavailable) and exc.kind == "timeout"
    assert "timeout" in str(exc) and "0.5 s" in str(exc)
    assert [s.active for s in [*fetch(reef.base_url, tls)]] == []  # the next request is answered


# -- HTTP status and bodies --------------------------------------------------------------------------------


def test_a_server_error_is_an_http_error_with_the_status_and_without_the_body(
    reef: ReefServer, tls: TlsFiles
):
    pin = reef.start_session(VIN)["pin"]
    reef.fail_next(500, body=json.dumps({"error": "boom", "managed_sessions": reef.sessions()}).encode())
    exc = failure(reef.base_url, tls)
    assert isinstance(exc, ReefHttpError) and exc.status == 500
    assert "500 Internal Server Error" in str(exc)
    assert "boom" not in str(exc)
    assert_no_pin(exc, {pin})

    reef.fail_next(403)
    exc = failure(reef.base_url, tls)
    assert isinstance(exc, ReefHttpError) and exc.status == 403
    assert "client certificate" in str(exc)
    assert [s.pin for s in fetch(reef.base_url, tls)] == [pin]  # faults were used up


def test_a_body_that_is_not_json_is_a_response_error(reef: ReefServer, tls: TlsFiles):
    pin = reef.start_session(VIN)["pin"]
    reef.malformed_next(f'{{"managed_sessions": [{{"pin": "{pin}",'.encode())
    exc = failure(reef.base_url, tls)
    assert isinstance(exc, ReefResponseError) and exc.where == "response"
    assert "not JSON" in str(exc)
    assert_no_pin(exc, {pin})


def _session(**changes: Any) -> dict[str, Any]:
    return {**SEED_SESSIONS[2], **changes}


WRONG_SHAPES: list[tuple[Any, str, str]] = [
    ([], "response", 'expected an object with "managed_sessions", got an array'),
    ({"sessions": []}, "response", '"managed_sessions" is missing (members: sessions)'),
    ({"managed_sessions": {"id": 3}}, "managed_sessions", "expected a list, got an object"),
    ({"managed_sessions": ["633911"]}, "managed_sessions[0]", "expected an object, got a string"),
    ({"managed_sessions": [SEED_SESSIONS[0], _session(completion=12)]}, "managed_sessions[1].completion",
     'expected a UTC timestamp or "active", got 12'),
    ({"managed_sessions": [_session(completion="ended")]}, "managed_sessions[0].completion",
     'expected a UTC timestamp or "active", got "ended"'),
    ({"managed_sessions": [_session(initialization="yesterday")]}, "managed_sessions[0].initialization",
     'expected a UTC timestamp, got "yesterday"'),
    ({"managed_sessions": [_session(id="3")]}, "managed_sessions[0].id", 'expected an integer 0..2**63-1, got "3"'),
    ({"managed_sessions": [_session(id=True)]}, "managed_sessions[0].id", "got true"),
    ({"managed_sessions": [_session(pin=633911)]}, "managed_sessions[0].pin",
     "expected a string of 4-12 digits, got a number"),
    ({"managed_sessions": [_session(pin="63391x")]}, "managed_sessions[0].pin", "got another string"),
    ({"managed_sessions": [_session(completion="633911")]}, "managed_sessions[0].completion",
     "got a string of digits (not shown"),
    ({"managed_sessions": [{k: v for k, v in _session().items() if k != "verification_id"}]},
     "managed_sessions[0].verification_id", "missing"),
    ({"managed_sessions": [_session(vin=OTHER_VIN)]}, "managed_sessions[0].vin",
     f'a session of vehicle "{OTHER_VIN}", not of "{VIN}"'),
    ({"managed_sessions": [_session(), _session()]}, "managed_sessions[1].id", "3 is also managed_sessions[0]"),
    ({"managed_sessions": [_session(completion="2021-06-09 22:07:39.000000")]}, "managed_sessions[0].completion",
     "is before initialization"),
    # A lone surrogate (JSON "\ud800") is no text: the audit and acknowledgement records could not encode it.
    ({"managed_sessions": [_session(verification_id="c24\ud800")]}, "managed_sessions[0].verification_id",
     "not valid Unicode"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("document", "where", "problem"), WRONG_SHAPES, ids=[w[1] + ":" + w[2][:20] for w in WRONG_SHAPES]
)
def test_a_wrong_shape_is_a_response_error_naming_the_field(
    reef: ReefServer, tls: TlsFiles, document: Any, where: str, problem: str
):
    reef.shape_next(document)
    exc = failure(reef.base_url, tls)
    assert isinstance(exc, ReefResponseError), repr(exc)
    assert exc.where == where, str(exc)
    assert problem in str(exc), str(exc)
    assert str(exc).startswith(f"{where}: ")
    assert_no_pin(exc, SEED_PINS)


# -- hostile bodies (issue 11, finding 12) -----------------------------------------------------------------

HOSTILE_BODIES: list[tuple[str, bytes, str]] = [
    ("deep-array", b"[" * 100_000, "nests arrays or objects deeper than"),
    ("deep-in-a-session", b'{"managed_sessions": [{"id": 1, "vin": ' + b'{"a": ' * 50_000, "nests"),
    ("long-number", b'{"managed_sessions": [{"id": ' + b"9" * 5_000 + b"}]}", "more than 4300 digits"),
    ("long-number-elsewhere", b'{"managed_sessions": [], "page": -' + b"1" * 4_301 + b"}", "more than 4300 digits"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "problem"), [h[1:] for h in HOSTILE_BODIES], ids=[h[0] for h in HOSTILE_BODIES]
)
def test_a_body_nested_too_deep_or_with_a_too_long_number_is_a_response_error(
    reef: ReefServer, tls: TlsFiles, body: bytes, problem: str
):
    """Before: RecursionError / ValueError escaped the client (the poller restarted, nothing counted)."""
    pin = reef.start_session(VIN)["pin"]
    reef.malformed_next(body)
    exc = failure(reef.base_url, tls)
    assert isinstance(exc, ReefResponseError), repr(exc)
    assert exc.where == "response" and problem in str(exc), str(exc)
    assert [s.pin for s in fetch(reef.base_url, tls)] == [pin]


def test_an_oversized_body_is_a_response_error_whether_declared_or_streamed(reef: ReefServer, tls: TlsFiles):
    reef.malformed_next(b" " * (MAX_BODY_BYTES + 1))
    exc = failure(reef.base_url, tls)
    assert isinstance(exc, ReefResponseError) and exc.where == "response"
    assert f"body of {MAX_BODY_BYTES + 1} bytes is larger than the limit" in str(exc)

    reef.stream_next()  # chunked, no Content-Length, never ends: a hostile server streaming gigabytes
    exc = failure(reef.base_url, tls)
    assert isinstance(exc, ReefResponseError) and exc.where == "response"
    assert f"larger than the limit of {MAX_BODY_BYTES} bytes" in str(exc)
    wait_until("the server to see the client hang up", lambda: reef.streamed)


def _gzip_of_zeros(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    return b"".join(packer.compress(block) for _ in range(size >> 20)) + packer.flush()


def test_a_compressed_body_is_bounded_as_it_decodes(reef: ReefServer, tls: TlsFiles):
    """1 GiB of zeros gzipped to ~1 MB (under the limit on the wire). Before: httpx inflated each 64 kB read in one
    go, ~64 MB at once, before the size check saw it."""
    bomb = _gzip_of_zeros(1 << 30)
    assert len(bomb) < MAX_BODY_BYTES
    reef.malformed_next(bomb, headers={"Content-Encoding": "gzip"})
    tracemalloc.start()
    try:
        exc = failure(reef.base_url, tls)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(exc, ReefResponseError) and exc.where == "response"
    assert "larger than the limit" in str(exc), str(exc)
    assert peak < 8 * MAX_BODY_BYTES, f"{peak / 2**20:.0f} MiB allocated at the peak"


def test_a_gzip_body_is_read_and_other_encodings_are_refused(reef: ReefServer, tls: TlsFiles):
    seed(reef)
    body = json.dumps({"managed_sessions": reef.sessions(VIN)}).encode()
    reef.malformed_next(gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert [s.id for s in fetch(reef.base_url, tls)] == [1, 2, 3]

    reef.malformed_next(gzip.compress(body)[:-20], headers={"Content-Encoding": "gzip"})
    exc = failure(reef.base_url, tls)
    assert isinstance(exc, ReefResponseError) and "gzip" in str(exc), str(exc)
    reef.malformed_next(b"\x1f\x8b not gzip at all", headers={"Content-Encoding": "gzip"})
    exc = failure(reef.base_url, tls)
    assert isinstance(exc, ReefResponseError) and "gzip" in str(exc), str(exc)
    reef.malformed_next(body, headers={"Content-Encoding": "br"})
    exc = failure(reef.base_url, tls)
    assert isinstance(exc, ReefResponseError) and "br" in str(exc), str(exc)
    assert_no_pin(exc, SEED_PINS)


# -- parse_sessions directly -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2021-06-09 22:06:56.232012", datetime(2021, 6, 9, 22, 6, 56, 232012, tzinfo=UTC)),
        ("2021-06-09T22:06:56.232012", datetime(2021, 6, 9, 22, 6, 56, 232012, tzinfo=UTC)),
        ("2021-05-10T02:37:00Z", datetime(2021, 5, 10, 2, 37, tzinfo=UTC)),
        ("2021-05-10 02:37:00+00:00", datetime(2021, 5, 10, 2, 37, tzinfo=UTC)),
        ("2021-05-10T02:37:00.5Z", datetime(2021, 5, 10, 2, 37, 0, 500000, tzinfo=UTC)),
        ("2021-05-10T02:37:00.123456789Z", datetime(2021, 5, 10, 2, 37, 0, 123456, tzinfo=UTC)),
    ],
)
def test_timestamps_are_utc_with_space_or_t_optional_fraction_and_optional_zone(
    text: str, expected: datetime
):
    [session] = parse_sessions(json.dumps({"managed_sessions": [_session(initialization=text)]}), vin=VIN)
    assert session.initialization == expected
    assert session.initialization.utcoffset() is not None


@pytest.mark.parametrize(
    "text",
    ["2021-06-09 22:06:56+02:00", "2021-02-30 10:00:00", "2021-06-09", "2021-06-09 22:06", " 2021-06-09 22:06:56",
     "2021-06-09 22:06:56.", "2021-06-09 24:00:00", "\uff12\uff10\uff12\uff11-06-09 22:06:56"],
)  # fmt: skip
def test_other_timestamps_are_refused(text: str):
    with pytest.raises(ReefResponseError) as caught:
        parse_sessions(json.dumps({"managed_sessions": [_session(initialization=text)]}), vin=VIN)
    assert caught.value.where == "managed_sessions[0].initialization"


def test_the_list_of_all_vehicles_parses_without_a_vin_and_an_empty_list_is_no_sessions():
    sessions = parse_sessions(json.dumps({"managed_sessions": SEED_SESSIONS}).encode(), vin=None)
    assert [(s.id, s.vin, s.active) for s in sessions] == [
        (1, VIN, False),
        (2, VIN, False),
        (3, VIN, True),
        (4, OTHER_VIN, False),
    ]
    assert parse_sessions(b'{"managed_sessions": []}', vin=VIN) == []
    # Members REEF may add later are ignored.
    [extra] = parse_sessions(json.dumps({"managed_sessions": [_session(note="x")], "page": 1}), vin=VIN)
    assert extra.id == 3


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"", "body is empty"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"managed_sessions": [], "managed_sessions": []}', "appears twice"),
        (b'{"managed_sessions": [{"id": NaN}]}', "NaN is not a JSON number"),
        (b'{"managed_sessions": [{"id": 1, "pin": "163063", "pin": "000000"}]}', "appears twice"),
    ],
)
def test_bodies_json_cannot_read_unambiguously_are_refused(body: bytes, problem: str):
    with pytest.raises(ReefResponseError) as caught:
        parse_sessions(body, vin=VIN)
    assert caught.value.where == "response" and problem in str(caught.value)
    assert_no_pin(caught.value, {"163063", "000000"})


# -- local configuration -----------------------------------------------------------------------------------


def test_unloadable_certificate_files_are_config_errors_naming_the_file(tls: TlsFiles, tmp_path: Path):
    missing = tmp_path / "nope.crt"
    with pytest.raises(ReefConfigError, match=r"CA file .*nope\.crt"):
        client_for("https://127.0.0.1:1/v1", tls, ca_file=missing)
    with pytest.raises(ReefConfigError, match=r"client certificate .*client\.crt with key .*rogue\.key"):
        client_for("https://127.0.0.1:1/v1", tls, key_file=tls.rogue_key)  # key of another certificate
    key = serialization.load_pem_private_key(tls.client_key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ReefConfigError, match="the key is encrypted"):  # and no password prompt
        client_for("https://127.0.0.1:1/v1", tls, key_file=encrypted)
    with pytest.raises(ValueError, match="https"):
        client_for("http://127.0.0.1:1/v1", tls)


def test_connection_refused_on_a_port_nobody_listens_on(tls: TlsFiles):
    exc = failure(f"https://127.0.0.1:{free_port()}/v1", tls)
    assert isinstance(exc, ReefUnavailable) and exc.kind == "connection-refused"


def test_a_reef_client_that_cannot_be_set_up_is_a_failure_the_sessions_view_shows() -> None:
    """A CA file gone after the start (the config check ran on a good one): the component fails and is
    retried by the supervisor, and `fleetgate sessions` shows why instead of ``failures: {}``."""
    import asyncio

    from fleetgate.daemon.access.reef_poller import ReefPoller

    def factory() -> Any:
        raise FileNotFoundError(2, "No such file or directory", "/etc/fleetgate/reef-ca.crt")

    poller = ReefPoller(factory, "VIN", None, 300, 1, None)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        asyncio.run(poller.run())
    snap = poller.snapshot()
    assert snap["failures"] == {"setup-FileNotFoundError": 1}
    assert "reef-ca.crt" in snap["last_error"] and "cannot be set up" in snap["last_error"]
