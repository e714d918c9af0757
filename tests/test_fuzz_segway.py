"""Fuzzing the depot's Segway edge (hypothesis): whatever Segway answers, a query or command ends in a typed
outcome that is committed to a real outbox, and the poller records what it can and backs off from the rest.

The answers come from an ``httpx.MockTransport`` in front of the real ``SegwayClient`` (the token endpoint
answers properly, the API anything): random bytes; random JSON values; the seed's envelope with any member
replaced by any JSON value, including text with lone surrogates and control characters, huge numbers, deep
nesting; ``data`` of each query with any field replaced; any HTTP status. The real server (segway_server.py)
covers the documented faults in test_segway_client.py; this file covers the undocumented ones.

Properties: ``CommandRunner.run`` never raises and always leaves exactly one ``scooter-results`` record in
the outbox with an outcome of the documented set; the poller's ``_poll`` never raises for one scooter and
writes either a reading of the queried kind or a counted failure.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.scooters.commands import CommandRunner, Request, RetryPolicy
from fleetgate.daemon.scooters.key_store import KeyStore
from fleetgate.daemon.scooters.poller import QUERIES, Poller, PollPolicy
from fleetgate.daemon.scooters.yard import Scooter, Yard
from fleetgate.sync.crypto.device_keys import at_rest_box
from fleetgate.sync.segway.client import SegwayClient
from fleetgate.sync.store import Database, Outbox

pytestmark = pytest.mark.timeout(300)

IOT = "861477038719116"
OUTCOMES = {"done", "partial", "failed", "refused", "expired"}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\ud800", "a\x00b", "\u202e", "é" * 300, ""]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
GOOD_DATA: dict[str, dict[str, Any]] = {
    "status": {"iotCode": IOT, "online": True, "locked": True, "lockVoltage": 342, "networkSignal": 22,
               "charging": False, "powerPercent": 80, "speedMode": 1, "speed": 0, "odometer": 9000,
               "remainderRange": 3000, "totalRidingSecs": 110, "statusUtcTime": 1796378400},
    "location": {"iotCode": IOT, "latitude": 22.6, "longitude": 114.1, "satelliteNumber": 6, "hdop": 1.3,
                 "altitude": 10.1, "gpsUtcTime": "1796378400"},
    "bluetooth-key": {"iotCode": IOT, "key": "abcd1234"},
}  # fmt: skip


@st.composite
def answers(draw: st.DrawFn) -> tuple[int, bytes]:
    """(HTTP status, body): mostly 200 with a near-miss envelope, sometimes anything at all."""
    kind = draw(st.sampled_from(["envelope", "envelope", "envelope", "json", "bytes", "deep", "status"]))
    if kind == "bytes":
        return 200, draw(st.binary(max_size=300))
    if kind == "json":
        return 200, json.dumps(draw(json_values)).encode()
    if kind == "deep":
        depth = draw(st.integers(1000, 100_000))
        return 200, b"[" * depth + b"]" * depth
    if kind == "status":
        return draw(st.integers(100, 599)), json.dumps(draw(json_values)).encode()
    op = draw(st.sampled_from(sorted(GOOD_DATA)))
    envelope: dict[str, Any] = {
        "code": draw(st.sampled_from([0, 0, 15301, 15302, 15004, 15623, 99999])),
        "msg": "Success",
        "data": dict(GOOD_DATA[op]),
        "t": 1593333694412,
        "opId": "3de041d2-7f1e-4cb2-a7be-483378727c56",
    }
    target = draw(st.sampled_from(["code", "msg", "data", "t", "opId", "resId", "field", "none", "text"]))
    if target == "text":  # Segway's own strings, hostile
        envelope[draw(st.sampled_from(["msg", "opId", "resId"]))] = draw(text)
    elif target == "field":
        field = draw(st.sampled_from(sorted(envelope["data"])))
        envelope["data"][field] = draw(json_values)
    elif target != "none":
        envelope[target] = draw(json_values)
    body = json.dumps(envelope, ensure_ascii=draw(st.booleans()))
    return 200, body.encode("utf-8", "surrogatepass")


def transport(answer: tuple[int, bytes]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            token = {"access_token": "t-1", "token_type": "bearer", "expires_in": 43199, "scope": "read"}
            return httpx.Response(200, stream=httpx.ByteStream(json.dumps(token).encode()))
        # A stream, as a real connection gives: the client reads the body bounded, chunk by chunk.
        return httpx.Response(
            answer[0], stream=httpx.ByteStream(answer[1]), headers={"Content-Type": "application/json"}
        )

    return httpx.MockTransport(handle)


async def _rig(tmp: Path, answer: tuple[int, bytes]) -> tuple[Database, Outbox, SegwayClient, Yard, KeyStore]:
    db = await Database.open(tmp / "f.db")
    outbox = Outbox(db, boot_id="b")
    client = SegwayClient(
        "https://segway.test", "A20081", "s3cret", transport=transport(answer), max_wait_s=5
    )
    yard = Yard()
    yard.add(Scooter(IOT))
    return db, outbox, client, yard, KeyStore(at_rest_box(bytes(range(32))))


def _results(path: Path, stream: str) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT o.payload FROM outbox o JOIN streams s ON s.id = o.stream_id WHERE s.name = ?", (stream,)
        ).fetchall()
    return [json.loads(p) for (p,) in rows]


def _envelope(code: int, msg: str, op_id: str = "3de041d2") -> tuple[int, bytes]:
    return 200, json.dumps({"code": code, "msg": msg, "data": None, "t": 1, "opId": op_id}).encode()


COMMANDS = st.sampled_from(["unlock", "status", "bluetooth-key", "location", "start-rental"])


@FUZZ
@given(answer=answers(), op=COMMANDS)
# Found by this file: a lone surrogate in Segway's msg could not be written into the result record (the
# command's task died with UnicodeEncodeError and no outcome was recorded).
@example(answer=_envelope(15302, "\ud800"), op="unlock")
@example(answer=_envelope(0, "ok\x00\ud800"), op="unlock")
@example(answer=_envelope(15623, "\udfff"), op="start-rental")
@example(answer=_envelope(15302, "timeout", "x\ud800"), op="unlock")
def test_whatever_segway_answers_a_command_ends_in_one_committed_result(tmp_path_factory, answer, op):
    tmp = tmp_path_factory.mktemp("cmd")

    async def main() -> dict[str, Any]:
        db, outbox, client, yard, keys = await _rig(tmp, answer)
        runner = CommandRunner(
            client, yard, keys, outbox, Clock(), RetryPolicy(max_attempts=2, retry_s=0.001)
        )
        try:
            return await runner.run(Request(IOT, op, {}, "cli"))
        finally:
            await client.aclose()
            await outbox.drain_pending()
            await db.close()

    result = asyncio.run(main())
    assert result["outcome"] in OUTCOMES
    [stored] = _results(tmp / "f.db", "scooter-results")
    assert stored["outcome"] == result["outcome"] and stored["op"] == op
    assert "abcd1234" not in json.dumps(stored)  # a key read is never in a result


@FUZZ
@given(answer=answers(), kind=st.sampled_from(sorted(QUERIES)))
def test_whatever_segway_answers_the_poller_records_a_reading_or_a_failure(tmp_path_factory, answer, kind):
    tmp = tmp_path_factory.mktemp("poll")

    async def main() -> tuple[dict[str, int], Scooter]:
        db, outbox, client, yard, keys = await _rig(tmp, answer)
        poller = Poller(client, yard, keys, outbox, Clock(), PollPolicy(60, 60, 60, 3600, 60))
        try:
            await poller._poll(yard.scooters[IOT], kind)
            return poller.counts, yard.scooters[IOT]
        finally:
            await client.aclose()
            await outbox.drain_pending()
            await db.close()

    counts, scooter = asyncio.run(main())
    stored = _results(tmp / "f.db", "scooters")
    assert sum(counts.values()) == 1
    if counts["answers"]:
        assert scooter.failures == 0
        assert len(stored) == (0 if kind == "key" else 1) or stored == []  # a control-less answer has no data
    else:
        assert stored == []
    if counts["failures"]:
        assert scooter.failures == 1 and scooter.last_error and "\ud800" not in scooter.last_error
