"""A real HTTPS server with mTLS that plays REEF's managed-sessions API in tests (aiohttp).

    from mosquitto_fixture import make_tls
    from reef_server import ReefServer

    tls = make_tls(tmp_path)
    with ReefServer(tls) as reef:                 # its own thread and event loop: usable from sync tests
        pin = reef.start_session(VIN)["pin"]
        ... ReefClient(reef.base_url, ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.client_key)

    async with ReefServer(tls) as reef:           # or in the running loop of an async test
        ...

Routes (under ``/v1``, shapes as in ``shared/seeds/reef-managed-sessions-api.md``):

- ``GET  /managed-sessions``, ``GET /managed-sessions/{id}``, ``GET /managed-sessions/vehicles/{vin}``:
  ``{"managed_sessions": [...]}``; timestamps as REEF writes them, naive UTC with a space
  (``2021-06-09 22:06:56.232012``), ``completion`` ``"active"`` while a session is open.
- ``POST /managed-sessions/vehicles/{vin}/start``: ends any open session of the VIN, starts one with a random
  6-digit PIN; ``{"vin", "verification_id", "id", "pin"}``.
- ``POST /managed-sessions/vehicles/{vin}/end``: ends the open session; ``{"vin", "verification_id", "id",
  "initialization", "completion"}``. With no open session: 404 ``{"message": ...}`` (REEF's answer for that
  is not documented).
- ``GET  /managed-sessions/vehicles/{vin}/synchronized``: ``{"vehicle_synchronized": bool}``, true iff the
  set of (session id, "active"/"ended") the vehicle last acknowledged (``vehicle_acknowledged``) equals the
  VIN's current one; false while the vehicle never acknowledged anything.

The TLS side is what REEF requires: the server certificate from ``tls``, client certificates verified
against ``tls.ca`` (``CERT_REQUIRED``). A refused client certificate never reaches the handlers; note that
asyncio's TLS closes such a connection without sending an alert (see ``fleetgate.sync.reef.client``).

Every request that reaches the application is recorded (``requests``: method, path, client CN, status).
Faults for the next N matching requests: ``fail_next`` (a status), ``malformed_next`` (bytes that are not
JSON, with headers of the test's choosing, e.g. ``Content-Encoding: gzip``), ``shape_next`` (valid JSON of a
wrong shape), ``delay_next`` (answer late, to test timeouts), ``stream_next`` (a chunked 200 body that goes on
for as long as the test says, or until the client hangs up; ``streamed`` has the bytes each one sent).
State and faults are guarded by a lock: tests may call the methods from any thread.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from mosquitto_fixture import TlsFiles

ACTIVE = "active"
STATES = frozenset({"active", "ended"})
START_TIMEOUT = 10.0


def reef_time(moment: datetime) -> str:
    """REEF's timestamp format: naive UTC, space separator, microseconds."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _parse_time(value: str | datetime) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(value.replace("Z", "+00:00")).replace(tzinfo=UTC)


@dataclass
class _Session:
    id: int
    vin: str
    pin: str = field(repr=False)
    initialization: datetime
    completion: datetime | None
    verification_id: str

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "vin": self.vin,
            "pin": self.pin,
            "initialization": reef_time(self.initialization),
            "completion": ACTIVE if self.completion is None else reef_time(self.completion),
            "verification_id": self.verification_id,
        }

    @property
    def state(self) -> str:
        return "active" if self.completion is None else "ended"


@dataclass(frozen=True)
class Recorded:
    """A request that reached the application."""

    method: str
    path: str
    client_cn: str | None
    status: int


@dataclass
class _Fault:
    remaining: int
    path: str | None  # applies to requests whose path contains this; None: any
    status: int | None = None
    body: bytes | None = None
    content_type: str = "application/json"
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    stream_chunk: bytes = b""  # not empty: a chunked body of this, repeated
    stream_total: int | None = None  # bytes to stream; None: until the client goes away


class ReefServer:
    """REEF on ``https://127.0.0.1:{port}/v1`` with mTLS. ``port=0`` picks a free one; it is kept across
    ``stop()`` / ``start()`` so a test can take REEF away and bring it back at the same address.
    ``tls_max`` caps the TLS version (e.g. ``ssl.TLSVersion.TLSv1_2``) to see the TLS 1.2 behaviour."""

    def __init__(self, tls: TlsFiles, *, port: int = 0, tls_max: ssl.TLSVersion | None = None) -> None:
        self.tls = tls
        self.port = port
        self.tls_max = tls_max
        self._lock = threading.Lock()
        self._sessions: list[_Session] = []
        self._next_id = 1
        self._acknowledged: dict[str, frozenset[tuple[int, str]]] = {}
        self._faults: list[_Fault] = []
        self._requests: list[Recorded] = []
        self._streamed: list[int] = []
        self._runner: web.AppRunner | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- addresses -----------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the server has not started yet")
        return f"https://127.0.0.1:{self.port}/v1"

    def url(self, path: str) -> str:
        return self.base_url + path

    # -- lifecycle: own thread -------------------------------------------------------------------------------

    def start(self) -> ReefServer:
        """Serve from a thread of its own (for sync tests; also fine from async ones)."""
        if self._thread is not None or self._runner is not None:
            raise RuntimeError("the REEF server is already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="reef-server", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start_site(), loop).result(START_TIMEOUT)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(START_TIMEOUT)
            loop.close()
            raise
        self._loop, self._thread = loop, thread
        return self

    def stop(self) -> None:
        """Stop serving (open connections are closed). ``start()`` serves again on the same port."""
        if self._loop is None or self._thread is None:
            return
        loop, thread = self._loop, self._thread
        try:
            asyncio.run_coroutine_threadsafe(self._stop_site(), loop).result(START_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(START_TIMEOUT)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> ReefServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle: the caller's event loop ----------------------------------------------------------------

    async def astart(self) -> ReefServer:
        """Serve in the running event loop (an async test)."""
        if self._thread is not None or self._runner is not None:
            raise RuntimeError("the REEF server is already running")
        await self._start_site()
        return self

    async def astop(self) -> None:
        await self._stop_site()

    async def __aenter__(self) -> ReefServer:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.tls.ca))
        ctx.load_cert_chain(str(self.tls.server_cert), str(self.tls.server_key))
        ctx.verify_mode = ssl.CERT_REQUIRED
        if self.tls_max is not None:
            ctx.maximum_version = self.tls_max
        return ctx

    async def _start_site(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        base = "/v1/managed-sessions"
        app.router.add_get(base, self._list_all)
        app.router.add_get(base + r"/{id:\d+}", self._by_id)
        app.router.add_get(base + "/vehicles/{vin}", self._by_vin)
        app.router.add_post(base + "/vehicles/{vin}/start", self._start)
        app.router.add_post(base + "/vehicles/{vin}/end", self._end)
        app.router.add_get(base + "/vehicles/{vin}/synchronized", self._synchronized)
        # A short shutdown: a delayed handler must not hold up the test's teardown.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self._ssl_context())
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def _stop_site(self) -> None:
        runner, self._runner = self._runner, None
        # Handlers still sleeping in a delay fault would outlive the loop: cancel them first.
        tasks = [t for t in self._inflight if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()

    # -- REEF state (also for tests to call directly) -------------------------------------------------------

    def add_session(
        self,
        vin: str,
        *,
        id: int | None = None,  # REEF's name
        pin: str | None = None,
        initialization: str | datetime | None = None,
        completion: str | datetime | None = ACTIVE,
        verification_id: str | None = None,
    ) -> dict[str, Any]:
        """Put a session into REEF's store as given (no ending of others); returns it in wire shape.
        Timestamps may be REEF strings (``2021-06-09 22:03:49.508408``, UTC) or datetimes."""
        with self._lock:
            ident = self._next_id if id is None else id
            self._next_id = max(self._next_id, ident + 1)
            session = _Session(
                ident,
                vin,
                pin if pin is not None else _new_pin(),
                _parse_time(initialization) if initialization is not None else datetime.now(UTC),
                None if completion is None or completion == ACTIVE else _parse_time(completion),
                verification_id if verification_id is not None else secrets.token_hex(12),
            )
            self._sessions.append(session)
            return session.wire()

    def start_session(self, vin: str) -> dict[str, Any]:
        """What ``POST .../vehicles/{vin}/start`` does: end the VIN's open sessions, start a new one.
        Returns the start answer ``{"vin", "verification_id", "id", "pin"}``."""
        with self._lock:
            now = datetime.now(UTC)
            for s in self._sessions:
                if s.vin == vin and s.completion is None:
                    s.completion = now
            session = _Session(self._next_id, vin, _new_pin(), now, None, secrets.token_hex(12))
            self._next_id += 1
            self._sessions.append(session)
            return {
                "vin": vin,
                "verification_id": session.verification_id,
                "id": session.id,
                "pin": session.pin,
            }

    def end_session(self, vin: str) -> dict[str, Any] | None:
        """What ``POST .../vehicles/{vin}/end`` does; None if the VIN had no open session."""
        with self._lock:
            now = datetime.now(UTC)
            ended = [s for s in self._sessions if s.vin == vin and s.completion is None]
            for s in ended:
                s.completion = now
            if not ended:
                return None
            last = ended[-1]
            return {
                "vin": vin,
                "verification_id": last.verification_id,
                "id": last.id,
                "initialization": reef_time(last.initialization),
                "completion": reef_time(now),
            }

    def sessions(self, vin: str | None = None) -> list[dict[str, Any]]:
        """REEF's sessions (of one VIN, or all) in wire shape."""
        with self._lock:
            return [s.wire() for s in self._sessions if vin is None or s.vin == vin]

    def vehicle_acknowledged(
        self, vin: str, session_states: Iterable[tuple[int, str]] | Mapping[int, str]
    ) -> None:
        """Record the set of (session id, "active" | "ended") the vehicle reports holding now."""
        pairs = session_states.items() if isinstance(session_states, Mapping) else session_states
        states = frozenset((int(i), str(state)) for i, state in pairs)
        if bad := {state for _, state in states} - STATES:
            raise ValueError(f"session states are 'active' or 'ended', not {sorted(bad)}")
        with self._lock:
            self._acknowledged[vin] = states

    def current_states(self, vin: str) -> frozenset[tuple[int, str]]:
        with self._lock:
            return frozenset((s.id, s.state) for s in self._sessions if s.vin == vin)

    def synchronized(self, vin: str) -> bool:
        current = self.current_states(vin)
        with self._lock:
            return self._acknowledged.get(vin) == current

    # -- faults ---------------------------------------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        *,
        count: int = 1,
        body: bytes | None = None,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The next ``count`` requests (whose path contains ``path``) get ``status``, ``body``
        (default ``{"message": "injected fault"}``) and ``headers``."""
        body = body if body is not None else json.dumps({"message": "injected fault"}).encode()
        self._add_fault(_Fault(count, path, status=status, body=body, headers=dict(headers or {})))

    def malformed_next(
        self,
        body: bytes = b'{"managed_sessions": [{"id": 1,',
        *,
        count: int = 1,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The next ``count`` requests get 200 with ``body`` (default: JSON cut short) and ``headers``
        (sent as given: ``{"Content-Encoding": "gzip"}`` with a body the test compressed)."""
        self._add_fault(_Fault(count, path, status=200, body=body, headers=dict(headers or {})))

    def stream_next(
        self,
        chunk: bytes = b" " * 65536,
        *,
        total: int | None = None,
        count: int = 1,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The next ``count`` requests get 200 with a chunked body (no Content-Length) of ``chunk`` repeated,
        ``total`` bytes in all, or, with ``total=None``, until the client hangs up."""
        if not chunk:
            raise ValueError("chunk must not be empty")
        fault = _Fault(count, path, headers=dict(headers or {}), stream_chunk=chunk, stream_total=total)
        self._add_fault(fault)

    def shape_next(self, document: Any, *, count: int = 1, path: str | None = None) -> None:
        """The next ``count`` requests get 200 with ``document`` as JSON (a wrong shape, a bad field ...)."""
        self._add_fault(_Fault(count, path, status=200, body=json.dumps(document).encode()))

    def delay_next(self, seconds: float, *, count: int = 1, path: str | None = None) -> None:
        """The next ``count`` requests are answered normally, but only after ``seconds``."""
        self._add_fault(_Fault(count, path, delay_s=seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _add_fault(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path is None or fault.path in path:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    # -- records --------------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    @property
    def streamed(self) -> list[int]:
        """Bytes of body each ``stream_next`` answer wrote before it ended or the client hung up."""
        with self._lock:
            return list(self._streamed)

    # -- HTTP ----------------------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        cn = _client_cn(request)
        fault = self._take_fault(request.path)
        status = 500
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            if fault is not None and fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            if fault is not None and fault.stream_chunk:
                response: web.StreamResponse = await self._stream(request, fault)
            elif fault is not None and fault.status is not None:
                response = web.Response(
                    status=fault.status,
                    body=fault.body,
                    content_type=fault.content_type,
                    headers=fault.headers,
                )
            else:
                response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            if task is not None:
                self._inflight.discard(task)
            with self._lock:
                self._requests.append(Recorded(request.method, request.path, cn, status))

    async def _stream(self, request: web.Request, fault: _Fault) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200, headers={"Content-Type": fault.content_type, **fault.headers}
        )
        await response.prepare(request)  # no Content-Length: HTTP/1.1 chunked
        sent = 0
        try:
            while fault.stream_total is None or sent < fault.stream_total:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break  # the client hung up
                await response.write(fault.stream_chunk)
                sent += len(fault.stream_chunk)
                # write() yields only when its buffer is full: without this, the news that the client hung up
                # (a callback) would never run, and this loop would write into the void forever.
                await asyncio.sleep(0)
            await response.write_eof()
        except ConnectionError:
            pass  # the client hung up, as it should on a body it will not take
        finally:
            with self._lock:
                self._streamed.append(sent)
        return response

    async def _list_all(self, request: web.Request) -> web.Response:
        return web.json_response({"managed_sessions": self.sessions()})

    async def _by_id(self, request: web.Request) -> web.Response:
        ident = int(request.match_info["id"])
        found = [s for s in self.sessions() if s["id"] == ident]
        if not found:
            return _not_found(f"no managed session {ident}")
        return web.json_response({"managed_sessions": found})

    async def _by_vin(self, request: web.Request) -> web.Response:
        return web.json_response({"managed_sessions": self.sessions(request.match_info["vin"])})

    async def _start(self, request: web.Request) -> web.Response:
        return web.json_response(self.start_session(request.match_info["vin"]))

    async def _end(self, request: web.Request) -> web.Response:
        ended = self.end_session(request.match_info["vin"])
        if ended is None:
            return _not_found("no active managed session for this vehicle")
        return web.json_response(ended)

    async def _synchronized(self, request: web.Request) -> web.Response:
        return web.json_response({"vehicle_synchronized": self.synchronized(request.match_info["vin"])})


def _not_found(message: str) -> web.Response:
    return web.json_response({"message": message}, status=404)


def _new_pin() -> str:
    return f"{secrets.randbelow(1_000_000):06d}"


def _client_cn(request: web.Request) -> str | None:
    transport = request.transport
    peercert = transport.get_extra_info("peercert") if transport is not None else None
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
