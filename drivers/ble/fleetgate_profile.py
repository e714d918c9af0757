"""The ``fleetgate`` BLE lock profile, central side (docs/ble-profile.md).

One command is two exchanges on the command characteristic, answered by notifications on the event one:
``HELLO(op)`` → ``CHALLENGE(nonce)``, then ``AUTH(op, mac)`` → ``RESULT(op, status, state)``, all with one
``seq``. Whatever the scooter sends is untrusted: a frame that does not parse is counted and ignored, so is an
answer to another ``seq`` (stale, from an exchange that timed out); the wait for each step is bounded by one
deadline however much noise arrives. The key is used for the MAC only: it is never logged nor put in an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import re
from dataclasses import dataclass

from fleetgate.drivers.ble.profile import (
    Advertisement,
    BleAnswer,
    BleProtocolError,
    BleUnsupported,
    GattLink,
)

log = logging.getLogger(__name__)

SERVICE_UUID = "f1ee7001-5e9a-4c1b-9a07-6a7c0de0b1e0"
COMMAND_UUID = "f1ee7002-5e9a-4c1b-9a07-6a7c0de0b1e0"  # write (with response)
EVENT_UUID = "f1ee7003-5e9a-4c1b-9a07-6a7c0de0b1e0"  # notify

COMPANY_ID = 0xFFFF  # the SIG's value for testing
ADV_PREFIX = b"FG\x01"  # "FG", profile version 1, then the iotCode
_IOT_CODE = re.compile(rb"[0-9A-Za-z]{6,32}")  # as config.segway's IOT_CODE_PATTERN

START = 0xA5
HELLO, CHALLENGE, AUTH, RESULT, ERROR = 0x01, 0x02, 0x03, 0x04, 0x7F
HEADER_LEN = 4  # start, type, seq, len
FRAME_OVERHEAD = HEADER_LEN + 2  # and the CRC
PAYLOAD_LEN = {HELLO: 1, CHALLENGE: 8, AUTH: 9, RESULT: 3, ERROR: 1}
NONCE_LEN = 8
MAC_LEN = 8
MAC_LABEL = b"fleetgate-ble/v1"

OPS: dict[str, int] = {
    "unlock": 0x01,
    "lock": 0x02,
    "start-rental": 0x03,
    "end-rental": 0x04,
    "saddle": 0x05,
    "tailbox": 0x06,
    "battery-cover": 0x07,
}

# status byte -> (the profile's word, retryable); auth-failed is retryable once the key is fetched again
STATUS: dict[int, tuple[str, bool]] = {
    0x00: ("ok", False),
    0x01: ("auth-failed", True),
    0x02: ("unsupported", False),
    0x03: ("busy", True),
    0x04: ("refused", False),
    0x05: ("bad-frame", True),
    0x06: ("internal-error", True),
}
STATE_LOCKED = 0x01
STATE_RENTAL = 0x02


class BadFrame(BleProtocolError):
    """Bytes that are not a frame of this profile (start byte, length, CRC or payload size wrong)."""


@dataclass(frozen=True)
class Frame:
    type: int
    seq: int
    payload: bytes


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: polynomial 0x1021, initial 0xFFFF, not reflected, no final XOR."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def build_frame(frame_type: int, seq: int, payload: bytes = b"") -> bytes:
    if not (0 <= frame_type <= 0xFF and 0 <= seq <= 0xFF and len(payload) <= 0xFF):
        raise ValueError("frame field out of range")
    body = bytes((frame_type, seq, len(payload))) + payload
    return bytes((START,)) + body + crc16(body).to_bytes(2, "big")


def parse_frame(data: bytes) -> Frame:
    """A frame from the wire; ``BadFrame`` if its framing, CRC or (for a known type) payload size is wrong."""
    data = bytes(data)
    if len(data) < FRAME_OVERHEAD:
        raise BadFrame(f"{len(data)} bytes: shorter than a frame")
    if data[0] != START:
        raise BadFrame(f"start byte 0x{data[0]:02x}")
    frame_type, seq, length = data[1], data[2], data[3]
    if len(data) != FRAME_OVERHEAD + length:
        raise BadFrame(f"length {length} in a frame of {len(data)} bytes")
    if crc16(data[1:-2]) != int.from_bytes(data[-2:], "big"):
        raise BadFrame("CRC mismatch")
    expected = PAYLOAD_LEN.get(frame_type)
    if expected is not None and length != expected:
        raise BadFrame(f"type 0x{frame_type:02x} with a payload of {length} bytes")
    return Frame(frame_type, seq, data[HEADER_LEN:-2])


def auth_mac(key: bytes, iot_code: bytes, nonce: bytes, op: int, seq: int) -> bytes:
    """HMAC-SHA256(key, "fleetgate-ble/v1" || iotCode || nonce || op || seq), first 8 bytes."""
    message = MAC_LABEL + iot_code + nonce + bytes((op, seq))
    return hmac.new(key, message, hashlib.sha256).digest()[:MAC_LEN]


def decode_state(state: int) -> dict[str, bool]:
    return {"locked": bool(state & STATE_LOCKED), "rental": bool(state & STATE_RENTAL)}


def answer_for(status: int, state: int | None = None) -> BleAnswer:
    """The ``BleAnswer`` of a status byte (``state`` None: an ERROR frame, which carries none)."""
    try:
        word, retryable = STATUS[status]
    except KeyError:
        raise BleProtocolError(f"unknown status 0x{status:02x}") from None
    return BleAnswer(
        ok=status == 0x00,
        status=word,
        retryable=retryable,
        key_rejected=word == "auth-failed",
        state=decode_state(state) if state is not None else {},
    )


class FleetgateProfile:
    """The profile of docs/ble-profile.md. ``counters`` counts what the scooters sent that was not taken."""

    name = "fleetgate"
    service_uuid = SERVICE_UUID
    notify_uuids = (EVENT_UUID,)
    operations = frozenset(OPS)

    def __init__(self, first_seq: int | None = None) -> None:
        self._first_seq = first_seq  # None: random per address (tests pin it)
        self._seq: dict[str, int] = {}
        self.counters: dict[str, int] = {
            "bad_frames": 0,  # notifications that are no frame
            "stale": 0,  # frames answering another seq
            "timeouts": 0,  # steps that got no answer in time
            "bad_answers": 0,  # frames of the right seq that make no sense (-> BleProtocolError)
            "bad_adverts": 0,  # "FG" manufacturer data that is not this profile's
        }

    def identify(self, adv: Advertisement) -> str | None:
        data = adv.manufacturer_data.get(COMPANY_ID)
        if not isinstance(data, bytes | bytearray) or not data.startswith(b"FG"):
            return None
        if data.startswith(ADV_PREFIX) and _IOT_CODE.fullmatch(data, len(ADV_PREFIX)):
            return bytes(data[len(ADV_PREFIX) :]).decode("ascii")
        self.counters["bad_adverts"] += 1  # another version, or a bad iotCode
        return None

    def next_seq(self, address: str) -> int:
        previous = self._seq.get(address)
        if previous is None:
            seq = self._first_seq if self._first_seq is not None else random.randrange(256)
        else:
            seq = (previous + 1) % 256
        self._seq[address] = seq
        return seq

    async def run(self, link: GattLink, iot_code: str, key: str, op: str, timeout_s: float) -> BleAnswer:
        code = OPS.get(op)
        if code is None:
            raise BleUnsupported(f"no operation {op!r} in the {self.name} profile")
        try:
            key_bytes, iot_bytes = key.encode("ascii"), iot_code.encode("ascii")
        except (AttributeError, UnicodeEncodeError):
            raise BleProtocolError("the key or iotCode is not ASCII") from None
        seq = self.next_seq(link.address)
        log.debug("ble command", extra={"address": link.address, "op": op, "seq": seq})

        await link.write(COMMAND_UUID, build_frame(HELLO, seq, bytes((code,))))
        frame = await self._answer(link, seq, (CHALLENGE, RESULT), timeout_s)
        if frame.type != CHALLENGE:
            answer = self._result(frame, code)
            if answer.ok:  # "done" without authentication is not an answer this profile has
                raise self._bad("RESULT ok before AUTH")
            return answer

        mac = auth_mac(key_bytes, iot_bytes, frame.payload, code, seq)
        await link.write(COMMAND_UUID, build_frame(AUTH, seq, bytes((code,)) + mac))
        return self._result(await self._answer(link, seq, (RESULT,), timeout_s), code)

    async def _answer(self, link: GattLink, seq: int, wanted: tuple[int, ...], timeout_s: float) -> Frame:
        """The next valid frame of ``seq`` (wanted, or ERROR); noise is counted, not waited for longer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.counters["timeouts"] += 1
                raise BleProtocolError(f"no answer to seq {seq} within {timeout_s} s")
            try:
                data = await link.notification(EVENT_UUID, remaining)
            except BleProtocolError:
                self.counters["timeouts"] += 1
                raise
            try:
                frame = parse_frame(data)
            except BadFrame as exc:
                self.counters["bad_frames"] += 1
                log.debug("ble bad frame", extra={"address": link.address, "error": str(exc)})
                continue
            if frame.seq != seq:
                self.counters["stale"] += 1
                continue
            if frame.type in wanted or frame.type == ERROR:
                return frame
            raise self._bad(f"unexpected frame type 0x{frame.type:02x}")

    def _result(self, frame: Frame, code: int) -> BleAnswer:
        try:
            if frame.type == ERROR:
                if frame.payload[0] == 0x00:
                    raise BleProtocolError("ERROR frame with status done")
                return answer_for(frame.payload[0])
            op, status, state = frame.payload
            if op != code:
                raise BleProtocolError(f"RESULT for op 0x{op:02x}, asked 0x{code:02x}")
            return answer_for(status, state)
        except BleProtocolError as exc:
            raise self._bad(str(exc)) from None

    def _bad(self, why: str) -> BleProtocolError:
        self.counters["bad_answers"] += 1
        return BleProtocolError(why)
