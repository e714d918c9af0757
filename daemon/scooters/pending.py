"""The persistent queue of scooter commands that no channel could run yet ("lock as soon as possible").

A command that neither BLE nor the cloud could run for a reason that may pass (the scooter out of range and
its cellular link down, the cloud unreachable) waits here until it is done or its expiry passes. Each entry is
its own key of the state table (``scooters.pending/<id>``), written in the same commit as the result record
that says ``deferred`` (or, for a signed downlink command, the one that says ``accepted``), and deleted in the
commit of its final outcome: a kill -9 or power cut at any point leaves either the entry or the outcome.

An entry never holds a secret: a setting that carries a Bluetooth key is not queued, and a key rotation draws
its new key when it runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from fleetgate.sync.store import StateStore

PREFIX = "scooters.pending/"
MAX_PENDING = 1024  # more than this and new ones are not queued (a yard, not a backlog)
_ID = re.compile(r"[\x21-\x7e]{1,80}")
_VIA = ("auto", "ble", "cloud")


@dataclass
class Pending:
    id: str
    iot_code: str
    op: str
    params: dict[str, Any]
    source: str
    via: str
    seq: int | None
    queued_wall_ns: int
    expires_wall_ns: int
    tries: int = 0

    @property
    def key(self) -> str:
        return PREFIX + self.id

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, raw: Any) -> Pending:
        """``ValueError`` naming what is wrong if ``raw`` is not an entry this version wrote."""
        if not isinstance(raw, dict) or set(raw) != set(cls.__dataclass_fields__):
            raise ValueError("not a pending command entry")
        for name in ("id", "iot_code", "op", "source", "via"):
            if not isinstance(raw[name], str):
                raise ValueError(f"{name} is not a string")
        for name in ("queued_wall_ns", "expires_wall_ns", "tries"):
            if type(raw[name]) is not int:  # bool is an int in Python
                raise ValueError(f"{name} is not an integer")
        if raw["seq"] is not None and type(raw["seq"]) is not int:
            raise ValueError("seq is not an integer")
        if not isinstance(raw["params"], dict):
            raise ValueError("params is not an object")
        if not _ID.fullmatch(raw["id"]) or raw["via"] not in _VIA:
            raise ValueError("id or via is malformed")
        return cls(**raw)


class PendingQueue:
    """What is queued, in memory, mirroring the state table (which the runner's commits keep in step)."""

    def __init__(self) -> None:
        self.entries: dict[str, Pending] = {}
        self.dropped = 0  # saved entries that did not decode (moved aside by the caller)

    async def load(self, state: StateStore) -> list[str]:
        """Read every saved entry; returns the keys of those that do not decode (the caller deletes them)."""
        bad = []
        for key, text in (await state.items(PREFIX)).items():
            try:
                entry = Pending.from_state(json.loads(text))
                if entry.key != key:
                    raise ValueError("its id does not match its key")
            except ValueError:
                bad.append(key)
                self.dropped += 1
                continue
            self.entries[entry.id] = entry
        return bad

    def full(self) -> bool:
        return len(self.entries) >= MAX_PENDING

    def put(self, entry: Pending) -> dict[str, Any]:
        """Keep ``entry``; returns the state change for the commit that queues it."""
        self.entries[entry.id] = entry
        return {entry.key: entry.to_state()}

    def remove(self, entry_id: str) -> dict[str, Any]:
        """Forget it; returns the state change (a delete) for the commit of its outcome."""
        self.entries.pop(entry_id, None)
        return {PREFIX + entry_id: None}

    def for_scooter(self, iot_code: str) -> list[Pending]:
        return [e for e in self.entries.values() if e.iot_code == iot_code]

    def view(self, iot_code: str) -> list[dict[str, Any]]:
        return [
            {"id": e.id, "op": e.op, "via": e.via, "tries": e.tries, "expires_wall_ns": e.expires_wall_ns}
            for e in sorted(self.for_scooter(iot_code), key=lambda e: e.queued_wall_ns)
        ]
