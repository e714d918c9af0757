"""The vehicle's managed sessions as last synchronized: what the PIN check trusts when there is no coverage.

Two channels bring a session set (the signed MQTT downlink and the REEF pull); both are merged here by the
same rules, so it does not matter which arrives first or late:

- An ended session stays ended. REEF ends a session once and starts a new one with a new id, so nothing
  can bring an ended session back: not a late retained message, not a REEF answer that was in flight.
- A session the set does not list is ended ("removed"), but only if it had started by the time the set
  was made (``as_of``, the cloud's clock): an old set knows nothing of a session started after it and must
  not end it.
- PINs are kept only as a keyed hash (``device_keys.hash_pin``), salted by the session id.

Persisted as one JSON value in the store's state table, written in the same transaction as the
acknowledgement that reports it (see ``session_sync``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from fleetgate.sync.crypto.device_keys import hash_pin
from fleetgate.sync.crypto.signed import format_timestamp

STATE_KEY = "sessions.book"
KEEP_ENDED = 50  # ended sessions remembered (so that a late message cannot revive them); oldest dropped


class IncomingSession(Protocol):
    """A session as a channel delivers it (``session_set.SessionGrant``, ``reef.ManagedSession``)."""

    id: int
    verification_id: str
    initialization: datetime
    completion: datetime | None  # None: active
    pin: str | None


def _ns(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1_000_000) * 1000


@dataclass(frozen=True)
class LocalSession:
    id: int
    verification_id: str
    initialization_ns: int
    completion_ns: int | None = None  # as the cloud reported it
    expires_ns: int | None = None  # hard end, enforced when wall time is trusted (MQTT sets only)
    pin_hash: bytes | None = field(default=None, repr=False)
    ended: str | None = None  # None while active; "completed" or "removed"

    @property
    def state(self) -> str:
        return "active" if self.ended is None else "ended"

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "verification_id": self.verification_id,
            "initialization_ns": self.initialization_ns,
            "completion_ns": self.completion_ns,
            "expires_ns": self.expires_ns,
            "pin_hash": None if self.pin_hash is None else self.pin_hash.hex(),
            "ended": self.ended,
        }

    @classmethod
    def from_json(cls, raw: Any) -> LocalSession:
        """A session as ``as_json`` wrote it; ValueError naming the field if it is anything else (the book
        decides who may open the vehicle: nothing is guessed)."""
        fields(raw, "session", set(_SESSION_FIELDS))
        pin_hash = optional(raw, "pin_hash", str, "session")
        if pin_hash is not None:
            try:
                digest = bytes.fromhex(pin_hash)
            except ValueError:
                raise ValueError("session pin_hash is not hex") from None
            if len(digest) != 32:
                raise ValueError(f"session pin_hash is {len(digest)} bytes, not 32")
        ended = optional(raw, "ended", str, "session")
        if ended not in (None, "completed", "removed"):
            raise ValueError("session ended is neither null, 'completed' nor 'removed'")
        return cls(
            required(raw, "id", int, "session"),
            required(raw, "verification_id", str, "session"),
            required(raw, "initialization_ns", int, "session"),
            optional(raw, "completion_ns", int, "session"),
            optional(raw, "expires_ns", int, "session"),
            None if pin_hash is None else bytes.fromhex(pin_hash),
            ended,
        )


_SESSION_FIELDS = (
    "id",
    "verification_id",
    "initialization_ns",
    "completion_ns",
    "expires_ns",
    "pin_hash",
    "ended",
)


def fields(raw: Any, what: str, names: set[str]) -> dict[str, Any]:
    """``raw`` as a JSON object with exactly the keys ``names``; ValueError naming what differs."""
    if not isinstance(raw, dict):
        raise ValueError(f"{what} is {_kind(raw)}, not an object")
    missing, extra = names - raw.keys(), raw.keys() - names
    if missing or extra:
        parts = ([f"missing {', '.join(sorted(missing))}"] if missing else []) + (
            [f"unexpected {', '.join(sorted(str(k) for k in extra))}"] if extra else []
        )
        raise ValueError(f"{what}: {'; '.join(parts)}")
    return raw


def required(raw: dict[str, Any], name: str, kind: type, what: str) -> Any:
    value = raw[name]
    # bool is an int to Python, not to this format: True is no session id
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{what} {name} is {_kind(value)}, not {kind.__name__}")
    return value


def optional(raw: dict[str, Any], name: str, kind: type, what: str) -> Any:
    return None if raw[name] is None else required(raw, name, kind, what)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True)
class Change:
    id: int
    verification_id: str
    before: str | None  # None: new to the vehicle
    after: str


@dataclass(frozen=True)
class SyncMark:
    """What the book was last synchronized from."""

    source: str  # "mqtt" or "reef"
    wall_ns: int  # device wall time of the sync
    wall_trusted: bool
    mqtt_version: int | None = None
    mqtt_issued: str | None = None  # ISO 8601 issue time of the last applied signed set
    mqtt_digest: str | None = None  # hex sha256 of the last applied signed body


@dataclass
class SessionBook:
    sessions: dict[int, LocalSession] = field(default_factory=dict)
    mark: SyncMark | None = None

    def active(self) -> list[LocalSession]:
        return [s for s in self.sessions.values() if s.ended is None]

    def merge(
        self,
        incoming: Iterable[IncomingSession],
        as_of_ns: int,
        pin_key: bytes,
        expires: dict[int, int | None] | None,
    ) -> list[Change]:
        """Apply a full session set of this vehicle; returns what changed (state transitions only).

        ``expires``: each listed session's hard end, from a channel that carries them (the signed MQTT set:
        a session it lists without one has none); None from a channel that does not (REEF), which then
        leaves every expiry as it was. A channel never erases what only the other one says."""
        changes: list[Change] = []
        listed: set[int] = set()
        for new in incoming:
            listed.add(new.id)
            old = self.sessions.get(new.id)
            if old is not None and old.ended is not None:
                continue  # ended for good
            completion = _ns(new.completion)
            expiry = (old.expires_ns if old is not None else None) if expires is None else expires.get(new.id)
            pin_hash = hash_pin(pin_key, new.id, new.pin) if new.pin is not None else None
            if pin_hash is None and old is not None:
                pin_hash = old.pin_hash
            if completion is not None:
                # The hash stays while the session is remembered: its PIN is then answered "ended", not
                # counted as a guess (docs/security.md).
                ended = LocalSession(
                    new.id,
                    new.verification_id,
                    _ns(new.initialization) or 0,
                    completion,
                    expiry,
                    pin_hash,
                    "completed",
                )
                self.sessions[new.id] = ended
                changes.append(Change(new.id, new.verification_id, old.state if old else None, "ended"))
                continue
            self.sessions[new.id] = LocalSession(
                new.id, new.verification_id, _ns(new.initialization) or 0, None, expiry, pin_hash, None
            )
            if old is None:
                changes.append(Change(new.id, new.verification_id, None, "active"))
        for session in list(self.sessions.values()):
            if session.id in listed or session.ended is not None:
                continue
            if session.initialization_ns <= as_of_ns:
                self.sessions[session.id] = replace(session, ended="removed")
                changes.append(Change(session.id, session.verification_id, "active", "ended"))
        self._forget_old_ended()
        return changes

    def _forget_old_ended(self) -> None:
        ended = sorted((s for s in self.sessions.values() if s.ended), key=lambda s: s.initialization_ns)
        for session in ended[: max(0, len(ended) - KEEP_ENDED)]:
            del self.sessions[session.id]

    def as_json(self) -> dict[str, Any]:
        return {
            "sessions": [s.as_json() for s in sorted(self.sessions.values(), key=lambda s: s.id)],
            "mark": None if self.mark is None else self.mark.__dict__,
        }

    @classmethod
    def from_json(cls, raw: Any) -> SessionBook:
        """The book as ``as_json`` wrote it (None: never synchronized, an empty book); ValueError naming what
        is wrong otherwise. The caller decides what an undecodable book means (no session is valid)."""
        if raw is None:
            return cls()
        fields(raw, "session book", {"sessions", "mark"})
        if not isinstance(raw["sessions"], list):
            raise ValueError(f"session book sessions is {_kind(raw['sessions'])}, not a list")
        book = cls()
        for entry in raw["sessions"]:
            session = LocalSession.from_json(entry)
            if session.id in book.sessions:
                raise ValueError(f"session book lists session {session.id} twice")
            book.sessions[session.id] = session
        mark = raw["mark"]
        if mark is not None:
            fields(mark, "sync mark", set(SyncMark.__dataclass_fields__))
            if mark["source"] not in ("mqtt", "reef"):
                raise ValueError("sync mark source is neither 'mqtt' nor 'reef'")
            digest = optional(mark, "mqtt_digest", str, "sync mark")
            if digest is not None:
                try:
                    bytes.fromhex(digest)
                except ValueError:
                    raise ValueError("sync mark mqtt_digest is not hex") from None
            issued = optional(mark, "mqtt_issued", str, "sync mark")
            if issued is not None:
                try:
                    datetime.fromisoformat(issued)
                except ValueError:
                    raise ValueError("sync mark mqtt_issued is not an ISO 8601 time") from None
            book.mark = SyncMark(
                mark["source"],
                required(mark, "wall_ns", int, "sync mark"),
                required(mark, "wall_trusted", bool, "sync mark"),
                optional(mark, "mqtt_version", int, "sync mark"),
                issued,
                digest,
            )
        return book


def utc(wall_ns: int | None) -> str | None:
    """A wall time as the session set writes its timestamps (``format_timestamp``), or None."""
    if wall_ns is None:
        return None
    seconds, micros = divmod(wall_ns // 1000, 1_000_000)
    return format_timestamp(datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=micros))


def ack_body(
    book: SessionBook, vin: str, source: str, version: int | None, changes: Sequence[Change]
) -> dict[str, Any]:
    """The acknowledgement published after a change: every session's id, state and the expiry the vehicle
    enforces, so the cloud can tell whether the vehicle holds its current set (REEF's ``/synchronized``)."""
    return {
        "vin": vin,
        "source": source,
        "version": version,
        "sessions": [
            {"id": s.id, "verification_id": s.verification_id, "state": s.state, "expires": utc(s.expires_ns)}
            for s in sorted(book.sessions.values(), key=lambda s: s.id)
        ],
        "changed": [{"id": c.id, "from": c.before, "to": c.after} for c in changes],
    }
