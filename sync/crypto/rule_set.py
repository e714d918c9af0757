"""The signed edge-rule set (``down/rules``): verify, check the envelope's body, and (cloud side) seal one.

The message is the signed envelope of ``signed.py`` with the prefix ``fleetgate/rules/v1\\n``, so no session-set
or command signature can pass for a rule set. The body (compact UTF-8 JSON)::

    {"device": "veh-0042", "version": 3, "issued_at": "2026-12-07T10:00:00Z", "rules": [ ...rules... ],
     "odometer": {"reading": 15000, "unit": "km"}, "odometerTriggers": [{"id", "type", "threshold", "unit"}]}

(``odometer`` and ``odometerTriggers`` optional: the seed's odometer reading and distance triggers.)

``rules`` is the whole set for the device, each rule as docs/mqtt.md describes (checked field by field by the
daemon: daemon/rules/definitions.py). Versions only go up (``judge_fresh``): an older version, the same
version with another body or a higher one issued earlier is refused; the retained message again is a
duplicate.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nacl.signing import SigningKey, VerifyKey

from fleetgate.sync.crypto.signed import (
    SignedRejected,
    format_timestamp,
    is_int,
    json_type,
    load_json,
    malformed,
    no_unknown,
    open_signed,
    quote,
    require,
    seal_signed,
)

SIGNING_PREFIX = b"fleetgate/rules/v1\n"
MAX_INT = 2**63 - 1
_BODY_KEYS = frozenset({"device", "version", "issued_at", "rules", "odometer", "odometerTriggers"})
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z", re.ASCII)


@dataclass(frozen=True)
class RuleSet:
    device: str
    version: int
    issued_at: datetime
    rules: list[Any]  # as received; the daemon checks each rule
    odometer: Any  # an odometer reading to anchor the estimate on, as received (None: none)
    odometer_triggers: Any  # distance triggers, as received (None: none)
    digest: bytes  # sha256 of the body: the same version again is a duplicate only with the same bytes
    key_id: str


def open_rule_set(payload: bytes, *, verify_keys: Sequence[VerifyKey], device: str) -> RuleSet:
    """A verified rule set for ``device``; ``SignedRejected`` (``malformed``, ``unsigned``, ``bad-signature``,
    ``wrong-device`` ...) otherwise. Freshness is the caller's (``signed.judge_fresh``)."""
    body, kid = open_signed(payload, prefix=SIGNING_PREFIX, verify_keys=verify_keys)
    obj = load_json(body, "body")
    if not isinstance(obj, dict):
        malformed("body", f"must be a JSON object, not {json_type(obj)}")
    no_unknown(obj, _BODY_KEYS, "")
    set_device = require(obj, "device", "")
    if not isinstance(set_device, str):
        malformed("device", f"must be a string, not {json_type(set_device)}")
    if set_device != device:
        raise SignedRejected(
            "wrong-device", f"the set is for device {quote(set_device)}, this is {quote(device)}"
        )
    version = require(obj, "version", "")
    if not is_int(version) or not 1 <= version <= MAX_INT:
        malformed("version", "must be an integer between 1 and 2**63-1")
    issued = require(obj, "issued_at", "")
    if not isinstance(issued, str) or not _TIMESTAMP.fullmatch(issued):
        malformed("issued_at", "must be a UTC timestamp YYYY-MM-DDTHH:MM:SS[.ffffff]Z")
    try:
        issued_at = datetime.fromisoformat(issued[:-1]).replace(tzinfo=UTC)
    except ValueError:
        malformed("issued_at", "is not a valid date and time")
    rules = require(obj, "rules", "")
    if not isinstance(rules, list):
        malformed("rules", f"must be an array, not {json_type(rules)}")
    return RuleSet(
        set_device, version, issued_at, rules, obj.get("odometer"), obj.get("odometerTriggers"),
        hashlib.sha256(body).digest(), kid,
    )  # fmt: skip


def seal_rule_set(
    *,
    device: str,
    version: int,
    issued_at: datetime,
    rules: list[Any],
    signing_key: SigningKey,
    odometer: Any = None,
    odometer_triggers: Any = None,
) -> bytes:
    """The cloud's side (tools/sim/cloud.py, tests): a signed rule-set message."""
    obj: dict[str, Any] = {
        "device": device,
        "version": version,
        "issued_at": format_timestamp(issued_at),
        "rules": rules,
    }
    if odometer is not None:
        obj["odometer"] = odometer
    if odometer_triggers is not None:
        obj["odometerTriggers"] = odometer_triggers
    body = json.dumps(obj, separators=(",", ":")).encode()
    return seal_signed(body, prefix=SIGNING_PREFIX, signing_key=signing_key)
