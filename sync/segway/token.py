"""The OAuth2 access token for Segway's API (client_credentials, the seed's Auth section).

A token lives ``expires_in`` seconds (at most 86400). ``TokenSource`` fetches one when it has none, or when the
one it has is within ``refresh_margin_s`` of expiry: Segway keeps the old token valid for 300 s after issuing
a new one, so refreshing ahead never breaks a request in flight. Concurrent callers share one fetch (a burst
of calls at refresh time must not become a burst of token requests). ``invalidate(token)`` drops a token the
API refused, but only if it is still the current one: many requests sent with the same stale token each see
the refusal, and only the first may cause a fetch.

The client secret is kept out of every message, repr and log; so is the token. This module also holds the
two wire helpers ``client.py`` shares: a bounded body read and a name for each kind of transport failure.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httpx

from .errors import SegwayUnavailable, TokenRefused

MAX_BODY_BYTES = 1024 * 1024  # an answer is a few hundred bytes; refuse to buffer more than this
MAX_EXPIRES_IN = 2 * 86400  # the seed says within 86400; twice that is surely not a token lifetime
_SAFE_WORD = re.compile(r"[A-Za-z0-9_.-]{1,40}")  # an OAuth error code is shown only if it looks like one


# -- wire helpers (shared with client.py) -------------------------------------------------------------------


def phrase(status: int) -> str:
    """``503 Service Unavailable``: the standard phrase, never the server's own text."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


async def read_bounded(response: httpx.Response, what: str, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, at most ``limit`` bytes (declared or sent). Only identity encoding is asked for, so
    a compressed body is refused rather than inflated without bound."""
    declared = response.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 15 or int(declared) > limit):
        raise SegwayUnavailable("garbled", f"{what}: body of {declared[:20]} bytes is larger than the limit")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise SegwayUnavailable("garbled", f"{what}: body is {encoding[:20]!r}-encoded; identity was asked")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise SegwayUnavailable("garbled", f"{what}: body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def transport_failure(exc: BaseException, what: str, timeout_s: float) -> SegwayUnavailable:
    """Name a transport failure of ``what`` (``POST /oauth/token``): timeout, untrusted certificate, refused
    connection, name resolution, or the exception's class. httpx's own messages name neither headers nor
    bodies, but they are not repeated anyway: the class and the OS reason say enough."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    if any(isinstance(e, httpx.TimeoutException | TimeoutError) for e in chain):
        return SegwayUnavailable("timeout", f"{what}: no answer within {timeout_s:g} s")
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return SegwayUnavailable("tls", f"{what}: server certificate not trusted ({e.verify_message})")
        if isinstance(e, ConnectionRefusedError):
            return SegwayUnavailable("transport", f"{what}: connection refused")
        if isinstance(e, socket.gaierror):
            return SegwayUnavailable("transport", f"{what}: cannot resolve the host ({e.strerror})")
    for e in chain:
        if isinstance(e, ssl.SSLError):
            return SegwayUnavailable("tls", f"{what}: TLS failed ({e.reason or type(e).__name__})")
        if isinstance(e, OSError) and e.strerror:
            return SegwayUnavailable("transport", f"{what}: {e.strerror}")
    return SegwayUnavailable("transport", f"{what}: {type(exc).__name__} (connection failed or broke off)")


# -- the token ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    value: str
    refresh_at: float  # clock time from which a get() fetches a new one
    expires_at: float

    def __repr__(self) -> str:
        return "<token>"


class TokenSource:
    """Access tokens from ``token_url`` for one client id and secret, shared by all of a client's calls."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        refresh_margin_s: float = 300.0,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not client_id or not client_secret:
            raise ValueError("Segway's client_id and client_secret must not be empty")
        self._http = http
        self.token_url = token_url
        self.client_id = client_id
        self.__secret = client_secret  # name-mangled and never formatted: see the module docstring
        self._margin = refresh_margin_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._token: _Token | None = None
        self._fetching: asyncio.Future[_Token] | None = None
        self.counters: dict[str, int] = {"fetches": 0, "failures": 0}

    def __repr__(self) -> str:
        return f"<TokenSource {self.token_url} client_id={self.client_id}>"

    async def get(self) -> str:
        """A token valid now, fetched first if there is none or it is near its expiry. Raises
        ``TokenRefused`` (wrong credentials) or ``SegwayUnavailable`` (transport, 5xx, malformed answer)."""
        token = self._token
        if token is not None and self._clock() < token.refresh_at:
            return token.value
        if self._fetching is None:
            self._fetching = asyncio.ensure_future(self._fetch())
            self._fetching.add_done_callback(self._fetched)
        # shield: one caller's cancellation must not cancel the fetch the others wait for.
        return (await asyncio.shield(self._fetching)).value

    def invalidate(self, token: str) -> None:
        """``token`` was refused: forget it if it is still the current one (else it was replaced already)."""
        if self._token is not None and self._token.value == token:
            self._token = None

    def _fetched(self, future: asyncio.Future[_Token]) -> None:
        self._fetching = None
        if future.cancelled():
            return
        if future.exception() is None:  # also marks the exception retrieved when no one waited
            self._token = future.result()
        else:
            self.counters["failures"] += 1

    async def _fetch(self) -> _Token:
        self.counters["fetches"] += 1
        what = "POST /oauth/token"
        sent_at = self._clock()  # the lifetime counts from before the request: errs on the early side
        form = {
            "client_id": self.client_id,
            "client_secret": self.__secret,
            "grant_type": "client_credentials",
        }
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._http.stream("POST", self.token_url, data=form) as response:
                    body = await read_bounded(response, what)
        except (httpx.HTTPError, OSError) as exc:
            raise transport_failure(exc, what, self._timeout_s) from None
        if response.status_code != 200:
            raise _refusal(response.status_code, body, what)
        return self._parse(body, sent_at, what)

    def _parse(self, body: bytes, sent_at: float, what: str) -> _Token:
        def bad(problem: str) -> SegwayUnavailable:
            return SegwayUnavailable("garbled", f"{what}: {problem}")

        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            raise bad("the answer is not JSON") from None
        if not isinstance(answer, dict):
            raise bad("the answer is not a JSON object")
        value = answer.get("access_token")
        if not isinstance(value, str) or not value or not value.isprintable() or len(value) > 4096:
            raise bad("access_token is missing or not a token string")
        token_type = answer.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise bad("token_type is not bearer")
        expires_in = answer.get("expires_in")
        if type(expires_in) is not int or not 0 < expires_in <= MAX_EXPIRES_IN:
            raise bad(f"expires_in is not a whole number of seconds 1..{MAX_EXPIRES_IN}")
        margin = min(self._margin, expires_in / 2)  # a short-lived token is still used for half its life
        return _Token(value, sent_at + expires_in - margin, sent_at + expires_in)


def _refusal(status: int, body: bytes, what: str) -> Exception:
    """A non-200 answer of the token endpoint: 4xx (but 429) refuses our credentials, the rest may pass."""
    error = _oauth_error(body)
    detail = f" ({error})" if error else ""
    if 400 <= status < 500 and status not in (408, 429):
        hint = (
            ": check the client id and secret" if error in ("invalid_client", "unauthorized_client") else ""
        )
        return TokenRefused(f"{what} answered {phrase(status)}{detail}{hint}")
    retryable = status >= 500 or status in (408, 429)
    return SegwayUnavailable("http", f"{what} answered {phrase(status)}{detail}", retryable=retryable)


def _oauth_error(body: bytes) -> str:
    try:
        answer: Any = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    error = answer.get("error") if isinstance(answer, dict) else None
    return error if isinstance(error, str) and _SAFE_WORD.fullmatch(error) else ""
