"""Supervised component: while the uplink is down, seals the telemetry backlog into ready-made messages.

Each step replaces one full message's worth of a stream's oldest telemetry rows by a sealed segment (the
rules are in sync/store/segments.py), packed as the drain would pack it but compressed harder. Offline, the
gateway has CPU to spare and nothing to send; when coverage returns the drain publishes the segments as they
are. It never runs while the drain does (it waits for the drain's lock), so no row it seals is in flight.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fleetgate.sync.mqtt.drain import Drain
from fleetgate.sync.mqtt.envelope import SEAL_LEVEL, pack_encoded
from fleetgate.sync.store import Outbox
from fleetgate.sync.store.segments import Sealed, SpilledMessage

IDLE_S = 5.0  # nothing to seal: look again after this


class Packer:
    name = "packer"

    def __init__(
        self,
        outbox: Outbox,
        drain: Drain,
        device: str,
        store_id: str,
        max_message_bytes: int,
        compress_min_bytes: int,
        idle_s: float = IDLE_S,
    ) -> None:
        self._outbox = outbox
        self._drain = drain
        self._device = device
        self._store_id = store_id
        self._max_bytes = max_message_bytes
        self._compress_min = compress_min_bytes
        self._idle_s = idle_s
        self.segments = 0
        self.records = 0
        self.bytes_saved = 0

    def pack(self, stream: str, rows: list[tuple[int, bytes]]) -> tuple[bytes, bool]:
        """Runs on the store thread. The store hands over exactly one message's worth."""
        [message] = pack_encoded(
            self._device, stream, rows, self._max_bytes, self._compress_min, self._store_id, SEAL_LEVEL
        )
        return message.payload, message.compressed

    def seal_spilled(self, stream: str, records: list[tuple[int, int, bytes]]) -> list[SpilledMessage]:
        """Runs on the store thread: live records being spilled, (seq, wall_ns, encoded), as the messages
        the drain will publish (``Outbox.seal_spills``)."""
        wall = {seq: wall_ns for seq, wall_ns, _ in records}
        return [
            SpilledMessage(m.ids[0], m.ids[-1], len(m.ids), wall[m.ids[0]], m.compressed, m.payload)
            for m in pack_encoded(
                self._device,
                stream,
                [(seq, encoded) for seq, _, encoded in records],
                self._max_bytes,
                self._compress_min,
                self._store_id,
                SEAL_LEVEL,
            )
        ]

    async def seal_one(self) -> Sealed | None:
        """One segment, if a stream has a full message's worth of sealable rows (the caller makes sure the
        drain is not running)."""
        sealed = await self._outbox.seal_next(self.pack, self._max_bytes, self._device)
        if sealed is not None:
            self.segments += 1
            self.records += sealed.records
            self.bytes_saved += sealed.rows_bytes - sealed.segment_bytes
        return sealed

    async def run(self) -> None:
        while True:
            async with self._drain.lock:
                sealed = await self.seal_one()
            if sealed is None:
                await asyncio.sleep(self._idle_s)

    def snapshot(self) -> dict[str, Any]:
        return {
            "segments": self.segments,
            "records": self.records,
            "bytes_saved": self.bytes_saved,
            "spills_sealed": self._outbox.sealed_spills,
        }
