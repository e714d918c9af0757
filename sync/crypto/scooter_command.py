"""A command the cloud sends a depot gateway for one scooter: signed, numbered, optionally with an expiry.

Topic ``fleetgate/v1/{device}/down/scooter-commands``, QoS 1, **not** retained (a command runs once). The
payload is the signed envelope of ``signed.py`` with the prefix ``b"fleetgate/scooter-commands/v1\\n"``; the
body is compact JSON::

    {"device": "depot-0001", "seq": 42, "id": "cmd-7f3a", "issued_at": "2026-12-04T10:00:00Z",
     "expires": "2026-12-04T10:05:00Z", "iot_code": "861477038719116", "op": "unlock", "params": {}}

- ``seq``: integer 1 .. 2**63-1, raised by the cloud with every command to this device. A command whose
  ``seq`` is not above the last one accepted is refused (``older-seq``): a captured command cannot be
  replayed, and this holds with no trusted clock. The broker keeps MQTT order per topic, so a cloud that
  numbers commands as it publishes them never sees a live command refused.
- ``id``: the cloud's handle (1-64 printable characters), echoed in the command's result.
- ``issued_at`` / ``expires``: UTC ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``; ``expires`` optional. A command whose
  expiry has passed is not run (the feature reports it ``expired``); judged only on a trusted clock.
- ``iot_code``: the scooter (Segway's ``iotCode``); ``op``: an operation name of ``sync.segway.operations``
  (``unlock``, ``lock``, ``speed-mode`` ...) and ``params`` its parameters with the seed's names
  (``{"speedMode": 2}``). Both are checked by the depot feature, which knows the catalogue.
- ``via`` (optional): ``"auto"`` (the default: BLE when the scooter is in range and its key cached, else the
  cloud), ``"ble"`` or ``"cloud"``.

Refusals (``SignedRejected.reason``): those of the envelope, ``malformed`` for the body, ``wrong-device``,
``older-seq``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nacl.signing import SigningKey, VerifyKey

from fleetgate.sync.crypto.signed import (
    SignedRejected,
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

SIGNING_PREFIX = b"fleetgate/scooter-commands/v1\n"
MAX_SEQ = 2**63 - 1
_BODY_KEYS = frozenset({"device", "seq", "id", "issued_at", "expires", "iot_code", "op", "params", "via"})
VIA = ("auto", "ble", "cloud")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z", re.ASCII)
_IOT_CODE = re.compile(r"[0-9A-Za-z]{6,32}", re.ASCII)
_OP = re.compile(r"[a-z][a-z-]{0,39}", re.ASCII)


@dataclass(frozen=True, slots=True)
class ScooterCommand:
    device: str
    seq: int
    id: str
    issued_at: datetime
    expires: datetime | None
    iot_code: str
    op: str
    params: dict[str, Any]
    key_id: str
    via: str = "auto"


def open_command(payload: bytes, *, verify_keys: Sequence[VerifyKey], device: str) -> ScooterCommand:
    """Verify and parse a command for ``device``; ``SignedRejected`` otherwise. Freshness: ``check_seq``."""
    body, kid = open_signed(payload, prefix=SIGNING_PREFIX, verify_keys=verify_keys)
    obj = load_json(body, "body")
    if not isinstance(obj, dict):
        malformed("body", f"must be a JSON object, not {json_type(obj)}")
    no_unknown(obj, _BODY_KEYS, "")
    target = _text(obj, "device", 64)
    if target != device:
        raise SignedRejected(
            "wrong-device", f"the command is for device {quote(target)}, this is {quote(device)}"
        )
    seq = require(obj, "seq", "")
    if not is_int(seq) or not 1 <= seq <= MAX_SEQ:
        malformed("seq", f"must be an integer 1 .. 2**63-1, not {json_type(seq)}")
    command_id = _text(obj, "id", 64)
    issued_at = _timestamp(obj, "issued_at")
    expires = None if obj.get("expires") is None else _timestamp(obj, "expires")
    iot_code = _text(obj, "iot_code", 32)
    if not _IOT_CODE.fullmatch(iot_code):
        malformed("iot_code", "must be 6-32 letters and digits (Segway's iotCode)")
    op = _text(obj, "op", 40)
    if not _OP.fullmatch(op):
        malformed("op", "must be an operation name such as 'unlock' or 'speed-mode'")
    params = obj.get("params", {})
    if not isinstance(params, dict):
        malformed("params", f"must be an object, not {json_type(params)}")
    _printable_strings(params, "params")
    via = obj.get("via", "auto")
    if via not in VIA:
        malformed("via", f"must be one of {', '.join(VIA)}")
    return ScooterCommand(target, seq, command_id, issued_at, expires, iot_code, op, params, kid, via)


def check_seq(command: ScooterCommand, last_seq: int | None) -> None:
    """Refuse a command not numbered above the last one accepted (``older-seq``)."""
    if last_seq is not None and command.seq <= last_seq:
        raise SignedRejected(
            "older-seq", f"seq {command.seq} is not above {last_seq}, the last command accepted (a replay?)"
        )


def seal_command(
    *,
    device: str,
    seq: int,
    command_id: str,
    iot_code: str,
    op: str,
    params: dict[str, Any] | None = None,
    issued_at: datetime,
    expires: datetime | None = None,
    via: str | None = None,
    signing_key: SigningKey,
) -> bytes:
    """The cloud side: the signed payload of one command (checked with the device's own parser)."""
    body_obj: dict[str, Any] = {
        "device": device,
        "seq": seq,
        "id": command_id,
        "issued_at": _format(issued_at),
        "iot_code": iot_code,
        "op": op,
        "params": params or {},
    }
    if expires is not None:
        body_obj["expires"] = _format(expires)
    if via is not None:
        body_obj["via"] = via
    body = json.dumps(body_obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    payload = seal_signed(body, prefix=SIGNING_PREFIX, signing_key=signing_key)
    try:
        open_command(payload, verify_keys=[signing_key.verify_key], device=device)
    except SignedRejected as exc:
        raise ValueError(exc.detail) from None
    return payload


def _text(obj: dict[str, Any], name: str, max_len: int) -> str:
    value = require(obj, name, "")
    if not isinstance(value, str):
        malformed(name, f"must be a string, not {json_type(value)}")
    if not 1 <= len(value) <= max_len or not value.isprintable():
        malformed(name, f"must be 1-{max_len} printable characters")
    return value


def _printable_strings(value: Any, where: str, depth: int = 0) -> None:
    """Every name and string in ``params`` printable: a lone surrogate (JSON "\\ud800") could not be written into
    the command's result record, and a control character has no business in a Segway parameter."""
    if depth > 8:
        malformed(where, "is nested too deep")
    if isinstance(value, str) and not value.isprintable():
        malformed(where, "must be printable Unicode text (no control characters or lone surrogates)")
    if isinstance(value, dict):
        for name, item in value.items():
            if not name.isprintable():
                malformed(where, "has a member name that is not printable text")
            _printable_strings(item, f"{where}.{name[:40]}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _printable_strings(item, f"{where}[{i}]", depth + 1)


def _timestamp(obj: dict[str, Any], name: str) -> datetime:
    value = require(obj, name, "")
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        malformed(name, "must be a UTC timestamp YYYY-MM-DDTHH:MM:SS[.ffffff]Z")
    try:
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)
    except ValueError:
        malformed(name, "is not a valid date and time")


def _format(moment: datetime) -> str:
    utc = moment.astimezone(UTC) if moment.tzinfo else moment
    return utc.replace(tzinfo=None).isoformat(timespec="microseconds" if utc.microsecond else "seconds") + "Z"
