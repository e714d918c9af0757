"""The signed envelope every fleetgate downlink message travels in (session sets, scooter commands).

The payload is UTF-8 JSON with exactly these members::

    {"v": 1, "alg": "ed25519", "key_id": "9f86d081884c7d65",
     "body": "<standard base64 of the body bytes>", "sig": "<standard base64 of the 64-byte signature>"}

``key_id`` is 16 lowercase hex digits, the first 8 bytes of the signer's Ed25519 public key: a hint that picks
the pinned key(s) to try, trusted for nothing else. ``sig`` is Ed25519 over ``prefix + body_bytes``, where the
prefix names the use (``b"fleetgate/sessions/v1\\n"``, ``b"fleetgate/scooter-commands/v1\\n"``): a signature
the same key made for one use cannot be replayed as another. The exact body bytes are signed, so there is no
JSON canonicalisation to agree on. The JSON helpers here refuse duplicate members and NaN/Infinity, and never
quote a document in an error (it may hold a sealed PIN).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, NoReturn

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

WIRE_VERSION = 1
ALG = "ed25519"
KEY_ID_BYTES = 8
_ENVELOPE_KEYS = frozenset({"v", "alg", "key_id", "body", "sig"})
_KEY_ID = re.compile(r"[0-9a-f]{16}", re.ASCII)


class SignedRejected(Exception):
    """A downlink message refused. ``reason`` is usable as a counter name (``malformed``,
    ``unsupported-version``, ``unsigned``, ``unknown-key``, ``bad-signature``, or one of the body's own);
    ``detail`` says what was wrong and never quotes a PIN, a key or a sealed value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def key_id(verify_key: VerifyKey) -> str:
    """The wire ``key_id`` of a public key: hex of its first 8 bytes."""
    return bytes(verify_key)[:KEY_ID_BYTES].hex()


def verify_keys_from_b64(values: Iterable[str]) -> list[VerifyKey]:
    """Ed25519 public keys from their base64 form (``signing_keys`` in the configuration)."""
    keys = []
    for i, value in enumerate(values):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"signing key [{i}] is not base64") from None
        if len(raw) != 32:
            raise ValueError(f"signing key [{i}] is {len(raw)} bytes; an Ed25519 public key is 32")
        keys.append(VerifyKey(raw))
    return keys


def open_signed(payload: bytes, *, prefix: bytes, verify_keys: Sequence[VerifyKey]) -> tuple[bytes, str]:
    """Check the envelope and its signature; return the signed body bytes and the key_id that signed them.

    The body is not parsed here: its checks belong to the message type.
    """
    envelope = load_json(payload, "payload")
    if not isinstance(envelope, dict):
        malformed("payload", f"must be a JSON object, not {json_type(envelope)}")
    version = require(envelope, "v", "")
    if not is_int(version):
        malformed("v", f"must be an integer, not {json_type(version)}")
    if version != WIRE_VERSION:
        raise SignedRejected("unsupported-version", f"v is {version}; this device reads {WIRE_VERSION}")
    alg = require(envelope, "alg", "")
    if not isinstance(alg, str):
        malformed("alg", f"must be a string, not {json_type(alg)}")
    if alg != ALG:
        raise SignedRejected("unsupported-version", f"alg is {quote(alg)}; this device verifies {ALG}")
    no_unknown(envelope, _ENVELOPE_KEYS, "")
    sig_b64 = envelope.get("sig")
    if sig_b64 is None or sig_b64 == "":
        raise SignedRejected("unsigned", "the message has no sig")
    sig = b64(sig_b64, "sig")
    kid = require(envelope, "key_id", "")
    if not isinstance(kid, str) or not _KEY_ID.fullmatch(kid):
        malformed("key_id", "must be 16 lowercase hex digits (the first 8 bytes of the public key)")
    body = b64(require(envelope, "body", ""), "body")
    if len(sig) != 64:
        raise SignedRejected("bad-signature", f"sig is {len(sig)} bytes; an Ed25519 signature is 64")
    candidates = [k for k in verify_keys if key_id(k) == kid]
    if not candidates:
        raise SignedRejected(
            "unknown-key", f"key_id {kid} matches none of the {len(verify_keys)} pinned signing key(s)"
        )
    if not any(_verifies(k, prefix + body, sig) for k in candidates):
        raise SignedRejected("bad-signature", f"signature does not verify with pinned key {kid}")
    return body, kid


def seal_signed(body: bytes, *, prefix: bytes, signing_key: SigningKey) -> bytes:
    """The cloud side: ``body`` signed for ``prefix``'s use, as the envelope's payload bytes."""
    envelope = {
        "v": WIRE_VERSION,
        "alg": ALG,
        "key_id": key_id(signing_key.verify_key),
        "body": base64.b64encode(body).decode("ascii"),
        "sig": base64.b64encode(signing_key.sign(prefix + body).signature).decode("ascii"),
    }
    return json.dumps(envelope, separators=(",", ":")).encode("ascii")


def _verifies(key: VerifyKey, message: bytes, sig: bytes) -> bool:
    try:
        key.verify(message, sig)
    except BadSignatureError:
        return False
    return True


# -- strict JSON, for the envelope and the bodies ---------------------------------------------------------


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def load_json(data: bytes, what: str) -> Any:
    """UTF-8 JSON with no duplicate member and no NaN/Infinity; ``malformed`` otherwise."""
    try:
        text = bytes(data).decode("utf-8")
    except (UnicodeDecodeError, TypeError):
        malformed(what, "is not UTF-8")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as exc:
        malformed(what, f"has the member {quote(str(exc))} more than once")
    except RecursionError:
        malformed(what, "is not JSON (nested too deep)")
    except ValueError as exc:  # JSONDecodeError's message gives a position, never the document's text
        malformed(what, f"is not JSON ({exc})")


def malformed(where: str, problem: str) -> NoReturn:
    # "from None": the decoder's exception (which may hold the document) is not chained to ours.
    raise SignedRejected("malformed", f"{where}: {problem}" if where else problem) from None


def require(obj: dict[str, Any], name: str, at: str) -> Any:
    if name not in obj:
        malformed(f"{at}{name}", "missing")
    return obj[name]


def no_unknown(obj: dict[str, Any], known: frozenset[str], at: str) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        malformed(f"{at}{unknown[0]}", "unknown member")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        malformed(where, f"must be a base64 string, not {json_type(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        malformed(where, "is not valid base64")


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    )


def quote(text: str, limit: int = 64) -> str:
    """An untrusted string for a log line: quoted, escaped, shortened."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def format_timestamp(moment: datetime) -> str:
    """A datetime as a wire timestamp (UTC, ``Z``; microseconds only when non-zero). Naive means UTC."""
    utc = moment.astimezone(UTC) if moment.tzinfo else moment
    text = utc.replace(tzinfo=None).isoformat(timespec="microseconds" if utc.microsecond else "seconds")
    return text + "Z"


def judge_fresh(
    version: int,
    issued_at: datetime,
    digest: bytes,
    last: tuple[int, datetime | None, bytes | None] | None,
) -> Literal["apply", "duplicate"]:
    """A versioned downlink set (session set, rule set) against the last applied one (``last``: its version,
    issue time and body digest; None if none was applied yet).

    ``"duplicate"``: the very set applied last (the retained message redelivered on reconnect): it confirms,
    and changes nothing. ``"apply"``: newer. Otherwise ``SignedRejected`` with ``older-version``, ``replayed``
    (the same version, another body) or ``issued-earlier`` (a higher version issued before the last). A naive
    issue time is taken as UTC."""
    if last is None:
        return "apply"
    last_version, last_issued_at, last_digest = last
    if version < last_version:
        raise SignedRejected(
            "older-version", f"version {version} is older than the applied version {last_version}"
        )
    if version == last_version:
        if last_digest is not None and hmac.compare_digest(digest, last_digest):
            return "duplicate"
        raise SignedRejected("replayed", f"version {version} was already applied with a different body")
    if last_issued_at is not None:
        previous = last_issued_at if last_issued_at.tzinfo else last_issued_at.replace(tzinfo=UTC)
        if issued_at < previous:
            raise SignedRejected(
                "issued-earlier",
                f"version {version} is issued at {format_timestamp(issued_at)}, before the applied version "
                f"{last_version} ({format_timestamp(previous)})",
            )
    return "apply"
