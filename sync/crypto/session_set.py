"""The session set the cloud publishes to a vehicle: signed, with every PIN sealed to the device.

Topic ``fleetgate/v1/{device}/down/sessions`` (``Topics.downlink("sessions")``), retained, QoS 1. The
message is the vehicle's whole set of managed sessions (REEF's ``id``, ``verification_id``,
``initialization``, ``completion``), not a delta, so the newest retained message is all a device needs.
The broker redelivers it on every reconnect: an identical message is a duplicate, not an attack.

Wire format (version 1)
-----------------------

The payload is UTF-8 JSON, an object with exactly these members::

    {"v": 1, "alg": "ed25519", "key_id": "9f86d081884c7d65",
     "body": "<standard base64 of the body bytes>", "sig": "<standard base64 of the 64-byte signature>"}

- ``key_id``: 16 lowercase hex digits, the first 8 bytes of the signer's Ed25519 public key. A hint that
  picks the pinned key(s) to try; it is not trusted for anything else.
- ``sig``: Ed25519 over ``b"fleetgate/sessions/v1\\n" + body_bytes``. The prefix separates this use of the
  key from any other, so a signature the same key made for something else cannot be replayed here. The
  exact body bytes are signed, so there is no JSON canonicalisation to agree on.

The body is JSON (the cloud writes it compact and ASCII; the device accepts any valid UTF-8 JSON)::

    {"device": "veh-0042", "vin": "1D4PT4GKXBW600841", "version": 17,
     "issued_at": "2021-06-09T22:07:40.000123Z",
     "sessions": [
       {"id": 2, "verification_id": "c24gt2d8f41c9450911e7890",
        "initialization": "2021-06-09T22:07:26.955043Z", "completion": "2021-06-09T22:07:39.099169Z"},
       {"id": 3, "verification_id": "60c252d8f41c9450911e8926",
        "initialization": "2021-06-09T22:07:39.113810Z", "completion": "active",
        "expires": "2021-06-10T22:07:39Z", "pin_sealed": "<base64, 52-60 bytes>"}]}

- ``device``: the gateway's device id; a set for another device is refused.
- ``vin``: the vehicle's VIN (the caller compares it with its own, pass ``vin=`` to have it checked here).
- ``version``: integer 1 .. 2**63-1, raised by the cloud with every new message; never reused. PINs are
  sealed afresh (randomised) each time, so re-sealing an unchanged set is a new message: raise the version,
  or republish the very same bytes.
- ``issued_at`` and every timestamp: UTC, ``YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z`` (REEF's naive UTC
  ``2021-06-09 22:07:39.113810`` becomes ``2021-06-09T22:07:39.113810Z``).
- a session: ``id`` integer 0 .. 2**63-1, unique in the set; ``verification_id`` a string of 1-256
  characters; ``completion`` a timestamp (ended; not before ``initialization``) or ``"active"``;
  ``expires`` optional, timestamp or null, a hard end the device enforces when its clock is trusted;
  ``pin_sealed`` required for an active session, optional for an ended one (the cloud omits it): the PIN
  (4-12 ASCII digits) as a libsodium sealed box (``crypto_box_seal``, ``nacl.public.SealedBox``) to the
  device's X25519 public key (``device_keys.device_public_key_b64``), standard base64. The broker keeps the
  retained message on disk, so it must never see a PIN in clear.
- Unknown members, duplicate member names, NaN/Infinity and booleans where integers belong are refused: a
  change of format is a new ``v`` (and a new signing prefix).

Checks, in order, and the reason a refusal carries (``SessionSetRejected.reason``, usable as a counter name)
----------------------------------------------------------------------------------------------------------

``open_session_set`` (content and authenticity):

======================== ==================================================================================
``malformed``            not UTF-8 JSON, not an object, a member missing / unknown / of the wrong type or
                         value, bad base64, a sealed value that is not a PIN; ``detail`` names the field
                         (``sessions[2].completion``) and never quotes a PIN
``unsupported-version``  ``v`` is not 1 or ``alg`` is not ``ed25519``
``unsigned``             ``sig`` missing, null or empty
``unknown-key``          ``key_id`` matches none of the pinned keys
``bad-signature``        the signature is not 64 bytes or does not verify with the pinned key(s)
``wrong-device``         ``body.device`` is not this device
``wrong-vehicle``        ``body.vin`` is not this vehicle (only when ``vin=`` is passed)
``unsealable-pin``       a ``pin_sealed`` that this device's key does not open (sealed to another device)
======================== ==================================================================================

Envelope checks (``v``, ``alg``, ``sig``, ``key_id``, signature) come before the body is parsed at all;
body fields are checked in the order device, vin, version, issued_at, sessions.

``check_fresh`` (against the last applied set):

======================== ==================================================================================
``older-version``        ``version`` lower than the last applied (an old set, replayed or late)
``replayed``             the same ``version`` with a different body
``issued-earlier``       a higher ``version`` whose ``issued_at`` is before the last applied one's
======================== ==================================================================================

and otherwise ``"duplicate"`` (same version, same body digest: the retained message again) or ``"apply"``.

The cloud side is ``seal_session_set`` (``tools/sim/cloud.py`` wraps it as a command).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NoReturn, get_args

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from fleetgate.sync.crypto.signed import (
    SignedRejected,
    b64,
    format_timestamp,
    is_int,
    json_type,
    judge_fresh,
    load_json,
    no_unknown,
    open_signed,
    quote,
    require,
    seal_signed,
)

SIGNING_PREFIX = b"fleetgate/sessions/v1\n"
ACTIVE = "active"
SEAL_OVERHEAD = 48  # crypto_box_seal: 32-byte ephemeral public key + 16-byte MAC
MAX_INT = 2**63 - 1  # ids and versions fit SQLite's INTEGER
MAX_VERIFICATION_ID = 256

Reason = Literal[
    "malformed",
    "unsupported-version",
    "unsigned",
    "unknown-key",
    "bad-signature",
    "wrong-device",
    "wrong-vehicle",
    "unsealable-pin",
    "older-version",
    "replayed",
    "issued-earlier",
]
REASONS: frozenset[str] = frozenset(get_args(Reason))

_BODY_KEYS = frozenset({"device", "vin", "version", "issued_at", "sessions"})
_SESSION_REQUIRED = frozenset({"id", "verification_id", "initialization", "completion"})
_SESSION_KEYS = _SESSION_REQUIRED | {"expires", "pin_sealed"}
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z", re.ASCII)
_PIN = re.compile(r"[0-9]{4,12}", re.ASCII)


class SessionSetRejected(SignedRejected):
    """A session-set message refused. ``reason``: one of ``REASONS``; ``detail``: what was wrong, for logs.

    ``detail`` names the field and never holds a PIN, a key or a sealed value.
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(reason, detail)
        self.reason: Reason = reason


@dataclass(frozen=True, slots=True)
class SessionGrant:
    """One managed session of a set. Times are aware UTC datetimes; ``completion`` None means active."""

    id: int
    verification_id: str
    initialization: datetime
    completion: datetime | None
    expires: datetime | None
    pin: str | None = field(default=None, repr=False)  # unsealed; None for ended sessions

    @property
    def active(self) -> bool:
        return self.completion is None


@dataclass(frozen=True, slots=True)
class SessionSet:
    """An opened, verified session set. ``digest`` is SHA-256 of the signed body bytes (duplicate detection);
    ``key_id`` says which pinned key signed it (useful during a key rotation)."""

    device: str
    vin: str
    version: int
    issued_at: datetime
    sessions: tuple[SessionGrant, ...]
    digest: bytes
    key_id: str


# -- device side ---------------------------------------------------------------------------------------------


def open_session_set(
    payload: bytes,
    *,
    verify_keys: Sequence[VerifyKey],
    box_key: PrivateKey,
    device: str,
    vin: str | None = None,
) -> SessionSet:
    """Verify and open a session-set message for ``device`` (and ``vin``, if given).

    Returns the set with every active session's PIN unsealed; raises ``SessionSetRejected`` otherwise.
    It does not judge freshness: pass the result to ``check_fresh``.
    """
    try:
        body, kid = open_signed(payload, prefix=SIGNING_PREFIX, verify_keys=verify_keys)
        fields = _parse_body(body, device=device, vin=vin, opener=SealedBox(box_key))
    except SessionSetRejected:
        raise
    except SignedRejected as exc:
        raise SessionSetRejected(exc.reason, exc.detail) from None  # type: ignore[arg-type]
    return SessionSet(*fields, digest=hashlib.sha256(body).digest(), key_id=kid)


def check_fresh(
    new: SessionSet,
    last_version: int | None,
    last_issued_at: datetime | None,
    last_digest: bytes | None,
) -> Literal["apply", "duplicate"]:
    """Judge an opened set against the last applied one (all None if none was applied yet).

    ``"duplicate"``: the very set applied last (the retained message redelivered on reconnect); it confirms
    the device is in sync but changes nothing. ``"apply"``: newer. Otherwise ``SessionSetRejected`` with
    ``older-version``, ``replayed`` or ``issued-earlier``. Only the last set's digest is kept, so an
    older version is ``older-version`` whether or not its bytes are exactly a set applied before.
    A naive ``last_issued_at`` is taken as UTC.
    """
    last = None if last_version is None else (last_version, last_issued_at, last_digest)
    try:
        return judge_fresh(new.version, new.issued_at, new.digest, last)
    except SignedRejected as exc:
        raise SessionSetRejected(exc.reason, exc.detail) from None  # type: ignore[arg-type]


# -- cloud side ----------------------------------------------------------------------------------------------


def seal_session_set(
    *,
    device: str,
    vin: str,
    version: int,
    issued_at: datetime,
    sessions: Sequence[dict[str, Any]],
    signing_key: SigningKey,
    device_public_key_b64: str,
) -> bytes:
    """Build the signed message (payload bytes) for ``device``.

    ``sessions``: dicts as REEF returns them — ``id``, ``verification_id``, ``initialization``,
    ``completion`` (a timestamp, or ``"active"``/None), ``pin`` (plain; required while active), and
    optionally ``vin`` (must equal ``vin``) and ``expires``. Timestamps may be datetimes (naive = UTC),
    REEF's ``"2021-06-09 22:07:39.113810"`` (UTC) or ISO 8601 with ``Z`` or an offset. PINs of ended
    sessions are not sent. Raises ``ValueError`` (never quoting a PIN) for anything the device would refuse.

    Sealing is randomised (a fresh ephemeral key per PIN), so sealing the same sessions twice gives other
    bytes: a device that applied the first refuses the second as ``replayed`` under the same version.
    Republish the exact payload, or raise the version.
    """
    try:
        raw_key = base64.b64decode(device_public_key_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("device public key is not base64") from None
    if len(raw_key) != 32:
        raise ValueError(f"device public key is {len(raw_key)} bytes; an X25519 public key is 32")
    sealer = SealedBox(PublicKey(raw_key))
    out = []
    for i, session in enumerate(sessions):
        if not isinstance(session, dict):
            raise ValueError(f"sessions[{i}]: must be a dict, not {type(session).__name__}")
        where = f"sessions[{i}] (id {session.get('id')!r})"
        unknown = set(session) - {*_SESSION_REQUIRED, "expires", "pin", "vin"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        missing = _SESSION_REQUIRED - set(session)
        if missing:
            raise ValueError(f"{where}: missing {', '.join(sorted(missing))}")
        if "vin" in session and session["vin"] != vin:
            raise ValueError(f"{where}: is for VIN {session['vin']!r}, the set for {vin!r}")
        completion = session["completion"]
        active = completion is None or completion == ACTIVE
        item: dict[str, Any] = {
            "id": session["id"],
            "verification_id": session["verification_id"],
            "initialization": _wire_timestamp(session["initialization"], f"{where}.initialization"),
            "completion": ACTIVE if active else _wire_timestamp(completion, f"{where}.completion"),
        }
        if session.get("expires") is not None:
            item["expires"] = _wire_timestamp(session["expires"], f"{where}.expires")
        if active:
            pin = session.get("pin")
            if not isinstance(pin, str) or not _PIN.fullmatch(pin):
                raise ValueError(f"{where}.pin: an active session needs a PIN of 4-12 ASCII digits")
            item["pin_sealed"] = base64.b64encode(sealer.encrypt(pin.encode("ascii"))).decode("ascii")
        out.append(item)
    body_obj = {
        "device": device,
        "vin": vin,
        "version": version,
        "issued_at": _wire_timestamp(issued_at, "issued_at"),
        "sessions": out,
    }
    body = json.dumps(body_obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    try:  # the device's own parser, so the cloud never publishes what devices refuse
        _parse_body(body, device=None, vin=None, opener=None)
    except SignedRejected as exc:
        raise ValueError(exc.detail) from None
    return seal_signed(body, prefix=SIGNING_PREFIX, signing_key=signing_key)


# -- parsing -------------------------------------------------------------------------------------------------


def _parse_body(
    body: bytes, *, device: str | None, vin: str | None, opener: SealedBox[PrivateKey] | None
) -> tuple[str, str, int, datetime, tuple[SessionGrant, ...]]:
    """Check the body's shape; with ``device``/``vin`` compare them; with ``opener`` unseal the PINs."""
    obj = load_json(body, "body")
    if not isinstance(obj, dict):
        _malformed("body", f"must be a JSON object, not {json_type(obj)}")
    set_device = _string(obj, "device", "")
    if device is not None and set_device != device:
        raise SessionSetRejected(
            "wrong-device", f"the set is for device {quote(set_device)}, this is {quote(device)}"
        )
    set_vin = _string(obj, "vin", "")
    if vin is not None and set_vin != vin:
        raise SessionSetRejected(
            "wrong-vehicle", f"the set is for VIN {quote(set_vin)}, this is {quote(vin)}"
        )
    version = _integer(obj, "version", "", minimum=1)
    issued_at = _timestamp(obj, "issued_at", "")
    no_unknown(obj, _BODY_KEYS, "")
    raw_sessions = require(obj, "sessions", "")
    if not isinstance(raw_sessions, list):
        _malformed("sessions", f"must be an array, not {json_type(raw_sessions)}")
    grants = []
    seen: set[int] = set()
    for i, raw in enumerate(raw_sessions):
        grant = _parse_session(raw, f"sessions[{i}].", opener)
        if grant.id in seen:
            _malformed(f"sessions[{i}].id", f"session {grant.id} appears more than once")
        seen.add(grant.id)
        grants.append(grant)
    return set_device, set_vin, version, issued_at, tuple(grants)


def _parse_session(raw: Any, at: str, opener: SealedBox[PrivateKey] | None) -> SessionGrant:
    if not isinstance(raw, dict):
        _malformed(at.rstrip("."), f"must be an object, not {json_type(raw)}")
    no_unknown(raw, _SESSION_KEYS, at)
    session_id = _integer(raw, "id", at, minimum=0)
    verification_id = _string(raw, "verification_id", at, max_len=MAX_VERIFICATION_ID)
    initialization = _timestamp(raw, "initialization", at)
    completion: datetime | None = None
    if require(raw, "completion", at) != ACTIVE:
        completion = _timestamp(raw, "completion", at, also=f'or "{ACTIVE}"')
        if completion < initialization:
            _malformed(f"{at}completion", "is before initialization")
    expires = None if raw.get("expires") is None else _timestamp(raw, "expires", at)
    sealed = raw.get("pin_sealed")
    if sealed is None and completion is None:
        _malformed(f"{at}pin_sealed", "is required for an active session")
    pin = None
    if sealed is not None:
        pin = _unseal(sealed, f"{at}pin_sealed", opener)
    return SessionGrant(
        session_id, verification_id, initialization, completion, expires, pin if completion is None else None
    )


def _unseal(value: Any, where: str, opener: SealedBox[PrivateKey] | None) -> str | None:
    sealed = b64(value, where)
    if not SEAL_OVERHEAD + 4 <= len(sealed) <= SEAL_OVERHEAD + 12:
        _malformed(where, f"is {len(sealed)} bytes; a sealed PIN of 4-12 digits is 52-60")
    if opener is None:
        return None
    try:
        plain = opener.decrypt(sealed)
    except CryptoError:
        raise SessionSetRejected(
            "unsealable-pin", f"{where} does not open with this device's key (sealed to another device?)"
        ) from None
    if not _PIN.fullmatch(plain.decode("latin-1")):
        _malformed(where, "the sealed value is not a PIN of 4-12 ASCII digits")
    return plain.decode("ascii")


def _malformed(where: str, problem: str) -> NoReturn:
    # "from None": the decoder's exception (which may hold the document) is not chained to ours.
    raise SessionSetRejected("malformed", f"{where}: {problem}" if where else problem) from None


def _integer(obj: dict[str, Any], name: str, at: str, *, minimum: int) -> int:
    value = require(obj, name, at)
    if not is_int(value):
        _malformed(f"{at}{name}", f"must be an integer, not {json_type(value)}")
    if not minimum <= value <= MAX_INT:
        _malformed(f"{at}{name}", f"must be between {minimum} and 2**63-1")
    return value


def _string(obj: dict[str, Any], name: str, at: str, *, max_len: int = 256) -> str:
    value = require(obj, name, at)
    if not isinstance(value, str):
        _malformed(f"{at}{name}", f"must be a string, not {json_type(value)}")
    if not 1 <= len(value) <= max_len:
        _malformed(f"{at}{name}", f"must be 1-{max_len} characters long, not {len(value)}")
    if not value.isprintable():
        # A lone surrogate (JSON "\ud800") cannot be written into the ack or audit records, and a control
        # character has no business in an id: refused here, not as a failure when the set is applied.
        _malformed(f"{at}{name}", "must be printable Unicode text (no control characters or lone surrogates)")
    return value


def _timestamp(obj: dict[str, Any], name: str, at: str, *, also: str = "") -> datetime:
    value = require(obj, name, at)
    expected = f"a UTC timestamp YYYY-MM-DDTHH:MM:SS[.ffffff]Z{' ' + also if also else ''}"
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        _malformed(f"{at}{name}", f"must be {expected}")
    try:
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)
    except ValueError:
        _malformed(f"{at}{name}", "is not a valid date and time")


def _wire_timestamp(value: Any, where: str) -> str:
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
        except ValueError:
            pass
        else:
            return format_timestamp(moment)
    raise ValueError(f"{where}: not a timestamp (a datetime or e.g. '2021-06-09 22:07:39.113810')")
