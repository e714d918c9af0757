"""The fleetgate BLE lock profile (docs/ble-profile.md), central side, as pure protocol: framing and its CRC,
the MAC, the advertisement, one command against a scripted in-memory link, and hypothesis fuzzing of what a
peripheral may notify. CRC and MAC are checked against independent implementations (binascii, hmac here);
the end-to-end path through bleak and the simulated scooter is tests/test_ble_manager.py's.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetgate.drivers.ble.fleetgate_profile import (
    COMMAND_UUID,
    EVENT_UUID,
    OPS,
    SERVICE_UUID,
    BadFrame,
    FleetgateProfile,
    Frame,
    auth_mac,
    build_frame,
    crc16,
    parse_frame,
)
from fleetgate.drivers.ble.profile import (
    Advertisement,
    BleAnswer,
    BleProtocolError,
    BleUnreachable,
    BleUnsupported,
)

KEY = "AB12cd34"
IOT = "861234567890123"
NONCE = bytes.fromhex("0001020304050607")
ADDRESS = "C4:64:E3:11:22:33"


def crc(data: bytes) -> int:
    return binascii.crc_hqx(data, 0xFFFF)  # the stdlib's CRC-CCITT, initial value 0xFFFF: CCITT-FALSE


def frame(ftype: int, seq: int, payload: bytes) -> bytes:
    """An independent frame builder: the spec's layout, the stdlib's CRC."""
    body = bytes([ftype, seq, len(payload)]) + payload
    return b"\xa5" + body + crc(body).to_bytes(2, "big")


def mac(key: str, iot: str, nonce: bytes, op: int, seq: int) -> bytes:
    msg = b"fleetgate-ble/v1" + iot.encode() + nonce + bytes([op, seq])
    return hmac.new(key.encode(), msg, hashlib.sha256).digest()[:8]


Responder = Callable[[bytes], Iterable[bytes]]


class FakeLink:
    """An in-memory GattLink: each write is recorded and answered by ``responder`` with notifications.
    Silence is a BleProtocolError at once (no real waiting); ``drop_after`` writes, the link is gone."""

    def __init__(self, responder: Responder, address: str = ADDRESS, drop_after: int | None = None) -> None:
        self.address = address
        self.responder = responder
        self.writes: list[tuple[str, bytes]] = []
        self.inbox: list[bytes] = []
        self.drop_after = drop_after
        self.waits: list[float] = []

    async def write(self, char_uuid: str, data: bytes) -> None:
        if self.drop_after is not None and len(self.writes) >= self.drop_after:
            raise BleUnreachable("gone")
        self.writes.append((char_uuid, bytes(data)))
        self.inbox.extend(self.responder(bytes(data)))

    async def notification(self, char_uuid: str, timeout_s: float) -> bytes:
        assert char_uuid == EVENT_UUID
        self.waits.append(timeout_s)
        await asyncio.sleep(0)
        if not self.inbox:
            raise BleProtocolError("no notification")
        return self.inbox.pop(0)


def scooter(key: str = KEY, iot: str = IOT, status: int = 0, state: int = 0x01) -> Responder:
    """An honest scooter of the spec, written here from the document."""
    nonces: dict[int, bytes] = {}

    def respond(data: bytes) -> list[bytes]:
        ftype, seq, op = data[1], data[2], data[4]
        if ftype == 0x01:
            nonces[seq] = NONCE
            return [frame(0x02, seq, NONCE)]
        good = data[5:13] == mac(key, iot, nonces.pop(seq, b""), op, seq)
        return [frame(0x04, seq, bytes([op, status if good else 0x01, state]))]

    return respond


def run(link: FakeLink, op: str = "unlock", profile: FleetgateProfile | None = None, **kw) -> BleAnswer:
    profile = profile or FleetgateProfile(first_seq=7)
    return asyncio.run(profile.run(link, kw.get("iot", IOT), kw.get("key", KEY), op, kw.get("timeout", 0.5)))


# -- framing -------------------------------------------------------------------------------------------


def test_crc_check_value() -> None:
    assert crc16(b"123456789") == 0x29B1
    assert crc16(b"") == 0xFFFF


@given(st.binary(max_size=300))
def test_crc_matches_the_stdlib(data: bytes) -> None:
    assert crc16(data) == crc(data)


def test_test_vector() -> None:
    """docs/ble-profile.md "Test vector": key AB12cd34, iotCode 861234567890123, nonce 0001020304050607,
    unlock, seq 7; the document's literal values, also checked against the independent helpers above."""
    hello = bytes.fromhex("a5 01 07 01 01 54 f4")
    challenge = bytes.fromhex("a5 02 07 08 00 01 02 03 04 05 06 07 67 0a")
    the_mac = bytes.fromhex("20 e9 41 5e e4 30 21 0d")
    auth = bytes.fromhex("a5 03 07 09 01 20 e9 41 5e e4 30 21 0d b4 5f")
    result = bytes.fromhex("a5 04 07 03 01 00 00 c3 89")
    error = bytes.fromhex("a5 7f 07 01 05 f4 5f")
    assert build_frame(0x01, 7, b"\x01") == hello == frame(0x01, 7, b"\x01")
    assert build_frame(0x02, 7, NONCE) == challenge == frame(0x02, 7, NONCE)
    assert auth_mac(KEY.encode(), IOT.encode(), NONCE, 0x01, 7) == the_mac == mac(KEY, IOT, NONCE, 1, 7)
    assert build_frame(0x03, 7, b"\x01" + the_mac) == auth == frame(0x03, 7, b"\x01" + the_mac)
    assert (
        parse_frame(result) == Frame(0x04, 7, b"\x01\x00\x00")
        and build_frame(0x04, 7, b"\x01\x00\x00") == result
    )
    assert parse_frame(error) == Frame(0x7F, 7, b"\x05") and build_frame(0x7F, 7, b"\x05") == error

    replies = {hello: [challenge], auth: [result]}
    link = FakeLink(lambda written: replies.get(written, []))
    answer = run(link)
    assert link.writes == [(COMMAND_UUID, hello), (COMMAND_UUID, auth)]
    assert answer == BleAnswer(
        ok=True, status="ok", retryable=False, state={"locked": False, "rental": False}
    )

    answer = run(FakeLink(lambda written: [error]))
    assert (answer.ok, answer.status, answer.retryable, answer.state) == (False, "bad-frame", True, {})


def test_frame_round_trip() -> None:
    data = build_frame(0x04, 255, b"\x02\x00\x03")
    assert data[:4] == b"\xa5\x04\xff\x03" and len(data) == 9
    assert parse_frame(data) == Frame(0x04, 255, b"\x02\x00\x03")
    assert parse_frame(bytearray(data)) == Frame(0x04, 255, b"\x02\x00\x03")
    assert parse_frame(frame(0x42, 1, b"")) == Frame(0x42, 1, b"")  # an unknown type parses; run() refuses it


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "shorter"),
        (b"\xa5\x04\x01", "shorter"),
        (b"\x5a" + frame(0x04, 1, b"\x01\x00\x00")[1:], "start byte"),
        (frame(0x04, 1, b"\x01\x00\x00") + b"\x00", "length"),
        (frame(0x04, 1, b"\x01\x00\x00")[:-3] + frame(0x04, 1, b"\x01\x00\x00")[-2:], "length"),
        (frame(0x04, 1, b"\x01\x00\x00")[:-1] + b"\x00", "CRC"),
        (frame(0x04, 1, b"\x01\x00\x01")[:-2] + frame(0x04, 1, b"\x01\x00\x00")[-2:], "CRC"),
        (frame(0x02, 1, b"\x00" * 7), "payload"),
        (frame(0x04, 1, b"\x01\x00"), "payload"),
        (frame(0x7F, 1, b""), "payload"),
    ],
)
def test_bad_frames_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(BadFrame, match=why):
        parse_frame(data)
    assert issubclass(BadFrame, BleProtocolError)


def test_build_frame_refuses_out_of_range_fields() -> None:
    for args in ((256, 0, b""), (1, 256, b""), (1, 0, bytes(256))):
        with pytest.raises(ValueError):
            build_frame(*args)


@given(st.binary(max_size=64))
def test_parse_any_bytes_gives_a_frame_or_bad_frame(data: bytes) -> None:
    try:
        parsed = parse_frame(data)
    except BadFrame:
        return
    assert build_frame(parsed.type, parsed.seq, parsed.payload) == data


# -- advertisement ---------------------------------------------------------------------------------------


def adv(manufacturer_data: dict[int, bytes]) -> Advertisement:
    return Advertisement(ADDRESS, "x", -60, manufacturer_data, (SERVICE_UUID,))


def test_identify() -> None:
    profile = FleetgateProfile()
    assert profile.identify(adv({0xFFFF: b"FG\x01" + IOT.encode()})) == IOT
    assert profile.identify(adv({0xFFFF: b"FG\x01abcDEF"})) == "abcDEF"
    assert profile.identify(adv({0xFFFF: b"FG\x01" + b"7" * 32})) == "7" * 32
    for other in ({}, {0x0969: b"FG\x01" + IOT.encode()}, {0xFFFF: b""}, {0xFFFF: b"XY\x01123456"}):
        assert profile.identify(adv(other)) is None
    assert profile.counters["bad_adverts"] == 0
    for bad in (b"FG\x02" + IOT.encode(), b"FG\x01abc12", b"FG\x01" + b"7" * 33, b"FG\x01123 456", b"FG"):
        assert profile.identify(adv({0xFFFF: bad})) is None
    assert profile.identify(adv({0xFFFF: b"FG\x01\xff\xfe\xfd\xfc\xfb\xfa"})) is None
    assert profile.counters["bad_adverts"] == 6


@given(st.binary(max_size=40))
def test_identify_any_manufacturer_data(data: bytes) -> None:
    iot = FleetgateProfile().identify(adv({0xFFFF: data}))
    assert iot is None or (data == b"FG\x01" + iot.encode() and iot.isascii() and iot.isalnum())


# -- one command -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "word", "retryable", "key_rejected"),
    [
        (0x00, "ok", False, False),
        (0x01, "auth-failed", True, True),
        (0x02, "unsupported", False, False),
        (0x03, "busy", True, False),
        (0x04, "refused", False, False),
        (0x05, "bad-frame", True, False),
        (0x06, "internal-error", True, False),
    ],
)
def test_result_status(status: int, word: str, retryable: bool, key_rejected: bool) -> None:
    answer = run(FakeLink(scooter(status=status, state=0x02)), "lock")
    assert (answer.ok, answer.status, answer.retryable, answer.key_rejected) == (
        status == 0,
        word,
        retryable,
        key_rejected,
    )
    assert answer.state == {"locked": False, "rental": True}


def test_every_operation_has_its_code() -> None:
    assert OPS == {
        "unlock": 1,
        "lock": 2,
        "start-rental": 3,
        "end-rental": 4,
        "saddle": 5,
        "tailbox": 6,
        "battery-cover": 7,
    }
    assert FleetgateProfile.operations == frozenset(OPS)
    for op, code in OPS.items():
        link = FakeLink(scooter())
        assert run(link, op).ok
        assert [w[1][4] for w in link.writes] == [code, code]


def test_a_wrong_key_is_key_rejected() -> None:
    answer = run(FakeLink(scooter(key="zz99ZZ99")))
    assert (answer.ok, answer.status, answer.key_rejected) == (False, "auth-failed", True)


def test_a_wrong_iot_code_fails_authentication() -> None:
    assert run(FakeLink(scooter(iot="861234567890124"))).status == "auth-failed"


def test_unsupported_op_writes_nothing() -> None:
    link = FakeLink(scooter())
    with pytest.raises(BleUnsupported):
        run(link, "horn")
    assert link.writes == []


def test_result_instead_of_challenge() -> None:
    def unsupported(data: bytes) -> list[bytes]:
        return [frame(0x04, data[2], bytes([data[4], 0x02, 0x01]))]

    link = FakeLink(unsupported)
    answer = run(link, "saddle")
    assert (answer.ok, answer.status, answer.retryable) == (False, "unsupported", False)
    assert len(link.writes) == 1  # no AUTH

    def done_without_auth(data: bytes) -> list[bytes]:
        return [frame(0x04, data[2], bytes([data[4], 0x00, 0x00]))]

    profile = FleetgateProfile(first_seq=1)
    with pytest.raises(BleProtocolError, match="before AUTH"):
        run(FakeLink(done_without_auth), profile=profile)
    assert profile.counters["bad_answers"] == 1


@pytest.mark.parametrize("status", [0x05, 0x03, 0x01])
def test_error_frames_are_answers(status: int) -> None:
    answer = run(FakeLink(lambda d: [frame(0x7F, d[2], bytes([status]))]))
    assert not answer.ok and answer.state == {}
    assert answer.status == {5: "bad-frame", 3: "busy", 1: "auth-failed"}[status]


@pytest.mark.parametrize(
    "reply",
    [
        lambda d: [frame(0x7F, d[2], b"\x00")],  # ERROR "done"
        lambda d: [frame(0x7F, d[2], b"\x99")],  # unknown status
        lambda d: [frame(0x04, d[2], bytes([d[4], 0x42, 0x00]))],  # RESULT with an unknown status
        lambda d: [frame(0x01, d[2], b"\x01")],  # its own HELLO echoed
        lambda d: [frame(0x42, d[2], b"")],  # an unknown type
    ],
)
def test_answers_that_make_no_sense_are_protocol_errors(reply: Responder) -> None:
    profile = FleetgateProfile(first_seq=3)
    with pytest.raises(BleProtocolError):
        run(FakeLink(reply), profile=profile)
    assert profile.counters["bad_answers"] == 1


def test_result_for_another_op_is_a_protocol_error() -> None:
    honest = scooter()

    def other_op(data: bytes) -> list[bytes]:
        answers = list(honest(data))
        if data[1] == 0x03:
            return [frame(0x04, data[2], b"\x02\x00\x01")]
        return answers

    with pytest.raises(BleProtocolError, match="op 0x02"):
        run(FakeLink(other_op))


def test_a_challenge_after_auth_is_a_protocol_error() -> None:
    with pytest.raises(BleProtocolError, match="type 0x02"):
        run(FakeLink(lambda d: [frame(0x02, d[2], NONCE)]))


def test_stale_and_garbled_answers_are_ignored_and_counted() -> None:
    honest = scooter()

    def noisy(data: bytes) -> list[bytes]:
        seq = data[2]
        noise = [
            frame(0x04, (seq - 1) % 256, bytes([data[4], 0x00, 0x00])),  # an earlier exchange's answer
            b"\xa5\x02",  # cut short
            frame(0x02, seq, NONCE)[:-1] + b"\x00",  # bad CRC
            b"\x00" * 20,
            frame(0x02, seq, NONCE[:4]),  # a short nonce
        ]
        return noise + list(honest(data))

    profile = FleetgateProfile(first_seq=0)
    answer = run(FakeLink(noisy), profile=profile)
    assert answer.ok
    assert profile.counters["stale"] == 2
    assert profile.counters["bad_frames"] == 8


def test_silence_is_a_protocol_error_and_counted() -> None:
    profile = FleetgateProfile()
    with pytest.raises(BleProtocolError):
        run(FakeLink(lambda d: []), profile=profile)
    assert profile.counters["timeouts"] == 1

    only_challenge = scooter()
    with pytest.raises(BleProtocolError):
        run(FakeLink(lambda d: only_challenge(d) if d[1] == 1 else []), profile=profile)
    assert profile.counters["timeouts"] == 2


def test_noise_does_not_extend_the_wait() -> None:
    """A peripheral that only ever notifies garbage: every wait is for what is left of one deadline."""

    class Flood(FakeLink):
        async def notification(self, char_uuid: str, timeout_s: float) -> bytes:
            self.waits.append(timeout_s)
            await asyncio.sleep(0.01)
            return b"\xa5garbage"

    link = Flood(lambda d: [])
    with pytest.raises(BleProtocolError, match="no answer"):
        run(link, timeout=0.1)
    assert link.waits == sorted(link.waits, reverse=True) and link.waits[0] <= 0.1


def test_a_dropped_link_is_unreachable() -> None:
    with pytest.raises(BleUnreachable):
        run(FakeLink(scooter(), drop_after=1))


def test_seq_per_address_increments_and_wraps() -> None:
    profile = FleetgateProfile(first_seq=254)
    a, b = FakeLink(scooter()), FakeLink(scooter(), address="AA:BB:CC:DD:EE:FF")
    for _ in range(3):
        assert run(a, profile=profile).ok
    assert run(b, profile=profile).ok
    assert [w[1][2] for w in a.writes] == [254, 254, 255, 255, 0, 0]
    assert [w[1][2] for w in b.writes] == [254, 254]
    assert FleetgateProfile().next_seq(ADDRESS) in range(256)  # random start


def test_a_key_that_is_not_ascii_is_refused_without_showing_it() -> None:
    link = FakeLink(scooter())
    with pytest.raises(BleProtocolError) as refused:
        run(link, key="AB12cd3é")
    assert "cd3" not in str(refused.value)
    assert link.writes == []


def test_the_key_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fleetgate")
    garbled = scooter(key="zz99ZZ99")
    run(FakeLink(lambda d: [b"junk", *garbled(d)]))
    assert caplog.records  # the debug lines are there ...
    for record in caplog.records:
        assert KEY not in record.getMessage() and KEY not in str(record.__dict__)  # ... and no key in them


# -- fuzzing ---------------------------------------------------------------------------------------------

_any_frame = st.builds(
    lambda ftype, seq_delta, payload: (ftype, seq_delta, payload),
    st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x7F, 0x00, 0x42, 0xFF]),
    st.sampled_from([0, 0, 0, 1, 255, 128]),
    st.one_of(
        st.binary(max_size=12),
        st.binary(min_size=8, max_size=8),
        st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(0, 255)).map(bytes),
        st.integers(0, 8).map(lambda s: bytes([s])),
    ),
)
_notification = st.one_of(st.binary(max_size=30), _any_frame)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_notification, max_size=6), min_size=1, max_size=3))
def test_any_notifications_give_an_answer_or_a_protocol_error(batches: list[list]) -> None:
    """Whatever a peripheral notifies in answer to each write (bytes, or frames of any type for this or
    another seq), run() returns a BleAnswer or raises BleProtocolError: nothing else escapes."""
    pending = list(batches)

    def respond(data: bytes) -> list[bytes]:
        out = []
        for item in pending.pop(0) if pending else []:
            if isinstance(item, tuple):
                ftype, delta, payload = item
                item = frame(ftype, (data[2] + delta) % 256, payload)
            out.append(item)
        return out

    profile = FleetgateProfile()
    try:
        answer = run(FakeLink(respond), profile=profile)
    except BleProtocolError:
        return
    assert isinstance(answer, BleAnswer)
    assert answer.status in {
        "ok",
        "auth-failed",
        "unsupported",
        "busy",
        "refused",
        "bad-frame",
        "internal-error",
    }
    assert set(answer.state) <= {"locked", "rental"}
