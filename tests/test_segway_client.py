"""The Segway cloud client (fleetgate.sync.segway.client, .token, .operations) against a real HTTPS server
playing Segway (segway_server.py), over TLS with a throwaway CA.

Async code runs under ``asyncio.run`` in plain tests (as tests/test_reef_client.py); the server has its own
thread and loop. Token lifetimes are driven by a fake clock, not by sleeping.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from pydantic import ValidationError

from fleetgate.sync.segway.client import Result, SegwayClient
from fleetgate.sync.segway.errors import (
    SegwayError,
    SegwayFailure,
    SegwayUnavailable,
    TokenRefused,
    TokenRejected,
)
from fleetgate.sync.segway.operations import (
    OPERATIONS,
    BatteryInfo,
    InvalidParams,
    Location,
    Status,
    UnknownOperation,
    params_for,
)
from fleetgate.sync.segway.token import TokenSource

from mosquitto_fixture import TlsFiles, free_port, make_tls
from segway_server import SEED_CLIENT_SECRET, SegwayServer

pytestmark = pytest.mark.timeout(60)

IOT = "861477038719116"
OTHER_IOT = "862869030338078"
SEED = Path(__file__).resolve().parent.parent.parent / "shared" / "seeds" / "segway-emoped-api.md"
T = TypeVar("T")

# Parameters for each operation, from the seed's examples where it has one.
EXAMPLES: dict[str, dict[str, Any]] = {
    "status": {},
    "extra-status": {},
    "location": {"realTimeLocation": True},
    "battery-info": {},
    "bluetooth-key": {},
    "start-rental": {},
    "end-rental": {},
    "unlock": {},
    "lock": {},
    "throttle-response": {"controlType": 1},
    "saddle": {},
    "tailbox": {},
    "battery-cover": {},
    "sound": {"controlType": 3},
    "rental-setting": {"saddleSwitch": 2, "tailboxSwitch": 3, "helmetCheck": 1, "saddleCheck": 1},
    "switch-setting": {"bssDisplay": 2, "berLevel": 3, "lowPowerValue": 10, "highSpeedLimit": 42},
    "switch-enable": {"assistedMode": 2, "kickstandCheck": 1, "saddleCheck": 0},
    "ambient-setting": {
        "bright": 1,
        "readyMode": {"mode": 2, "color": 1},
        "parkingMode": {"mode": 2, "color": 3},
    },
    "sound-setting": {"workMode": 2, "volume": 3, "moeqMask": {"unlocked": 1, "batteryInserted": 2}},
    "speed-mode": {"speedMode": 1},
    "bluetooth-key-setting": {"key": "4BKNwi77"},
    "upload-interval": {
        "locationInterval": {"unlockStatus": 10, "lockStatus": 65535},
        "statusInterval": {"ridingStatus": 30, "nonRiding": 600, "lockStatus": 3600},
    },
    "time-adjust": {"utcOffset": 28800, "dstOffset": 0},
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def segway(tls: TlsFiles) -> Iterator[SegwayServer]:
    with SegwayServer(tls) as server:
        server.add_scooter(IOT)
        yield server


def client_for(server: SegwayServer, tls: TlsFiles, **overrides: Any) -> SegwayClient:
    args: dict[str, Any] = {"ca_file": tls.ca, "timeout_s": 5.0, "max_requests_per_s": 1000.0}
    args.update(overrides)
    secret = args.pop("client_secret", server.client_secret)
    return SegwayClient(args.pop("base_url", server.base_url), server.client_id, secret, **args)


def with_client(
    server: SegwayServer, tls: TlsFiles, work: Callable[[SegwayClient], Awaitable[T]], **overrides: Any
) -> T:
    async def main() -> T:
        async with client_for(server, tls, **overrides) as client:
            return await work(client)

    return asyncio.run(main())


def failure(server: SegwayServer, tls: TlsFiles, op: str = "status", **overrides: Any) -> SegwayFailure:
    with pytest.raises(SegwayFailure) as caught:
        with_client(server, tls, lambda c: c.call(op, IOT, EXAMPLES[op]), **overrides)
    return caught.value


def assert_no_secrets(server: SegwayServer, *things: object) -> None:
    for thing in things:
        text = f"{thing} {thing!r}"
        assert server.client_secret not in text, text
        assert not [t for t in server.tokens_issued if t in text], text


# -- tokens --------------------------------------------------------------------------------------------------


def test_one_token_serves_many_calls_and_is_sent_as_a_bearer_token(segway: SegwayServer, tls: TlsFiles):
    async def work(client: SegwayClient) -> None:
        for _ in range(10):
            await client.status(IOT)

    with_client(segway, tls, work)
    assert segway.token_fetches == 1
    [token] = segway.tokens_issued
    assert [r.token for r in segway.api_requests()] == [token] * 10
    [fetch] = [r for r in segway.requests if r.path == "/oauth/token"]
    assert fetch.params == {
        "client_id": "A20081",
        "client_secret": "<secret>",
        "grant_type": "client_credentials",
    }


def test_the_token_is_refreshed_ahead_of_its_expiry(segway: SegwayServer, tls: TlsFiles):
    clock = FakeClock()
    segway.expires_in = 3600  # refreshed 300 s before it ends

    async def work(client: SegwayClient) -> list[int]:
        fetches = []
        for advance in (0, 3299, 2, 3298, 3):
            clock.now += advance
            await client.status(IOT)
            fetches.append(segway.token_fetches)
        return fetches

    assert with_client(segway, tls, work, clock=clock) == [1, 1, 2, 2, 3]
    first, second, third = segway.tokens_issued
    assert [r.token for r in segway.api_requests()] == [first, first, second, second, third]


def test_a_short_lived_token_is_used_for_half_its_life(segway: SegwayServer, tls: TlsFiles):
    clock = FakeClock()
    segway.expires_in = 60  # the 300 s margin would refresh it at once: half of 60 is used instead

    async def work(client: SegwayClient) -> list[int]:
        fetches = []
        for advance in (0, 29, 2):
            clock.now += advance
            await client.status(IOT)
            fetches.append(segway.token_fetches)
        return fetches

    assert with_client(segway, tls, work, clock=clock) == [1, 1, 2]


def test_concurrent_calls_at_refresh_time_share_one_token_request(segway: SegwayServer, tls: TlsFiles):
    clock = FakeClock()
    segway.expires_in = 3600

    async def work(client: SegwayClient) -> None:
        segway.delay_next(0.2, path="/oauth/token")  # all callers arrive while the fetch is under way
        await asyncio.gather(*(client.status(IOT) for _ in range(20)))
        assert segway.token_fetches == 1
        clock.now += 3400
        segway.delay_next(0.2, path="/oauth/token")
        await asyncio.gather(*(client.status(IOT) for _ in range(20)))
        assert segway.token_fetches == 2

    with_client(segway, tls, work, max_concurrent=20, clock=clock)
    first, second = segway.tokens_issued
    tokens = [r.token for r in segway.api_requests()]
    assert tokens == [first] * 20 + [second] * 20


@pytest.mark.parametrize("reject_with", ["code", "http"])
def test_a_refused_token_is_refreshed_once_and_the_call_retried(
    segway: SegwayServer, tls: TlsFiles, reject_with: str
):
    segway.reject_with = reject_with  # type: ignore[assignment]

    async def work(client: SegwayClient) -> Result:
        await client.status(IOT)
        segway.expire_tokens()
        return await client.call("status", IOT)

    result = with_client(segway, tls, work)
    assert result.code == 0 and isinstance(result.data, Status)
    first, second = segway.tokens_issued
    assert [(r.path, r.token) for r in segway.requests[-3:]] == [
        ("/api/v2/vehicle/query/current/status", first),
        ("/oauth/token", None),
        ("/api/v2/vehicle/query/current/status", second),
    ]
    assert segway.requests[-3].status == (401 if reject_with == "http" else 200)


@pytest.mark.parametrize("fault", [{"code": 15101}, {"http_status": 401}])
def test_a_second_refusal_raises_token_rejected(segway: SegwayServer, tls: TlsFiles, fault: dict[str, int]):
    segway.fail_next(**fault, count=2)
    exc = failure(segway, tls)
    assert isinstance(exc, TokenRejected) and exc.code == 15101 and not exc.retryable
    assert len(segway.api_requests()) == 2 and segway.token_fetches == 2
    assert_no_secrets(segway, exc)


def test_many_calls_refused_with_the_same_stale_token_refresh_it_once(segway: SegwayServer, tls: TlsFiles):
    async def work(client: SegwayClient) -> None:
        await client.status(IOT)
        segway.expire_tokens()
        await asyncio.gather(*(client.status(IOT) for _ in range(8)))

    with_client(segway, tls, work, max_concurrent=8)
    assert segway.token_fetches == 2


def test_invalidating_a_token_already_replaced_fetches_nothing(segway: SegwayServer, tls: TlsFiles):
    async def main() -> None:
        async with httpx.AsyncClient(verify=tls.client_context(cert=None)) as http:
            source = TokenSource(
                http, segway.base_url + "/oauth/token", segway.client_id, segway.client_secret
            )
            first = await source.get()
            assert await source.get() == first
            source.invalidate(first)
            second = await source.get()
            source.invalidate(first)  # a late refusal of the old one
            assert await source.get() == second != first
            assert source.counters == {"fetches": 2, "failures": 0}
            assert_no_secrets(segway, source)

    asyncio.run(main())
    assert segway.token_fetches == 2


def test_wrong_credentials_are_refused_and_no_api_request_is_sent(segway: SegwayServer, tls: TlsFiles):
    exc = failure(segway, tls, client_secret="not-the-secret")
    assert isinstance(exc, TokenRefused) and not exc.retryable
    assert "401 Unauthorized" in str(exc) and "invalid_client" in str(exc)
    assert segway.api_requests() == [] and segway.token_fetches == 1
    assert "not-the-secret" not in f"{exc} {exc!r}"


@pytest.mark.parametrize(
    ("answer", "named"),
    [
        (b"<html>", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"token_type": "bearer", "expires_in": 60}', "access_token"),
        (b'{"access_token": "t", "token_type": "mac", "expires_in": 60}', "token_type"),
        (b'{"access_token": "t", "expires_in": 60}', "token_type"),
        (b'{"access_token": "t", "token_type": "bearer", "expires_in": 0}', "expires_in"),
        (b'{"access_token": "t", "token_type": "bearer", "expires_in": "3600"}', "expires_in"),
        (b'{"access_token": "t", "token_type": "bearer", "expires_in": true}', "expires_in"),
        (b'{"access_token": "t", "token_type": "bearer", "expires_in": 172801}', "expires_in"),
    ],
)
def test_a_malformed_token_answer_is_refused_naming_the_field(
    segway: SegwayServer, tls: TlsFiles, answer: bytes, named: str
):
    segway.garble_next(answer, path="/oauth/token")
    exc = failure(segway, tls)
    assert isinstance(exc, SegwayUnavailable) and exc.kind == "garbled"
    assert named in str(exc) and "/oauth/token" in str(exc)
    assert segway.api_requests() == []


def test_token_type_is_case_insensitive(segway: SegwayServer, tls: TlsFiles):
    segway.garble_next(
        b'{"access_token": "t0k", "token_type": "Bearer", "expires_in": 60}', path="/oauth/token"
    )
    segway.fail_next(0, path="/unlock")  # the server does not know "t0k": answer success regardless
    result = with_client(segway, tls, lambda c: c.call("unlock", IOT))
    assert result.code == 0 and segway.token_fetches == 1
    assert segway.api_requests()[0].token == "t0k"


def test_a_token_endpoint_failure_is_retryable(segway: SegwayServer, tls: TlsFiles):
    segway.fail_next(http_status=503, path="/oauth/token")
    exc = failure(segway, tls)
    assert isinstance(exc, SegwayUnavailable) and exc.retryable and "503 Service Unavailable" in str(exc)
    # and the next call fetches again
    assert with_client(segway, tls, lambda c: c.status(IOT)).iotCode == IOT


# -- every operation ----------------------------------------------------------------------------------------


def test_the_examples_cover_the_catalogue():
    assert set(EXAMPLES) == set(OPERATIONS)
    assert len(OPERATIONS) == 23


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_every_operation_round_trips_with_the_seeds_field_names(
    segway: SegwayServer, tls: TlsFiles, name: str
):
    op = OPERATIONS[name]
    segway.add_scooter(IOT, locked=False)  # boxes open only while unlocked
    result = with_client(segway, tls, lambda c: c.call(name, IOT, EXAMPLES[name]))
    [request] = segway.api_requests()
    assert (request.method, request.path, request.code) == (op.method, op.path, 0)
    assert (result.op, result.iot_code, result.code, result.op_id) == (name, IOT, 0, request.op_id)
    if op.method == "GET":
        # booleans as JSON writes them: realTimeLocation=true
        assert request.params == {"iotCode": IOT, **{k: json.dumps(v) for k, v in EXAMPLES[name].items()}}
        assert op.response is not None and type(result.data) is op.response
    else:
        assert request.params == {"iotCode": IOT, **EXAMPLES[name]}
        assert next(iter(request.params)) == "iotCode"
        assert result.data is None


def test_controls_and_settings_change_the_scooter(segway: SegwayServer, tls: TlsFiles):
    async def work(client: SegwayClient) -> None:
        assert (await client.status(IOT)).locked
        await client.command("unlock", IOT)
        assert not (await client.status(IOT)).locked
        await client.command("saddle", IOT)
        assert (await client.extra_status(IOT)).saddleStatus == 0
        await client.command("lock", IOT)
        assert (await client.status(IOT)).locked
        with pytest.raises(SegwayError) as caught:
            await client.command("tailbox", IOT)  # locked: the seed's 15635
        assert caught.value.code == 15635 and not caught.value.retryable
        await client.command("speed-mode", IOT, speedMode=3)
        assert (await client.status(IOT)).speedMode == 3
        await client.command("bluetooth-key-setting", IOT, key="4BKNwi77")
        assert (await client.bluetooth_key(IOT)).key == "4BKNwi77"
        await client.command("time-adjust", IOT, utcOffset=-18000, dstOffset=3600)

    with_client(segway, tls, work)
    assert segway.scooter(IOT)["settings"]["/api/v2/vehicle/setting/time-adjust"] == {
        "utcOffset": -18000,
        "dstOffset": 3600,
    }


def test_answers_are_typed_and_take_the_seeds_own_variants(segway: SegwayServer, tls: TlsFiles):
    segway.add_scooter(IOT, powerPercent=55, remainderRange=1230, charging=True)

    async def work(client: SegwayClient) -> tuple[Status, Location, BatteryInfo, Result]:
        return (
            await client.status(IOT),
            await client.location(IOT),
            await client.battery_info(IOT),
            await client.call("battery-info", IOT),
        )

    status, location, battery, battery_result = with_client(segway, tls, work)
    assert (status.powerPercent, status.remainingRange, status.charging, status.online) == (
        55,
        1230,
        True,
        True,
    )
    assert status.statusUtcTime == 1591067719
    assert location.gpsUtcTime == 1591067719  # sent as the string "1591067719", as in the seed
    assert (location.latitude, location.longitude, location.hdop) == (22.634228, 114.125962, 1.38)
    assert [(b.batteryPort, b.batteryPercent, b.cycleTimes) for b in battery.batteryData] == [
        (1, 52, 23),
        (2, 20, 40),
    ]
    assert battery.iotVoltage == 412 and battery.charging
    assert battery_result.op_id == segway.requests[-1].op_id  # battery-info's resId
    assert "realTimeLocation" not in segway.api_requests()[1].params


def test_the_answer_models_accept_both_names_and_ignore_new_fields_but_refuse_wrong_types():
    base = {
        "iotCode": IOT, "online": True, "locked": True, "lockVoltage": 342, "networkSignal": 22,
        "charging": True, "powerPercent": 10, "speedMode": 1, "speed": 20, "odometer": 9000,
        "totalRidingSecs": 110, "statusUtcTime": 1591067719,
    }  # fmt: skip
    assert Status.model_validate({**base, "remainingRange": 7}).remainingRange == 7
    assert Status.model_validate({**base, "remainderRange": 8, "addedNextYear": [1]}).remainingRange == 8
    for bad in ({"powerPercent": "x"}, {"powerPercent": "10"}, {"locked": 1}, {"odometer": True}):
        with pytest.raises(ValidationError):
            Status.model_validate({**base, "remainingRange": 7, **bad})
    with pytest.raises(ValidationError):
        Status.model_validate(base)  # no range at all


# -- Segway's codes -----------------------------------------------------------------------------------------


def test_a_device_timeout_is_a_retryable_error_with_segways_operation_id(segway: SegwayServer, tls: TlsFiles):
    segway.fail_next(15302)
    exc = failure(segway, tls, "unlock")
    assert isinstance(exc, SegwayError) and exc.code == 15302 and exc.retryable
    assert exc.op_id == segway.api_requests()[-1].op_id and exc.op_id and exc.op_id in str(exc)


def test_a_parameter_error_is_not_retryable(segway: SegwayServer, tls: TlsFiles):
    segway.fail_next(15004)
    exc = failure(segway, tls, "speed-mode")
    assert isinstance(exc, SegwayError) and exc.code == 15004 and not exc.retryable


def test_an_unknown_vehicle_is_15102(segway: SegwayServer, tls: TlsFiles):
    with pytest.raises(SegwayError) as caught:
        with_client(segway, tls, lambda c: c.status(OTHER_IOT))
    assert caught.value.code == 15102 and not caught.value.retryable


def test_a_started_rental_whose_saddle_failed_is_a_result_not_an_error(segway: SegwayServer, tls: TlsFiles):
    segway.fail_next(15623, path="startRental")

    async def work(client: SegwayClient) -> tuple[Result, dict[str, int]]:
        return await client.command("start-rental", IOT), client.counters

    result, counters = with_client(segway, tls, work)
    assert (result.code, result.msg, result.data) == (15623, "startRental success, but saddle failed", None)
    assert result.op_id == segway.api_requests()[-1].op_id
    assert counters["partial"] == 1 and counters["ok"] == 0


# -- no usable answer ---------------------------------------------------------------------------------------


def test_a_server_error_is_unavailable_and_retryable(segway: SegwayServer, tls: TlsFiles):
    segway.fail_next(http_status=503)
    exc = failure(segway, tls)
    assert isinstance(exc, SegwayUnavailable) and exc.retryable and exc.kind == "http"
    assert "503 Service Unavailable" in str(exc) and "/api/v2/vehicle/query/current/status" in str(exc)


def test_a_429_carries_retry_after(segway: SegwayServer, tls: TlsFiles):
    segway.fail_next(http_status=429, headers={"Retry-After": "7"})
    exc = failure(segway, tls)
    assert isinstance(exc, SegwayUnavailable) and exc.retryable and exc.kind == "rate-limited"
    assert exc.retry_after == 7.0 and "7 s" in str(exc)


def test_a_redirect_is_not_followed(segway: SegwayServer, tls: TlsFiles):
    segway.fail_next(http_status=302, headers={"Location": "https://example.invalid/steal"})
    exc = failure(segway, tls)
    assert isinstance(exc, SegwayUnavailable) and "302 Found" in str(exc) and not exc.retryable
    assert len(segway.api_requests()) == 1


STATUS_DATA = {
    "iotCode": IOT, "online": True, "locked": True, "lockVoltage": 342, "networkSignal": 22, "charging": True,
    "powerPercent": 10, "speedMode": 1, "speed": 20, "odometer": 9000, "remainderRange": 3000,
    "totalRidingSecs": 110, "statusUtcTime": 1591067719,
}  # fmt: skip


def envelope(**changes: Any) -> bytes:
    answer = {"code": 0, "msg": "Success", "data": STATUS_DATA, "t": 1593333694412, "opId": "x"}
    return json.dumps({**answer, **changes}).encode()


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"<html>busy</html>", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b'["code", 0]', "not a JSON object"),
        (b'{"msg": "Success", "data": null}', "has no code"),
        (envelope(code="0"), "code is not an integer"),
        (envelope(code=True), "code is not an integer"),
        (envelope(msg=5), "msg is not a string"),
        (envelope(t="now"), "t is not an integer"),
        (envelope(opId=7), "opId is not printable text"),
        (envelope(data=None), "data is not an object"),
        (envelope(data=[STATUS_DATA]), "data is not an object"),
        (envelope(data={**STATUS_DATA, "powerPercent": "x"}), "data.powerPercent"),
        (envelope(data={k: v for k, v in STATUS_DATA.items() if k != "locked"}), "data.locked"),
        (envelope(data={**STATUS_DATA, "iotCode": OTHER_IOT}), "another vehicle"),
        (b"x" * (2 * 1024 * 1024), "larger than"),
    ],
)
def test_a_garbled_answer_is_unavailable_naming_what_is_wrong(
    segway: SegwayServer, tls: TlsFiles, body: bytes, named: str
):
    segway.garble_next(body)
    exc = failure(segway, tls)
    assert isinstance(exc, SegwayUnavailable) and exc.kind == "garbled" and exc.retryable
    assert named in str(exc)
    assert "busy" not in str(exc)  # never the body itself


def test_a_slow_answer_times_out(segway: SegwayServer, tls: TlsFiles):
    segway.delay_next(3.0)
    exc = failure(segway, tls, timeout_s=0.3)
    assert isinstance(exc, SegwayUnavailable) and exc.kind == "timeout" and exc.retryable
    assert "within 0.3 s" in str(exc)


def test_an_untrusted_server_certificate_is_named(segway: SegwayServer, tls: TlsFiles):
    exc = failure(segway, tls, ca_file=tls.rogue_ca)
    assert isinstance(exc, SegwayUnavailable) and exc.kind == "tls" and "not trusted" in str(exc)


def test_nothing_listening_is_connection_refused(segway: SegwayServer, tls: TlsFiles):
    exc = failure(segway, tls, base_url=f"https://127.0.0.1:{free_port()}")
    assert isinstance(exc, SegwayUnavailable) and exc.retryable and "connection refused" in str(exc)


# -- parameters ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("speed-mode", {"speedMode": 4}, "speedMode"),
        ("speed-mode", {"speedMode": True}, "speedMode"),
        ("speed-mode", {"speedMode": "2"}, "speedMode"),
        ("speed-mode", {"speedMode": 2.0}, "speedMode"),
        ("speed-mode", {}, "speedMode"),
        ("speed-mode", {"speedMode": 2, "turbo": 1}, "turbo"),
        ("throttle-response", {"controlType": 2}, "controlType"),
        ("sound", {"controlType": 0}, "controlType"),
        ("location", {"realTimeLocation": "true"}, "realTimeLocation"),
        ("time-adjust", {"utcOffset": 43201, "dstOffset": 0}, "utcOffset"),
        ("time-adjust", {"utcOffset": 0, "dstOffset": 1800}, "dstOffset"),
        (
            "upload-interval",
            {**EXAMPLES["upload-interval"], "statusInterval": {"ridingStatus": 9}},
            "statusInterval",
        ),
        (
            "upload-interval",
            {"locationInterval": {"unlockStatus": 10, "lockStatus": 65536}},
            "locationInterval.lockStatus",
        ),
        ("bluetooth-key-setting", {"key": "S3cr3t!!"}, "key"),
        ("bluetooth-key-setting", {"key": "S3cr3tK3y"}, "key"),
        ("bluetooth-key-setting", {"key": "S3cr3tK\n"}, "key"),
        ("ambient-setting", {"bright": 1}, "parkingMode"),
        ("ambient-setting", {"bright": 1, "parkingMode": {"mode": 2, "color": 8}}, "parkingMode.color"),
        ("sound-setting", {"workMode": 1, "moeqMask": {"helmet": 3}}, "moeqMask.helmet"),
        ("sound-setting", {"workMode": 1, "moeqMask": {"horn": 1}}, "moeqMask.horn"),
        ("switch-setting", {"lowPowerValue": 9}, "lowPowerValue"),
        ("switch-setting", {"highSpeedLimit": 43}, "highSpeedLimit"),
        ("rental-setting", {"helmetCheck": 3}, "helmetCheck"),
        ("switch-enable", {"cruiseSwitch": -1}, "cruiseSwitch"),
        ("unlock", {"force": True}, "force"),
        ("status", {"iotCode": OTHER_IOT}, "iotCode"),
    ],
)
def test_invalid_parameters_are_refused_before_anything_is_sent(
    segway: SegwayServer, tls: TlsFiles, name: str, params: dict[str, Any], field: str
):
    with pytest.raises(InvalidParams) as caught:
        with_client(segway, tls, lambda c: c.call(name, IOT, params))
    assert caught.value.field.startswith(field) and field in str(caught.value) and name in str(caught.value)
    assert "S3cr3t" not in str(caught.value)  # a bluetooth key is not repeated
    assert segway.requests == []  # not even a token was fetched


def test_params_for_leaves_out_optional_fields_not_given():
    assert params_for("switch-setting", {"bssDisplay": 1, "alertCheck": None}) == {"bssDisplay": 1}
    assert params_for("sound-setting", {"workMode": 0, "moeqMask": {"ready": 0}}) == {
        "workMode": 0,
        "moeqMask": {"ready": 0},
    }
    assert params_for(OPERATIONS["status"], {}) == {}
    with pytest.raises(UnknownOperation):
        params_for("self-destruct", {})


@pytest.mark.parametrize("iot_code", ["", "8614 77", "../status", "8" * 33])
def test_a_bad_iot_code_is_refused(segway: SegwayServer, tls: TlsFiles, iot_code: str):
    with pytest.raises(ValueError, match="iotCode"):
        with_client(segway, tls, lambda c: c.status(iot_code))
    assert segway.requests == []


def test_the_server_refuses_what_the_seed_does_not_allow(segway: SegwayServer, tls: TlsFiles):
    """The test server checks parameters by its own tables: the round trips above mean something."""

    async def main() -> list[int]:
        async with httpx.AsyncClient(verify=tls.client_context(cert=None), base_url=segway.base_url) as http:
            form = {"client_id": segway.client_id, "client_secret": segway.client_secret}
            answer = await http.post("/oauth/token", data={**form, "grant_type": "client_credentials"})
            token = answer.json()["access_token"]
            auth = {"Authorization": f"bearer {token}"}
            codes = []
            for body in ({"speedMode": 4}, {"speedMode": True}, {"speedMode": 2, "x": 1}, {}):
                answer = await http.post(
                    "/api/v2/vehicle/setting/speed-mode", json={"iotCode": IOT, **body}, headers=auth
                )
                codes.append(answer.json()["code"])
            query = {"iotCode": IOT, "realTimeLocation": "yes"}
            answer = await http.get("/api/v2/vehicle/query/current/location", params=query, headers=auth)
            codes.append(answer.json()["code"])
            return codes

    assert asyncio.run(main()) == [15004] * 5


# -- secrets and limits -------------------------------------------------------------------------------------


def test_neither_the_secret_nor_a_token_appears_in_errors_or_the_client(segway: SegwayServer, tls: TlsFiles):
    errors: list[BaseException] = []

    async def work(client: SegwayClient) -> None:
        await client.status(IOT)
        faults: list[Callable[[], None]] = [
            lambda: segway.fail_next(15101, count=2),
            lambda: segway.fail_next(http_status=401, count=2),
            lambda: segway.fail_next(15302),
            lambda: segway.fail_next(http_status=500),
            lambda: segway.garble_next(envelope(data={**STATUS_DATA, "speed": "fast"})),
        ]
        for fault in faults:
            fault()
            try:
                await client.status(IOT)
            except SegwayFailure as exc:
                errors.append(exc)
        assert_no_secrets(segway, client, client.tokens)

    with_client(segway, tls, work)
    errors.append(failure(segway, tls, client_secret="x" + SEED_CLIENT_SECRET))
    assert len(errors) == 6
    assert_no_secrets(segway, *errors)
    assert "x" + SEED_CLIENT_SECRET not in str(errors[-1])


def test_one_request_at_a_time_when_max_concurrent_is_1(segway: SegwayServer, tls: TlsFiles):
    segway.delay_next(0.05, count=12)

    async def work(client: SegwayClient) -> None:
        await asyncio.gather(*(client.status(IOT) for _ in range(12)))

    with_client(segway, tls, work, max_concurrent=1)
    assert len(segway.api_requests()) == 12
    assert segway.max_in_flight == 1


def test_the_in_flight_count_does_see_overlapping_requests(segway: SegwayServer, tls: TlsFiles):
    """The control for the test above: with 4 slots, delayed requests do overlap at the server."""
    segway.delay_next(0.2, count=8)

    async def work(client: SegwayClient) -> None:
        await client.status(IOT)  # the token first, so that the delayed requests start together
        await asyncio.gather(*(client.status(IOT) for _ in range(8)))

    with_client(segway, tls, work, max_concurrent=4)
    assert 2 <= segway.max_in_flight <= 4


def test_counters_count_requests_and_outcomes(segway: SegwayServer, tls: TlsFiles):
    async def work(client: SegwayClient) -> dict[str, int]:
        await client.status(IOT)
        segway.fail_next(15301)
        with pytest.raises(SegwayError):
            await client.command("unlock", IOT)
        with pytest.raises(InvalidParams):
            await client.command("speed-mode", IOT, speedMode=9)
        segway.fail_next(http_status=502)
        with pytest.raises(SegwayUnavailable):
            await client.status(IOT)
        return client.counters

    counters = with_client(segway, tls, work)
    assert counters["requests"] == 3
    assert (counters["ok"], counters["segway_error"], counters["invalid"], counters["unavailable"]) == (
        1,
        1,
        1,
        1,
    )


# -- the seed's tables --------------------------------------------------------------------------------------


def seed_sections() -> dict[str, list[str]]:
    """Each endpoint's lines, by its path (the line after GET / POST)."""
    if not SEED.exists():
        pytest.skip(f"the seed is not beside the checkout ({SEED})")
    lines = SEED.read_text().splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("# ")] + [len(lines)]
    sections = {}
    for start, end in itertools.pairwise(heads):
        body = lines[start:end]
        for i, line in enumerate(body[:-1]):
            if line in ("GET", "POST"):
                sections[body[i + 1]] = body
    return sections


def tables(section: list[str], after: str, until: str) -> dict[str, set[str]]:
    """The field tables between the lines ``after`` and ``until``: ``{"": top level, name: attached}``."""
    start = section.index(after)
    end = section.index(until, start)
    found: dict[str, set[str]] = {}
    current = [""]
    for line in section[start + 1 : end]:
        if line.startswith("attached:"):
            current = [n.strip() for n in line.split("'")[1].split(",")]
        elif "|" in line and not line.startswith(("field", "---")):
            name = re.sub(r"\s*\(optional\)$|required$", "", line.split("|")[0].strip())
            for c in current:
                found.setdefault(c, set()).add(name)
    return found


def fields(model: Any) -> set[str]:
    return set(model.model_fields)


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_each_operation_has_the_seeds_method_path_and_field_names(name: str):
    op = OPERATIONS[name]
    section = seed_sections()[op.path]
    assert op.method in section
    params = tables(section, "Parameter", "Success")
    assert params[""] == {"iotCode"} | (fields(op.request) if op.request else set())
    for attached, names in params.items():
        if attached:
            nested = op.request.model_fields[attached].annotation  # type: ignore[union-attr]
            model = next(a for a in getattr(nested, "__args__", (nested,)) if a is not type(None))
            assert fields(model) == names, attached
    data = tables(section, "Success", "HTTP/1.1 200 OK")
    if op.response is None:
        assert "data" not in {k for k in data if k}
    else:
        assert fields(op.response) == data["data"]
        if "battery data" in data:
            assert (
                fields(BatteryInfo.model_fields["batteryData"].annotation.__args__[0]) == data["battery data"]
            )  # type: ignore[union-attr]
