"""The signed, PIN-sealed session-set message: cloud side, device side, freshness, device keys, cloud CLI."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey, SealedBox
from nacl.signing import SigningKey

from fleetgate.sync.crypto.device_keys import (
    DeviceSecretError,
    box_key,
    device_public_key_b64,
    generate_secret_file,
    hash_pin,
    pin_key,
    pin_matches,
    read_secret_file,
)
from fleetgate.sync.crypto.session_set import (
    REASONS,
    SIGNING_PREFIX,
    SessionGrant,
    SessionSet,
    SessionSetRejected,
    check_fresh,
    open_session_set,
    seal_session_set,
)
from fleetgate.sync.crypto.signed import key_id, verify_keys_from_b64

from mosquitto_fixture import Mosquitto, make_tls
from mqtt_consumer import Consumer

CLOUD = Path(__file__).resolve().parents[1] / "tools" / "sim" / "cloud.py"
DEVICE = "veh-0042"
VIN = "1D4PT4GKXBW600841"
SIGNER = SigningKey(bytes(range(32)))
NEW_SIGNER = SigningKey(bytes(range(32, 64)))
STRANGER = SigningKey(bytes(range(64, 96)))
SECRET = bytes(range(100, 132))
OTHER_SECRET = bytes(range(140, 172))
DEVICE_KEY = device_public_key_b64(SECRET)
ISSUED = datetime(2021, 6, 9, 22, 8, 0, 123, tzinfo=UTC)
ENDED_PIN, ACTIVE_PIN = "062309", "633911"
PINS = (ENDED_PIN, ACTIVE_PIN, "987654", "4242")
SESSIONS: list[dict[str, Any]] = [  # as REEF returns them (naive UTC timestamps)
    {
        "id": 2,
        "vin": VIN,
        "pin": ENDED_PIN,
        "initialization": "2021-06-09 22:07:26.955043",
        "completion": "2021-06-09 22:07:39.099169",
        "verification_id": "c24gt2d8f41c9450911e7890",
    },
    {
        "id": 3,
        "vin": VIN,
        "pin": ACTIVE_PIN,
        "initialization": "2021-06-09 22:07:39.113810",
        "completion": "active",
        "verification_id": "60c252d8f41c9450911e8926",
        "expires": datetime(2021, 6, 10, 22, 7, 39, tzinfo=UTC),
    },
]


def make(
    version: int = 5,
    issued_at: datetime = ISSUED,
    sessions: list[dict[str, Any]] | None = None,
    signer: SigningKey = SIGNER,
    device: str = DEVICE,
    device_key: str = DEVICE_KEY,
) -> bytes:
    return seal_session_set(
        device=device,
        vin=VIN,
        version=version,
        issued_at=issued_at,
        sessions=SESSIONS if sessions is None else sessions,
        signing_key=signer,
        device_public_key_b64=device_key,
    )


def open_(payload: bytes, keys: tuple[SigningKey, ...] = (SIGNER,), **kw: Any) -> SessionSet:
    kw.setdefault("device", DEVICE)
    return open_session_set(payload, verify_keys=[k.verify_key for k in keys], box_key=box_key(SECRET), **kw)


def envelope(payload: bytes) -> dict[str, Any]:
    return json.loads(payload)


def body_of(payload: bytes) -> dict[str, Any]:
    return json.loads(base64.b64decode(envelope(payload)["body"]))


def dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def signed(body: bytes | dict[str, Any], signer: SigningKey = SIGNER) -> bytes:
    """A correctly signed message around any body: how malformed bodies reach the body checks."""
    raw = body if isinstance(body, bytes) else dump(body)
    sig = signer.sign(SIGNING_PREFIX + raw).signature
    return dump(
        {
            "v": 1,
            "alg": "ed25519",
            "key_id": key_id(signer.verify_key),
            "body": base64.b64encode(raw).decode(),
            "sig": base64.b64encode(sig).decode(),
        }
    )


def rejected(payload: bytes, reason: str, names: str | None = None, **kw: Any) -> SessionSetRejected:
    with pytest.raises(SessionSetRejected) as info:
        open_(payload, **kw)
    exc = info.value
    assert exc.reason == reason, exc
    if names is not None:
        assert names in exc.detail, exc.detail
    assert_no_pin(exc)
    return exc


def assert_no_pin(*things: object) -> None:
    for thing in things:
        for text in (str(thing), repr(thing), getattr(thing, "detail", "")):
            for pin in PINS:
                assert pin not in text, f"PIN in {text!r}"


# -- a valid set -------------------------------------------------------------------------------------------


def test_a_valid_set_opens_with_the_active_sessions_pins() -> None:
    payload = make()
    opened = open_(payload, vin=VIN)
    body_bytes = base64.b64decode(envelope(payload)["body"])
    assert (opened.device, opened.vin, opened.version, opened.issued_at) == (DEVICE, VIN, 5, ISSUED)
    assert opened.digest == hashlib.sha256(body_bytes).digest()
    assert opened.key_id == key_id(SIGNER.verify_key) == bytes(SIGNER.verify_key)[:8].hex()
    ended, active = opened.sessions
    assert ended == SessionGrant(
        2,
        "c24gt2d8f41c9450911e7890",
        datetime(2021, 6, 9, 22, 7, 26, 955043, tzinfo=UTC),
        datetime(2021, 6, 9, 22, 7, 39, 99169, tzinfo=UTC),
        None,
        None,
    )
    assert not ended.active and ended.pin is None  # an ended session's PIN is not even sent
    assert active.active and active.completion is None
    assert active.pin == ACTIVE_PIN
    assert active.expires == datetime(2021, 6, 10, 22, 7, 39, tzinfo=UTC)
    assert_no_pin(opened, active, payload.decode())  # sealed on the wire, hidden in reprs
    assert ENDED_PIN.encode() not in body_bytes and ACTIVE_PIN.encode() not in body_bytes


def test_wire_format_is_as_documented() -> None:
    env = envelope(make())
    assert set(env) == {"v", "alg", "key_id", "body", "sig"}
    assert (env["v"], env["alg"], env["key_id"]) == (1, "ed25519", bytes(SIGNER.verify_key)[:8].hex())
    body = base64.b64decode(env["body"])
    SIGNER.verify_key.verify(b"fleetgate/sessions/v1\n" + body, base64.b64decode(env["sig"]))
    obj = json.loads(body)
    assert obj["issued_at"] == "2021-06-09T22:08:00.000123Z"
    assert obj["sessions"][0] == {
        "id": 2,
        "verification_id": "c24gt2d8f41c9450911e7890",
        "initialization": "2021-06-09T22:07:26.955043Z",
        "completion": "2021-06-09T22:07:39.099169Z",
    }
    active = obj["sessions"][1]
    assert (active["completion"], active["expires"]) == ("active", "2021-06-10T22:07:39Z")
    sealed = base64.b64decode(active["pin_sealed"])
    assert SealedBox(box_key(SECRET)).decrypt(sealed) == ACTIVE_PIN.encode()


# -- authenticity ------------------------------------------------------------------------------------------


def test_a_tampered_body_fails_the_signature() -> None:
    env = envelope(make(version=5))
    body = json.loads(base64.b64decode(env["body"]))
    body["version"] = 6
    env["body"] = base64.b64encode(dump(body)).decode()
    rejected(dump(env), "bad-signature", key_id(SIGNER.verify_key))


@pytest.mark.parametrize("flip", [0, 31, 63])
def test_a_tampered_signature_fails(flip: int) -> None:
    env = envelope(make())
    sig = bytearray(base64.b64decode(env["sig"]))
    sig[flip] ^= 0x01
    env["sig"] = base64.b64encode(bytes(sig)).decode()
    rejected(dump(env), "bad-signature")


def test_a_signature_of_the_wrong_length_is_bad() -> None:
    env = envelope(make())
    env["sig"] = base64.b64encode(b"\x00" * 63).decode()
    rejected(dump(env), "bad-signature", "63 bytes")


def test_a_signature_made_without_the_domain_prefix_does_not_verify() -> None:
    """Guards the domain separation: the key's signature over the bare body (made for some other use)
    must not pass here."""
    env = envelope(make())
    body = base64.b64decode(env["body"])
    env["sig"] = base64.b64encode(SIGNER.sign(body).signature).decode()
    rejected(dump(env), "bad-signature")


@pytest.mark.parametrize("sig", ["missing", None, ""])
def test_a_message_without_a_signature_is_unsigned(sig: str | None) -> None:
    env = envelope(make())
    if sig == "missing":
        del env["sig"]
    else:
        env["sig"] = sig
    rejected(dump(env), "unsigned", "sig")


def test_a_set_signed_by_an_unpinned_key_is_unknown_key() -> None:
    exc = rejected(make(signer=STRANGER), "unknown-key", key_id(STRANGER.verify_key))
    assert "1 pinned" in exc.detail


def test_a_stranger_claiming_a_pinned_key_id_is_a_bad_signature() -> None:
    env = envelope(make(signer=STRANGER))
    env["key_id"] = key_id(SIGNER.verify_key)
    rejected(dump(env), "bad-signature")


def test_key_rotation_accepts_every_pinned_key() -> None:
    both = (SIGNER, NEW_SIGNER)
    assert open_(make(signer=SIGNER), keys=both).key_id == key_id(SIGNER.verify_key)
    assert open_(make(signer=NEW_SIGNER), keys=both).key_id == key_id(NEW_SIGNER.verify_key)
    rejected(make(signer=NEW_SIGNER), "unknown-key", keys=(SIGNER,))  # before the new key is pinned
    rejected(make(signer=SIGNER), "unknown-key", keys=(NEW_SIGNER,))  # after the old one is dropped
    rejected(make(signer=STRANGER), "unknown-key", keys=both)


def test_verify_keys_from_base64() -> None:
    b64 = base64.b64encode(bytes(SIGNER.verify_key)).decode()
    assert verify_keys_from_b64([b64]) == [SIGNER.verify_key]
    with pytest.raises(ValueError, match=r"\[1\] is 31 bytes"):
        verify_keys_from_b64([b64, base64.b64encode(b"x" * 31).decode()])
    with pytest.raises(ValueError, match=r"\[0\] is not base64"):
        verify_keys_from_b64(["not base64!"])


# -- addressed to this device ------------------------------------------------------------------------------


def test_a_set_for_another_device_is_refused_even_on_this_devices_topic() -> None:
    exc = rejected(make(device="veh-0043"), "wrong-device", "veh-0043")
    assert DEVICE in exc.detail


def test_a_set_for_another_vin_is_refused_when_the_vin_is_given() -> None:
    rejected(make(), "wrong-vehicle", "1D4PT4GKXBW600841", vin="7F7ATR312KER0400")


def test_a_pin_sealed_to_another_device_is_unsealable() -> None:
    payload = make(device_key=device_public_key_b64(OTHER_SECRET))
    rejected(payload, "unsealable-pin", "sessions[1].pin_sealed")


def test_a_sealed_value_that_is_not_a_pin_is_malformed_and_not_quoted() -> None:
    body = body_of(make())
    body["sessions"][1]["pin_sealed"] = base64.b64encode(
        SealedBox(box_key(SECRET).public_key).encrypt(b"98765x")
    ).decode()
    exc = rejected(signed(body), "malformed", "sessions[1].pin_sealed")
    assert "98765" not in str(exc)


# -- format ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason", "names"),
    [
        (lambda e: e.update(v=2), "unsupported-version", "v is 2"),
        (lambda e: e.update(alg="rsa-pss"), "unsupported-version", "alg"),
        (lambda e: e.update(v="1"), "malformed", "v: must be an integer"),
        (lambda e: e.update(v=True), "malformed", "v: must be an integer"),
        (lambda e: e.pop("v"), "malformed", "v: missing"),
        (lambda e: e.pop("alg"), "malformed", "alg: missing"),
        (lambda e: e.pop("body"), "malformed", "body: missing"),
        (lambda e: e.pop("key_id"), "malformed", "key_id: missing"),
        (lambda e: e.update(key_id="ABCDEF0123456789"), "malformed", "key_id"),
        (lambda e: e.update(key_id=7), "malformed", "key_id"),
        (lambda e: e.update(body="%%%"), "malformed", "body: is not valid base64"),
        (lambda e: e.update(body=["x"]), "malformed", "body: must be a base64 string, not an array"),
        (lambda e: e.update(sig="not base64!"), "malformed", "sig: is not valid base64"),
        (lambda e: e.update(sig=12), "malformed", "sig: must be a base64 string"),
        (lambda e: e.update(extra=1), "malformed", "extra: unknown member"),
    ],
)
def test_a_bad_envelope_is_refused_naming_the_field(
    change: Callable[[dict[str, Any]], object], reason: str, names: str
) -> None:
    env = envelope(make())
    change(env)
    rejected(dump(env), reason, names)


@pytest.mark.parametrize(
    ("payload", "names"),
    [
        (b"", "payload: is not JSON"),
        (b"\xff\xfe garbage", "payload: is not UTF-8"),
        (b"not json at all", "payload: is not JSON"),
        (b"[1, 2]", "payload: must be a JSON object, not an array"),
        (b"null", "payload: must be a JSON object, not null"),
        (b"[" * 100_000, "payload"),
        (b'{"v": NaN}', "payload: is not JSON"),
        (b'{"v": 1, "v": 1}', "member 'v' more than once"),
    ],
)
def test_garbage_is_malformed(payload: bytes, names: str) -> None:
    rejected(payload, "malformed", names)


def _session(i: int, **change: Any) -> Callable[[dict[str, Any]], None]:
    def apply(body: dict[str, Any]) -> None:
        for k, v in change.items():
            if v is _DROP:
                del body["sessions"][i][k]
            else:
                body["sessions"][i][k] = v

    return apply


_DROP = object()


def _body(**change: Any) -> Callable[[dict[str, Any]], None]:
    def apply(body: dict[str, Any]) -> None:
        for k, v in change.items():
            if v is _DROP:
                del body[k]
            else:
                body[k] = v

    return apply


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (_body(device=_DROP), "device: missing"),
        (_body(device=42), "device: must be a string, not an integer"),
        (_body(vin=""), "vin: must be 1-256 characters"),
        (_body(version=_DROP), "version: missing"),
        (_body(version=0), "version: must be between 1"),
        (_body(version=2**63), "version: must be between 1"),
        (_body(version="5"), "version: must be an integer, not a string"),
        (_body(version=True), "version: must be an integer, not a boolean"),
        (_body(version=5.0), "version: must be an integer, not a number"),
        (_body(issued_at="2021-06-09 22:08:00"), "issued_at: must be a UTC timestamp"),
        (_body(issued_at="2021-06-09T22:08:00+00:00"), "issued_at: must be a UTC timestamp"),
        (_body(issued_at="2021-13-09T22:08:00Z"), "issued_at: is not a valid date"),
        (_body(issued_at=None), "issued_at: must be a UTC timestamp"),
        (_body(sessions={"id": 1}), "sessions: must be an array, not an object"),
        (_body(sessions=_DROP), "sessions: missing"),
        (_body(sessions=[1]), "sessions[0]: must be an object, not an integer"),
        (_body(signature_ok=True), "signature_ok: unknown member"),
        (_session(0, id=_DROP), "sessions[0].id: missing"),
        (_session(0, id="2"), "sessions[0].id: must be an integer"),
        (_session(0, id=-1), "sessions[0].id: must be between 0"),
        (_session(0, id=3), "sessions[1].id: session 3 appears more than once"),
        (_session(1, verification_id=""), "sessions[1].verification_id: must be 1-256"),
        (_session(1, verification_id=None), "sessions[1].verification_id: must be a string, not null"),
        (_session(0, completion="ended"), "sessions[0].completion: must be a UTC timestamp YYYY"),
        (_session(0, completion=None), "sessions[0].completion"),
        (_session(0, completion="2021-06-09T22:07:00Z"), "sessions[0].completion: is before initialization"),
        (_session(1, initialization=_DROP), "sessions[1].initialization: missing"),
        (_session(1, expires="tomorrow"), "sessions[1].expires"),
        (_session(1, pin_sealed=_DROP), "sessions[1].pin_sealed: is required for an active session"),
        (_session(1, pin_sealed=None), "sessions[1].pin_sealed: is required for an active session"),
        (_session(1, pin_sealed="%%%"), "sessions[1].pin_sealed: is not valid base64"),
        (_session(1, pin_sealed=base64.b64encode(b"x" * 20).decode()), "sessions[1].pin_sealed: is 20 bytes"),
        (_session(1, pin="987654"), "sessions[1].pin: unknown member"),  # a PIN in clear is refused unread
    ],
)
def test_a_bad_body_field_is_malformed_naming_the_field(
    change: Callable[[dict[str, Any]], None], names: str
) -> None:
    body = body_of(make())
    change(body)
    rejected(signed(body), "malformed", names)


def test_a_body_with_duplicate_members_is_malformed() -> None:
    """Guards against parser differentials: two ``device`` members could be read differently elsewhere."""
    raw = base64.b64decode(envelope(make())["body"])
    doubled = raw.replace(b'{"device":"veh-0042",', b'{"device":"veh-0042","device":"veh-0043",', 1)
    assert doubled != raw
    rejected(signed(doubled), "malformed", "'device' more than once")


def test_an_ended_session_may_carry_a_sealed_pin_which_is_dropped() -> None:
    body = body_of(make())
    body["sessions"][0]["pin_sealed"] = body["sessions"][1]["pin_sealed"]
    opened = open_(signed(body))
    assert opened.sessions[0].pin is None and opened.sessions[1].pin == ACTIVE_PIN


def test_an_empty_set_is_valid() -> None:
    assert open_(make(sessions=[])).sessions == ()


def test_every_reason_is_a_counter_name_and_unknown_reasons_are_refused() -> None:
    assert all(r.replace("-", "").isalpha() and r.islower() for r in REASONS)
    with pytest.raises(ValueError, match="unknown rejection reason"):
        SessionSetRejected("oops", "x")  # type: ignore[arg-type]


# -- cloud side --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sessions", "match"),
    [
        ([{**SESSIONS[1], "pin": None}], r"sessions\[0\].*\.pin: an active session needs a PIN"),
        ([{**SESSIONS[1], "pin": "98765x"}], r"sessions\[0\].*\.pin: an active session needs a PIN"),
        ([{**SESSIONS[1], "pin": "987"}], r"needs a PIN of 4-12"),
        ([{**SESSIONS[1], "vin": "7F7ATR312KER0400"}], "is for VIN '7F7ATR312KER0400'"),
        ([{**SESSIONS[1], "colour": "red"}], r"unknown field\(s\) colour"),
        ([{k: v for k, v in SESSIONS[1].items() if k != "initialization"}], "missing initialization"),
        ([{**SESSIONS[1], "initialization": "yesterday"}], r"\.initialization: not a timestamp"),
        ([{**SESSIONS[1], "id": "3"}], r"sessions\[0\]\.id: must be an integer"),
        ([SESSIONS[1], SESSIONS[1]], r"session 3 appears more than once"),
    ],
)
def test_the_cloud_refuses_to_seal_what_devices_would_refuse(
    sessions: list[dict[str, Any]], match: str
) -> None:
    with pytest.raises(ValueError, match=match) as info:
        make(sessions=sessions)
    assert_no_pin(info.value)
    assert "98765x" not in str(info.value)


def test_the_cloud_refuses_a_bad_device_key() -> None:
    with pytest.raises(ValueError, match="device public key is 16 bytes"):
        make(device_key=base64.b64encode(b"k" * 16).decode())


def test_cloud_timestamps_in_any_offset_become_utc() -> None:
    berlin = timezone(timedelta(hours=2))
    sessions = [{**SESSIONS[1], "initialization": datetime(2021, 6, 10, 0, 7, 39, tzinfo=berlin)}]
    opened = open_(make(issued_at=datetime(2021, 6, 10, 0, 8, tzinfo=berlin), sessions=sessions))
    assert opened.issued_at == datetime(2021, 6, 9, 22, 8, tzinfo=UTC)
    assert opened.sessions[0].initialization == datetime(2021, 6, 9, 22, 7, 39, tzinfo=UTC)
    assert body_of(make(sessions=sessions))["sessions"][0]["initialization"] == "2021-06-09T22:07:39Z"


# -- freshness ---------------------------------------------------------------------------------------------


def _last(payload: bytes) -> tuple[int, datetime, bytes]:
    applied = open_(payload)
    return applied.version, applied.issued_at, applied.digest


def test_the_first_set_applies() -> None:
    assert check_fresh(open_(make()), None, None, None) == "apply"


def test_a_higher_version_applies() -> None:
    last = _last(make(version=5))
    assert check_fresh(open_(make(version=6, issued_at=ISSUED + timedelta(seconds=1))), *last) == "apply"
    assert check_fresh(open_(make(version=9, issued_at=ISSUED)), *last) == "apply"  # same instant is fine


def test_the_same_message_again_is_a_duplicate() -> None:
    """The broker redelivers the retained set on every reconnect: not an attack."""
    payload = make(version=5)
    assert check_fresh(open_(payload), *_last(payload)) == "duplicate"


def test_the_same_body_signed_by_the_rotated_key_is_a_duplicate() -> None:
    payload = make(version=5)
    resigned = open_(
        signed(base64.b64decode(envelope(payload)["body"]), NEW_SIGNER), keys=(SIGNER, NEW_SIGNER)
    )
    assert check_fresh(resigned, *_last(payload)) == "duplicate"


def test_sealing_the_same_set_again_gives_other_bytes_so_the_cloud_must_raise_the_version() -> None:
    """Sealed boxes are randomised: a re-sealed set under the same version is "replayed", not a duplicate.
    The cloud republishes the exact bytes, or raises the version."""
    first, again = make(version=5), make(version=5)
    assert body_of(first)["sessions"][1]["pin_sealed"] != body_of(again)["sessions"][1]["pin_sealed"]
    with pytest.raises(SessionSetRejected, match="replayed"):
        check_fresh(open_(again), *_last(first))


def test_the_same_version_with_other_content_is_replayed() -> None:
    last = _last(make(version=5))
    other = open_(make(version=5, sessions=SESSIONS[:1]))
    with pytest.raises(SessionSetRejected) as info:
        check_fresh(other, *last)
    assert info.value.reason == "replayed" and "version 5" in info.value.detail
    with pytest.raises(SessionSetRejected) as info:  # nothing to compare with: not trusted either
        check_fresh(open_(make(version=5)), 5, ISSUED, None)
    assert info.value.reason == "replayed"


def test_a_lower_version_is_refused() -> None:
    """Guards against a replayed old set (e.g. one that still listed a now-ended session as active)."""
    old = make(version=4, issued_at=ISSUED - timedelta(hours=1))
    with pytest.raises(SessionSetRejected) as info:
        check_fresh(open_(old), *_last(make(version=5)))
    assert info.value.reason == "older-version"
    assert "version 4 is older than the applied version 5" in info.value.detail


def test_a_newer_version_issued_earlier_is_refused() -> None:
    last = _last(make(version=5))
    earlier = open_(make(version=6, issued_at=ISSUED - timedelta(microseconds=1)))
    with pytest.raises(SessionSetRejected) as info:
        check_fresh(earlier, *last)
    assert info.value.reason == "issued-earlier"
    assert (
        "2021-06-09T22:08:00.000122Z" in info.value.detail
        and "2021-06-09T22:08:00.000123Z" in info.value.detail
    )


def test_a_naive_last_issued_at_is_taken_as_utc() -> None:
    version, issued, digest = _last(make(version=5))
    naive = issued.replace(tzinfo=None)
    assert check_fresh(open_(make(version=6)), version, naive, digest) == "apply"
    with pytest.raises(SessionSetRejected):
        check_fresh(open_(make(version=6, issued_at=ISSUED - timedelta(seconds=1))), version, naive, digest)


def test_the_last_issued_at_as_the_daemon_stores_it_round_trips() -> None:
    applied = open_(make(version=5))
    stored = applied.issued_at.isoformat()
    assert check_fresh(applied, 5, datetime.fromisoformat(stored), applied.digest) == "duplicate"


# -- device keys -------------------------------------------------------------------------------------------


def test_derived_keys_are_deterministic_distinct_and_per_secret() -> None:
    assert pin_key(SECRET) == pin_key(bytes(SECRET))
    assert len(pin_key(SECRET)) == 32
    assert bytes(box_key(SECRET)) == bytes(box_key(SECRET))
    assert pin_key(SECRET) != bytes(box_key(SECRET))  # domain separation between the two uses
    assert pin_key(SECRET) != pin_key(OTHER_SECRET)
    assert device_public_key_b64(SECRET) != device_public_key_b64(OTHER_SECRET)
    assert base64.b64decode(DEVICE_KEY) == bytes(box_key(SECRET).public_key)
    assert isinstance(box_key(SECRET), PrivateKey)
    assert pin_key(SECRET + b"\x00" * 40) != pin_key(SECRET)  # longer secrets are fine and all of it counts


def test_hash_pin_differs_per_session_per_secret_and_per_pin() -> None:
    key = pin_key(SECRET)
    h = hash_pin(key, 3, ACTIVE_PIN)
    assert len(h) == 32 and h == hash_pin(key, 3, ACTIVE_PIN)
    assert h != hash_pin(key, 4, ACTIVE_PIN)
    assert h != hash_pin(pin_key(OTHER_SECRET), 3, ACTIVE_PIN)
    assert h != hash_pin(key, 3, "633912")
    assert hash_pin(key, 12, "345678") != hash_pin(key, 123, "45678")  # id and PIN cannot run together
    assert ACTIVE_PIN.encode() not in h


def test_pin_matches() -> None:
    key = pin_key(SECRET)
    stored = hash_pin(key, 3, ACTIVE_PIN)
    assert pin_matches(key, 3, ACTIVE_PIN, stored)
    assert not pin_matches(key, 3, "633912", stored)
    assert not pin_matches(key, 2, ACTIVE_PIN, stored)
    assert not pin_matches(pin_key(OTHER_SECRET), 3, ACTIVE_PIN, stored)
    assert not pin_matches(key, 3, "", stored)
    assert not pin_matches(key, 3, ACTIVE_PIN, stored[:16])


def test_short_secrets_are_refused_without_quoting_them() -> None:
    short = b"s3cr3t-" * 4 + b"xyz"  # 31 bytes
    for derive in (pin_key, box_key, device_public_key_b64):
        with pytest.raises(DeviceSecretError, match="31 bytes; at least 32") as info:
            derive(short)
        assert "s3cr3t" not in str(info.value)
    with pytest.raises(ValueError, match="PIN key must be 32 bytes"):
        hash_pin(b"short", 1, "1234")


def test_generate_secret_file_makes_a_0600_file_once(tmp_path: Path) -> None:
    path = tmp_path / "device.secret"
    old_umask = os.umask(0o777)  # even a umask that would leave the owner nothing
    try:
        generate_secret_file(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_bytes()
    assert len(secret) == 32 and read_secret_file(path) == secret
    with pytest.raises(FileExistsError):
        generate_secret_file(path)
    assert path.read_bytes() == secret  # never overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.secret"]  # no temporary file left
    generate_secret_file(tmp_path / "other.secret")
    assert (tmp_path / "other.secret").read_bytes() != secret


def test_read_secret_file_refuses_open_modes_and_short_files(tmp_path: Path) -> None:
    loose = tmp_path / "loose.secret"
    loose.write_bytes(SECRET)
    loose.chmod(0o644)
    with pytest.raises(DeviceSecretError, match="mode 0644"):
        read_secret_file(loose)
    short = tmp_path / "short.secret"
    short.write_bytes(SECRET[:16])
    short.chmod(0o600)
    with pytest.raises(DeviceSecretError, match="16 bytes; at least 32"):
        read_secret_file(short)
    with pytest.raises(DeviceSecretError, match="cannot be read"):
        read_secret_file(tmp_path / "missing")


# -- the cloud CLI -----------------------------------------------------------------------------------------


def cloud(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(CLOUD), *map(str, args)], capture_output=True, text=True, timeout=60
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def cloud_setup(tmp_path: Path) -> dict[str, Any]:
    """keygen, pubkey --create and a REEF-shaped sessions file, through the CLI."""
    public = cloud("keygen", "--out", tmp_path / "keys").stdout.strip()
    secret_file = tmp_path / "device.secret"
    device_key = cloud("pubkey", "--secret-file", secret_file, "--create").stdout.strip()
    sessions = tmp_path / "sessions.json"
    sessions.write_text(json.dumps({"managed_sessions": SESSIONS}, default=str))  # datetimes as text
    return {
        "public": public,
        "secret_file": secret_file,
        "device_key": device_key,
        "sign_args": [
            *("--signing-key", tmp_path / "keys" / "signing.key", "--device-key", device_key),
            *("--device", DEVICE, "--vin", VIN, "--version", "7", "--sessions", sessions),
        ],
        "keys": tmp_path / "keys",
    }


def test_cli_keygen_and_pubkey(cloud_setup: dict[str, Any]) -> None:
    keys: Path = cloud_setup["keys"]
    assert stat.S_IMODE((keys / "signing.key").stat().st_mode) == 0o600
    assert (keys / "signing.pub").read_text().strip() == cloud_setup["public"]
    seed = base64.b64decode((keys / "signing.key").read_text())
    assert base64.b64encode(bytes(SigningKey(seed).verify_key)).decode() == cloud_setup["public"]
    secret_file: Path = cloud_setup["secret_file"]
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert cloud_setup["device_key"] == device_public_key_b64(secret_file.read_bytes())
    again = cloud("pubkey", "--secret-file", secret_file, "--create").stdout.strip()
    assert again == cloud_setup["device_key"]  # --create keeps an existing secret
    refused = cloud("keygen", "--out", keys, check=False)
    assert refused.returncode == 1 and "not overwriting" in refused.stderr


def _open_with(cloud_setup: dict[str, Any], payload: bytes) -> SessionSet:
    secret = read_secret_file(cloud_setup["secret_file"])
    return open_session_set(
        payload,
        verify_keys=verify_keys_from_b64([cloud_setup["public"]]),
        box_key=box_key(secret),
        device=DEVICE,
        vin=VIN,
    )


def test_cli_sign_round_trips_to_the_device(cloud_setup: dict[str, Any]) -> None:
    proc = cloud("sign", *cloud_setup["sign_args"], "--issued-at", "2021-06-09T22:08:00Z")
    assert_no_pin(proc.stdout, proc.stderr)
    opened = _open_with(cloud_setup, proc.stdout.strip().encode())
    assert (opened.version, opened.issued_at) == (7, datetime(2021, 6, 9, 22, 8, tzinfo=UTC))
    assert [(g.id, g.active, g.pin) for g in opened.sessions] == [(2, False, None), (3, True, ACTIVE_PIN)]


def test_cli_sign_names_a_bad_session_without_a_traceback(
    cloud_setup: dict[str, Any], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**SESSIONS[0], "completion": "active", "pin": "98765x"}]))
    args = [*cloud_setup["sign_args"][:-1], bad]
    proc = cloud("sign", *args, check=False)
    assert proc.returncode == 1
    assert "sessions[0]" in proc.stderr and "needs a PIN" in proc.stderr
    assert "Traceback" not in proc.stderr and "98765x" not in proc.stderr


def test_cli_publish_leaves_a_retained_set_on_a_tls_broker(
    cloud_setup: dict[str, Any], tmp_path: Path
) -> None:
    tls = make_tls(tmp_path / "pki")
    topic = f"fleetgate/v1/{DEVICE}/down/sessions"
    with Mosquitto(tls=tls) as broker:
        connect = ("--host", "127.0.0.1", "--port", str(broker.port), "--tls-ca", tls.ca)
        proc = cloud(
            "publish", *cloud_setup["sign_args"], *connect, "--cert", tls.client_cert, "--key", tls.client_key
        )
        assert topic in proc.stderr
        # Subscribing only now: what arrives is the broker's retained copy, as a reconnecting device gets it.
        with Consumer("127.0.0.1", broker.port, topic, tls=tls) as consumer:
            (msg,) = consumer.wait_for(lambda msgs: len(msgs) >= 1, timeout=30)
    received_topic, payload, qos, retain, _ = msg
    assert (received_topic, qos, retain) == (topic, 1, True)
    opened = _open_with(cloud_setup, payload)
    assert opened.version == 7 and opened.sessions[1].pin == ACTIVE_PIN
