"""The two ways a command reaches a scooter: the Segway cloud API and Bluetooth LE in the yard.

Each returns an outcome dict for the result record (``outcome``, ``retryable`` and what the channel said:
Segway's ``code``/``msg``/``opId``, or the BLE profile's ``ble_status``), never raises for what the scooter,
the radio or the cloud did.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.scooters.key_store import KeyStore
from fleetgate.drivers.ble.manager import BleManager
from fleetgate.drivers.ble.profile import BleError, BleUnreachable, BleUnsupported, ScooterProfile
from fleetgate.sync.segway.client import SegwayClient
from fleetgate.sync.segway.errors import SegwayError, SegwayFailure
from fleetgate.sync.segway.operations import operation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    retry_s: float


class CloudChannel:
    """Segway's API, with its retryable answers (device offline 15301, response timeout 15302, send failed
    15303, the cloud unreachable ...) tried again up to ``max_attempts`` times, waiting ``retry_s`` and
    doubling, but never past the command's ``expires``."""

    name = "cloud"

    def __init__(self, client: SegwayClient, clock: Clock, policy: RetryPolicy) -> None:
        self._client = client
        self._clock = clock
        self._policy = policy

    async def run(
        self, iot_code: str, op_name: str, params: dict[str, Any], expires: datetime | None, max_attempts: int
    ) -> tuple[dict[str, Any], Any]:
        """The outcome, and the answer's data (a query's model) when there is one."""
        op = operation(op_name)
        delay = self._policy.retry_s
        attempt = 0
        while True:
            if expired(self._clock, expires):
                return {"outcome": "expired", "attempts": attempt}, None
            attempt += 1
            try:
                result = await self._client.call(op, iot_code, params)
            except ValueError as exc:  # an iot code the API cannot take: nothing was sent
                return {"outcome": "refused", "reason": str(exc), "attempts": attempt - 1}, None
            except SegwayFailure as exc:
                last_try = attempt >= max_attempts or not exc.retryable
                delay = max(delay, getattr(exc, "retry_after", None) or 0.0)  # a 429's Retry-After
                if last_try or expired(self._clock, expires, after_s=delay):
                    return _failure(exc, attempt), None
                log.info(
                    "scooter command: retrying",
                    extra={"iot_code": iot_code, "op": op_name, "error": str(exc), "in_s": delay},
                )
                await asyncio.sleep(delay)
                delay *= 2
                continue
            out = {
                "outcome": "partial" if result.code else "done",
                "code": result.code,
                "msg": result.msg,
                "op_id": result.op_id,
                "attempts": attempt,
            }
            return out, result.data


class BleChannel:
    """The yard's radio: the command runs over BLE when the scooter is in range and its key is cached. A key
    the scooter refuses is fetched again from the cloud (``on_key_rejected``)."""

    name = "ble"

    def __init__(
        self,
        manager: BleManager,
        profile: ScooterProfile,
        keys: KeyStore,
        on_key_rejected: Callable[[str], None],
    ) -> None:
        self.manager = manager
        self._operations = profile.operations
        self._keys = keys
        self._on_key_rejected = on_key_rejected

    def supports(self, op: str) -> bool:
        return op in self._operations

    def unavailable(self, iot_code: str, op: str) -> str | None:
        """Why ``op`` cannot go over BLE now (None: it can)."""
        if not self.supports(op):
            return f"{op} does not go over BLE"
        if self._keys.get(iot_code) is None:
            return "no Bluetooth key cached"
        if not self.manager.in_range(iot_code):
            return "not in BLE range"
        return None

    async def run(self, iot_code: str, op: str) -> dict[str, Any]:
        key = self._keys.get(iot_code)
        if key is None:
            return {"outcome": "failed", "ble_status": "no-key", "retryable": True}
        try:
            answer = await self.manager.run_op(iot_code, key, op)
        except BleUnsupported as exc:
            return {"outcome": "failed", "ble_status": "unsupported", "retryable": False, "msg": str(exc)}
        except BleError as exc:
            status = "unreachable" if isinstance(exc, BleUnreachable) else "protocol-error"
            return {"outcome": "failed", "ble_status": status, "retryable": exc.retryable, "msg": str(exc)}
        if answer.key_rejected:
            self._on_key_rejected(iot_code)
        out: dict[str, Any] = {
            "outcome": "done" if answer.ok else "failed",
            "ble_status": answer.status,
            "scooter_state": dict(answer.state),
        }
        if not answer.ok:
            out["retryable"] = answer.retryable
        return out


def expired(clock: Clock, expires: datetime | None, after_s: float = 0.0) -> bool:
    """Whether ``expires`` has passed (or will have, ``after_s`` from now), judged on a trusted clock only."""
    if expires is None:
        return False
    stamp = clock.stamp()
    return stamp.trusted and stamp.wall_ns / 1e9 + after_s > expires.timestamp()


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
