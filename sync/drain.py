"""Drain the outbox to the broker: by priority, many records per message, several messages in flight,
records deleted only after the broker acknowledged them (PUBACK).

Two lanes share the in-flight window. The backlog lane walks the outbox in drain order (priority, then age)
with a cursor; the live lane takes records appended since the drain began, so while a day of backlog drains
a new reading still goes out within seconds (``live_share`` of the messages). A record taken by one lane is
never taken by the other while in flight. On any publish failure the drain stops (the link is presumed
dead); the next run starts from the outbox again, so what was in flight is sent again: at-least-once, with
(device, stream, seq) to drop duplicates.

Acknowledged ids are deleted in coalesced transactions; one lost in a crash is merely sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fleetgate.sync.envelope import Message, pack_rows
from fleetgate.sync.store import Outbox

log = logging.getLogger(__name__)

Publish = Callable[[Message], Awaitable[None]]
FETCH = 2000  # records read from the outbox per query
ACK_FLUSH_S = 0.2
ACK_FLUSH_IDS = 5000
IDLE_POLL_S = 1.0


@dataclass
class DrainStats:
    messages: int = 0
    records: int = 0
    last_publish_wall: float | None = None
    rate_window: deque[tuple[float, int]] = field(default_factory=deque)  # (monotonic, records) per message

    def published(self, records: int) -> None:
        now = time.monotonic()
        self.messages += 1
        self.records += records
        self.last_publish_wall = time.time()
        self.rate_window.append((now, records))
        while self.rate_window and now - self.rate_window[0][0] > 30:
            self.rate_window.popleft()

    @property
    def rate_per_s(self) -> float:
        """Records acknowledged per second over the last 30 s."""
        if len(self.rate_window) < 2:
            return 0.0
        span = self.rate_window[-1][0] - self.rate_window[0][0]
        return (sum(n for _, n in self.rate_window) - self.rate_window[0][1]) / span if span > 0 else 0.0


class Drain:
    def __init__(
        self,
        outbox: Outbox,
        device: str,
        max_inflight: int,
        max_message_bytes: int,
        compress_min_bytes: int,
        live_share: float,
        store_id: str,
    ) -> None:
        self._outbox = outbox
        self._device = device
        self._store_id = store_id
        self._max_inflight = max_inflight
        self._max_bytes = max_message_bytes
        self._compress_min = compress_min_bytes
        self._live_every = 0 if live_share <= 0 else max(1, round(1 / live_share))
        self.stats = DrainStats()
        self.wake = asyncio.Event()  # "sync now"

    async def run(self, publish: Publish) -> None:
        """Publish until cancelled or a publish fails (which is raised)."""
        window = asyncio.Semaphore(self._max_inflight)
        # Ids in flight, or acknowledged and not yet deleted: never taken again by either lane meanwhile.
        taken: set[int] = set()
        acked: list[int] = []
        failure: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        tasks: set[asyncio.Task[None]] = set()
        backlog = (-1, 0)  # cursor: (priority, id) of the last record the backlog lane took
        live_after = await self._outbox.last_id()
        turn = 0

        async def send(message: Message) -> None:
            try:
                await publish(message)
            except BaseException as exc:
                if not failure.done():
                    failure.set_result(exc)
                raise
            finally:
                window.release()
            acked.extend(message.ids)
            self.stats.published(len(message.ids))

        async def delete_acked() -> None:
            ids = acked[:]
            del acked[:]
            await self._outbox.acknowledge(ids)
            taken.difference_update(ids)

        async def flush_acks() -> None:
            while True:
                await asyncio.sleep(ACK_FLUSH_S)
                if acked:
                    await delete_acked()

        acker = asyncio.create_task(flush_acks(), name="drain-acks")
        try:
            while not failure.done():
                turn += 1
                live_turn = self._live_every and turn % self._live_every == 0
                if live_turn:
                    newest = await self._outbox.encoded_newest_after(live_after, FETCH)
                    records = [r for r in newest if r[0] not in taken]
                    if records:
                        live_after = records[-1][0]
                else:
                    records = await self._outbox.encoded_after(backlog[0], backlog[1], FETCH)
                    if records:
                        backlog = (records[-1][2], records[-1][0])
                    records = [r for r in records if r[0] not in taken]
                if not records:
                    if not live_turn:
                        await self._idle(failure)
                        backlog = (
                            -1,
                            0,
                        )  # new records may sit anywhere in drain order: look again from the top
                    continue
                for message in pack_rows(
                    self._device, self._store_id, records, self._max_bytes, self._compress_min
                ):
                    await window.acquire()
                    if failure.done():
                        window.release()
                        break
                    taken.update(message.ids)
                    task = asyncio.create_task(send(message))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            raise failure.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            acker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acker
            if acked:
                await asyncio.shield(delete_acked())

    async def _idle(self, failure: asyncio.Future[BaseException]) -> None:
        """Nothing to take: wait for new records, "sync now", a failure, or a second."""
        self._outbox.appended.clear()
        waiters = [
            asyncio.ensure_future(self._outbox.appended.wait()),
            asyncio.ensure_future(self.wake.wait()),
        ]
        try:
            await asyncio.wait([*waiters, failure], timeout=IDLE_POLL_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        self.wake.clear()
