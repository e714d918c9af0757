"""The REEF managed-sessions API client: HTTPS with mTLS (httpx), strict parsing of the answers.

REEF (``shared/seeds/reef-managed-sessions-api.md``) authenticates the device by its client certificate.
This module asks it for one vehicle's sessions (``GET {base_url}/managed-sessions/vehicles/{vin}``) and turns
the answer into ``ManagedSession`` values, or raises one of:

- ``ReefUnavailable`` (``.kind`` says which): REEF's server certificate is not trusted, REEF refused our
  client certificate, connection refused, host unreachable, timeout, other TLS or connection failures;
- ``ReefHttpError`` (``.status``): any non-2xx answer;
- ``ReefResponseError`` (``.where``): a 2xx answer that is not the documented shape, including a body that is
  not UTF-8 JSON, nests deeper than the parser goes, holds a number of more digits than Python converts, holds
  a string that is not Unicode text (a lone surrogate), or is larger than ``MAX_BODY_BYTES`` (declared, sent,
  or once decoded: a gzip body is inflated piecewise and stops at the limit, so a small compressed bomb
  cannot take memory; encodings other than gzip are refused);
- ``ReefConfigError``: the CA, certificate or key file cannot be loaded.

All derive from ``ReefError``; callers count failures by class. No message ever holds a response body or a
PIN: REEF's bodies carry PINs, so a status error gives the status code and its standard phrase only, and a
parse error names the field and never shows a value that could be a PIN.

How a refused client certificate shows (measured against an aiohttp server and a blocking OpenSSL server on
Python 3.11, OpenSSL 3.0, httpx 0.28): a server that sends its TLS alert gives ``unknown ca`` / ``bad
certificate`` / ``certificate required`` - under TLS 1.2 during the handshake, under TLS 1.3 on the first
read after it, as a bare ``ssl.SSLError``. Often there is no alert at all: asyncio servers (aiohttp) close
without one, and even OpenSSL's alert is lost when the server's close resets the connection first. Then the
only symptom is the connection ending during the handshake (TLS 1.2) or right after it, before any answer
(TLS 1.3). Every request here uses a fresh connection (no keep-alive: polls are minutes apart), so such an
end is reported as a refused client certificate, marked "most likely".
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import socket
import ssl
import sys
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Literal, NoReturn
from urllib.parse import quote, urlsplit

import anyio
import httpx

from fleetgate import __version__

ACTIVE = "active"
MAX_BODY_BYTES = 1024 * 1024  # a vehicle's sessions are a few kB; refuse to buffer more than this
MAX_INT = 2**63 - 1  # ids fit SQLite's INTEGER
MAX_VERIFICATION_ID = 256

_PIN = re.compile(r"[0-9]{4,12}", re.ASCII)
# REEF writes naive UTC with a space ("2021-06-09 22:06:56.232012"); accept T, a fraction and Z / +00:00 too.
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:Z|\+00:00)?", re.ASCII
)

StrPath = str | os.PathLike[str]
UnavailableKind = Literal[
    "server-certificate-untrusted",
    "client-certificate-refused",
    "connection-refused",
    "unreachable",
    "timeout",
    "tls",
    "disconnected",
]

# TLS alerts a server sends about our certificate (OpenSSL's reason names, as in ssl.SSLError.reason).
_CERT_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "certificate required",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown ca: the server does not trust the CA that issued it",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate revoked",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
}
_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}


# -- errors -----------------------------------------------------------------------------------------------


class ReefError(Exception):
    """Any failure to get an answer from REEF that this module can use."""


class ReefConfigError(ReefError):
    """The CA file, client certificate or key cannot be loaded (names the file, never its content)."""


class ReefUnavailable(ReefError):
    """No usable connection to REEF. ``kind`` names the cause (see ``UnavailableKind``)."""

    def __init__(self, kind: UnavailableKind, message: str) -> None:
        super().__init__(message)
        self.kind: UnavailableKind = kind


class ReefHttpError(ReefError):
    """REEF answered with a non-2xx status. The message has the status line, never the body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ReefResponseError(ReefError):
    """A 2xx answer that is not what the API documents. ``where`` is the field path (``managed_sessions[2].id``)
    or ``response`` for the body as a whole."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


# -- sessions ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManagedSession:
    """One managed session as REEF reports it. Times are aware UTC; ``completion`` is None while active."""

    id: int
    vin: str
    pin: str = field(repr=False)
    initialization: datetime
    completion: datetime | None
    verification_id: str

    @property
    def active(self) -> bool:
        return self.completion is None


def parse_sessions(body: bytes | str, *, vin: str | None) -> list[ManagedSession]:
    """Parse a ``{"managed_sessions": [...]}`` answer (list, by id, or by VIN), strictly.

    Each session needs ``id`` (integer 0..2**63-1, unique in the answer), ``vin`` (equal to ``vin`` when
    given), ``pin`` (4-12 digits, a string), ``initialization`` (UTC timestamp), ``completion`` (UTC timestamp
    not before ``initialization``, or ``"active"``) and ``verification_id`` (1-256 characters). Timestamps
    are UTC with a space or ``T``, an optional fraction and an optional ``Z`` / ``+00:00``. Members the API
    may add later are ignored; duplicate member names and NaN/Infinity are refused.

    One bad entry rejects the whole answer (``ReefResponseError`` naming the field). A partial set would be
    read as the whole set: a session left out because its entry was bad would look ended (a paying
    customer's PIN stops working) or, if it was the entry that ended it, still active (an old PIN keeps
    opening the vehicle). Keeping the last good set until REEF answers correctly is the safe side.
    """
    data = _load_json(body)
    if not isinstance(data, dict):
        _bad("response", f'expected an object with "managed_sessions", got {_json_type(data)}')
    if "managed_sessions" not in data:
        names = ", ".join(_short(str(k), 32) for k in list(data)[:8]) or "none"
        _bad("response", f'"managed_sessions" is missing (members: {names})')
    entries = data["managed_sessions"]
    if not isinstance(entries, list):
        _bad("managed_sessions", f"expected a list, got {_show(entries)}")
    sessions: list[ManagedSession] = []
    seen: dict[int, int] = {}
    for i, raw in enumerate(entries):
        session = _parse_session(raw, f"managed_sessions[{i}]", vin)
        if session.id in seen:
            _bad(f"managed_sessions[{i}].id", f"{session.id} is also managed_sessions[{seen[session.id]}]")
        seen[session.id] = i
        sessions.append(session)
    return sessions


def _parse_session(raw: Any, at: str, vin: str | None) -> ManagedSession:
    if not isinstance(raw, dict):
        _bad(at, f"expected an object, got {_json_type(raw)}")
    ident = _require(raw, "id", at)
    if not (isinstance(ident, int) and not isinstance(ident, bool) and 0 <= ident <= MAX_INT):
        _bad(f"{at}.id", f"expected an integer 0..2**63-1, got {_show(ident)}")
    got_vin = _require(raw, "vin", at)
    if not isinstance(got_vin, str) or not got_vin:
        _bad(f"{at}.vin", f"expected a non-empty string, got {_show(got_vin)}")
    if not _is_text(got_vin):
        _bad(f"{at}.vin", _NOT_TEXT)
    if vin is not None and got_vin != vin:
        _bad(f"{at}.vin", f"a session of vehicle {_show(got_vin)}, not of {_show(vin)}")
    pin = _require(raw, "pin", at)
    if not isinstance(pin, str):
        _bad(f"{at}.pin", f"expected a string of 4-12 digits, got {_json_type(pin)}")  # never the value
    if not _PIN.fullmatch(pin):
        _bad(f"{at}.pin", "expected a string of 4-12 digits, got another string")
    initialization = _timestamp(_require(raw, "initialization", at), f"{at}.initialization", "")
    completion_raw = _require(raw, "completion", at)
    completion = (
        None
        if completion_raw == ACTIVE
        else _timestamp(completion_raw, f"{at}.completion", f' or "{ACTIVE}"')
    )
    if completion is not None and completion < initialization:
        _bad(
            f"{at}.completion",
            f"{_show(completion_raw)} is before initialization {_show(raw['initialization'])}",
        )
    verification_id = _require(raw, "verification_id", at)
    if not isinstance(verification_id, str) or not 1 <= len(verification_id) <= MAX_VERIFICATION_ID:
        _bad(f"{at}.verification_id", f"expected a string of 1-256 characters, got {_show(verification_id)}")
    if not _is_text(verification_id):
        _bad(f"{at}.verification_id", _NOT_TEXT)
    return ManagedSession(ident, got_vin, pin, initialization, completion, verification_id)


def parse_timestamp(value: str) -> datetime:
    """A REEF UTC timestamp (``2021-06-09 22:06:56.232012``, ``2021-05-10T02:37:00Z``, ...) as an aware
    datetime. Raises ValueError. Fractions beyond microseconds are truncated."""
    match = _TIMESTAMP.fullmatch(value)
    if match is None:
        raise ValueError("not a UTC timestamp")
    year, month, day, hour, minute, second, fraction = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=UTC)


_NOT_TEXT = "a string that is not valid Unicode text (a lone surrogate escape such as \\ud800)"


def _is_text(value: str) -> bool:
    """False for a string with a lone surrogate (JSON allows the escape): it cannot be encoded as UTF-8, so no
    record or message holding it could be written."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _timestamp(value: Any, where: str, also: str) -> datetime:
    if isinstance(value, str):
        try:
            return parse_timestamp(value)
        except ValueError:
            pass
    _bad(where, f"expected a UTC timestamp{also}, got {_show(value)}")


def _load_json(body: bytes | str) -> Any:
    if isinstance(body, bytes | bytearray):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            _bad("response", f"body is not UTF-8 (byte {exc.start})")
    if not body.strip():
        _bad("response", "body is empty")
    try:
        return json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        # exc.msg and the position only: the exception's doc is the body, which may hold PINs.
        _bad("response", f"body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
    except RecursionError:
        _bad("response", "body nests arrays or objects deeper than the JSON parser goes")
    except ValueError:  # the only other ValueError json raises: an int longer than Python converts
        _bad("response", f"body holds a number of more than {sys.get_int_max_str_digits()} digits")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            _bad("response", f"member {_short(key, 32)!r} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> NoReturn:
    _bad("response", f"{name} is not a JSON number")


def _require(obj: dict[str, Any], name: str, at: str) -> Any:
    if name not in obj:
        _bad(f"{at}.{name}", "missing")
    return obj[name]


def _bad(where: str, problem: str) -> NoReturn:
    raise ReefResponseError(where, problem)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _show(value: Any) -> str:
    """A short JSON rendering of a scalar for a message; only the type of an array or object, and of a
    value that could be a PIN (4-12 digits), wherever it turns up."""
    if isinstance(value, dict | list):
        return _json_type(value)
    if not isinstance(value, bool) and _PIN.fullmatch(str(value).strip()):
        return f"{_json_type(value)} of digits (not shown: it could be a PIN)"
    return _short(json.dumps(value, ensure_ascii=True), 40)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- client -----------------------------------------------------------------------------------------------


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Called only for an encrypted key. Without this, OpenSSL would prompt on the terminal and block.
    raise _EncryptedKey


def client_ssl_context(
    ca_file: StrPath, cert_file: StrPath | None, key_file: StrPath | None
) -> ssl.SSLContext:
    """TLS 1.2+, REEF's server certificate verified against ``ca_file`` (with its host name), our client
    certificate chain from ``cert_file`` and ``key_file`` (None: the key is in ``cert_file``).

    ``cert_file=None`` sends no client certificate: REEF will refuse the connection (useful to diagnose).
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(ca_file))
    except (OSError, ValueError) as exc:
        raise ReefConfigError(f"cannot load REEF's CA file {os.fspath(ca_file)}: {_reason(exc)}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        key = os.fspath(key_file) if key_file is not None else None
        what = f"client certificate {os.fspath(cert_file)}" + (f" with key {key}" if key else "")
        try:
            ctx.load_cert_chain(os.fspath(cert_file), key, password=_no_password)
        except _EncryptedKey:
            raise ReefConfigError(f"cannot load {what}: the key is encrypted (it must not be)") from None
        except (OSError, ValueError) as exc:
            raise ReefConfigError(f"cannot load {what}: {_reason(exc)}") from None
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.library or 'SSL'} {exc.reason}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class ReefClient:
    """One REEF endpoint, one ``httpx.AsyncClient`` with mTLS. Use ``async with`` or call ``aclose()``.

    ``base_url`` goes up to the version, e.g. ``https://reef.api.arcimoto.com/v1``. ``timeout_s`` bounds a
    whole request (connect, TLS, answer, body). Redirects are not followed and proxy variables from the
    environment are ignored: the client certificate is only ever presented to ``base_url``'s host.
    """

    def __init__(
        self,
        base_url: str,
        *,
        ca_file: StrPath,
        cert_file: StrPath | None,
        key_file: StrPath | None,
        timeout_s: float = 10.0,
    ) -> None:
        parts = urlsplit(str(base_url))
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"REEF base_url must be https://host/...: {base_url!r}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.base_url = str(base_url).rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or 443
        self._ca_file = os.fspath(ca_file)
        self._sends_cert = cert_file is not None
        self._timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            verify=client_ssl_context(ca_file, cert_file, key_file),
            timeout=httpx.Timeout(timeout_s),
            # A fresh connection per request: a disconnect before any answer then means the server refused
            # this connection's TLS client certificate, not that an idle keep-alive connection went stale.
            limits=httpx.Limits(max_keepalive_connections=0),
            follow_redirects=False,
            trust_env=False,
            # gzip only: the body is decoded here (``_read_limited``), bounded as it inflates.
            headers={
                "Accept": "application/json",
                "Accept-Encoding": "gzip",
                "User-Agent": f"fleetgate/{__version__}",
            },
        )

    async def get_vehicle_sessions(self, vin: str) -> list[ManagedSession]:
        """All managed sessions REEF has for ``vin`` (``GET /managed-sessions/vehicles/{vin}``)."""
        if not vin:
            raise ValueError("vin must not be empty")
        body = await self._get(f"/managed-sessions/vehicles/{quote(vin, safe='')}")
        return parse_sessions(body, vin=vin)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> ReefClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<ReefClient {self.base_url}>"

    async def _get(self, path: str) -> bytes:
        answered = False
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._client.stream("GET", self.base_url + path) as response:
                    answered = True
                    if not 200 <= response.status_code < 300:
                        raise _status_error(response, path)
                    return await _read_limited(response)
        except ReefError:
            raise
        except httpx.RemoteProtocolError as exc:
            if answered or not str(exc).startswith("Server disconnected"):
                # The h11 message may quote the server's bytes, so it is not repeated here.
                raise ReefUnavailable(
                    "disconnected",
                    "REEF's answer broke off or is not valid HTTP/1.1"
                    + (" (connection closed mid-answer)" if "closed" in str(exc) else ""),
                ) from None
            raise self._failure(exc, answered) from exc
        except (httpx.TransportError, OSError) as exc:  # OSError: ssl.SSLError, TimeoutError, ...
            raise self._failure(exc, answered) from exc

    def _failure(self, exc: BaseException, answered: bool) -> ReefUnavailable:
        """Name the cause of a transport failure (see the module docstring for how TLS refusals look)."""
        chain = _chain(exc)
        where = f"{self._host}:{self._port}"
        for e in chain:
            if isinstance(e, ssl.SSLCertVerificationError):
                return ReefUnavailable(
                    "server-certificate-untrusted",
                    f"REEF's server certificate is not trusted: {e.verify_message} "
                    f"(checked against {self._ca_file})",
                )
        for e in chain:
            if isinstance(e, ssl.SSLError) and e.reason in _CERT_ALERTS:
                return ReefUnavailable(
                    "client-certificate-refused",
                    f"REEF refused our client certificate (TLS alert: {_CERT_ALERTS[e.reason]})",
                )
            if isinstance(e, ssl.SSLError) and e.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
                if not self._sends_cert:
                    return ReefUnavailable(
                        "client-certificate-refused",
                        "REEF refused the connection without a client certificate (we sent none; TLS alert: "
                        "handshake failure)",
                    )
                return ReefUnavailable(
                    "tls",
                    "REEF refused the TLS handshake (alert: handshake failure): no TLS version or "
                    "cipher in common",
                )
        if any(isinstance(e, httpx.TimeoutException | TimeoutError) for e in chain):
            phases: dict[type[BaseException], str] = {
                httpx.ConnectTimeout: "connecting",
                httpx.ReadTimeout: "waiting for the answer",
                httpx.WriteTimeout: "sending the request",
                httpx.PoolTimeout: "waiting for a connection slot",
            }
            phase = phases.get(
                type(exc), "reading the answer" if answered else "connecting or waiting for the answer"
            )
            return ReefUnavailable(
                "timeout", f"timeout: REEF ({where}) did not answer within {self._timeout_s:g} s ({phase})"
            )
        for e in chain:
            if isinstance(e, ConnectionRefusedError):
                return ReefUnavailable(
                    "connection-refused", f"connection refused by {where} (nothing listening)"
                )
            if isinstance(e, socket.gaierror):
                return ReefUnavailable("unreachable", f"cannot resolve {self._host}: {e.strerror or e}")
            if isinstance(e, OSError) and e.errno in _UNREACHABLE:
                return ReefUnavailable("unreachable", f"{where} is unreachable: {e.strerror}")
        ssl_other = next(
            (e for e in chain if isinstance(e, ssl.SSLError) and not isinstance(e, _ENDED)), None
        )
        if ssl_other is not None:
            return ReefUnavailable("tls", f"TLS with {where} failed: {_reason(ssl_other)}")
        ended = isinstance(exc, httpx.RemoteProtocolError) or any(isinstance(e, _ENDED) for e in chain)
        if ended and not answered:
            during = (
                "during the TLS handshake"
                if isinstance(exc, httpx.ConnectError)
                else "right after the TLS handshake, before answering"
            )
            how = f"{where} closed the connection without a TLS alert {during}"
            if not self._sends_cert:
                message = f"REEF refused the connection without a client certificate (we sent none): {how}"
            else:
                message = (
                    f"REEF refused our client certificate, most likely: {how}, which is how a server rejects "
                    "a client certificate it does not accept"
                )
            return ReefUnavailable("client-certificate-refused", message)
        return ReefUnavailable("disconnected", f"connection to {where} failed: {_reason(chain[-1])}")


# How a connection that the server closed or reset shows through httpx / httpcore / anyio.
_ENDED = (ssl.SSLEOFError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError, anyio.EndOfStream)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (httpx wraps httpcore, which wraps anyio, which wraps ssl / OSError)."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in out:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


_PHRASES = {s.value: s.phrase for s in HTTPStatus}


def _status_error(response: httpx.Response, path: str) -> ReefHttpError:
    status = response.status_code
    # The standard phrase, not the server's: everything the server sends is kept out of messages.
    line = f"{status} {_PHRASES.get(status, '')}".strip()
    hint = ""
    if status in (401, 403):
        hint = ": REEF authenticates this device by its client certificate; is it registered with REEF?"
    elif 300 <= status < 400:
        hint = " (redirects are not followed)"
    return ReefHttpError(status, f"REEF answered {line} to GET {path}{hint}")


async def _read_limited(response: httpx.Response) -> bytes:
    """The body, decoded, of at most MAX_BODY_BYTES on the wire and once decoded; ReefResponseError otherwise.

    httpx's own decoding inflates each read whole (~64 MB from 64 kB of gzipped zeros) before anyone can count
    it, so the raw bytes are read and inflated here, never more than the limit allows at a time."""
    declared = response.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 15 or int(declared) > MAX_BODY_BYTES):
        _bad("response", f"body of {_short(declared, 20)} bytes is larger than the limit of {MAX_BODY_BYTES}")
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip"):
        _bad("response", f"Content-Encoding {_short(encoding, 32)!r} is not gzip, the only one asked for")
    inflate = zlib.decompressobj(zlib.MAX_WBITS | 16) if "gzip" in encoding else None
    chunks: list[bytes] = []
    raw = size = 0

    def take(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > MAX_BODY_BYTES:
            _bad("response", f"body is larger than the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(data)

    try:
        async for chunk in response.aiter_raw():
            raw += len(chunk)
            if raw > MAX_BODY_BYTES:
                _bad("response", f"body is larger than the limit of {MAX_BODY_BYTES} bytes")
            if inflate is None:
                take(chunk)
                continue
            while chunk and not inflate.eof:
                take(inflate.decompress(chunk, MAX_BODY_BYTES - size + 1))
                chunk = inflate.unconsumed_tail
        if inflate is not None and not inflate.eof:
            _bad("response", "body's gzip stream is cut short")
    except zlib.error as exc:
        _bad("response", f"body does not decode as gzip ({exc})")
    return b"".join(chunks)
