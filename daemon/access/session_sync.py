"""Session sets from the cloud into the session book: the signed MQTT downlink and the REEF pull.

Both channels end in ``_commit``: the merged book, the sync mark and the acknowledgement record are written
in one transaction, so the vehicle never acknowledges a set it did not keep (nor keeps one it did not
acknowledge). The acknowledgement goes to ``up/sessions-ack`` at the outbox's top priority.

Rejected downlink messages (unsigned, forged, replayed, older, for another device, malformed) change
nothing; each is counted by reason, logged with the reason, and reported as a ``session-set-rejected``
event (at most one per reason a minute, so a flood cannot fill the outbox).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from nacl.public import PrivateKey
from nacl.signing import VerifyKey

from fleetgate.daemon.access.controller import AccessController
from fleetgate.daemon.access.session_book import STATE_KEY, SessionBook, SyncMark, ack_body
from fleetgate.daemon.access.session_policy import STATE_KEY as AGE_KEY
from fleetgate.daemon.runtime.clock import Clock, mono_ns
from fleetgate.daemon.runtime.events import Events
from fleetgate.sync.crypto.session_set import SessionSet, SessionSetRejected, check_fresh, open_session_set
from fleetgate.sync.store import NewRecord, Outbox, Priority

if TYPE_CHECKING:
    from fleetgate.sync.reef.client import ManagedSession

log = logging.getLogger(__name__)

ACK_STREAM = "sessions-ack"
MAX_PAYLOAD_BYTES = 256 * 1024
REJECTION_EVENT_EVERY_S = 60.0


class SessionSync:
    def __init__(
        self,
        vin: str,
        device: str,
        book: SessionBook,
        pin_key: bytes,
        box_key: PrivateKey,
        verify_keys: Sequence[VerifyKey],
        outbox: Outbox,
        clock: Clock,
        events: Events,
        access: AccessController,
    ) -> None:
        self._vin = vin
        self._device = device
        self._book = book
        self._pin_key = pin_key
        self._box_key = box_key
        self._verify_keys = list(verify_keys)
        self._outbox = outbox
        self._clock = clock
        self._events = events
        self._access = access
        self._lock = asyncio.Lock()
        self._last_rejection_event: dict[str, float] = {}
        self.counts: dict[str, int] = {"applied": 0, "duplicate": 0}
        self.rejected: dict[str, int] = {}
        self.last_sync_mono_ns: int | None = None  # any channel, including a confirming duplicate

    # -- MQTT downlink -------------------------------------------------------------------------------------

    async def on_mqtt(self, payload: bytes) -> None:
        async with self._lock:
            try:
                if len(payload) > MAX_PAYLOAD_BYTES:
                    raise SessionSetRejected("malformed", f"payload of {len(payload)} bytes is too large")
                new = open_session_set(
                    payload,
                    verify_keys=self._verify_keys,
                    box_key=self._box_key,
                    device=self._device,
                    vin=self._vin,
                )
                mark = self._book.mark
                verdict = check_fresh(
                    new,
                    mark.mqtt_version if mark else None,
                    datetime.fromisoformat(mark.mqtt_issued) if mark and mark.mqtt_issued else None,
                    bytes.fromhex(mark.mqtt_digest) if mark and mark.mqtt_digest else None,
                )
            except SessionSetRejected as exc:
                await self._rejected(exc)
                return
            if verdict == "duplicate":
                self.counts["duplicate"] += 1
                self.last_sync_mono_ns = mono_ns()
                log.info("session set unchanged", extra={"version": new.version})
                return
            await self._apply_mqtt(new)

    async def _apply_mqtt(self, new: SessionSet) -> None:
        issued_ns = _ns(new.issued_at)
        expires = {g.id: _ns(g.expires) if g.expires else None for g in new.sessions}
        stamp = self._clock.stamp()
        mark = SyncMark(
            "mqtt", stamp.wall_ns, stamp.trusted, new.version, new.issued_at.isoformat(), new.digest.hex()
        )
        await self._commit(new.sessions, issued_ns, expires, mark, "mqtt", new.version, ack_always=True)

    async def _rejected(self, exc: SessionSetRejected) -> None:
        self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
        log.warning("session set rejected", extra={"reason": exc.reason, "detail": exc.detail})
        now = time.monotonic()
        if now - self._last_rejection_event.get(exc.reason, -1e9) >= REJECTION_EVENT_EVERY_S:
            self._last_rejection_event[exc.reason] = now
            await self._events.emit_now(
                "session-set-rejected",
                {"reason": exc.reason, "detail": exc.detail, "count": self.rejected[exc.reason]},
            )

    # -- REEF pull -------------------------------------------------------------------------------------------

    async def apply_reef(self, sessions: list[ManagedSession]) -> None:
        async with self._lock:
            # REEF answers with the live state; the newest timestamp in it is a lower bound of when it was made.
            moments = [s.initialization for s in sessions] + [s.completion for s in sessions if s.completion]
            as_of = max((_ns(m) for m in moments), default=0)
            stamp = self._clock.stamp()
            old = self._book.mark
            mark = SyncMark(
                "reef",
                stamp.wall_ns,
                stamp.trusted,
                old.mqtt_version if old else None,
                old.mqtt_issued if old else None,
                old.mqtt_digest if old else None,
            )
            # REEF carries no expiry: the merge keeps what a signed set said (None: not this channel's).
            await self._commit(sessions, as_of, None, mark, "reef", mark.mqtt_version, ack_always=False)

    # -- both ------------------------------------------------------------------------------------------------

    async def _commit(
        self,
        incoming: Sequence[Any],
        as_of_ns: int,
        expires: dict[int, int | None] | None,
        mark: SyncMark,
        source: str,
        version: int | None,
        ack_always: bool,
    ) -> None:
        candidate = SessionBook.from_json(self._book.as_json())
        changes = candidate.merge(incoming, as_of_ns, self._pin_key, expires)
        candidate.mark = mark
        records = []
        if changes or ack_always:
            body = ack_body(candidate, self._vin, source, version, changes)
            records.append(NewRecord.json(ACK_STREAM, Priority.AUDIT, self._clock.stamp(), body))
        await self._outbox.append(records, {STATE_KEY: candidate.as_json(), AGE_KEY: {"floor_s": 0.0}})
        self._book.sessions, self._book.mark = candidate.sessions, candidate.mark
        self._access.offline_age.synced(mono_ns())
        self.last_sync_mono_ns = mono_ns()
        self.counts["applied"] += 1
        log.info(
            "session set applied",
            extra={
                "source": source,
                "version": version,
                "changes": ",".join(f"{c.id}:{c.before or 'new'}->{c.after}" for c in changes) or "none",
            },
        )
        await self._access.review()

    def snapshot(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "rejected": dict(self.rejected)}


def _ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000) * 1000
