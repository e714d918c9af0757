"""Supervised component: the HTTPS endpoint Segway POSTs its pushes to (alert, fault, location, status,
components), each committed to the durable outbox before Segway hears 200.

Why it answers as it does: Segway retries a push once, 5 s after anything but 200, then drops it. So 200 means
"committed" (``accept`` returns only after the outbox commit), and a failure of ours (disk full) is 503, so the
retry gets a second chance. A push that is not Segway's (no or bad signature, another platform's) is 403 and
never reaches ``accept``; a signed one with a bad value is 400 (a retry would not help). The retry is the same
bytes, so a push seen within the last ten minutes is answered 200 again without a second record; its key is
remembered only once committed, and a retry that arrives while the first is still being committed waits for
it. Segway authenticates by signature, not client certificate, so the TLS side asks for none.

What is logged: the kind, iotCode (of signed pushes only), the reason of a refusal and counters; never another
parameter's value, the signature or the secret. aiohttp's access log is off, since it would print paths and
query strings of anything that connects.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from fleetgate.sync.segway.push import SIGNATURE, PushRejected, parse_form, verify
from fleetgate.sync.segway.pushes import KINDS, Push, PushInvalid, decode_push, dedup_key

log = logging.getLogger(__name__)

FORM = "application/x-www-form-urlencoded"
DEDUP_WINDOW_S = 600.0
DEDUP_ENTRIES = 4096
SUCCESS = {"code": 0, "message": "success"}


@dataclass
class PushSettings:
    bind: str
    port: int  # 0: the kernel picks one (tests); the receiver's ``port`` then says which
    cert_file: Path
    key_file: Path
    max_body_bytes: int = 16384


def _no_password() -> bytes:
    return b""


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class PushReceiver:
    name = "segway-push"
    expected_errors = (OSError,)  # address in use, certificate missing or unreadable (ssl.SSLError included)

    def __init__(
        self,
        settings: PushSettings,
        client_secret: str,
        platform_code: str,
        accept: Callable[[Push], Awaitable[None]],
        dedup_window_s: float = DEDUP_WINDOW_S,
        dedup_entries: int = DEDUP_ENTRIES,
    ) -> None:
        self._settings = settings
        self._secret = client_secret
        self._platform_code = platform_code
        self._accept = accept
        self._window_s = dedup_window_s
        self._max_entries = dedup_entries
        self._seen: OrderedDict[str, float] = OrderedDict()  # dedup key -> monotonic time committed
        self._pending: dict[str, asyncio.Future[bool]] = {}  # dedup key -> committed? (being accepted)
        self.counters: dict[str, int] = {
            "received": 0,
            "accepted": 0,
            "duplicates": 0,
            "invalid": 0,
            "failed": 0,
        }
        self.port: int | None = None  # the bound port while serving

    def __repr__(self) -> str:  # the secret stays out of reprs, and so out of tracebacks' locals
        return f"PushReceiver(bind={self._settings.bind!r}, port={self.port})"

    def status(self) -> dict[str, Any]:
        return {
            "listening": self.port is not None,
            "bind": self._settings.bind,
            "port": self.port,
            "counters": dict(self.counters),
            "remembered": len(self._seen),
        }

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # CERT_NONE: no client certificate asked
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        cert, key = os.fspath(self._settings.cert_file), os.fspath(self._settings.key_file)
        ctx.load_cert_chain(cert, key, password=_no_password)  # an encrypted key fails, never prompts
        return ctx

    async def run(self) -> None:
        ctx = self._ssl_context()  # read at every start: a renewed certificate is used after a restart
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._settings.bind, self._settings.port, ssl_context=ctx)
            await site.start()
            self.port = runner.addresses[0][1]
            log.info("segway push receiver listening", extra={"bind": self._settings.bind, "port": self.port})
            await asyncio.Future()  # serve until cancelled
        finally:
            self.port = None
            await runner.cleanup()

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    async def _handle(self, request: web.Request) -> web.Response:
        self._count("received")
        kind = KINDS.get(request.path)
        try:
            if kind is None:
                raise _Refused(404, "unknown-path")
            if request.method != "POST":
                raise _Refused(405, "method")
            push, key = await self._read(request, kind)
        except _Refused as refused:
            self._count(f"refused:{refused.reason}")
            log.info("segway push refused", extra={"kind": kind, "reason": refused.reason})
            return web.json_response(
                {"code": refused.status, "message": refused.reason}, status=refused.status
            )
        except PushInvalid as exc:
            self._count("invalid")
            log.info("segway push invalid", extra={"kind": kind, "error": str(exc)})
            return web.json_response({"code": 400, "message": f"invalid: {exc}"}, status=400)
        return await self._commit(push, key)

    async def _read(self, request: web.Request, kind: str) -> tuple[Push, str]:
        """The signed, decoded push and its dedup key, or ``_Refused`` / ``PushInvalid``."""
        if request.content_type.lower() != FORM:
            raise _Refused(415, "content-type")
        if request.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise _Refused(415, "content-encoding")  # Segway sends plain forms; no compressed bombs here
        limit = self._settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _Refused(413, "too-large")
        body = bytearray()
        while chunk := await request.content.readany():
            body += chunk
            if len(body) > limit:
                raise _Refused(413, "too-large")
        try:
            params = parse_form(bytes(body))
        except PushRejected:
            raise _Refused(400, "not-form") from None
        if not params.get(SIGNATURE):
            raise _Refused(403, "no-signature")
        try:
            verify(params, self._secret)
        except PushRejected:
            raise _Refused(403, "bad-signature") from None
        if params.get("platformCode") != self._platform_code:
            raise _Refused(403, "wrong-platform")
        return decode_push(kind, params), dedup_key(request.path, params)

    async def _commit(self, push: Push, key: str) -> web.Response:
        where = {"kind": push.kind, "iot_code": push.iot_code}
        while True:
            if self._remembered(key):
                self._count("duplicates")
                log.debug("segway push duplicate", extra=where)
                return web.json_response(SUCCESS)
            pending = self._pending.get(key)
            if pending is None:
                break
            await asyncio.shield(pending)  # the same push, being committed: its outcome decides
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[key] = done
        try:
            await self._accept(push)
        except Exception as exc:
            self._count("failed")
            error = type(exc).__name__ + (
                f": {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else ""
            )
            log.warning("segway push not committed", extra={**where, "error": error})
            return web.json_response({"code": 503, "message": "not stored, retry"}, status=503)
        else:
            self._remember(key)
            self._count("accepted")
            log.debug("segway push accepted", extra=where)
            return web.json_response(SUCCESS)
        finally:
            del self._pending[key]
            done.set_result(key in self._seen)

    def _remembered(self, key: str) -> bool:
        now = time.monotonic()
        while self._seen and next(iter(self._seen.values())) <= now - self._window_s:
            self._seen.popitem(last=False)
        return key in self._seen

    def _remember(self, key: str) -> None:
        self._seen[key] = time.monotonic()
        self._seen.move_to_end(key)
        while len(self._seen) > self._max_entries:
            self._seen.popitem(last=False)
