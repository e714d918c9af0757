"""Scooter commands, from the signed MQTT downlink or a technician's ``fleetgate scooter``, routed BLE → cloud →
the persistent queue, with every outcome in the ``scooter-results`` stream.

A command is checked before anything is sent: an operation of the catalogue, parameters in the seed's ranges,
a channel that can carry it (``refused`` otherwise, with the field named). Then, with ``via = "auto"``: over
BLE when the scooter is in range and its Bluetooth key is cached, else (or when BLE fails in a way the cloud may
not) through the Segway API, retried as ``CloudChannel`` says; and if neither could run it for a reason that
may pass (out of range, the scooter or the cloud offline), it waits in the persistent queue (``pending.py``)
until done or expired: ``defer_s`` after it was asked, ``secure_defer_s`` for commands that make a scooter
safe (lock, end-rental, a key rotation), or its own signed ``expires``. ``via = "ble"`` / ``"cloud"`` pins the
channel (and may queue too).

Outcomes: ``done``; ``partial`` (startRental started but the saddle or tailbox stayed shut, 15623-15625; a
rotated key set but not read back); ``failed`` (``retryable`` says whether asking again may help);
``refused``; ``expired`` (judged on a trusted clock only); ``deferred`` (queued: its final outcome follows in
another record with the same ``id``). Each says the ``channel`` that ran it and the ``route`` tried.

After a rental ends (over either channel) the scooter's Bluetooth key is rotated: a new random key is set
through the cloud and read back, so a renter's copy stops working. A key never appears in a record.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.scooters import records
from fleetgate.daemon.scooters.channels import BleChannel, CloudChannel, RetryPolicy, expired
from fleetgate.daemon.scooters.key_store import STATE_KEY as KEYS_KEY
from fleetgate.daemon.scooters.key_store import KeyStore
from fleetgate.daemon.scooters.pending import Pending, PendingQueue
from fleetgate.daemon.scooters.yard import Yard
from fleetgate.sync.segway.client import SegwayClient
from fleetgate.sync.segway.operations import InvalidParams, UnknownOperation, operation, params_for
from fleetgate.sync.store import Outbox

__all__ = ["CommandRunner", "DeferPolicy", "Request", "RetryPolicy"]

log = logging.getLogger(__name__)

ROTATE_KEY = "rotate-key"  # the gateway's own operation: set a new Bluetooth key, then read it back
SECRET_PARAMS = frozenset({"key"})  # bluetooth-key-setting's new key
SECURING = frozenset({"lock", "end-rental", ROTATE_KEY})  # make a scooter safe: queued the longest
VIA = ("auto", "ble", "cloud")
_KEY_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class Request:
    iot_code: str
    op: str
    params: Mapping[str, Any]
    source: str  # "mqtt", "cli", or "rotation" (the key rotation after a rental)
    id: str | None = None
    seq: int | None = None
    expires: datetime | None = None
    via: str = "auto"
    queued: bool = False  # an entry of the persistent queue stands for it (``pending.py``)


@dataclass(frozen=True)
class DeferPolicy:
    defer_s: float = 0.0  # 0: nothing is queued
    secure_defer_s: float = 0.0
    rotate_key_after_rental: bool = False


class CommandRunner:
    def __init__(
        self,
        client: SegwayClient,
        yard: Yard,
        keys: KeyStore,
        outbox: Outbox,
        clock: Clock,
        policy: RetryPolicy,
        *,
        ble: BleChannel | None = None,
        pending: PendingQueue | None = None,
        defer: DeferPolicy | None = None,
    ) -> None:
        self._cloud = CloudChannel(client, clock, policy)
        self._yard = yard
        self._keys = keys
        self._outbox = outbox
        self._clock = clock
        self._policy = policy
        self.ble = ble
        self.pending = pending or PendingQueue()
        self._defer = defer or DeferPolicy()
        self.followup: Callable[[Request], None] | None = None  # where a key rotation is sent to run
        self.outcomes: dict[str, int] = {}
        self.channels: dict[str, int] = {}

    # -- what may be queued, and for how long ------------------------------------------------------------

    def defer_window_s(self, op: str) -> float:
        """How long ``op`` may wait in the persistent queue (0: it is not queued)."""
        if op == ROTATE_KEY or op in SECURING:
            return self._defer.secure_defer_s
        if op == "bluetooth-key-setting" or _is_query(op):  # a key is not stored; a late answer is no use
            return 0.0
        return self._defer.defer_s

    def pending_entry(self, request: Request, queued_wall_ns: int) -> Pending | None:
        """The queue entry for ``request`` (None if it may not be queued, or the queue is full)."""
        window = self.defer_window_s(request.op)
        if window <= 0 or self.pending.full() or request.id is None:
            return None
        if request.expires is not None:
            expires_ns = int(request.expires.timestamp() * 1e9)
        else:
            expires_ns = queued_wall_ns + int(window * 1e9)
        params = {k: v for k, v in request.params.items() if k not in SECRET_PARAMS}
        return Pending(
            request.id, request.iot_code, request.op, params, request.source, request.via, request.seq,
            queued_wall_ns, expires_ns,
        )  # fmt: skip

    # -- running one ---------------------------------------------------------------------------------------

    async def run(self, request: Request) -> dict[str, Any]:
        """Run ``request`` to its outcome; the result record is committed before this returns it."""
        body: dict[str, Any] = {
            "id": request.id,
            "seq": request.seq,
            "source": request.source,
            "iot_code": request.iot_code,
            "op": request.op,
            "via": request.via,
            "params": {k: "(secret)" if k in SECRET_PARAMS else v for k, v in request.params.items()},
        }
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except (UnicodeEncodeError, ValueError):  # a lone surrogate (the CLI's JSON may carry one)
            body["params"] = {}
            return await self._finish(request, body, _refused("params: not UTF-8 text"))
        if request.via not in VIA:
            body["via"] = None
            return await self._finish(request, body, _refused(f"via must be one of {', '.join(VIA)}"))
        try:
            params = self._params(request)
        except (UnknownOperation, InvalidParams) as exc:
            return await self._finish(request, body, _refused(str(exc)))
        if request.via == "ble" and (self.ble is None or not self.ble.supports(request.op)):
            why = "BLE is not enabled" if self.ble is None else f"{request.op} does not go over BLE"
            return await self._finish(request, body, _refused(why))
        if self.is_expired(request):
            return await self._finish(request, body, {"outcome": "expired", "attempts": 0})
        if request.op == ROTATE_KEY:
            outcome, state = await self._rotate_key(request)
        else:
            outcome, state = await self._route(request, params)
        if outcome["outcome"] == "failed" and outcome.get("retryable"):
            deferred = await self._defer_or_fail(request, body, outcome)
            if deferred is not None:
                return deferred
        record = await self._finish(request, body, outcome, state)
        if request.op == "end-rental" and outcome["outcome"] == "done":
            self._rotate_soon(request.iot_code)
        return record

    def _cloud_attempts(self, request: Request) -> int:
        """A command's first run tries the cloud ``max_attempts`` times; from the queue, once per retry (the
        queue is the retry)."""
        entry = self.pending.entries.get(request.id or "") if request.queued else None
        return 1 if entry is not None and entry.tries > 0 else self._policy.max_attempts

    def _params(self, request: Request) -> dict[str, Any]:
        if request.op == ROTATE_KEY:
            if request.params:
                raise InvalidParams(ROTATE_KEY, "params", "takes no parameters")
            return {}
        return params_for(request.op, request.params)

    async def _route(self, request: Request, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        route: list[dict[str, Any]] = []
        ble = self.ble
        if request.via != "cloud" and ble is not None and ble.supports(request.op):
            why_not = ble.unavailable(request.iot_code, request.op)
            if why_not is None:
                out = await ble.run(request.iot_code, request.op)
                route.append({"channel": "ble", "result": out["ble_status"]})
                keep_on = (
                    request.via == "auto" and out["outcome"] != "done" and out["ble_status"] != "refused"
                )
                if not keep_on:
                    return {**out, "channel": "ble", "route": route, "attempts": 1}, {}
            else:
                route.append({"channel": "ble", "result": why_not})
                if request.via == "ble":
                    return {"outcome": "failed", "retryable": True, "reason": why_not, "route": route,
                            "channel": None, "attempts": 0}, {}  # fmt: skip
        attempts = self._cloud_attempts(request)
        out, data = await self._cloud.run(request.iot_code, request.op, params, request.expires, attempts)
        route.append({"channel": "cloud", "result": _cloud_result(out)})
        state: dict[str, Any] = {}
        if out["outcome"] in ("done", "partial"):
            state = self._after_cloud_success(request, params, data, out)
        return {**out, "channel": "cloud", "route": route}, state

    def _after_cloud_success(
        self, request: Request, params: dict[str, Any], data: Any, out: dict[str, Any]
    ) -> dict[str, Any]:
        if request.op in ("bluetooth-key", "bluetooth-key-setting"):
            key = getattr(data, "key", None) if data is not None else params.get("key")
            out["data"] = {"key_cached": isinstance(key, str)}
            if isinstance(key, str):
                return self._keep_key(request.iot_code, key)
        elif data is not None:
            out["data"] = data.model_dump(mode="json")
        return {}

    def _keep_key(self, iot_code: str, key: str) -> dict[str, Any]:
        wall_ns = self._clock.stamp().wall_ns
        state = self._keys.put(iot_code, key, wall_ns)
        if (scooter := self._yard.get(iot_code)) is not None:
            scooter.key_fetched_wall_ns = wall_ns
        return {KEYS_KEY: state}

    async def _rotate_key(self, request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        """Set a new random key through the cloud, then read it back; keep what the scooter has."""
        attempts = self._cloud_attempts(request)
        new = "".join(secrets.choice(_KEY_ALPHABET) for _ in range(8))
        iot = request.iot_code
        out, _ = await self._cloud.run(iot, "bluetooth-key-setting", {"key": new}, request.expires, attempts)
        route = [{"channel": "cloud", "result": _cloud_result(out)}]
        if out["outcome"] != "done":
            return {**out, "channel": "cloud", "route": route}, {}
        back, data = await self._cloud.run(iot, "bluetooth-key", {}, request.expires, attempts)
        route.append({"channel": "cloud", "result": _cloud_result(back)})
        read = getattr(data, "key", None)
        if read == new:
            return {**back, "channel": "cloud", "route": route, "data": {"key_cached": True}}, self._keep_key(
                iot, new
            )
        if isinstance(read, str):  # the scooter holds another key than the one just set: keep what it has
            out = {"outcome": "failed", "retryable": False, "reason": "the key read back is not the one set"}
            return {**out, "channel": "cloud", "route": route, "data": {"key_cached": True}}, self._keep_key(
                iot, read
            )
        out = {**back, "outcome": "partial", "reason": "the new key was set but could not be read back"}
        out.pop("retryable", None)
        return {**out, "channel": "cloud", "route": route, "data": {"key_cached": True}}, self._keep_key(
            iot, new
        )

    def _rotate_soon(self, iot_code: str) -> None:
        if not self._defer.rotate_key_after_rental or self.followup is None:
            return
        self.followup(Request(iot_code, ROTATE_KEY, {}, "rotation", f"rotate-{uuid.uuid4().hex[:12]}"))

    async def _defer_or_fail(
        self, request: Request, body: dict[str, Any], outcome: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Queue ``request`` (or keep it queued) if it may wait; None if it may not (the failure stands)."""
        stamp = self._clock.stamp()
        entry = self.pending.entries.get(request.id or "") if request.queued else None
        if entry is None:
            entry = self.pending_entry(request, stamp.wall_ns)
            if entry is None:
                return None
        if stamp.trusted and stamp.wall_ns >= entry.expires_wall_ns:
            return None  # its time is up: the failure is its outcome
        entry.tries += 1
        expires = datetime.fromtimestamp(entry.expires_wall_ns / 1e9, UTC)
        record = {**body, **outcome, "outcome": "deferred", "expires": _iso(expires)}
        record.pop("retryable", None)
        if request.queued and entry.tries > 1:  # still waiting: its entry is updated, not audited again
            await self._outbox.append([], self.pending.put(entry))
            return record
        await self._outbox.append([records.result(stamp, record)], self.pending.put(entry))
        self._count(record)
        log.info(
            "scooter command queued", extra={k: record.get(k) for k in ("iot_code", "op", "id", "expires")}
        )
        return record

    async def _finish(
        self,
        request: Request,
        body: dict[str, Any],
        outcome: dict[str, Any],
        state: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        record = {**body, **outcome}
        changes = dict(state or {})
        if request.queued and request.id is not None:
            changes.update(self.pending.remove(request.id))
        await self._outbox.append([records.result(self._clock.stamp(), record)], changes or None)
        self._count(record)
        scooter = self._yard.get(record["iot_code"])
        if scooter is not None:
            scooter.last_command = {
                k: record.get(k)
                for k in ("op", "outcome", "channel", "code", "ble_status", "op_id", "source")
            }
        log.info(
            "scooter command",
            extra={
                k: record.get(k) for k in ("iot_code", "op", "source", "outcome", "channel", "code", "op_id")
            },
        )
        return record

    def _count(self, record: dict[str, Any]) -> None:
        self.outcomes[record["outcome"]] = self.outcomes.get(record["outcome"], 0) + 1
        if record.get("channel"):
            self.channels[record["channel"]] = self.channels.get(record["channel"], 0) + 1

    def is_expired(self, request: Request) -> bool:
        return expired(self._clock, request.expires)


def _cloud_result(out: dict[str, Any]) -> int | str:
    """A cloud step of the route: Segway's code, or what happened when there was none."""
    code = out.get("code")
    if isinstance(code, int):
        return code
    return "no usable answer" if out["outcome"] == "failed" else out["outcome"]


def _refused(reason: str) -> dict[str, Any]:
    return {"outcome": "refused", "reason": reason, "attempts": 0}


def _is_query(op: str) -> bool:
    try:
        return operation(op).kind == "query"
    except UnknownOperation:
        return False


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")
