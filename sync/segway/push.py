"""The signature on Segway's pushes (status, location, alerts ... POSTed form-encoded to our receiver).

The seed's algorithm: every received parameter except ``signature``, sorted by name in ASCII order, joined as
``k1=v1&k2=v2``, then ``&client_secret=<secret>`` appended, MD5 in 32 lowercase hex digits. Every parameter
counts, including ones this code has never heard of: the seed warns that Segway adds fields, and a receiver
that signs only the documented ones would refuse every push after such a change.

Values are taken as received after form decoding (what ``application/x-www-form-urlencoded`` carries); a
parameter sent twice is refused, since the seed's key/value pairs have no order for duplicates. MD5 is weak,
but it is Segway's choice; the comparison is constant-time and the secret never leaves this module's callers.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl

SIGNATURE = "signature"


class PushRejected(ValueError):
    """A push that is not Segway's: unsigned, badly signed, or not form-encoded key/value pairs."""


def signature(params: Mapping[str, str], client_secret: str) -> str:
    """The signature Segway computes over ``params`` (any ``signature`` member is left out)."""
    signed = "&".join(f"{k}={params[k]}" for k in sorted(params) if k != SIGNATURE)
    return hashlib.md5(f"{signed}&client_secret={client_secret}".encode(), usedforsecurity=False).hexdigest()


def parse_form(body: bytes) -> dict[str, str]:
    """Form-encoded pairs; a parameter sent twice or a body that is not UTF-8 is refused."""
    try:
        pairs: Iterable[tuple[str, str]] = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, strict_parsing=True, max_num_fields=256
        )
        params: dict[str, str] = {}
        for key, value in pairs:
            if key in params:
                raise PushRejected(f"parameter {key[:40]!r} sent twice")
            params[key] = value
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, PushRejected):
            raise
        raise PushRejected(f"not form-encoded key/value pairs: {type(exc).__name__}") from None
    return params


def verify(params: Mapping[str, str], client_secret: str) -> None:
    """Raise ``PushRejected`` unless ``params`` carries Segway's signature over all of its other members."""
    sent = params.get(SIGNATURE)
    if not sent:
        raise PushRejected("the push carries no signature")
    if not hmac.compare_digest(sent.lower().encode(), signature(params, client_secret).encode()):
        raise PushRejected("the signature does not match the parameters")
