"""Fuzz suite, MQTT downlink edge: session-set messages into the device's real verifier and parser.

Cases covered (hypothesis, derandomized, about 10 s):

- raw payload bytes (noise, truncated and bit-flipped real messages);
- envelopes of every JSON shape with hostile member values (wrong types, huge and deep values, unicode);
- bodies *signed with the pinned key*, so the parser behind the signature is reached: a valid body with one
  member replaced by a hostile value (wrong type, 5,000-digit integer, 3,000-deep array, lone surrogate,
  control characters, out-of-range timestamps and ids, booleans for integers), random JSON documents, and
  valid bodies with sessions duplicated, dropped or shuffled.

And through a real broker to a running daemon (test_access_daemon's rig), 60 messages drawn with a fixed seed
from the same kinds (noise, the applied message cut short, forged, signed with hostile member types): each
refusal counted, the sessions and the accepted PIN unchanged, no traceback.

Asserted: ``open_session_set`` returns a ``SessionSet`` or raises ``SessionSetRejected`` with one of the
documented reasons, nothing else; ``check_fresh`` on an opened set does the same; every string of an accepted
set can be written into the acknowledgement and audit records (strict UTF-8 JSON), and every accepted PIN is
4-12 ASCII digits.

What it found: a signed set whose ``verification_id`` (or ``vin``, ``device``) was a lone surrogate (JSON
``"\ud800"``) or held control characters was accepted, and then failed when applied, because the
acknowledgement could not be encoded: a traceback at every redelivery of the retained message instead of a
counted refusal. Such strings are now ``malformed``. Nothing else in the verifier or parser.
"""

from __future__ import annotations

import base64
import copy
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as paho
import pytest
import test_access_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from paho.mqtt.enums import CallbackAPIVersion
from test_access_daemon import DEVICE as DAEMON_DEVICE
from test_access_daemon import PIN, session, sessions, synced_version, type_pin

from fleetgate.sync.crypto.scooter_command import SIGNING_PREFIX as COMMAND_PREFIX
from fleetgate.sync.crypto.scooter_command import (
    ScooterCommand,
    check_seq,
    open_command,
    seal_command,
)
from fleetgate.sync.crypto.session_set import (
    REASONS,
    SIGNING_PREFIX,
    SessionSet,
    SessionSetRejected,
    check_fresh,
    open_session_set,
    seal_session_set,
)
from fleetgate.sync.crypto.signed import SignedRejected, key_id

from conftest import wait_until

# The daemon-level case runs on test_access_daemon's rig: a real daemon, broker, keypad and relay.
rig = test_access_daemon.rig
pty_pairs = test_access_daemon.pty_pairs
DEVICE = "veh-fuzz"
VIN = "1D4PT4GKXBW600841"
SIGNER = SigningKey(bytes(range(32)))
BOX = PrivateKey(bytes(range(32, 64)))
DEVICE_PUBLIC = base64.b64encode(bytes(BOX.public_key)).decode()
FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def valid_payload() -> bytes:
    start = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    return seal_session_set(
        device=DEVICE,
        vin=VIN,
        version=7,
        issued_at=start + timedelta(hours=1),
        sessions=[
            {
                "id": 2,
                "verification_id": "c24gt2d8f41c9450911e7890",
                "initialization": start,
                "completion": start + timedelta(minutes=30),
            },
            {
                "id": 3,
                "verification_id": "60c252d8f41c9450911e8926",
                "initialization": start,
                "completion": "active",
                "pin": "739164",
                "expires": start + timedelta(days=1),
            },
        ],
        signing_key=SIGNER,
        device_public_key_b64=DEVICE_PUBLIC,
    )


VALID = valid_payload()
VALID_BODY: dict[str, Any] = json.loads(base64.b64decode(json.loads(VALID)["body"]))


def signed(body: bytes) -> bytes:
    """An envelope around ``body`` that verifies with the pinned key: the parser behind it is reached."""
    return json.dumps(
        {
            "v": 1,
            "alg": "ed25519",
            "key_id": key_id(SIGNER.verify_key),
            "body": base64.b64encode(body).decode(),
            "sig": base64.b64encode(SIGNER.sign(SIGNING_PREFIX + body).signature).decode(),
        }
    ).encode()


def check(payload: bytes) -> SessionSet | None:
    """Open the payload as the device does; fail on anything but a set or a documented refusal."""
    try:
        opened = open_session_set(
            payload, verify_keys=[SIGNER.verify_key], box_key=BOX, device=DEVICE, vin=VIN
        )
    except SessionSetRejected as exc:
        assert exc.reason in REASONS, exc.reason
        return None
    for last in ((None, None, None), (7, datetime(2026, 6, 1, 13, 0, tzinfo=UTC), b"\0" * 32)):
        try:
            check_fresh(opened, *last)
        except SessionSetRejected as exc:
            assert exc.reason in REASONS, exc.reason
    strings = [opened.device, opened.vin] + [g.verification_id for g in opened.sessions]
    json.dumps(strings, ensure_ascii=False).encode("utf-8")  # the ack and audit records can hold them
    for grant in opened.sessions:
        assert grant.pin is None or (
            grant.pin.isascii() and grant.pin.isdigit() and 4 <= len(grant.pin) <= 12
        )
    return opened


def to_json(document: Any) -> bytes:
    """JSON text as a hostile cloud could write it: HUGE becomes a 5,000-digit integer literal."""
    return json.dumps(document).replace(json.dumps(HUGE), "1" + "0" * 5000).encode()


def test_the_valid_message_opens():
    """The suite's baseline: its valid message is accepted, so rejections below are the inputs' doing."""
    opened = check(VALID)
    assert opened is not None and [g.id for g in opened.sessions] == [2, 3]
    assert check(signed(json.dumps(VALID_BODY).encode())) is not None


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused(noise):
    assert check(noise) is None


@FUZZ
@given(st.integers(0, len(VALID) - 1), st.integers(1, 255), st.booleans())
def test_a_flipped_or_cut_real_message_is_refused_or_unchanged(at, xor, cut):
    damaged = VALID[:at] if cut else VALID[:at] + bytes([VALID[at] ^ xor]) + VALID[at + 1 :]
    opened = check(damaged)
    if opened is not None:  # a flip in JSON whitespace or base64 padding can leave the same meaning
        assert opened.digest == check(VALID).digest  # type: ignore[union-attr]


HUGE = "__a 5000-digit integer__"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
hostile = (
    json_values
    | st.just("\ud800")
    | st.just("x\u0000y\u001b[2J")
    | st.just(HUGE)
    | st.just(-(2**63))
    | st.just(2**63)
    | st.just(True)
    | st.just("9999-12-31T23:59:59.999999Z")
    | st.just("0001-01-01T00:00:00Z")
    | st.just("2026-02-30T00:00:00Z")
    | st.just("a" * 5000)
)


@FUZZ
@given(st.sampled_from(sorted({"v", "alg", "key_id", "body", "sig"})), hostile)
def test_an_envelope_member_replaced_by_anything_is_refused(member, value):
    envelope = json.loads(VALID)
    envelope[member] = value
    assert (
        check(to_json(envelope)) is None or member == "key_id"
    )  # key_id is a hint, but a wrong one finds no key


def body_paths(body: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix] if prefix else []
    if isinstance(body, dict):
        for key, value in body.items():
            paths += body_paths(value, (*prefix, key))
    elif isinstance(body, list):
        for index, value in enumerate(body):
            paths += body_paths(value, (*prefix, index))
    return paths


PATHS = body_paths(VALID_BODY)


@FUZZ
@given(st.sampled_from(PATHS), hostile)
def test_a_signed_body_with_any_member_replaced_is_opened_or_refused_cleanly(path, value):
    body = copy.deepcopy(VALID_BODY)
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    check(signed(to_json(body)))


@FUZZ
@given(json_values)
def test_a_signed_body_of_any_json_shape_is_refused(document):
    assert check(signed(json.dumps(document).encode())) is None


@FUZZ
@given(st.integers(1, 3000), st.sampled_from(PATHS))
def test_deep_nesting_anywhere_in_a_signed_body_is_refused(levels, path):
    body = copy.deepcopy(VALID_BODY)
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = "__DEEP__"
    raw = json.dumps(body).replace('"__DEEP__"', "[" * levels + "]" * levels, 1)
    assert check(signed(raw.encode())) is None
    assert check(signed(("[" * levels + "]" * levels).encode())) is None


@FUZZ
@given(st.lists(st.sampled_from([0, 1]), max_size=6), st.randoms(use_true_random=False))
def test_sessions_duplicated_dropped_or_shuffled_are_opened_or_refused_cleanly(picks, rnd):
    body = copy.deepcopy(VALID_BODY)
    body["sessions"] = [copy.deepcopy(VALID_BODY["sessions"][i]) for i in picks]
    rnd.shuffle(body["sessions"])
    opened = check(signed(json.dumps(body).encode()))
    if len(set(picks)) != len(picks):
        assert opened is None  # a session id twice in one set


def test_a_lone_surrogate_or_control_character_in_a_string_is_malformed():
    """Guards against a set the parser accepts and the ack writer then cannot encode (found by this suite)."""
    for path, value in ((("sessions", 0, "verification_id"), "\ud800"), (("vin",), "1D4PT4GKX\u0000W600841")):
        body = copy.deepcopy(VALID_BODY)
        target = body
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        try:
            open_session_set(
                signed(to_json(body)), verify_keys=[SIGNER.verify_key], box_key=BOX, device=DEVICE, vin=VIN
            )
        except SessionSetRejected as exc:
            assert exc.reason == "malformed" and path[-1] in exc.detail
        else:
            raise AssertionError(f"{path} = {value!r} was accepted")


def hostile_payloads(cloud_key: SigningKey, device: str, applied: bytes, count: int) -> list[bytes]:
    """``count`` messages a running daemon must refuse, drawn with a fixed seed from the suite's generators:
    noise, the applied message damaged, forged (an unknown key), and bodies signed with the pinned key that
    carry a hostile value of the wrong type."""
    rnd = random.Random(11)
    forger = SigningKey(bytes(range(100, 132)))
    envelope = json.loads(applied)
    body = json.loads(base64.b64decode(envelope["body"]))
    wrong_types: list[Any] = [None, True, [], {}, "x" * 300, 1.5, [[[[[]]]]], -1]
    out = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            out.append(rnd.randbytes(rnd.randrange(0, 512)))
        elif kind == 1:
            cut = rnd.randrange(1, len(applied))
            out.append(applied[:cut])
        elif kind == 2:
            raw = json.dumps({**body, "version": body["version"] + 100 + index}).encode()
            sig = forger.sign(SIGNING_PREFIX + raw).signature
            out.append(json.dumps({**envelope, "key_id": key_id(forger.verify_key),
                                   "body": base64.b64encode(raw).decode(),
                                   "sig": base64.b64encode(sig).decode()}).encode())  # fmt: skip
        else:
            hostile_body = copy.deepcopy(body)
            member = rnd.choice(["device", "vin", "version", "issued_at", "sessions"])
            hostile_body[member] = rnd.choice(
                [v for v in wrong_types if not isinstance(v, type(body[member]))]
            )
            raw = json.dumps(hostile_body).encode()
            sig = cloud_key.sign(SIGNING_PREFIX + raw).signature
            out.append(json.dumps({**envelope, "body": base64.b64encode(raw).decode(),
                                   "sig": base64.b64encode(sig).decode()}).encode())  # fmt: skip
    return out


def test_a_running_daemon_counts_every_hostile_downlink_message_and_keeps_its_sessions(rig):
    """Through a real broker to a real daemon: each refusal counted, the sessions and the PIN unchanged, the
    daemon answering, no traceback."""
    applied = rig.cloud.sign([session(3)])
    rig.cloud.publish(applied)
    wait_until("set applied", lambda: synced_version(rig.daemon) == 1)
    before = sessions(rig.daemon)
    refused_before = sum(before["downlink"]["rejected"].values())
    payloads = hostile_payloads(rig.cloud.key, DAEMON_DEVICE, applied, 60)
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", rig.broker.port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(f"fleetgate/v1/{DAEMON_DEVICE}/down/sessions", payload, qos=1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()
    wait_until(
        "every message refused and counted",
        lambda: sum(sessions(rig.daemon)["downlink"]["rejected"].values()) - refused_before == len(payloads),
        timeout=60,
    )
    after = sessions(rig.daemon)
    assert after["sessions"] == before["sessions"] and after["sync"]["mqtt_version"] == 1
    assert type_pin(rig.keypad, PIN) == b"G\n"
    assert "Traceback" not in rig.daemon.log


# -- scooter commands: the same envelope, another prefix and body --------------------------------------------

COMMAND_DEVICE = "depot-fuzz"
COMMAND_REASONS = frozenset(
    {"malformed", "unsupported-version", "unsigned", "unknown-key", "bad-signature", "wrong-device"}
)
VALID_COMMAND = seal_command(
    device=COMMAND_DEVICE,
    seq=42,
    command_id="cmd-7f3a",
    iot_code="861477038719116",
    op="speed-mode",
    params={"speedMode": 2},
    issued_at=datetime(2026, 12, 4, 10, 0, tzinfo=UTC),
    expires=datetime(2026, 12, 4, 10, 5, tzinfo=UTC),
    signing_key=SIGNER,
)
VALID_COMMAND_BODY: dict[str, Any] = json.loads(base64.b64decode(json.loads(VALID_COMMAND)["body"]))
COMMAND_MEMBERS = sorted(VALID_COMMAND_BODY)


def signed_command(body: bytes) -> bytes:
    """A command envelope around ``body`` that verifies with the pinned key: the body parser is reached."""
    return json.dumps(
        {
            "v": 1,
            "alg": "ed25519",
            "key_id": key_id(SIGNER.verify_key),
            "body": base64.b64encode(body).decode(),
            "sig": base64.b64encode(SIGNER.sign(COMMAND_PREFIX + body).signature).decode(),
        }
    ).encode()


def check_command(payload: bytes) -> ScooterCommand | None:
    """Open the payload as the depot does: a command or a documented refusal, never another exception."""
    try:
        command = open_command(payload, verify_keys=[SIGNER.verify_key], device=COMMAND_DEVICE)
    except SignedRejected as exc:
        assert exc.reason in COMMAND_REASONS, exc.reason
        return None
    assert isinstance(command, ScooterCommand)
    assert command.device == COMMAND_DEVICE and 1 <= command.seq <= 2**63 - 1
    assert isinstance(command.params, dict)
    # The acceptance record (CommandDownlink._accept) can hold its strings and its issued_at.
    accepted = [command.id, command.iot_code, command.op, command.issued_at.astimezone(UTC).isoformat()]
    json.dumps(accepted, ensure_ascii=False).encode("utf-8")
    for last in (None, 41, 42, 2**63 - 1):
        try:
            check_seq(command, last)
        except SignedRejected as exc:
            assert exc.reason == "older-seq"
    return command


def test_the_valid_command_opens():
    command = check_command(VALID_COMMAND)
    assert command is not None and command.seq == 42
    assert check_command(signed_command(json.dumps(VALID_COMMAND_BODY).encode())) == command


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_are_not_a_command(noise):
    assert check_command(noise) is None


@FUZZ
@given(st.integers(0, len(VALID_COMMAND) - 1), st.integers(1, 255), st.booleans())
def test_a_flipped_or_cut_command_is_refused_or_unchanged(at, xor, cut):
    damaged = (
        VALID_COMMAND[:at]
        if cut
        else VALID_COMMAND[:at] + bytes([VALID_COMMAND[at] ^ xor]) + VALID_COMMAND[at + 1 :]
    )
    command = check_command(damaged)
    if command is not None:  # a flip in JSON whitespace or base64 padding can leave the same meaning
        assert command == check_command(VALID_COMMAND)


@FUZZ
@given(st.sampled_from(sorted({"v", "alg", "key_id", "body", "sig"})), hostile)
def test_a_command_envelope_member_replaced_by_anything_is_refused(member, value):
    envelope = json.loads(VALID_COMMAND)
    envelope[member] = value
    assert check_command(to_json(envelope)) is None or member == "key_id"


@FUZZ
@given(st.sampled_from(COMMAND_MEMBERS), hostile)
def test_a_signed_command_with_any_member_replaced_is_opened_or_refused_cleanly(member, value):
    body = {**VALID_COMMAND_BODY, member: value}
    command = check_command(signed_command(to_json(body)))
    if command is not None and member == "seq":
        assert command.seq == value


@FUZZ
@given(st.sampled_from(COMMAND_MEMBERS), st.booleans())
def test_a_signed_command_with_a_member_dropped_or_unknown_is_opened_or_refused_cleanly(member, add):
    body = (
        {**VALID_COMMAND_BODY, f"x-{member}": 1}
        if add
        else {k: v for k, v in VALID_COMMAND_BODY.items() if k != member}
    )
    command = check_command(signed_command(json.dumps(body).encode()))
    if add or member not in ("expires", "params"):
        assert command is None


@FUZZ
@given(json_values)
def test_a_signed_command_body_of_any_json_shape_is_refused(document):
    assert check_command(signed_command(json.dumps(document).encode())) is None


@FUZZ
@given(st.integers(1, 3000), st.sampled_from(COMMAND_MEMBERS))
def test_deep_nesting_in_a_signed_command_member_is_refused(levels, member):
    raw = json.dumps({**VALID_COMMAND_BODY, member: "__DEEP__"}).replace(
        '"__DEEP__"', "[" * levels + "]" * levels, 1
    )
    assert check_command(signed_command(raw.encode())) is None


@FUZZ
@given(st.sampled_from(COMMAND_MEMBERS), hostile)
def test_a_session_set_key_use_never_opens_as_a_command(member, value):
    """The same body signed under the session-set prefix: refused as bad-signature whatever it holds."""
    raw = to_json({**VALID_COMMAND_BODY, member: value})
    forged = json.loads(signed_command(raw))
    forged["sig"] = base64.b64encode(SIGNER.sign(SIGNING_PREFIX + raw).signature).decode()
    with pytest.raises(SignedRejected) as info:
        open_command(json.dumps(forged).encode(), verify_keys=[SIGNER.verify_key], device=COMMAND_DEVICE)
    assert info.value.reason == "bad-signature"
