"""Commands for scooters, from the signed MQTT downlink or a technician's ``fleetgate scooter``, run through
the Segway API, with every outcome in the ``scooter-results`` stream.

A command is checked before anything is sent: an operation of the catalogue, parameters in the seed's ranges
(``refused`` otherwise, with the field named). Segway's retryable answers (device offline 15301, response
timeout 15302, send failed 15303, the cloud unreachable ...) are tried again up to ``max_attempts`` times,
waiting ``retry_s`` and doubling, but never past the command's ``expires``. Outcomes:

- ``done``: code 0; ``partial``: startRental started the rental but the saddle or tailbox stayed shut
  (15623-15625); ``failed``: a Segway code or no usable answer, with ``retryable`` saying whether asking again
  later may help; ``refused``: not an operation or bad parameters; ``expired``: its ``expires`` passed before
  it could run (judged on a trusted clock only).

Downlink commands are first recorded as ``accepted`` in the same commit that raises the saved sequence
number, so a command the cloud sees accepted and never sees finished was cut short by a restart; it is not
run again (the persistent "lock as soon as possible" queue is the BLE issue's). A Bluetooth key never appears
in a result: not the one a query returns nor the one a setting sends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nacl.signing import VerifyKey

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.events import Events
from fleetgate.daemon.scooters import records
from fleetgate.daemon.scooters.key_store import STATE_KEY as KEYS_KEY
from fleetgate.daemon.scooters.key_store import KeyStore
from fleetgate.daemon.scooters.yard import Yard
from fleetgate.sync.crypto.scooter_command import ScooterCommand, check_seq, open_command
from fleetgate.sync.crypto.signed import SignedRejected
from fleetgate.sync.segway.client import SegwayClient
from fleetgate.sync.segway.errors import SegwayError, SegwayFailure
from fleetgate.sync.segway.operations import InvalidParams, UnknownOperation, operation, params_for
from fleetgate.sync.store import Outbox

log = logging.getLogger(__name__)

SEQ_KEY = "scooters.command_seq"
MAX_PAYLOAD_BYTES = 64 * 1024
REJECTION_EVENT_EVERY_S = 60.0
MAX_QUEUED = 256
SECRET_PARAMS = frozenset({"key"})  # bluetooth-key-setting's new key


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    retry_s: float


@dataclass(frozen=True)
class Request:
    iot_code: str
    op: str
    params: Mapping[str, Any]
    source: str  # "mqtt" or "cli"
    id: str | None = None
    seq: int | None = None
    expires: datetime | None = None


class CommandRunner:
    def __init__(
        self,
        client: SegwayClient,
        yard: Yard,
        keys: KeyStore,
        outbox: Outbox,
        clock: Clock,
        policy: RetryPolicy,
    ) -> None:
        self._client = client
        self._yard = yard
        self._keys = keys
        self._outbox = outbox
        self._clock = clock
        self._policy = policy
        self.outcomes: dict[str, int] = {}

    async def run(self, request: Request) -> dict[str, Any]:
        """Run ``request`` to its outcome; the result record is committed before this returns it."""
        body: dict[str, Any] = {
            "id": request.id,
            "seq": request.seq,
            "source": request.source,
            "iot_code": request.iot_code,
            "op": request.op,
            "params": {k: "(secret)" if k in SECRET_PARAMS else v for k, v in request.params.items()},
        }
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except (UnicodeEncodeError, ValueError):  # a lone surrogate (the CLI's JSON may carry one)
            body["params"] = {}
            return await self._finish(
                body, {"outcome": "refused", "reason": "params: not UTF-8 text", "attempts": 0}
            )
        try:
            params = params_for(request.op, request.params)
        except (UnknownOperation, InvalidParams) as exc:
            return await self._finish(body, {"outcome": "refused", "reason": str(exc), "attempts": 0})
        outcome = await self._attempts(request, params)
        return await self._finish(body, outcome)

    async def _attempts(self, request: Request, params: dict[str, Any]) -> dict[str, Any]:
        op = operation(request.op)
        delay = self._policy.retry_s
        attempt = 0
        while True:
            if self._expired(request.expires):
                return {"outcome": "expired", "attempts": attempt}
            attempt += 1
            try:
                result = await self._client.call(op, request.iot_code, params)
            except ValueError as exc:  # an iot code the API cannot take: nothing was sent
                return {"outcome": "refused", "reason": str(exc), "attempts": attempt - 1}
            except SegwayFailure as exc:
                last_try = attempt >= self._policy.max_attempts or not exc.retryable
                delay = max(delay, getattr(exc, "retry_after", None) or 0.0)  # a 429's Retry-After
                if last_try or self._expired(request.expires, after_s=delay):
                    return _failure(exc, attempt)
                log.info(
                    "scooter command: retrying",
                    extra={"iot_code": request.iot_code, "op": request.op, "error": str(exc), "in_s": delay},
                )
                await asyncio.sleep(delay)
                delay *= 2
                continue
            out: dict[str, Any] = {
                "outcome": "partial" if result.code else "done",
                "code": result.code,
                "msg": result.msg,
                "op_id": result.op_id,
                "attempts": attempt,
            }
            await self._after_success(request, params, result.data, out)
            return out

    async def _after_success(
        self, request: Request, params: dict[str, Any], data: Any, out: dict[str, Any]
    ) -> None:
        scooter = self._yard.get(request.iot_code)
        if request.op in ("bluetooth-key", "bluetooth-key-setting"):
            key = getattr(data, "key", None) if data is not None else params.get("key")
            if isinstance(key, str):
                stamp = self._clock.stamp()
                await self._outbox.append(
                    [], {KEYS_KEY: self._keys.put(request.iot_code, key, stamp.wall_ns)}
                )
                if scooter is not None:
                    scooter.key_fetched_wall_ns = stamp.wall_ns
            out["data"] = {"key_cached": isinstance(key, str)}
        elif data is not None:
            out["data"] = data.model_dump(mode="json")

    def _expired(self, expires: datetime | None, after_s: float = 0.0) -> bool:
        if expires is None:
            return False
        stamp = self._clock.stamp()
        return stamp.trusted and stamp.wall_ns / 1e9 + after_s > expires.timestamp()

    async def _finish(self, body: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
        record = {**body, **outcome}
        await self._outbox.append([records.result(self._clock.stamp(), record)])
        self.outcomes[record["outcome"]] = self.outcomes.get(record["outcome"], 0) + 1
        scooter = self._yard.get(record["iot_code"])
        if scooter is not None:
            scooter.last_command = {k: record.get(k) for k in ("op", "outcome", "code", "op_id", "source")}
        log.info(
            "scooter command",
            extra={k: record.get(k) for k in ("iot_code", "op", "source", "outcome", "code", "op_id")},
        )
        return record


def _failure(exc: SegwayFailure, attempts: int) -> dict[str, Any]:
    if isinstance(exc, SegwayError):
        return {
            "outcome": "failed",
            "code": exc.code,
            "msg": exc.msg,
            "op_id": exc.op_id,
            "retryable": exc.retryable,
            "attempts": attempts,
        }
    return {
        "outcome": "failed",
        "code": None,
        "msg": str(exc),
        "retryable": exc.retryable,
        "attempts": attempts,
    }


class CommandDownlink:
    """``down/scooter-commands``: verify, refuse replays, record acceptance, queue for the worker."""

    name = "scooter-commands"

    def __init__(
        self,
        device: str,
        verify_keys: list[VerifyKey],
        last_seq: int | None,
        runner: CommandRunner,
        outbox: Outbox,
        clock: Clock,
        events: Events,
    ) -> None:
        self._device = device
        self._verify_keys = verify_keys
        self._last_seq = last_seq
        self._runner = runner
        self._outbox = outbox
        self._clock = clock
        self._events = events
        self._lock = asyncio.Lock()
        self._queue: asyncio.Queue[Request] = asyncio.Queue(MAX_QUEUED)
        self._last_rejection_event: dict[str, float] = {}
        self.accepted = 0
        self.failed = 0  # commands whose outcome could not be recorded
        self.rejected: dict[str, int] = {}

    async def on_mqtt(self, payload: bytes) -> None:
        async with self._lock:
            try:
                if len(payload) > MAX_PAYLOAD_BYTES:
                    raise SignedRejected("malformed", f"payload of {len(payload)} bytes is too large")
                command = open_command(payload, verify_keys=self._verify_keys, device=self._device)
                check_seq(command, self._last_seq)
                if self._queue.full():
                    raise SignedRejected("queue-full", f"{MAX_QUEUED} commands are already waiting")
            except SignedRejected as exc:
                await self._rejected(exc)
                return
            await self._accept(command)

    async def _accept(self, command: ScooterCommand) -> None:
        accepted = {
            "id": command.id,
            "seq": command.seq,
            "source": "mqtt",
            "iot_code": command.iot_code,
            "op": command.op,
            "outcome": "accepted",
            "issued_at": command.issued_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        }
        await self._outbox.append([records.result(self._clock.stamp(), accepted)], {SEQ_KEY: command.seq})
        self._last_seq = command.seq
        self.accepted += 1
        request = Request(
            command.iot_code, command.op, command.params, "mqtt", command.id, command.seq, command.expires
        )
        self._queue.put_nowait(request)

    async def _rejected(self, exc: SignedRejected) -> None:
        self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
        log.warning("scooter command rejected", extra={"reason": exc.reason, "detail": exc.detail})
        now = time.monotonic()
        if now - self._last_rejection_event.get(exc.reason, -1e9) >= REJECTION_EVENT_EVERY_S:
            self._last_rejection_event[exc.reason] = now
            await self._events.emit_now(
                "scooter-command-rejected",
                {"reason": exc.reason, "detail": exc.detail, "count": self.rejected[exc.reason]},
            )

    async def run(self) -> None:
        """The worker: accepted commands run one after another per scooter, scooters side by side."""
        busy: dict[str, asyncio.Task[Any]] = {}
        try:
            while True:
                request = await self._queue.get()
                before = busy.get(request.iot_code)
                busy[request.iot_code] = asyncio.create_task(self._after(before, request))
        finally:
            for task in busy.values():
                task.cancel()

    async def _after(self, before: asyncio.Task[Any] | None, request: Request) -> None:
        if before is not None:
            await asyncio.gather(before, return_exceptions=True)
        try:
            await self._runner.run(request)
        except Exception:  # the store could not commit the outcome (disk full ...): said, and counted
            self.failed += 1
            log.exception("scooter command: no outcome recorded", extra={"id": request.id, "op": request.op})

    def status(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "unrecorded": self.failed,
            "rejected": dict(self.rejected),
            "queued": self._queue.qsize(),
            "last_seq": self._last_seq,
        }


def last_seq_from_state(raw: Any) -> int | None:
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
        raise ValueError("the last command seq is not a positive integer")
    return raw
