"""The access decision: a PIN against the synchronized sessions of this vehicle, the start-enable output, the
lockout, and an audit record of every decision at the outbox's top priority.

Order of effects, and why:
- Accepted: the output is switched first, then the audit record is committed. The renter waits for the
  relay, not for the SD card; a crash between the two loses one audit line, never access state.
- Refused: the failure count is committed (with its audit record) before the keypad shows "wrong", so
  pulling the power after a guess cannot undo the count. If the store cannot commit (disk full), the answer
  is ``store-unavailable``, not "wrong PIN": the failure still counts in memory (the lockout holds while the
  daemon runs) and is written with the next commit that succeeds, but the answer does not claim it was kept.
- Locked out: no PIN is checked, nothing is counted, and a keypad can send hundreds of entries a second. The
  first refusal of a lockout is audited at once; later ones are tallied and written as one record with their
  ``count`` (per source) when the lockout ends, every ``LOCKED_OUT_AUDIT_EVERY_S``, before the next other
  audit record and when the daemon stops. Every refusal is in a count; a power cut loses at most the tally
  since the last record.
- Not a PIN (anything but ASCII digits: ``str.isdigit`` is true for fullwidth and Arabic-Indic digits): refused
  as ``not-a-pin`` before any check, never counted toward the lockout and not audited (the keypad driver
  cannot produce one; the control verb and the CLI refuse it first).

A PIN is compared with every session's keyed hash, active and ended, all of them, in constant time (no early
exit), and it is never logged, stored or put in a message. Only a PIN that matches no session counts toward
the lockout: the PIN of an ended or expired session is refused as ``ended`` / ``expired`` and audited with
its session, so the cloud can tell a late renter from a guesser.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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
from fleetgate.sync.store.database import STORE_ERRORS

log = logging.getLogger(__name__)

AUDIT_STREAM = "audit"
LOCKOUT_KEY = "access.lockout"
ENABLED_KEY = "access.enabled"
REVIEW_INTERVAL_S = 1.0
AGE_SAVE_INTERVAL_S = 60.0
LOCKED_OUT_AUDIT_EVERY_S = 60.0  # a tally of refusals while locked out is written at least this often
STORE_ERROR_LOG_EVERY_S = 60.0


def is_pin(text: object) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts fullwidth (U+FF11) and Arabic-Indic (U+0661) digits."""
    return isinstance(text, str) and text.isascii() and text.isdigit()


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
        vin_mismatch: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.book = book
        # The VIN the vehicle answers when it is not the one the sessions are for (None: the same, or unknown).
        self.vin_mismatch = vin_mismatch
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
        # Refusals while locked out not yet written, by source, and when the oldest of them was made.
        self._tally: dict[str, int] = {}
        self._tally_since_ns: int | None = None
        self._audited_lockout: int | None = None  # the lockout (its end) whose first refusal was audited
        self.store_failures = 0  # commits the store refused (each is logged, at most once a minute)
        self.store_error: str | None = None  # the last one, until a commit succeeds again
        self._last_store_log = -STORE_ERROR_LOG_EVERY_S

    # -- the PIN path -----------------------------------------------------------------------------------

    def _refusal(self, session: Any) -> str | None:
        if self.vin_mismatch() is not None:  # moved to another vehicle: no session here is for it
            return "vin-mismatch"
        stamp = self._clock.stamp()
        return refusal_reason(
            session,
            now_wall_ns=stamp.wall_ns,
            wall_trusted=stamp.trusted,
            offline_age_s=self.offline_age.age_s(stamp.mono_ns, stamp.wall_ns, stamp.trusted, self.book.mark),
            max_offline_age_s=self._policy.max_offline_age_s,
        )

    def _match(self, pin: str) -> Any:
        """The session whose PIN this is: an active one before an ended one (ended sessions keep their hash
        while remembered, so a late renter is told "ended"). Every candidate is compared, active or ended:
        the time taken does not tell which matched, or whether any did."""
        active = ended = None
        for session in self.book.sessions.values():
            if session.pin_hash is not None and pin_matches(self._pin_key, session.id, pin, session.pin_hash):
                if session.ended is None:
                    active = session
                else:
                    ended = session
        return active if active is not None else ended

    async def enter(self, pin: str, *, actuate: bool = True, source: str = "keypad") -> Decision:
        async with self._lock:
            decision, tallied = await self._decide(pin, actuate, source)
        self.counts[decision.outcome] = self.counts.get(decision.outcome, 0) + 1
        if not tallied:  # a tallied refusal is logged with its tally: a hammered keypad must not flood
            log.info("PIN %s", decision.outcome, extra={"source": source, **decision.as_dict()})
        return decision

    async def _decide(self, pin: str, actuate: bool, source: str) -> tuple[Decision, bool]:
        """The decision, and whether it went into the locked-out tally instead of a record of its own."""
        if not is_pin(pin):
            return Decision("refused", "not-a-pin"), False
        now = mono_ns()
        if self.lockout.locked(now):
            self.lockout.refused_while_locked += 1
            decision = Decision(
                "locked-out", "locked-out", retry_after_s=round(self.lockout.remaining_s(now), 1)
            )
            if self._audited_lockout == self.lockout.locked_until_mono_ns:
                self._count_locked_out(source, now)
                return decision, True
            self._audited_lockout = self.lockout.locked_until_mono_ns
            if not await self._audit("pin-refused", decision, source):
                self._count_locked_out(source, now)  # kept in the tally, written once the store takes it
            return decision, False
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
                    return decision, False
                self.enabled_by = session.id
                self.off_deferred = False
            decision = Decision("accepted", None, session.id, session.verification_id)
            audited = await self._audit(
                "pin-accepted" if actuate else "pin-tested",
                decision,
                source,
                {
                    LOCKOUT_KEY: self.lockout.as_state(),
                    **({ENABLED_KEY: {"session_id": session.id}} if actuate else {}),
                },
            )
            if not audited and not actuate:
                # A test that cannot be audited is not answered: the socket must not become an unaudited
                # oracle. (The keypad's acceptance stands: the output is already on; its audit line is
                # lost as in a crash between the two, and counted.)
                return Decision("refused", "store-unavailable"), False
            return decision, False
        # Only a PIN that matches no session is a guess. A right PIN refused by policy (its session ended or
        # expired, the sync too old) neither counts toward the lockout (a late renter cannot lock the keypad)
        # nor resets it (an old PIN must not wipe a guesser's count).
        started = self.lockout.failed(now) if session is None else 0.0
        decision = Decision(
            "refused",
            reason,
            None if session is None else session.id,
            None if session is None else session.verification_id,
            lockout_started_s=started,
        )
        if not await self._audit("pin-refused", decision, source, {LOCKOUT_KEY: self.lockout.as_state()}):
            # Counted in memory only: the answer must not say it was kept (docs/security.md).
            return Decision("refused", "store-unavailable"), False
        return decision, False

    def _count_locked_out(self, source: str, now_ns: int) -> None:
        self._tally[source] = self._tally.get(source, 0) + 1
        if self._tally_since_ns is None:
            self._tally_since_ns = now_ns

    def _take_tally(self) -> tuple[list[NewRecord], dict[str, int]]:
        """The tally as audit records (one per source) and as counts, taken out (``_untake`` puts it back)."""
        taken = self._tally
        if not taken:
            return [], {}
        now = mono_ns()
        locked_out = Decision(
            "locked-out", "locked-out", retry_after_s=round(self.lockout.remaining_s(now), 1)
        )
        records = [self._record("pin-refused", locked_out, src, n) for src, n in sorted(taken.items())]
        self._tally, self._tally_since_ns = {}, None
        return records, taken

    def _untake(self, taken: dict[str, int]) -> None:
        for source, count in taken.items():
            self._tally[source] = self._tally.get(source, 0) + count
        if taken and self._tally_since_ns is None:
            self._tally_since_ns = mono_ns()

    def tally_due(self, now_ns: int) -> bool:
        """The tally should be written now: its lockout is over, or it is older than the interval."""
        if self._tally_since_ns is None:
            return False
        return (
            not self.lockout.locked(now_ns)
            or (now_ns - self._tally_since_ns) / 1e9 >= LOCKED_OUT_AUDIT_EVERY_S
        )

    async def flush_tally(self) -> bool:
        """Write the tally of refusals while locked out (if any); False if the store refused it (kept)."""
        async with self._lock:
            return await self._commit([])

    def _record(self, event: str, decision: Decision, source: str, count: int = 1) -> NewRecord:
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
            "count": count,
        }
        return NewRecord.json(AUDIT_STREAM, Priority.AUDIT, self._clock.stamp(), body)

    async def _audit(
        self, event: str, decision: Decision, source: str, state: dict[str, Any] | None = None
    ) -> bool:
        """Commit the decision's audit record (after any tally, so records keep their order) with ``state``;
        False if the store cannot take it."""
        return await self._commit([self._record(event, decision, source)], state)

    async def _commit(self, records: list[NewRecord], state: dict[str, Any] | None = None) -> bool:
        tally, taken = self._take_tally()
        if not tally and not records and not state:
            return True
        try:
            await self._outbox.append(tally + records, state)
        except STORE_ERRORS as exc:
            self._untake(taken)
            self._store_failed(exc)
            return False
        if taken:
            log.info("PIN refusals while locked out audited", extra={"count": sum(taken.values())})
        self.store_error = None
        return True

    def _store_failed(self, exc: BaseException) -> None:
        self.store_failures += 1
        self.store_error = str(exc) or type(exc).__name__
        now = time.monotonic()
        if now - self._last_store_log >= STORE_ERROR_LOG_EVERY_S:
            self._last_store_log = now
            log.error(
                "store cannot commit the PIN path's records",
                extra={"error": self.store_error, "failures": self.store_failures},
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
        await self._commit([NewRecord.json(AUDIT_STREAM, Priority.AUDIT, self._clock.stamp(), body)], state)

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
                if self.tally_due(mono_ns()):
                    await self.flush_tally()
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
        # With any tally: stopping writes what was counted while locked out.
        await self._commit([], {AGE_KEY: self.offline_age.as_state(mono_ns())})

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
            "locked_out_unwritten": sum(self._tally.values()),  # tallied, not yet in an audit record
            "store_failures": self.store_failures,
            "store_error": self.store_error,
        }
