"""A feature's saved values (the state table), read so that a bad one never stops the daemon.

A value that cannot be decoded (not JSON, or not the shape its owner writes) is moved aside under
``quarantine/<key>/<wall_ns>`` with the reason, in the same commit as a ``state-quarantined`` event; the owner's
fallback is used and saved in its place, and the feature shows an alert until the next start.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.events import Events
from fleetgate.sync.store import StateStore
from fleetgate.sync.store.database import STORE_ERRORS
from fleetgate.sync.store.state import StateDecodeError, quarantine_key

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 200
T = TypeVar("T")


@dataclass(frozen=True)
class Quarantined:
    """A saved value that could not be decoded, where it was moved, and what is used instead."""

    key: str
    reason: str
    moved_to: str
    instead: str


class SavedState:
    """Reads this feature's saved values; moves a bad one aside instead of failing to start."""

    def __init__(self, state: StateStore, events: Events, clock: Clock) -> None:
        self._state = state
        self._events = events
        self._clock = clock
        self.quarantined: list[Quarantined] = []

    async def load(
        self,
        key: str,
        decode: Callable[[Any], T],
        fallback: Callable[[], tuple[T, Any]],
        instead: str,
    ) -> T:
        """``decode`` the value of ``key`` (raising ValueError naming what is wrong); if it cannot be decoded,
        ``fallback()`` gives the value to use and what to save under ``key`` in its place (None: nothing)."""
        try:
            raw = await self._state.get(key)
        except StateDecodeError as exc:
            reason, text = exc.reason, exc.text
        else:
            try:
                return decode(raw)
            except ValueError as exc:
                reason, text = str(exc), json.dumps(raw)
        reason = reason[:MAX_REASON_CHARS]
        value, replacement = fallback()
        events = self._events
        stamp = self._clock.stamp()
        moved_to = quarantine_key(key, stamp.wall_ns)
        body = {"key": key, "reason": reason, "moved_to": moved_to}
        log.error("saved state cannot be decoded: moved aside", extra={**body, "instead": instead})
        try:
            await events.emit(
                events.record("state-quarantined", body, stamp),
                state={
                    moved_to: {"text": text, "reason": reason, "found_wall_ns": stamp.wall_ns},
                    key: replacement,
                },
            )
        except STORE_ERRORS as exc:  # the bad value stays where it is: the next start finds it again
            log.error("cannot move the bad state aside", extra={"key": key, "error": str(exc)})
            moved_to = "(not moved: store unavailable)"
        self.quarantined.append(Quarantined(key, reason, moved_to, instead))
        return value

    def alerts(self) -> list[str]:
        return [
            f"saved {q.key} could not be decoded ({q.reason}); kept as {q.moved_to}; {q.instead}"
            for q in self.quarantined
        ]
