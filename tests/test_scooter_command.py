"""The signed scooter-command downlink: the message (``sync.crypto.scooter_command``) and the daemon's
receiver (``CommandDownlink.on_mqtt``) with a real outbox."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from nacl.secret import SecretBox
from nacl.signing import SigningKey

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.events import Events
from fleetgate.daemon.scooters.commands import CommandRunner, DeferPolicy, Request, RetryPolicy
from fleetgate.daemon.scooters.dispatch import Dispatcher
from fleetgate.daemon.scooters.downlink import (
    MAX_PAYLOAD_BYTES,
    SEQ_KEY,
    CommandDownlink,
    last_seq_from_state,
)
from fleetgate.daemon.scooters.key_store import KeyStore
from fleetgate.daemon.scooters.pending import PREFIX as PENDING_PREFIX
from fleetgate.daemon.scooters.yard import Yard
from fleetgate.sync.crypto.device_keys import box_key, device_public_key_b64
from fleetgate.sync.crypto.scooter_command import (
    SIGNING_PREFIX,
    ScooterCommand,
    check_seq,
    open_command,
    seal_command,
)
from fleetgate.sync.crypto.session_set import (
    SessionSetRejected,
    open_session_set,
    seal_session_set,
)
from fleetgate.sync.crypto.signed import SignedRejected, key_id
from fleetgate.sync.store import Database, Outbox, StateStore

DEVICE = "depot-0001"
IOT = "861477038719116"
SIGNER = SigningKey(bytes(range(32)))
NEW_SIGNER = SigningKey(bytes(range(32, 64)))
STRANGER = SigningKey(bytes(range(64, 96)))
SECRET = bytes(range(100, 132))
ISSUED = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)
EXPIRES = ISSUED + timedelta(minutes=5)
MAX_SEQ = 2**63 - 1


def make(
    seq: int = 42,
    *,
    signer: SigningKey = SIGNER,
    device: str = DEVICE,
    op: str = "speed-mode",
    params: dict[str, Any] | None = None,
    expires: datetime | None = EXPIRES,
    issued_at: datetime = ISSUED,
    command_id: str = "cmd-7f3a",
    iot_code: str = IOT,
) -> bytes:
    return seal_command(
        device=device,
        seq=seq,
        command_id=command_id,
        iot_code=iot_code,
        op=op,
        params={"speedMode": 2} if params is None else params,
        issued_at=issued_at,
        expires=expires,
        signing_key=signer,
    )


def open_(payload: bytes, keys: tuple[SigningKey, ...] = (SIGNER,), device: str = DEVICE) -> ScooterCommand:
    return open_command(payload, verify_keys=[k.verify_key for k in keys], device=device)


def envelope(payload: bytes) -> dict[str, Any]:
    return json.loads(payload)


def body_of(payload: bytes) -> dict[str, Any]:
    return json.loads(base64.b64decode(envelope(payload)["body"]))


def dump(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def signed(
    body: bytes | dict[str, Any], signer: SigningKey = SIGNER, prefix: bytes = SIGNING_PREFIX
) -> bytes:
    """A correctly signed envelope around any body: how malformed bodies reach the body checks."""
    raw = body if isinstance(body, bytes) else dump(body)
    return dump(
        {
            "v": 1,
            "alg": "ed25519",
            "key_id": key_id(signer.verify_key),
            "body": base64.b64encode(raw).decode(),
            "sig": base64.b64encode(signer.sign(prefix + raw).signature).decode(),
        }
    )


def rejected(payload: bytes, reason: str, names: str | None = None, **kw: Any) -> SignedRejected:
    with pytest.raises(SignedRejected) as info:
        open_(payload, **kw)
    exc = info.value
    assert exc.reason == reason, exc
    if names is not None:
        assert names in exc.detail, exc.detail
    return exc


BODY = body_of(make())


def with_(**changes: Any) -> dict[str, Any]:
    return {**BODY, **changes}


def without(name: str) -> dict[str, Any]:
    return {k: v for k, v in BODY.items() if k != name}


# -- opening -------------------------------------------------------------------------------------------------


def test_a_sealed_command_opens_with_every_field() -> None:
    command = open_(make())
    assert command == ScooterCommand(
        device=DEVICE,
        seq=42,
        id="cmd-7f3a",
        issued_at=ISSUED,
        expires=EXPIRES,
        iot_code=IOT,
        op="speed-mode",
        params={"speedMode": 2},
        key_id=key_id(SIGNER.verify_key),
    )
    assert command.issued_at.tzinfo is not None and command.expires is not None
    assert BODY == {
        "device": DEVICE,
        "seq": 42,
        "id": "cmd-7f3a",
        "issued_at": "2026-12-04T10:00:00Z",
        "expires": "2026-12-04T10:05:00Z",
        "iot_code": IOT,
        "op": "speed-mode",
        "params": {"speedMode": 2},
    }


def test_expires_is_optional() -> None:
    assert "expires" not in body_of(make(expires=None))
    assert open_(make(expires=None)).expires is None
    assert open_(signed(with_(expires=None))).expires is None  # null is "no expiry" too
    assert open_(signed(without("expires"))).expires is None


def test_params_default_to_an_empty_object() -> None:
    assert open_(make(op="unlock", params={})).params == {}
    assert body_of(make(op="unlock", params={}))["params"] == {}


def test_the_extreme_seqs_open() -> None:
    assert open_(make(seq=1)).seq == 1
    assert open_(make(seq=MAX_SEQ)).seq == MAX_SEQ


def test_microseconds_and_offsets_round_trip_as_utc() -> None:
    berlin = timezone(timedelta(hours=1))
    issued = datetime(2026, 12, 4, 11, 0, 0, 123, tzinfo=berlin)
    payload = make(issued_at=issued, expires=None)
    assert body_of(payload)["issued_at"] == "2026-12-04T10:00:00.000123Z"
    assert open_(payload).issued_at == datetime(2026, 12, 4, 10, 0, 0, 123, tzinfo=UTC)
    naive = make(issued_at=datetime(2026, 12, 4, 10, 0), expires=None)  # naive means UTC
    assert open_(naive).issued_at == ISSUED


def test_a_rotated_key_opens_and_is_named() -> None:
    command = open_(make(signer=NEW_SIGNER), keys=(SIGNER, NEW_SIGNER))
    assert command.key_id == key_id(NEW_SIGNER.verify_key) != key_id(SIGNER.verify_key)


# -- refusals: malformed -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b"not json at all", "body: is not JSON"),
        (b"\xff\xfe", "body: is not UTF-8"),
        (b"[1, 2]", "body: must be a JSON object, not an array"),
        (b'"a string"', "body: must be a JSON object, not a string"),
        (b"null", "body: must be a JSON object, not null"),
        (with_(colour="red"), "colour: unknown member"),
        (without("seq"), "seq: missing"),
        (without("device"), "device: missing"),
        (without("id"), "id: missing"),
        (without("issued_at"), "issued_at: missing"),
        (without("iot_code"), "iot_code: missing"),
        (without("op"), "op: missing"),
        (with_(seq=0), "seq: must be an integer 1 .. 2**63-1"),
        (with_(seq=-1), "seq: must be an integer 1 .. 2**63-1"),
        (with_(seq=True), "seq: must be an integer 1 .. 2**63-1, not a boolean"),
        (with_(seq=2**63), "seq: must be an integer 1 .. 2**63-1"),
        (with_(seq=42.0), "seq: must be an integer 1 .. 2**63-1, not a number"),
        (with_(seq="42"), "seq: must be an integer 1 .. 2**63-1, not a string"),
        (with_(id=""), "id: must be 1-64 printable characters"),
        (with_(id="x" * 65), "id: must be 1-64 printable characters"),
        (with_(id="cmd\u0000"), "id: must be 1-64 printable characters"),
        (with_(id="\ud800"), "id: must be 1-64 printable characters"),
        (with_(id=7), "id: must be a string, not an integer"),
        (with_(issued_at="2026-12-04 10:00:00"), "issued_at: must be a UTC timestamp"),
        (with_(issued_at="2026-12-04T10:00:00+00:00"), "issued_at: must be a UTC timestamp"),
        (with_(issued_at="2026-02-30T10:00:00Z"), "issued_at: is not a valid date and time"),
        (with_(issued_at=1733306400), "issued_at: must be a UTC timestamp"),
        (with_(expires="tomorrow"), "expires: must be a UTC timestamp"),
        (with_(expires="2026-12-04T25:00:00Z"), "expires: is not a valid date and time"),
        (with_(iot_code="861477 038719116"), "iot_code: must be 6-32 letters and digits"),
        (with_(iot_code="12345"), "iot_code: must be 6-32 letters and digits"),
        (with_(iot_code="8" * 33), "iot_code: must be 1-32 printable characters"),
        (with_(iot_code=861477038719116), "iot_code: must be a string"),
        (with_(op="Unlock"), "op: must be an operation name"),
        (with_(op="speed_mode"), "op: must be an operation name"),
        (with_(op="-unlock"), "op: must be an operation name"),
        (with_(op=""), "op: must be 1-40 printable characters"),
        (with_(params=[]), "params: must be an object, not an array"),
        (with_(params="speedMode=2"), "params: must be an object, not a string"),
        (with_(params=None), "params: must be an object, not null"),
    ],
)
def test_a_malformed_body_is_refused_naming_the_field(body: bytes | dict[str, Any], names: str) -> None:
    rejected(signed(body), "malformed", names)


def test_a_duplicate_member_is_malformed() -> None:
    """No parser differentials: two ``seq`` members could be read differently elsewhere."""
    raw = base64.b64decode(envelope(make())["body"])
    doubled = raw.replace(b'"seq":42,', b'"seq":42,"seq":43,', 1)
    assert doubled != raw
    rejected(signed(doubled), "malformed", "'seq' more than once")


def test_nan_and_infinity_are_malformed() -> None:
    rejected(signed(b'{"seq": NaN}'), "malformed", "body: is not JSON")
    rejected(signed(b'{"seq": Infinity}'), "malformed", "body: is not JSON")


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (lambda e: {**e, "extra": 1}, "extra: unknown member"),
        (lambda e: {k: v for k, v in e.items() if k != "key_id"}, "key_id: missing"),
        (lambda e: {**e, "key_id": "ABCDEF0123456789"}, "key_id: must be 16 lowercase hex digits"),
        (lambda e: {**e, "body": "not base64!"}, "body: is not valid base64"),
        (lambda e: {**e, "body": 5}, "body: must be a base64 string"),
        (lambda e: {**e, "sig": "***"}, "sig: is not valid base64"),
        (lambda e: {**e, "v": "1"}, "v: must be an integer"),
        (lambda e: {**e, "v": True}, "v: must be an integer"),
        (lambda e: {k: v for k, v in e.items() if k != "v"}, "v: missing"),
    ],
)
def test_a_malformed_envelope_is_refused_naming_the_field(
    change: Callable[[dict[str, Any]], dict[str, Any]], names: str
) -> None:
    rejected(dump(change(envelope(make()))), "malformed", names)


def test_a_payload_that_is_not_a_json_object_is_malformed() -> None:
    rejected(b"", "malformed", "payload: is not JSON")
    rejected(b"[]", "malformed", "payload: must be a JSON object")


# -- refusals: the envelope's reasons ------------------------------------------------------------------------


def test_another_wire_version_or_algorithm_is_unsupported() -> None:
    rejected(dump({**envelope(make()), "v": 2}), "unsupported-version", "v is 2")
    rejected(dump({**envelope(make()), "alg": "rsa"}), "unsupported-version", "alg is 'rsa'")


@pytest.mark.parametrize("sig", [None, "", "absent"])
def test_a_command_without_a_signature_is_unsigned(sig: str | None) -> None:
    env = envelope(make())
    if sig == "absent":
        del env["sig"]
    else:
        env["sig"] = sig
    rejected(dump(env), "unsigned", "no sig")


def test_a_command_signed_by_an_unpinned_key_is_unknown_key() -> None:
    exc = rejected(make(signer=STRANGER), "unknown-key", key_id(STRANGER.verify_key))
    assert "none of the 1 pinned" in exc.detail
    rejected(make(), "unknown-key", keys=())


def test_a_tampered_body_is_bad_signature() -> None:
    env = envelope(make(seq=42))
    tampered = json.dumps(with_(seq=43), separators=(",", ":")).encode()
    env["body"] = base64.b64encode(tampered).decode()
    rejected(dump(env), "bad-signature", "does not verify")


def test_a_signature_of_the_wrong_length_or_from_a_key_with_the_same_id_is_bad_signature() -> None:
    env = envelope(make())
    rejected(dump({**env, "sig": base64.b64encode(b"s" * 63).decode()}), "bad-signature", "63 bytes")
    forged = STRANGER.sign(
        SIGNING_PREFIX + base64.b64decode(env["body"])
    ).signature  # key_id left as SIGNER's
    rejected(dump({**env, "sig": base64.b64encode(forged).decode()}), "bad-signature", "does not verify")


def test_a_command_for_another_device_is_wrong_device() -> None:
    exc = rejected(make(device="depot-0002"), "wrong-device", "'depot-0002'")
    assert repr(DEVICE) in exc.detail


def test_the_envelope_is_checked_before_the_body() -> None:
    """A forged or tampered message never reaches the body parser: its reason is the envelope's."""
    rejected(signed(b"not json", signer=STRANGER), "unknown-key")
    env = envelope(signed(b"not json"))
    env["body"] = base64.b64encode(b"still not json").decode()
    rejected(dump(env), "bad-signature")


# -- cross-use: the prefix separates the session-set and command uses of one key -----------------------------


def test_a_session_set_signed_by_the_same_key_is_not_a_command() -> None:
    session_set = seal_session_set(
        device=DEVICE,
        vin="1D4PT4GKXBW600841",
        version=42,
        issued_at=ISSUED,
        sessions=[],
        signing_key=SIGNER,
        device_public_key_b64=device_public_key_b64(SECRET),
    )
    rejected(session_set, "bad-signature", "does not verify")


def test_a_command_body_signed_for_the_session_set_use_is_refused() -> None:
    """Even a perfectly valid command body, if signed under the session-set prefix, does not verify."""
    rejected(signed(BODY, prefix=b"fleetgate/sessions/v1\n"), "bad-signature")


def test_a_command_is_not_a_session_set() -> None:
    with pytest.raises(SessionSetRejected) as info:
        open_session_set(make(), verify_keys=[SIGNER.verify_key], box_key=box_key(SECRET), device=DEVICE)
    assert info.value.reason == "bad-signature"


# -- freshness -----------------------------------------------------------------------------------------------


def test_check_seq() -> None:
    check_seq(open_(make(seq=1)), None)  # nothing accepted yet
    check_seq(open_(make(seq=43)), 42)
    check_seq(open_(make(seq=MAX_SEQ)), MAX_SEQ - 1)
    for last in (42, 43, MAX_SEQ):
        with pytest.raises(SignedRejected) as info:
            check_seq(open_(make(seq=42)), last)
        assert info.value.reason == "older-seq"
        assert f"seq 42 is not above {last}" in info.value.detail


# -- the cloud side ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"seq": 0}, r"seq: must be an integer 1 \.\. 2\*\*63-1"),
        ({"seq": 2**63}, r"seq: must be an integer"),
        ({"seq": True}, r"seq: must be an integer"),
        ({"iot_code": "861477 038719116"}, "iot_code: must be 6-32 letters and digits"),
        ({"op": "Unlock"}, "op: must be an operation name"),
        ({"command_id": ""}, "id: must be 1-64 printable characters"),
        ({"command_id": "c" * 65}, "id: must be 1-64 printable characters"),
        ({"device": ""}, "device: must be 1-64 printable characters"),
        ({"params": ["speedMode", 2]}, "params: must be an object"),
    ],
)
def test_the_cloud_refuses_to_seal_what_the_device_would_refuse(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(**changes)


def test_sealing_raises_value_error_not_signed_rejected() -> None:
    with pytest.raises(ValueError) as info:
        make(seq=0)
    assert not isinstance(info.value, SignedRejected)


# -- CommandDownlink.on_mqtt with a real outbox --------------------------------------------------------------


class Rig:
    def __init__(self, db: Database, downlink: CommandDownlink, dispatcher: Dispatcher) -> None:
        self.db = db
        self.downlink = downlink
        self.dispatcher = dispatcher

    async def records(self, stream: str) -> list[dict[str, Any]]:
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT o.payload FROM outbox o JOIN streams s ON s.id = o.stream_id WHERE s.name = ?"
                " ORDER BY o.seq",
                (stream,),
            ).fetchall()
        )
        return [json.loads(r[0]) for r in rows]

    async def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in await self.records("events") if e.get("event") == name]

    async def saved_seq(self) -> Any:
        return await StateStore(self.db).get(SEQ_KEY)

    def queued(self) -> list[Request]:
        queue = self.dispatcher._queue
        items = [queue.get_nowait() for _ in range(queue.qsize())]
        for item in items:
            queue.put_nowait(item)
        return [request for request, _future in items]

    async def pending(self) -> dict[str, str]:
        return await StateStore(self.db).items(PENDING_PREFIX)


def run_with_downlink(
    tmp_path: Path,
    body: Callable[[Rig], Awaitable[None]],
    last_seq: int | None = None,
    defer: DeferPolicy | None = None,
) -> None:
    async def main() -> None:
        db = await Database.open(tmp_path / "fleetgate.db")
        try:
            outbox = Outbox(db, boot_id="boot-1")
            clock = Clock()
            # on_mqtt only records and queues: the runner is asked what may wait, and never runs here.
            runner = CommandRunner(
                None,  # type: ignore[arg-type]
                Yard(),
                KeyStore(SecretBox(bytes(32))),
                outbox,
                clock,
                RetryPolicy(1, 1.0),
                defer=defer,
            )
            dispatcher = Dispatcher(runner)
            downlink = CommandDownlink(
                DEVICE,
                [SIGNER.verify_key],
                last_seq,
                runner,
                dispatcher,
                outbox,
                clock,
                Events(outbox, clock),
            )
            await body(Rig(db, downlink, dispatcher))
        finally:
            await db.close()

    asyncio.run(main())


def test_an_accepted_command_is_recorded_with_its_seq_and_queued(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        assert await rig.saved_seq() is None
        await rig.downlink.on_mqtt(make(seq=42))
        assert rig.downlink.status() == {
            "unrecorded": 0,
            "accepted": 1,
            "rejected": {},
            "queued": 1,
            "last_seq": 42,
        }
        (record,) = await rig.records("scooter-results")
        assert record == {
            "id": "cmd-7f3a",
            "seq": 42,
            "source": "mqtt",
            "iot_code": IOT,
            "op": "speed-mode",
            "outcome": "accepted",
            "issued_at": "2026-12-04T10:00:00Z",
        }
        assert await rig.saved_seq() == 42
        assert rig.queued() == [Request(IOT, "speed-mode", {"speedMode": 2}, "mqtt", "cmd-7f3a", 42, EXPIRES)]
        assert await rig.events("scooter-command-rejected") == []

    run_with_downlink(tmp_path, body)


def test_a_command_that_may_wait_is_queued_durably_in_the_commit_that_accepts_it(tmp_path: Path) -> None:
    """A lock's queue entry is written with its acceptance, so a kill -9 before it runs does not lose it; a
    query is never queued (a late answer is of no use)."""

    async def body(rig: Rig) -> None:
        await rig.downlink.on_mqtt(make(seq=1, op="lock", params={}, command_id="lock-1", expires=None))
        await rig.downlink.on_mqtt(make(seq=2, op="status", params={}, command_id="status-2"))
        (lock, status) = rig.queued()
        assert lock.queued and not status.queued
        saved = await rig.pending()
        assert list(saved) == [PENDING_PREFIX + "lock-1"]
        entry = json.loads(saved[PENDING_PREFIX + "lock-1"])
        assert entry["op"] == "lock" and entry["source"] == "mqtt" and entry["seq"] == 1
        # No expiry of its own: it may wait secure_defer_s from its acceptance.
        assert entry["expires_wall_ns"] - entry["queued_wall_ns"] == 3600 * 10**9

    run_with_downlink(tmp_path, body, defer=DeferPolicy(defer_s=60.0, secure_defer_s=3600.0))


def test_commands_in_order_are_all_accepted_and_the_seq_follows(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        for seq in (1, 2, 10):
            await rig.downlink.on_mqtt(make(seq=seq, command_id=f"cmd-{seq}"))
        assert rig.downlink.status()["accepted"] == 3
        assert [r["seq"] for r in await rig.records("scooter-results")] == [1, 2, 10]
        assert [q.id for q in rig.queued()] == ["cmd-1", "cmd-2", "cmd-10"]
        assert await rig.saved_seq() == 10

    run_with_downlink(tmp_path, body)


def test_a_replay_is_older_seq_counted_and_not_recorded_again(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        payload = make(seq=42)
        await rig.downlink.on_mqtt(payload)
        await rig.downlink.on_mqtt(payload)
        await rig.downlink.on_mqtt(make(seq=41, command_id="cmd-old"))
        status = rig.downlink.status()
        assert status == {
            "unrecorded": 0,
            "accepted": 1,
            "rejected": {"older-seq": 2},
            "queued": 1,
            "last_seq": 42,
        }
        assert len(await rig.records("scooter-results")) == 1
        assert await rig.saved_seq() == 42
        (event,) = await rig.events("scooter-command-rejected")
        assert event["reason"] == "older-seq" and event["count"] == 1

    run_with_downlink(tmp_path, body)


def test_the_saved_seq_refuses_a_replay_after_a_restart(tmp_path: Path) -> None:
    payload = make(seq=42)

    async def before(rig: Rig) -> None:
        await rig.downlink.on_mqtt(payload)

    run_with_downlink(tmp_path, before)

    async def read_seq() -> int | None:
        db = await Database.open(tmp_path / "fleetgate.db")
        try:
            return last_seq_from_state(await StateStore(db).get(SEQ_KEY))
        finally:
            await db.close()

    saved = asyncio.run(read_seq())
    assert saved == 42

    async def after(rig: Rig) -> None:
        await rig.downlink.on_mqtt(payload)
        assert rig.downlink.status() == {
            "unrecorded": 0,
            "accepted": 0,
            "rejected": {"older-seq": 1},
            "queued": 0,
            "last_seq": 42,
        }
        assert len(await rig.records("scooter-results")) == 1  # the one from before the restart

    run_with_downlink(tmp_path, after, last_seq=saved)


def test_a_forged_command_is_unknown_key_and_changes_nothing(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await rig.downlink.on_mqtt(make(seq=42, signer=STRANGER))
        assert rig.downlink.status() == {
            "unrecorded": 0,
            "accepted": 0,
            "rejected": {"unknown-key": 1},
            "queued": 0,
            "last_seq": None,
        }
        assert await rig.records("scooter-results") == []
        assert await rig.saved_seq() is None

    run_with_downlink(tmp_path, body)


def test_a_payload_over_64_kib_is_malformed_without_being_parsed(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        valid = make(seq=42)
        big = valid + b" " * (MAX_PAYLOAD_BYTES + 1 - len(valid))  # a valid message padded past the limit
        assert len(big) == MAX_PAYLOAD_BYTES + 1
        await rig.downlink.on_mqtt(big)
        await rig.downlink.on_mqtt(b"x" * (65 * 1024))
        assert rig.downlink.status() == {
            "unrecorded": 0,
            "accepted": 0,
            "rejected": {"malformed": 2},
            "queued": 0,
            "last_seq": None,
        }
        assert await rig.records("scooter-results") == []
        (event,) = await rig.events("scooter-command-rejected")
        assert event["reason"] == "malformed" and "too large" in event["detail"]

    run_with_downlink(tmp_path, body)


def test_a_payload_of_exactly_64_kib_is_parsed(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        valid = make(seq=42)
        await rig.downlink.on_mqtt(
            valid + b" " * (MAX_PAYLOAD_BYTES - len(valid))
        )  # trailing JSON whitespace
        assert rig.downlink.status()["accepted"] == 1

    run_with_downlink(tmp_path, body)


def test_a_wrong_device_or_tampered_command_is_counted_by_reason(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        env = envelope(make(seq=50))
        env["body"] = base64.b64encode(json.dumps(with_(seq=51)).encode()).decode()
        await rig.downlink.on_mqtt(dump(env))
        await rig.downlink.on_mqtt(make(seq=52, device="depot-0002"))
        await rig.downlink.on_mqtt(b"\x00garbage")
        assert rig.downlink.status()["rejected"] == {"bad-signature": 1, "wrong-device": 1, "malformed": 1}
        assert rig.downlink.status()["last_seq"] is None
        assert sorted(e["reason"] for e in await rig.events("scooter-command-rejected")) == [
            "bad-signature",
            "malformed",
            "wrong-device",
        ]

    run_with_downlink(tmp_path, body)


def test_rejection_events_are_at_most_one_per_reason_per_minute(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await rig.downlink.on_mqtt(make(seq=42, signer=STRANGER))
        await rig.downlink.on_mqtt(make(seq=43, signer=STRANGER))
        assert rig.downlink.status()["rejected"] == {"unknown-key": 2}
        (event,) = await rig.events("scooter-command-rejected")
        assert event["reason"] == "unknown-key" and event["count"] == 1
        assert key_id(STRANGER.verify_key) in event["detail"]
        await rig.downlink.on_mqtt(b"{}")  # another reason has its own allowance
        assert [e["reason"] for e in await rig.events("scooter-command-rejected")] == [
            "unknown-key",
            "malformed",
        ]
        await rig.downlink.on_mqtt(make(seq=44))  # an accepted command does not reset the limit
        await rig.downlink.on_mqtt(make(seq=45, signer=STRANGER))
        assert len(await rig.events("scooter-command-rejected")) == 2
        assert rig.downlink.status()["rejected"] == {"unknown-key": 3, "malformed": 1}

    run_with_downlink(tmp_path, body)


@pytest.mark.parametrize("params", [{"speedMode": "\ud800"}, {"\udfff": 1}, {"speedMode": ["x\ud800"]}])
def test_params_an_accepted_command_carries_can_be_written_into_its_result_record(
    params: dict[str, Any],
) -> None:
    """The runner writes a command's params into its ``scooter-results`` record (strict UTF-8 JSON, as
    ``NewRecord.json`` encodes it), also when it refuses them: a lone surrogate must be refused here, as the
    session set's strings are, not crash the worker after the command was recorded ``accepted``."""
    try:
        command = open_(signed(with_(params=params)))
    except SignedRejected as exc:
        assert exc.reason == "malformed" and "params" in exc.detail
    else:
        json.dumps(command.params, ensure_ascii=False).encode("utf-8")
