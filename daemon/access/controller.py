"""The access decision: a PIN against the synchronized sessions of this vehicle, the start-enable output, the
lockout, and an audit record of every decision at the outbox's top priority.

Order of effects, and why:
- Accepted: the output is switched first, then the audit record is committed. The renter waits for the
  relay, not for the SD card; a crash between the two loses one audit line, never access state.
- Refused: the failure count is committed (with its audit record) before the keypad shows "wrong", so
  pulling the power after a guess cannot undo the count.

A PIN is compared with every active session's keyed hash, all of them, in constant time (no early exit),
and it is never logged, stored or put in a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetgate.daemon.access.lockout import Lockout
from fleetgate.daemon.access.session_book import SessionBook
from fleetgate.daemon.access.session_policy import STATE_KEY as AGE_KEY
from fleetgate.daemon.access.session_policy import OfflineAge, refusal_reason
from fleetgate.daemon.runtime.clock import Clock, mono_ns
from fleetgate.drivers.output import OutputError, StartEnable
from fleetgate.sync.crypto.device_keys import pin_matches
from fleetgate.sync.store import NewRecord, Outbox, Priority

log = logging.getLogger(__name__)

AUDIT_STREAM = "audit"
LOCKOUT_KEY = "access.lockout"
ENABLED_KEY = "access.enabled"
REVIEW_INTERVAL_S = 1.0
AGE_SAVE_INTERVAL_S = 60.0


@dataclass(frozen=True)
class AccessPolicy:
    max_offline_age_s: float
    end_while_moving: str  # "defer" or "immediate"


@dataclass(frozen=True)
class Decision:
    outcome: str  # "accepted", "refused", "locked-out"
    reason: str | None = None  # why refused: "no-match", "ended", "expired", "sync-too-old", ...
    session_id: int | None = None
    verification_id: str | None = None
    retry_after_s: float = 0.0
    lockout_started_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, 0.0)}


class AccessController:
    """Supervised component: reviews the output against the sessions every second; PINs come in through
    ``enter`` (the keypad loop, or ``fleetgate pin test`` without actuating)."""

    name = "access"

    def __init__(
        self,
        book: SessionBook,
        pin_key: bytes,
        lockout: Lockout,
        offline_age: OfflineAge,
        output: StartEnable,
        outbox: Outbox,
        clock: Clock,
        policy: AccessPolicy,
        moving: Callable[[], bool],
        on_session: Callable[[int | None], None],
        enabled_by: int | None = None,
    ) -> None:
        self.book = book
        self._pin_key = pin_key
        self.lockout = lockout
        self.offline_age = offline_age
        self._output = output
        self._outbox = outbox
        self._clock = clock
        self._policy = policy
        self._moving = moving
        self._on_session = on_session  # the session readings are tagged with (or None)
        self.enabled_by = enabled_by  # the session whose PIN turned start-enable on
        self.off_deferred = False
        self._lock = asyncio.Lock()
        self.counts: dict[str, int] = {}

    # -- the PIN path -----------------------------------------------------------------------------------

    def _refusal(self, session: Any) -> str | None:
        stamp = self._clock.stamp()
        return refusal_reason(
            session,
            now_wall_ns=stamp.wall_ns,
            wall_trusted=stamp.trusted,
            offline_age_s=self.offline_age.age_s(stamp.mono_ns, stamp.wall_ns, stamp.trusted, self.book.mark),
            max_offline_age_s=self._policy.max_offline_age_s,
        )

    def _match(self, pin: str) -> Any:
        matched = None
        for session in self.book.active():  # every candidate is compared: the time does not tell which
            if session.pin_hash is not None and pin_matches(self._pin_key, session.id, pin, session.pin_hash):
                matched = session
        return matched

    async def enter(self, pin: str, *, actuate: bool = True, source: str = "keypad") -> Decision:
        async with self._lock:
            decision = await self._decide(pin, actuate, source)
        self.counts[decision.outcome] = self.counts.get(decision.outcome, 0) + 1
        log.info("PIN %s", decision.outcome, extra={"source": source, **decision.as_dict()})
        return decision

    async def _decide(self, pin: str, actuate: bool, source: str) -> Decision:
        now = mono_ns()
        if self.lockout.locked(now):
            self.lockout.refused_while_locked += 1
            decision = Decision(
                "locked-out", "locked-out", retry_after_s=round(self.lockout.remaining_s(now), 1)
            )
            await self._audit("pin-refused", decision, source)
            return decision
        session = self._match(pin)
        reason = "no-match" if session is None else self._refusal(session)
        if reason is None:
            self.lockout.succeeded()
            if actuate:
                try:
                    await self._output.set(True)
                except OutputError as exc:
                    # A right PIN and a relay that cannot be told: no lockout count, and the audit says why.
                    log.error("start-enable failed", extra={"error": str(exc)})
                    decision = Decision("refused", "output-fault", session.id, session.verification_id)
                    await self._audit("pin-refused", decision, source, {LOCKOUT_KEY: self.lockout.as_state()})
                    return decision
                self.enabled_by = session.id
                self.off_deferred = False
            decision = Decision("accepted", None, session.id, session.verification_id)
            await self._audit(
                "pin-accepted" if actuate else "pin-tested",
                decision,
                source,
                {
                    LOCKOUT_KEY: self.lockout.as_state(),
                    **({ENABLED_KEY: {"session_id": session.id}} if actuate else {}),
                },
            )
            return decision
        started = self.lockout.failed(now)
        decision = Decision(
            "refused",
            reason,
            None if session is None else session.id,
            None if session is None else session.verification_id,
            lockout_started_s=started,
        )
        await self._audit("pin-refused", decision, source, {LOCKOUT_KEY: self.lockout.as_state()})
        return decision

    async def _audit(
        self, event: str, decision: Decision, source: str, state: dict[str, Any] | None = None
    ) -> None:
        body = {
            "event": event,
            "source": source,
            "outcome": decision.outcome,
            "reason": decision.reason,
            "session_id": decision.session_id,
            "verification_id": decision.verification_id,
            "failures": self.lockout.failures,
            "lockout_s": decision.lockout_started_s,
            "retry_after_s": decision.retry_after_s,
        }
        await self._outbox.append(
            [NewRecord.json(AUDIT_STREAM, Priority.AUDIT, self._clock.stamp(), body)], state
        )

    # -- keeping the output in line with the sessions ----------------------------------------------------

    def current_session(self) -> int | None:
        """The active, usable session of this vehicle (readings are tagged with it)."""
        usable = [s for s in self.book.active() if self._refusal(s) is None]
        return max(usable, key=lambda s: s.initialization_ns).id if usable else None

    async def review(self) -> None:
        """Switch start-enable off if the session that turned it on may no longer be used."""
        async with self._lock:
            self._on_session(self.current_session())
            if self.enabled_by is None:
                return
            session = self.book.sessions.get(self.enabled_by)
            reason = "removed" if session is None else self._refusal(session)
            if reason is None:
                self.off_deferred = False
                return
            if self._policy.end_while_moving == "defer" and self._moving():
                if not self.off_deferred:
                    self.off_deferred = True
                    await self._audit_output("start-enable-off-deferred", reason)
                return
            await self._output.set(False)
            ended = self.enabled_by
            self.enabled_by, self.off_deferred = None, False
            await self._audit_output("start-enable-off", reason, ended, {ENABLED_KEY: None})

    async def _audit_output(
        self, event: str, reason: str, session_id: int | None = None, state: dict[str, Any] | None = None
    ) -> None:
        session_id = self.enabled_by if session_id is None else session_id
        session = self.book.sessions.get(session_id) if session_id is not None else None
        body = {
            "event": event,
            "reason": reason,
            "session_id": session_id,
            "verification_id": session.verification_id if session else None,
        }
        log.info(event, extra={"reason": reason, "session_id": session_id})
        await self._outbox.append(
            [NewRecord.json(AUDIT_STREAM, Priority.AUDIT, self._clock.stamp(), body)], state
        )

    async def run(self) -> None:
        await self._output.open()  # comes up off
        try:
            if self.enabled_by is not None:
                # After a restart: turn it back on if the session that enabled it still holds.
                session = self.book.sessions.get(self.enabled_by)
                if session is not None and self._refusal(session) is None:
                    await self._output.set(True)
            last_saved = 0.0
            loop = asyncio.get_running_loop()
            while True:
                await self.review()
                if loop.time() - last_saved >= AGE_SAVE_INTERVAL_S:
                    await self._save_age()
                    last_saved = loop.time()
                await asyncio.sleep(REVIEW_INTERVAL_S)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._save_age())
            with contextlib.suppress(Exception):
                await asyncio.shield(self._output.close())

    async def _save_age(self) -> None:
        await self._outbox.append([], {AGE_KEY: self.offline_age.as_state(mono_ns())})

    def session_rows(self) -> list[dict[str, Any]]:
        """Every session the vehicle knows, for ``fleetgate sessions``: never a PIN or a hash."""
        return [
            {
                "id": s.id,
                "state": s.state,
                "verification_id": s.verification_id,
                "initialization_ns": s.initialization_ns,
                "completion_ns": s.completion_ns,
                "expires_ns": s.expires_ns,
                "ended": s.ended,
                "refused": self._refusal(s) if s.ended is None else None,
            }
            for s in sorted(self.book.sessions.values(), key=lambda s: s.id)
        ]

    def snapshot(self) -> dict[str, Any]:
        stamp = self._clock.stamp()
        return {
            "start_enable": {"on": self._output.enabled, "output": self._output.describe()},
            "enabled_by": self.enabled_by,
            "off_deferred": self.off_deferred,
            "current_session": self.current_session(),
            "offline_age_s": round(
                self.offline_age.age_s(stamp.mono_ns, stamp.wall_ns, stamp.trusted, self.book.mark), 1
            ),
            "max_offline_age_s": self._policy.max_offline_age_s,
            "lockout": self.lockout.snapshot(stamp.mono_ns),
            "decisions": dict(self.counts),
        }
