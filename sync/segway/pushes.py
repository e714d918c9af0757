"""Typed decoding of a push Segway has signed (``push.verify`` first): the seed's field names, typed values.

Why typed here, not downstream: a record in the outbox outlives this process and is read by the cloud; a
latitude of "abc" or 91 is refused now (``PushInvalid``, the receiver answers 400) rather than stored as a
fact. The seed's names are kept as they are (``powerPercent``, ``remainingRange`` ...) with its units
(``lockVoltage`` 412 is 4.12 V, ``odometer`` in m, ``remainingRange`` in 10 m): renaming would only add a
mapping for everyone to learn.

Rules, with the seed's quirks:

- ``iotCode`` is required (1-64 printable ASCII characters: it goes into records and log lines).
- Every known field is optional (the seed's examples leave some out) and an empty value is ``None`` (no
  reading, e.g. a location without a fix); a present value must parse and be in range, or ``PushInvalid``
  names the field (never the value). Booleans are "true"/"false" in any letter case; integers are decimal
  without a point; doubles are decimal with an optional exponent, finite.
- A parameter this module does not know for the push's kind is kept as the string received: Segway adds
  fields, and they are signed like the rest.
- status: the table says ``remainingRange``, the example sends ``remainderRange``; both are read, each under
  the name received.
- alert: the table lists ``alertStatus`` but the example sends only ``code``; both are read when present.
- fault: ``code`` is kept as a string (the IoT box's are "E0".."E9"), normalised to the table's form when
  Appendix 2 knows it, which also adds ``fault``: {"system", "description"}.
- components: ``type`` (1 saddle, 2 tailbox, 4 helmet check) and ``status`` (1 unlock, 2 lock) are integers,
  any value (the example sends ``status=0``; new components may come).
- ``at`` is ``statusUtcTime`` (``gpsUtcTime`` for a location) in seconds: the seed's timestamps are seconds
  (1591067719), but its answers' ``t`` is in milliseconds, so a value of 10^11 or more (past the year 5000 in
  seconds) is taken as milliseconds. The field itself keeps the value received.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fleetgate.sync.segway.faults import decode as decode_fault

KINDS = {
    "/v2/vehicle/alert": "alert",
    "/v2/vehicle/fault": "fault",
    "/v2/vehicle/location": "location",
    "/v2/vehicle/status": "status",
    "/v2/vehicle/components": "components",
}
EVENT = "event"
TELEMETRY = "telemetry"
PRIORITY = {"alert": EVENT, "fault": EVENT, "components": EVENT, "location": TELEMETRY, "status": TELEMETRY}
MILLISECONDS_FROM = 10**11

_INT = re.compile(r"[+-]?[0-9]{1,18}")
_DOUBLE = re.compile(r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,3})?")
_IOT_CODE = re.compile(r"[\x21-\x7e]{1,64}")
_FAULT_CODE = re.compile(r"[A-Za-z0-9]{1,16}")


class PushInvalid(ValueError):
    """A signed push whose known field does not hold what the seed says it holds; ``field`` names it."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field


@dataclass(frozen=True)
class Push:
    kind: str  # one of KINDS' values
    iot_code: str
    platform_code: str
    at: int | None  # seconds since the epoch, from statusUtcTime / gpsUtcTime
    fields: dict[str, Any]  # everything else but the signature, typed where known, by the seed's names
    priority: str  # "event" or "telemetry", for the outbox


def _integer(lo: int = 0, hi: int = 2**63 - 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not _INT.fullmatch(text):
            raise ValueError("not an integer")
        value = int(text)
        if not lo <= value <= hi:
            raise ValueError(f"out of range {lo}..{hi}")
        return value

    return parse


def _double(lo: float = -math.inf, hi: float = math.inf) -> Callable[[str], float]:
    def parse(text: str) -> float:
        if not _DOUBLE.fullmatch(text):
            raise ValueError("not a number")
        value = float(text)
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"out of range {lo}..{hi}")
        return value

    return parse


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false"):
        raise ValueError('not "true" or "false"')
    return lowered == "true"


def _location_status(text: str) -> str:
    lowered = text.lower()
    if lowered not in ("valid", "invalid"):
        raise ValueError('not "valid" or "invalid"')
    return lowered


def _fault_code(text: str) -> str:
    stripped = text.strip()
    if not _FAULT_CODE.fullmatch(stripped):
        raise ValueError("not a fault code")
    known = decode_fault(stripped)
    return known.code if known else stripped.upper()


_TIME = _integer(0)
_COUNT = _integer(0)
_FIELDS: dict[str, dict[str, Callable[[str], Any]]] = {
    "alert": {"statusUtcTime": _TIME, "alertStatus": _integer(0, 1), "code": _COUNT},
    "fault": {"statusUtcTime": _TIME, "faultStatus": _integer(0, 1), "code": _fault_code},
    "location": {
        "locationStatus": _location_status,
        "latitude": _double(-90, 90),
        "longitude": _double(-180, 180),
        "satelliteNumber": _COUNT,
        "hdop": _double(0),
        "altitude": _double(),
        "gpsUtcTime": _TIME,
    },
    "status": {
        "online": _boolean,
        "locked": _boolean,
        "lockVoltage": _COUNT,
        "networkSignal": _COUNT,
        "charging": _boolean,
        "powerPercent": _integer(0, 100),
        "speedMode": _COUNT,
        "speed": _double(0),
        "odometer": _COUNT,
        "remainingRange": _COUNT,
        "remainderRange": _COUNT,
        "totalRidingSecs": _COUNT,
        "statusUtcTime": _TIME,
    },
    "components": {"type": _COUNT, "status": _COUNT, "statusUtcTime": _TIME},
}
_NOT_FIELDS = ("iotCode", "platformCode", "signature")


def decode_push(kind: str, params: Mapping[str, str]) -> Push:
    """The typed push of ``kind`` (a value of ``KINDS``) from its verified form parameters."""
    known = _FIELDS.get(kind)
    if known is None:
        raise PushInvalid("kind", "not a Segway push kind")
    iot_code = params.get("iotCode", "")
    if not _IOT_CODE.fullmatch(iot_code):
        raise PushInvalid("iotCode", "missing or not 1-64 printable ASCII characters")
    fields: dict[str, Any] = {}
    for name, text in params.items():
        if name in _NOT_FIELDS:
            continue
        parse = known.get(name)
        if parse is None:
            fields[name] = text
            continue
        try:
            fields[name] = None if text == "" else parse(text)
        except ValueError as exc:
            raise PushInvalid(name, str(exc)) from None
    if kind == "fault" and fields.get("code") is not None:
        fault = decode_fault(fields["code"])
        if fault is not None:
            fields["fault"] = {"system": fault.system, "description": fault.description}
    at = fields.get("gpsUtcTime" if kind == "location" else "statusUtcTime")
    if isinstance(at, int) and at >= MILLISECONDS_FROM:
        at //= 1000
    return Push(kind, iot_code, params.get("platformCode", ""), at, fields, PRIORITY[kind])


def record_body(push: Push) -> dict[str, Any]:
    """The outbox record's JSON body: iot_code, kind, at, then the push's fields (a field that Segway might
    one day call ``kind`` or ``at`` does not replace ours)."""
    body: dict[str, Any] = {"iot_code": push.iot_code, "kind": push.kind, "at": push.at}
    for name, value in push.fields.items():
        body.setdefault(name, value)
    return body


def dedup_key(path: str, params: Mapping[str, str]) -> str:
    """A digest of the path and every parameter, signature included: Segway's retry (once, after 5 s) is the
    same content, while two pushes that differ in anything, even a timestamp, are two events."""
    canonical = json.dumps([path, sorted(params.items())], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
