"""A real HTTPS server that plays Segway's fleet IoT API in tests (aiohttp), shapes as in
``shared/seeds/segway-emoped-api.md``.

    from mosquitto_fixture import make_tls
    from segway_server import SegwayServer

    tls = make_tls(tmp_path)
    with SegwayServer(tls) as segway:             # its own thread and event loop: usable from sync tests
        segway.add_scooter("861477038719116", locked=True, powerPercent=80)
        ... SegwayClient(segway.base_url, segway.client_id, segway.client_secret, ca_file=tls.ca)

    async with SegwayServer(tls) as segway:       # or in the running loop of an async test
        ...

TLS: the server certificate from ``tls``, no client certificate asked for (Segway authenticates by OAuth2).

- ``POST /oauth/token`` (form: client_id, client_secret, grant_type=client_credentials): a uuid token of
  ``expires_in`` seconds; 401 ``{"error": "invalid_client", ...}`` for wrong credentials. A new token cuts
  the older ones' lives to 300 s from now, as the seed says (old and new both work meanwhile).
- Every query, control and setting path of the catalogue: ``{code, msg, data, t, opId}`` (battery-info
  carries ``resId`` instead of ``opId``, as in the seed; the status answer says ``remainderRange`` and the
  location answer ``gpsUtcTime`` as a string, as the seed's examples do). Parameters are checked against the
  seed's tables here, independently of the client's catalogue: unknown, missing or out-of-range → 15004;
  unknown iotCode → 15102; controls and settings on an offline scooter → 15301. A missing or expired token
  gets code 15101 (``reject_with="code"``) or HTTP 401 (``reject_with="http"``).
- The yard (``add_scooter``) holds each scooter's status, extra status, location, battery and bluetooth key;
  controls and settings change it (lock/unlock, rental, boxes, speed mode, key, settings as sent).

Faults for the next N requests whose path contains ``path`` (default: any ``/api/`` path, not the token
endpoint): ``fail_next`` (a Segway code or an HTTP status), ``delay_next``, ``garble_next`` (a body of the
test's choosing). ``expire_tokens()`` makes every token invalid at once. ``requests`` records each request
(method, path, params or JSON, token, status, code, opId); ``max_in_flight`` the most handled at once.
State and faults are guarded by a lock: tests may call the methods from any thread.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from mosquitto_fixture import TlsFiles

START_TIMEOUT = 10.0
SEED_CLIENT_ID = "A20081"
SEED_CLIENT_SECRET = "e2651be5-12d3-48f3-ba6c-bc2b04a447b6"
OVERLAP_S = 300.0  # the seed: old and new tokens both work for 300 s after a refresh
MESSAGES = {
    0: "Success",
    15001: "server error",
    15004: "parameter error",
    15101: "token verification failed",
    15102: "device not found",
    15301: "offline device",
    15302: "device response timeout",
    15600: "lock failed: vehicle is riding",
    15623: "startRental success, but saddle failed",
    15627: "endRental failed: vehicle is riding",
    15635: "open failed: please operate when mopeds is unlocking",
}

# -- the seed's parameter tables, written out again (not taken from the client under test) ----------------

Spec = dict[str, tuple[bool, Any]]  # name -> (required, allowed: a set/range of ints, "key", or a Spec)
SW = frozenset({0, 1, 2})
SW3 = frozenset({0, 1, 2, 3})
ONE3 = frozenset({1, 2, 3})
LAMP: Spec = {"mode": (True, frozenset({1, 2})), "color": (True, range(1, 8))}
SOUNDS = [
    "unlocked",
    "locked",
    "openBoxes",
    "kickstand",
    "helmet",
    "turning",
    "ready",
    "unReady",
    "gearUp",
    "gearDown",
    "enterCruise",
    "exitCruise",
    "setSuccess",
    "setFailed",
    "defenseOn",
    "error",
    "lowPower",
    "batteryInserted",
]
INTERVAL = range(10, 65536)

POST_SPECS: dict[str, Spec] = {
    "/api/v2/mopeds/control/startRental": {},
    "/api/v2/mopeds/control/endRental": {},
    "/api/v2/vehicle/control/unlock": {},
    "/api/v2/vehicle/control/lock": {},
    "/api/v2/vehicle/control/throttle-response": {"controlType": (True, frozenset({0, 1}))},
    "/api/v2/mopeds/control/saddle": {},
    "/api/v2/mopeds/control/tailbox": {},
    "/api/v2/vehicle/control/battery-cover": {},
    "/api/v2/vehicle/control/sound": {"controlType": (True, ONE3)},
    "/api/v2/mopeds/setting/rental": {
        "saddleSwitch": (False, SW3),
        "tailboxSwitch": (False, SW3),
        "helmetCheck": (False, SW),
        "saddleCheck": (False, SW),
        "tailboxCheck": (False, SW),
    },
    "/api/v2/mopeds/setting/switch": {
        "bssDisplay": (False, SW),
        "alertCheck": (False, SW),
        "berLevel": (False, SW3),
        "alertSensitivity": (False, ONE3),
        "lowPowerValue": (False, range(10, 31)),
        "displayTime": (False, SW),
        "displayODO": (False, SW),
        "lowSpeedLimit": (False, range(6, 43)),
        "mediumSpeedLimit": (False, range(6, 43)),
        "highSpeedLimit": (False, range(6, 43)),
    },
    "/api/v2/mopeds/setting/able-switch": {
        name: (False, SW)
        for name in [
            "assistedMode",
            "crashWarning",
            "kickstandCheck",
            "cruiseSwitch",
            "speedModeSwitch",
            "handlebarSwitch",
            "lowPowerSwitch",
            "saddleCheck",
        ]
    },
    "/api/v2/vehicle/setting/ambient": {
        "bright": (True, ONE3),
        "parkingMode": (True, LAMP),
        "cruiseMode": (False, LAMP),
        "readyMode": (False, LAMP),
        "faultMode": (False, LAMP),
    },
    "/api/v2/vehicle/setting/sound": {
        "workMode": (True, SW),
        "volume": (False, ONE3),
        "moeqMask": (False, {name: (False, SW) for name in SOUNDS}),
    },
    "/api/v2/vehicle/setting/speed-mode": {"speedMode": (True, ONE3)},
    "/api/v2/vehicle/setting/bluetooth-key": {"key": (True, "key")},
    "/api/v2/vehicle/setting/interval": {
        "locationInterval": (True, {"unlockStatus": (True, INTERVAL), "lockStatus": (True, INTERVAL)}),
        "statusInterval": (
            True,
            {"ridingStatus": (True, INTERVAL), "nonRiding": (True, INTERVAL), "lockStatus": (True, INTERVAL)},
        ),
    },
    "/api/v2/vehicle/setting/time-adjust": {
        "utcOffset": (True, range(-43200, 43201)),
        "dstOffset": (True, frozenset({0, 3600})),
    },
}
GET_PATHS = {
    "/api/v2/vehicle/query/current/status": "status",
    "/api/v2/mopeds/query/current/extra-status": "extra",
    "/api/v2/vehicle/query/current/location": "location",
    "/api/v2/mopeds/query/current/battery-info": "battery",
    "/api/v2/vehicle/query/current/bluetooth-key": "key",
}
_KEY = re.compile(r"[A-Za-z0-9]{8}")


def valid(spec: Spec, values: Any) -> bool:
    """Whether ``values`` is an object with exactly ``spec``'s fields (the required ones at least), each an
    int in its set or range, a bluetooth key, or a nested object of its own spec."""
    if not isinstance(values, dict) or set(values) - set(spec):
        return False
    for name, (required, allowed) in spec.items():
        if name not in values:
            if required:
                return False
            continue
        value = values[name]
        if isinstance(allowed, dict):
            ok = valid(allowed, value)
        elif allowed == "key":
            ok = isinstance(value, str) and _KEY.fullmatch(value) is not None
        else:
            ok = type(value) is int and value in allowed
        if not ok:
            return False
    return True


# -- the yard -----------------------------------------------------------------------------------------------


def _new_scooter(iot_code: str) -> dict[str, Any]:
    """One scooter's state, in the seed's example values and field names."""
    return {
        "status": {
            "iotCode": iot_code,
            "online": True,
            "locked": True,
            "lockVoltage": 342,
            "networkSignal": 22,
            "charging": False,
            "powerPercent": 80,
            "speedMode": 1,
            "speed": 0,
            "odometer": 9000,
            "remainderRange": 3000,  # the example's name; the table says remainingRange
            "totalRidingSecs": 110,
            "statusUtcTime": 1591067719,
        },
        "extra": {
            "iotCode": iot_code,
            "seatCaskHelmet": 1,
            "tailboxHelmet": 0,
            "peopleSat": 0,
            "cruiseStatus": 0,
            "saddleStatus": 1,
            "tailboxStatus": 1,
            "handlebarStatus": 1,
            "kickstand": 0,
        },
        "location": {
            "iotCode": iot_code,
            "latitude": 22.634228,
            "longitude": 114.125962,
            "satelliteNumber": 6,
            "hdop": 1.38,
            "altitude": 10.1,
            "gpsUtcTime": "1591067719",  # a string, as in the seed's example
        },
        "battery": {
            "iotCode": iot_code,
            "charging": False,
            "vehiclePercent": 80,
            "batteryCount": 2,
            "drivingVoltage": 80,
            "currentPower": 260,
            "iotPercent": 100,
            "iotVoltage": 412,
            "batteryData": [
                {
                    "batteryPort": 1,
                    "batteryPercent": 52,
                    "batteryVoltage": 48,
                    "cycleTimes": 23,
                    "temperatrue": 25,
                },
                {
                    "batteryPort": 2,
                    "batteryPercent": 20,
                    "batteryVoltage": 48,
                    "cycleTimes": 40,
                    "temperatrue": 25,
                },
            ],
        },
        "key": {"iotCode": iot_code, "key": "abcd1234"},
        "rental": False,
        "throttle": True,
        "batteryCover": "closed",
        "sounds": [],
        "settings": {},
    }


class _Answer(Exception):
    """A handler's non-zero Segway code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class Recorded:
    """A request that reached the server. ``params``: the query (GET), the JSON body (POST) or the form
    (token endpoint, secret blanked). ``token``: the bearer token sent. ``code``: the answer's Segway code."""

    method: str
    path: str
    params: Any
    token: str | None
    status: int
    code: int | None
    op_id: str | None


@dataclass
class _Fault:
    remaining: int
    path: str | None
    code: int | None = None
    msg: str | None = None
    http_status: int | None = None
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    delay_s: float = 0.0

    def matches(self, path: str) -> bool:
        return path.startswith("/api/") if self.path is None else self.path in path


class SegwayServer:
    """Segway on ``https://127.0.0.1:{port}``. ``port=0`` picks a free one, kept across stop/start."""

    def __init__(
        self,
        tls: TlsFiles,
        *,
        client_id: str = SEED_CLIENT_ID,
        client_secret: str = SEED_CLIENT_SECRET,
        expires_in: int = 43199,
        reject_with: Literal["code", "http"] = "code",
        port: int = 0,
    ) -> None:
        self.tls = tls
        self.client_id = client_id
        self.client_secret = client_secret
        self.expires_in = expires_in
        self.reject_with = reject_with
        self.port = port
        self._lock = threading.Lock()
        self._scooters: dict[str, dict[str, Any]] = {}
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._issued: list[str] = []
        self._token_requests = 0
        self._faults: list[_Fault] = []
        self._requests: list[Recorded] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the server has not started yet")
        return f"https://127.0.0.1:{self.port}"

    # -- lifecycle (as ReefServer) ----------------------------------------------------------------------------

    def start(self) -> SegwayServer:
        """Serve from a thread of its own (for sync tests; also fine from async ones)."""
        if self._thread is not None or self._runner is not None:
            raise RuntimeError("the Segway server is already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="segway-server", daemon=True)
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

    def __enter__(self) -> SegwayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def astart(self) -> SegwayServer:
        """Serve in the running event loop (an async test)."""
        if self._thread is not None or self._runner is not None:
            raise RuntimeError("the Segway server is already running")
        await self._start_site()
        return self

    async def astop(self) -> None:
        await self._stop_site()

    async def __aenter__(self) -> SegwayServer:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()

    async def _start_site(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # no client certificate asked for
        ctx.load_cert_chain(str(self.tls.server_cert), str(self.tls.server_key))
        try:
            await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=ctx).start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def _stop_site(self) -> None:
        runner, self._runner = self._runner, None
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:  # handlers sleeping in a delay fault must not outlive the loop
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()

    # -- the yard ---------------------------------------------------------------------------------------------

    def add_scooter(self, iot_code: str, **state: Any) -> None:
        """Put a scooter in the yard with the seed's example values, ``state`` overriding any of them by its
        field name (``locked=False``, ``powerPercent=55``, ``key="4BKNwi77"``, ``online=False`` ...; a name
        several answers carry, such as ``charging``, is set in each)."""
        scooter = _new_scooter(iot_code)
        for name, value in state.items():
            homes = [part for part in scooter.values() if isinstance(part, dict) and name in part]
            if not homes and name not in scooter:
                raise ValueError(f"no scooter field is named {name!r}")
            for home in homes:
                home[name] = value
            if not homes:
                scooter[name] = value
        with self._lock:
            self._scooters[iot_code] = scooter

    def scooter(self, iot_code: str) -> dict[str, Any]:
        """A copy of a scooter's state: ``status``, ``extra``, ``location``, ``battery``, ``key`` (answers'
        data), ``rental``, ``throttle``, ``batteryCover``, ``sounds`` and ``settings`` (by path, as sent)."""
        with self._lock:
            return copy.deepcopy(self._scooters[iot_code])

    # -- tokens -------------------------------------------------------------------------------------------------

    def issue_token(self) -> str:
        """What a good token request does: a new uuid token; older ones live 300 s more at most."""
        token = str(uuid.uuid4())
        now = time.monotonic()
        with self._lock:
            for old, until in self._tokens.items():
                self._tokens[old] = min(until, now + OVERLAP_S)
            self._tokens[token] = now + self.expires_in
            self._issued.append(token)
        return token

    def expire_tokens(self) -> None:
        """Every token issued so far stops working now."""
        with self._lock:
            self._tokens.clear()

    def token_valid(self, token: str | None) -> bool:
        with self._lock:
            return token is not None and self._tokens.get(token, 0.0) > time.monotonic()

    @property
    def token_fetches(self) -> int:
        """Requests to the token endpoint, good or not, faults injected or not."""
        with self._lock:
            return self._token_requests

    @property
    def tokens_issued(self) -> list[str]:
        with self._lock:
            return list(self._issued)

    # -- faults ---------------------------------------------------------------------------------------------

    def fail_next(
        self,
        code: int | None = None,
        *,
        http_status: int | None = None,
        msg: str | None = None,
        count: int = 1,
        path: str | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The next ``count`` matching requests are answered with Segway ``code`` (HTTP 200, the envelope,
        a fresh opId) or with HTTP ``http_status`` (``body``, default ``{"message": "injected fault"}``)."""
        if (code is None) == (http_status is None):
            raise ValueError("give either a Segway code or an HTTP status")
        if http_status is not None and body is None:
            body = json.dumps({"message": "injected fault"}).encode()
        self._add(
            _Fault(
                count,
                path,
                code=code,
                msg=msg,
                http_status=http_status,
                body=body,
                headers=dict(headers or {}),
            )
        )

    def delay_next(self, seconds: float, *, count: int = 1, path: str | None = None) -> None:
        """The next ``count`` matching requests are answered (normally) ``seconds`` late."""
        self._add(_Fault(count, path, delay_s=seconds))

    def garble_next(
        self,
        body: bytes,
        *,
        count: int = 1,
        path: str | None = None,
        status: int = 200,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The next ``count`` matching requests get ``body`` as it is (not JSON, a wrong shape ...)."""
        self._add(
            _Fault(
                count,
                path,
                http_status=status,
                body=body,
                content_type=content_type,
                headers=dict(headers or {}),
            )
        )

    def _add(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(path):
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

    def api_requests(self) -> list[Recorded]:
        """The requests to the API proper (not the token endpoint)."""
        return [r for r in self.requests if r.path.startswith("/api/")]

    @property
    def max_in_flight(self) -> int:
        """The most requests handled at the same time so far."""
        with self._lock:
            return self._max_in_flight

    # -- HTTP -------------------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        record: dict[str, Any] = {"params": None, "token": None, "code": None, "op_id": None}
        status = 500
        try:
            response = await self._answer(request, record)
            status = response.status
            return response
        finally:
            with self._lock:
                self._in_flight -= 1
                self._requests.append(Recorded(request.method, request.path, status=status, **record))
            if task is not None:
                self._tasks.discard(task)

    async def _answer(self, request: web.Request, record: dict[str, Any]) -> web.StreamResponse:
        record["token"] = _bearer(request)
        form: dict[str, Any] = {}
        if request.path == "/oauth/token" and request.method == "POST":
            with self._lock:
                self._token_requests += 1
            form = dict(await request.post())
            record["params"] = {k: ("<secret>" if k == "client_secret" else v) for k, v in form.items()}
        elif request.method == "GET":
            record["params"] = dict(request.query)
        else:
            record["params"] = await _json_body(request)
        fault = self._take_fault(request.path)
        if fault is not None and fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault is not None and fault.code is not None:
            return self._envelope(request.path, record, fault.code, None, msg=fault.msg)
        if fault is not None and fault.http_status is not None:
            return web.Response(
                status=fault.http_status,
                body=fault.body,
                content_type=fault.content_type,
                headers=fault.headers,
            )
        if request.path == "/oauth/token":
            return self._token_endpoint(form)
        method = "GET" if request.path in GET_PATHS else "POST" if request.path in POST_SPECS else None
        if method is None:
            return web.json_response({"message": "no such path"}, status=404)
        if request.method != method:
            return web.json_response({"message": "method not allowed"}, status=405)
        if not self.token_valid(record["token"]):
            if self.reject_with == "http":
                return web.json_response({"error": "invalid_token"}, status=401)
            return self._envelope(request.path, record, 15101, None)
        try:
            data = self._operate(request.path, record["params"])
        except _Answer as answer:
            return self._envelope(request.path, record, answer.code, None)
        return self._envelope(request.path, record, 0, data)

    def _token_endpoint(self, form: dict[str, Any]) -> web.Response:
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        good_id = secrets.compare_digest(str(form.get("client_id", "")).encode(), self.client_id.encode())
        good_secret = secrets.compare_digest(
            str(form.get("client_secret", "")).encode(), self.client_secret.encode()
        )
        if not (good_id and good_secret):
            return web.json_response(
                {"error": "invalid_client", "error_description": "Bad client credentials"}, status=401
            )
        return web.json_response(
            {
                "access_token": self.issue_token(),
                "token_type": "bearer",
                "expires_in": self.expires_in,
                "scope": "read write trust",
            }
        )

    def _envelope(
        self, path: str, record: dict[str, Any], code: int, data: Any, msg: str | None = None
    ) -> web.Response:
        op_id = str(uuid.uuid4())
        record["code"], record["op_id"] = code, op_id
        answer = {
            "code": code,
            "msg": msg or MESSAGES.get(code, "error"),
            "data": data,
            "t": int(time.time() * 1000),
        }
        answer["resId" if path.endswith("/battery-info") else "opId"] = op_id  # as the seed's examples
        return web.json_response(answer)

    def _operate(self, path: str, params: Any) -> Any:
        """The answer's data for a valid request, or raises _Answer with the code."""
        if not isinstance(params, dict) or not isinstance(params.get("iotCode"), str):
            raise _Answer(15004)
        iot_code = params["iotCode"]
        rest = {k: v for k, v in params.items() if k != "iotCode"}
        if path in GET_PATHS:
            allowed = {"realTimeLocation"} if path.endswith("/location") else set()
            if set(rest) - allowed or rest.get("realTimeLocation", "true") not in ("true", "false"):
                raise _Answer(15004)
        elif not valid(POST_SPECS[path], rest):
            raise _Answer(15004)
        with self._lock:
            scooter = self._scooters.get(iot_code)
            if scooter is None:
                raise _Answer(15102)
            if path in GET_PATHS:
                if rest.get("realTimeLocation") == "true" and not scooter["status"]["online"]:
                    raise _Answer(15301)
                return copy.deepcopy(scooter[GET_PATHS[path]])
            if not scooter["status"]["online"]:
                raise _Answer(15301)
            _apply(scooter, path, rest)
        return None


def _apply(scooter: dict[str, Any], path: str, params: dict[str, Any]) -> None:
    """What a control or setting does to the scooter (a model of it, enough for tests to observe)."""
    status, extra = scooter["status"], scooter["extra"]
    action = path.rsplit("/", 1)[1]
    riding = status["speed"] > 0
    if action in ("unlock", "startRental"):
        status["locked"], extra["handlebarStatus"] = False, 0
        if action == "startRental":
            scooter["rental"] = True
            if scooter["settings"].get("/api/v2/mopeds/setting/rental", {}).get("saddleSwitch") == 1:
                extra["saddleStatus"] = 0
    elif action in ("lock", "endRental"):
        if riding:
            raise _Answer(15600 if action == "lock" else 15627)
        status["locked"], extra["handlebarStatus"] = True, 1
        extra["saddleStatus"] = extra["tailboxStatus"] = 1
        scooter["rental"] = scooter["rental"] and action != "endRental"
    elif action in ("saddle", "tailbox", "battery-cover"):
        if status["locked"]:
            raise _Answer(15635)
        if action == "battery-cover":
            scooter["batteryCover"] = "open"
        else:
            extra[f"{action}Status"] = 0
    elif action == "throttle-response":
        scooter["throttle"] = params["controlType"] == 1
    elif action == "sound" and "/control/" in path:
        scooter["sounds"].append(params["controlType"])
    elif action == "speed-mode":
        status["speedMode"] = params["speedMode"]
    elif action == "bluetooth-key":
        scooter["key"]["key"] = params["key"]
    else:
        scooter["settings"].setdefault(path, {}).update(copy.deepcopy(params))


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


async def _json_body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        return None
    try:
        return json.loads(await request.read())
    except ValueError:
        return None
