"""``down/scooter-commands``: signed commands from the cloud, verified, replay-checked, recorded as accepted, and
handed to the dispatcher.

A command is recorded as ``accepted`` in the same commit that raises the saved sequence number and, for one
that may wait (``CommandRunner.defer_window_s``), writes its entry of the persistent queue: a command the cloud
sees accepted is then run to an outcome even across a kill -9 (at least once: one cut short after Segway took
it and before its outcome was committed runs again; lock, unlock and the rentals are idempotent at Segway). A
query or a key setting is not queued, and is not run again after a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from datetime import UTC
from typing import Any

from nacl.signing import VerifyKey

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.events import Events
from fleetgate.daemon.scooters import records
from fleetgate.daemon.scooters.commands import CommandRunner, Request
from fleetgate.daemon.scooters.dispatch import Dispatcher
from fleetgate.sync.crypto.scooter_command import ScooterCommand, check_seq, open_command
from fleetgate.sync.crypto.signed import SignedRejected
from fleetgate.sync.store import Outbox

log = logging.getLogger(__name__)

SEQ_KEY = "scooters.command_seq"
MAX_PAYLOAD_BYTES = 64 * 1024
REJECTION_EVENT_EVERY_S = 60.0


class CommandDownlink:
    """``down/scooter-commands``: verify, refuse replays, record acceptance, hand to the dispatcher."""

    def __init__(
        self,
        device: str,
        verify_keys: list[VerifyKey],
        last_seq: int | None,
        runner: CommandRunner,
        dispatcher: Dispatcher,
        outbox: Outbox,
        clock: Clock,
        events: Events,
    ) -> None:
        self._device = device
        self._verify_keys = verify_keys
        self._last_seq = last_seq
        self._runner = runner
        self._dispatcher = dispatcher
        self._outbox = outbox
        self._clock = clock
        self._events = events
        self._lock = asyncio.Lock()
        self._last_rejection_event: dict[str, float] = {}
        self.accepted = 0
        self.rejected: dict[str, int] = {}

    async def on_mqtt(self, payload: bytes) -> None:
        async with self._lock:
            try:
                if len(payload) > MAX_PAYLOAD_BYTES:
                    raise SignedRejected("malformed", f"payload of {len(payload)} bytes is too large")
                command = open_command(payload, verify_keys=self._verify_keys, device=self._device)
                check_seq(command, self._last_seq)
                if self._dispatcher.full():
                    raise SignedRejected("queue-full", "the command worker's queue is full")
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
        request = Request(
            command.iot_code, command.op, command.params, "mqtt", command.id, command.seq, command.expires,
            command.via,
        )  # fmt: skip
        stamp = self._clock.stamp()
        state: dict[str, Any] = {SEQ_KEY: command.seq}
        entry = (
            None if self._runner.is_expired(request) else self._runner.pending_entry(request, stamp.wall_ns)
        )
        if entry is not None:
            state.update(self._runner.pending.put(entry))
            request = dataclasses.replace(request, queued=True)
        await self._outbox.append([records.result(stamp, accepted)], state)
        self._last_seq = command.seq
        self.accepted += 1
        self._dispatcher.submit_nowait(request)

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

    def status(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "unrecorded": self._dispatcher.unrecorded,
            "rejected": dict(self.rejected),
            "queued": self._dispatcher.qsize(),
            "last_seq": self._last_seq,
        }


def last_seq_from_state(raw: Any) -> int | None:
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
        raise ValueError("the last command seq is not a positive integer")
    return raw
