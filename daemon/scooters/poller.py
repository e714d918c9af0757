"""Asks Segway about every scooter of the yard on a schedule: status and extra-status, location, battery
info, and (rarely) the Bluetooth key. Each answer becomes a ``scooters`` reading in the outbox.

The schedule is per scooter and per kind. A scooter whose queries fail (offline at Segway, a timeout, the
cloud unreachable) is asked less often, doubling with jitter up to ``backoff_max_s``, without holding up the
others; one that Segway does not know (15102) or that is inactive (15300) waits the longest step. A kind the
scooter's model does not have (extra-status and battery-info are E-moped queries, 15004 for others) is not
asked again until a restart. Refused credentials stop the poller with an error, so ``fleetgate status``
shows the component failing and the supervisor retries with its own backoff. Requests are paced and bounded
by the client (``max_requests_per_s``, ``max_concurrent``), so a large yard cannot flood the API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.supervisor import Backoff
from fleetgate.daemon.scooters import records
from fleetgate.daemon.scooters.key_store import STATE_KEY as KEYS_KEY
from fleetgate.daemon.scooters.key_store import KeyStore
from fleetgate.daemon.scooters.yard import Latest, Scooter, Yard
from fleetgate.sync.segway.client import SegwayClient
from fleetgate.sync.segway.errors import SegwayFailure, TokenRefused
from fleetgate.sync.store import Outbox

log = logging.getLogger(__name__)

# The query behind each kind of reading, and the seed's field carrying Segway's own time of it.
QUERIES = {
    "status": ("status", "statusUtcTime"),
    "extra-status": ("extra-status", None),
    "location": ("location", "gpsUtcTime"),
    "battery": ("battery-info", None),
    "key": ("bluetooth-key", None),
}
NOT_THERE = frozenset({15102, 15300})  # device not found, inactive device: wait the longest step
NO_SUCH_QUERY = 15004  # parameter error: this model does not answer this query
NO_LOCATION = 15400  # latest location not found via device: nothing to record, not a failure
FIRST_SPREAD_S = 0.2  # the first round is spread out, one scooter this much after the other


@dataclass(frozen=True)
class PollPolicy:
    status_s: float
    location_s: float
    battery_s: float
    key_s: float
    backoff_max_s: float
    backoff_initial_s: float = 30.0

    def interval(self, kind: str) -> float:
        return {
            "status": self.status_s,
            "extra-status": self.status_s,
            "location": self.location_s,
            "battery": self.battery_s,
            "key": self.key_s,
        }[kind]


class Poller:
    name = "scooter-poller"
    expected_errors = (TokenRefused,)

    def __init__(
        self,
        client: SegwayClient,
        yard: Yard,
        keys: KeyStore,
        outbox: Outbox,
        clock: Clock,
        policy: PollPolicy,
        on_key: Callable[[Scooter], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self._yard = yard
        self._keys = keys
        self._outbox = outbox
        self._clock = clock
        self._policy = policy
        self._on_key = on_key
        self._unsupported: set[tuple[str, str]] = set()
        self.counts: dict[str, int] = {"answers": 0, "failures": 0, "unsupported": 0, "no-location": 0}

    async def run(self) -> None:
        start = time.monotonic()
        for i, scooter in enumerate(self._yard.scooters.values()):
            for kind in QUERIES:
                scooter.next_due.setdefault(kind, start + i * FIRST_SPREAD_S)
        while True:
            now = time.monotonic()
            due = [
                (scooter, kind)
                for scooter in list(self._yard.scooters.values())
                for kind in QUERIES
                if (scooter.iot_code, kind) not in self._unsupported
                and scooter.next_due.setdefault(kind, now) <= now
            ]
            if due:
                await asyncio.gather(*(self._poll(scooter, kind) for scooter, kind in due))
                continue
            upcoming = [
                t
                for s in self._yard.scooters.values()
                for kind, t in s.next_due.items()
                if (s.iot_code, kind) not in self._unsupported
            ]
            await asyncio.sleep(min(max(min(upcoming, default=now + 1.0) - now, 0.05), 1.0))

    async def _poll(self, scooter: Scooter, kind: str) -> None:
        op, time_field = QUERIES[kind]
        iot = scooter.iot_code
        generation = self._keys.generation(iot)
        try:
            result = await self._client.call(op, iot)
        except TokenRefused:
            raise
        except (SegwayFailure, ValueError) as exc:  # ValueError: an iot code the API cannot take
            self._failed(scooter, kind, exc)
            return
        scooter.failures = 0
        scooter.last_error = None
        if scooter.backoff is not None:
            scooter.backoff.reset()
        scooter.next_due[kind] = time.monotonic() + self._policy.interval(kind)
        self.counts["answers"] += 1
        if result.data is None:
            return
        stamp = self._clock.stamp()
        if kind == "key":
            key = getattr(result.data, "key", None)
            if isinstance(key, str):
                state = self._keys.put(iot, key, stamp.wall_ns, generation)
                if state is None:  # a rotation kept a newer key while this answer was on its way
                    return
                await self._outbox.append([], {KEYS_KEY: state})
                scooter.key_fetched_wall_ns = stamp.wall_ns
                if self._on_key is not None:
                    await self._on_key(scooter)
            return
        fields: dict[str, Any] = result.data.model_dump(mode="json")
        at = fields.get(time_field) if time_field else None
        scooter.latest[kind] = Latest(fields, stamp.mono_ns, at if isinstance(at, int) else None)
        await self._outbox.append([records.reading(stamp, iot, kind, "poll", at, fields)])

    def _failed(self, scooter: Scooter, kind: str, exc: Exception) -> None:
        code = getattr(exc, "code", None)
        if code == NO_LOCATION and kind == "location":
            self.counts["no-location"] += 1
            scooter.next_due[kind] = time.monotonic() + self._policy.interval(kind)
            return
        if code == NO_SUCH_QUERY and kind in ("extra-status", "battery"):
            self.counts["unsupported"] += 1
            self._unsupported.add((scooter.iot_code, kind))
            log.info("scooter does not answer this query", extra={"iot_code": scooter.iot_code, "kind": kind})
            return
        self.counts["failures"] += 1
        scooter.failures += 1
        scooter.last_error = str(exc)
        if scooter.backoff is None:
            scooter.backoff = Backoff(self._policy.backoff_initial_s, self._policy.backoff_max_s)
        delay = self._policy.backoff_max_s if code in NOT_THERE else scooter.backoff.next_delay()
        delay = max(delay, getattr(exc, "retry_after", None) or 0.0)  # a 429's Retry-After
        resume = time.monotonic() + delay
        for k in QUERIES:  # the whole scooter waits: what failed for one query will fail for the next
            scooter.next_due[k] = max(scooter.next_due.get(k, 0.0), resume)
        log.warning(
            "scooter query failed",
            extra={"iot_code": scooter.iot_code, "kind": kind, "error": str(exc), "retry_in_s": round(delay)},
        )

    def status(self) -> dict[str, Any]:
        return {**self.counts, "unsupported_queries": sorted(f"{i}:{k}" for i, k in self._unsupported)}
