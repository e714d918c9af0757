"""The Segway fleet IoT cloud client: every operation of ``operations.OPERATIONS`` over HTTPS (httpx).

One ``call`` is: parameters checked against the catalogue (a bad one is refused before anything is sent), a
request slot (at most ``max_concurrent`` in flight, request starts at most ``max_requests_per_s`` apart:
Segway rate-limits per platform, and a burst from a gateway must not spend the fleet's budget), a token from
the ``TokenSource``, the request, and the answer's envelope ``{code, msg, data, t, opId}`` checked strictly.

- code 0: a ``Result`` with ``data`` as the operation's typed model (queries) or None;
- a partial success (15623/15624/15625, startRental did start the rental): a ``Result`` with that code;
- HTTP 401 or code 15101: the token is invalidated and the call retried once with a fresh one; a second
  refusal raises ``TokenRejected``;
- any other code: ``error_for(code, msg, opId)``, a typed ``SegwayError`` saying whether a retry may help;
- transport failure, timeout, HTTP 5xx / 429 / other, a body that is not the envelope, or ``data`` not of
  the documented shape: ``SegwayUnavailable`` (``.kind``; ``.retry_after`` for a 429).

Everything raised derives from ``errors.SegwayFailure`` (``.retryable``) except ``ValueError`` for a bad
operation name, iotCode or parameter. No message holds the client secret, a token or a response body.
Redirects are not followed (the bearer token goes to ``base_url``'s host only), proxies from the environment
are ignored, TLS is 1.2 or later, against ``ca_file`` or the system's trust store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from fleetgate import __version__

from .errors import (
    PARTIAL_SUCCESS,
    SUCCESS,
    SegwayError,
    SegwayUnavailable,
    TokenRefused,
    TokenRejected,
    error_for,
)
from .operations import (
    BatteryInfo,
    BluetoothKey,
    ExtraStatus,
    Location,
    Operation,
    Status,
    operation,
    params_for,
)
from .token import TokenSource, phrase, read_bounded, transport_failure

TOKEN_REJECTED = 15101
MAX_MSG = 200  # Segway's msg is kept in errors, cut to this
_IOT_CODE = re.compile(r"[0-9A-Za-z]{1,32}")  # an IMEI is 15 digits; the seed's examples are 13-15 digits

StrPath = str | os.PathLike[str]


@dataclass(frozen=True)
class Result:
    """A successful (or partly successful) answer. ``code`` is 0 or one of ``errors.PARTIAL_SUCCESS``."""

    op: str
    iot_code: str
    code: int
    msg: str
    op_id: str | None  # Segway's opId (battery-info calls it resId): quote it to Segway
    t: int | None  # Segway's answer time, ms since the epoch
    data: BaseModel | None


@dataclass(frozen=True)
class _Envelope:
    code: int
    msg: str
    op_id: str | None
    t: int | None
    data: Any


def ssl_context(ca_file: StrPath | None) -> ssl.SSLContext:
    """TLS 1.2+, the server verified with its host name against ``ca_file`` or the system trust store."""
    try:
        ctx = ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load Segway's CA file {os.fspath(ca_file or '')}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class SegwayClient:
    """One platform's access to Segway's API (``base_url``: ``regions.api_base``). ``async with`` or
    ``aclose()``. ``timeout_s`` bounds each HTTP exchange (token or API), connect to last byte; waiting for a
    request slot is bounded by ``max_wait_s``. ``clock`` is the token lifetime's clock (tests)."""

    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str,
        *,
        ca_file: StrPath | None = None,
        timeout_s: float = 10.0,
        max_requests_per_s: float = 10.0,
        max_concurrent: int = 4,
        max_wait_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(str(base_url))
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"Segway base_url must be https://host[:port]: {str(base_url)[:80]!r}")
        if timeout_s <= 0 or max_requests_per_s <= 0 or max_concurrent < 1 or max_wait_s <= 0:
            raise ValueError("timeout_s, max_requests_per_s, max_wait_s and max_concurrent must be positive")
        self.base_url = str(base_url).rstrip("/")
        self._timeout_s = timeout_s
        self._interval = 1.0 / max_requests_per_s
        self._next_start = 0.0
        self._slots = asyncio.Semaphore(max_concurrent)
        self._max_concurrent = max_concurrent
        self._max_wait_s = max_wait_s
        self._http = httpx.AsyncClient(
            verify=ssl_context(ca_file),
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            trust_env=False,
            transport=transport,
            headers={
                "Accept": "application/json",
                "Accept-Encoding": "identity",  # read_bounded counts raw bytes: nothing to inflate
                "User-Agent": f"fleetgate/{__version__}",
            },
        )
        self.tokens = TokenSource(
            self._http,
            self.base_url + "/oauth/token",
            client_id,
            client_secret,
            timeout_s=timeout_s,
            clock=clock,
        )
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "requests",
                "ok",
                "partial",
                "segway_error",
                "token_rejected",
                "token_retries",
                "token_refused",
                "unavailable",
                "invalid",
            ),
            0,
        )

    def __repr__(self) -> str:
        return f"<SegwayClient {self.base_url} client_id={self.tokens.client_id}>"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> SegwayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- typed conveniences ------------------------------------------------------------------------------

    async def status(self, iot_code: str) -> Status:
        return cast(Status, (await self.call("status", iot_code)).data)

    async def extra_status(self, iot_code: str) -> ExtraStatus:
        return cast(ExtraStatus, (await self.call("extra-status", iot_code)).data)

    async def location(self, iot_code: str, real_time: bool = False) -> Location:
        params = {"realTimeLocation": True} if real_time else {}
        return cast(Location, (await self.call("location", iot_code, params)).data)

    async def battery_info(self, iot_code: str) -> BatteryInfo:
        return cast(BatteryInfo, (await self.call("battery-info", iot_code)).data)

    async def bluetooth_key(self, iot_code: str) -> BluetoothKey:
        return cast(BluetoothKey, (await self.call("bluetooth-key", iot_code)).data)

    async def command(self, name: str, iot_code: str, **params: Any) -> Result:
        """A control or setting by its catalogue name, e.g. ``command("speed-mode", iot, speedMode=2)``."""
        return await self.call(name, iot_code, params)

    # -- the call ------------------------------------------------------------------------------------------

    async def call(
        self, op: Operation | str, iot_code: str, params: Mapping[str, Any] | None = None
    ) -> Result:
        """Run ``op`` on vehicle ``iot_code`` (see the module docstring for what comes back or is raised)."""
        try:
            result = await self._call(op, iot_code, params)
        except Exception as exc:
            self.counters[_outcome(exc)] += 1
            raise
        self.counters["ok" if result.code == SUCCESS else "partial"] += 1
        return result

    async def _call(self, op: Operation | str, iot_code: str, params: Mapping[str, Any] | None) -> Result:
        op_ = operation(op)
        payload = params_for(op_, params if params is not None else {})
        if not isinstance(iot_code, str) or not _IOT_CODE.fullmatch(iot_code):
            raise ValueError(f"iotCode must be 1-32 letters or digits, got {str(iot_code)[:40]!r}")
        async with self._slot():
            token = await self.tokens.get()
            answer = await self._exchange(op_, iot_code, payload, token)
            if answer.code == TOKEN_REJECTED:
                self.counters["token_retries"] += 1
                self.tokens.invalidate(token)
                answer = await self._exchange(op_, iot_code, payload, await self.tokens.get())
                if answer.code == TOKEN_REJECTED:
                    raise TokenRejected(answer.code, answer.msg, answer.op_id)
        if answer.code not in PARTIAL_SUCCESS and answer.code != SUCCESS:
            raise error_for(answer.code, answer.msg, answer.op_id)
        data = _data(op_, iot_code, answer.data) if answer.code == SUCCESS else None
        return Result(op_.name, iot_code, answer.code, answer.msg, answer.op_id, answer.t, data)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of ``max_concurrent`` request slots, waited for at most ``max_wait_s``."""
        try:
            async with asyncio.timeout(self._max_wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise SegwayUnavailable(
                "busy", f"no request slot free within {self._max_wait_s:g} s ({self._max_concurrent} in use)"
            ) from None
        try:
            yield
        finally:
            self._slots.release()

    async def _pace(self) -> None:
        """Start requests at least 1/max_requests_per_s apart: reserve the next start, then wait for it.
        The wait is bounded: only the holders of the few slots reserve, one or two starts each."""
        now = time.monotonic()
        start = max(now, self._next_start)
        self._next_start = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)

    async def _exchange(self, op: Operation, iot_code: str, payload: dict[str, Any], token: str) -> _Envelope:
        """One request; the answer's envelope. An HTTP 401 comes back as code 15101, as the API's own."""
        await self._pace()
        what = f"{op.method} {op.path}"
        headers = {"Authorization": f"bearer {token}"}
        if op.method == "GET":
            query = {"iotCode": iot_code, **{k: _query_value(v) for k, v in payload.items()}}
            request = self._http.build_request("GET", self.base_url + op.path, params=query, headers=headers)
        else:
            body = json.dumps({"iotCode": iot_code, **payload}, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
            request = self._http.build_request("POST", self.base_url + op.path, content=body, headers=headers)
        self.counters["requests"] += 1
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._http.send(request, stream=True)
                try:
                    body = await read_bounded(response, what)
                finally:
                    await response.aclose()
        except (httpx.HTTPError, OSError) as exc:
            raise transport_failure(exc, what, self._timeout_s) from None
        status = response.status_code
        if status == 401:
            return _Envelope(TOKEN_REJECTED, "HTTP 401 Unauthorized", None, None, None)
        if status == 429:
            retry_after = _retry_after(response.headers.get("retry-after", ""))
            after = f"; retry after {retry_after:g} s" if retry_after is not None else ""
            raise SegwayUnavailable(
                "rate-limited", f"{what} answered {phrase(429)}{after}", retry_after=retry_after
            )
        if status != 200:
            raise SegwayUnavailable("http", f"{what} answered {phrase(status)}", retryable=status >= 500)
        return _envelope(body, what)


def _outcome(exc: Exception) -> str:
    if isinstance(exc, TokenRejected):
        return "token_rejected"
    if isinstance(exc, SegwayError):
        return "segway_error"
    if isinstance(exc, SegwayUnavailable):
        return "unavailable"
    if isinstance(exc, TokenRefused):
        return "token_refused"
    return "invalid"


def _query_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _retry_after(value: str) -> float | None:
    """Retry-After in seconds (its HTTP-date form is not worth a parser here)."""
    value = value.strip()
    return float(value) if value.isascii() and value.isdigit() and len(value) <= 6 else None


def _garbled(what: str, problem: str) -> SegwayUnavailable:
    return SegwayUnavailable("garbled", f"{what}: {problem}")


def _envelope(body: bytes, what: str) -> _Envelope:
    """``{code, msg, data, t, opId}`` checked: code an integer, msg a string, t an integer, opId (or
    battery-info's resId) a string; each may be null but code."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        raise _garbled(what, "the answer is not JSON") from None
    if not isinstance(answer, dict):
        raise _garbled(what, "the answer is not a JSON object")
    if "code" not in answer:
        raise _garbled(what, "the answer has no code")
    code, msg, t = answer["code"], answer.get("msg"), answer.get("t")
    op_id = answer["opId"] if answer.get("opId") is not None else answer.get("resId")
    if type(code) is not int:
        raise _garbled(what, "code is not an integer")
    if msg is not None and not isinstance(msg, str):
        raise _garbled(what, "msg is not a string")
    if t is not None and type(t) is not int:
        raise _garbled(what, "t is not an integer")
    if op_id is not None and not (isinstance(op_id, str) and op_id.isprintable()):
        raise _garbled(what, "opId is not printable text")
    return _Envelope(code, _printable((msg or "")[:MAX_MSG]), op_id and op_id[:100], t, answer.get("data"))


def _printable(text: str) -> str:
    """Segway's msg as shown and recorded: a lone surrogate (JSON "\\ud800") cannot be written into a UTF-8
    record, and a control character has no place in a log line; each becomes U+FFFD."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "\ufffd" for c in text)


def _data(op: Operation, iot_code: str, data: Any) -> BaseModel | None:
    """A query's ``data`` as its model, for this vehicle; a control's or setting's data is not looked at."""
    if op.response is None:
        return None
    what = f"{op.method} {op.path}"
    if not isinstance(data, dict):
        raise _garbled(what, "data is not an object")
    try:
        model = op.response.model_validate(data)
    except ValidationError as exc:
        # Located, without the input: the value may be a bluetooth key.
        error = exc.errors(include_url=False, include_input=False, include_context=False)[0]
        where = ".".join(str(part) for part in error["loc"])[:80]
        raise _garbled(what, f"data.{where}: {error['msg']}") from None
    if getattr(model, "iotCode", iot_code) != iot_code:
        raise _garbled(what, "data.iotCode is another vehicle's")
    return model
