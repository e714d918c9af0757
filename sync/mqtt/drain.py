"""Drain the outbox to the broker: by priority, many records per message, several messages in flight,
records deleted only after the broker acknowledged them (PUBACK).

Two lanes share the in-flight window. The backlog lane walks the outbox in drain order (priority, then age)
with a cursor, publishing sealed segments (the oldest telemetry, packed ahead while offline: see
sync/store/segments.py) as they are, before the telemetry rows. The live lane takes records appended since
the drain began, so while a day of backlog drains a new reading still goes out within seconds
(``live_share`` of the messages). A record taken by one lane is never taken by the other while in flight.
On any publish failure the drain stops (the link is presumed dead); the next run starts from the outbox
again, so what was in flight is sent again: at-least-once, with (device, stream, seq) to drop duplicates.

Acknowledged ids are deleted in coalesced transactions; one lost in a crash is merely sent again.

Live telemetry in the outbox's hot tier (sync/store/hot.py) never touches the store on its way: it is
published from memory once its oldest record is ``live_batch_s`` old (or a batch is full), under negative
ids (``-seq``), and forgotten on PUBACK; what the drain leaves in flight when it stops goes back to the tier.
With ``compact_live`` those messages are compact ones (envelope version 2, envelope.pack_compact).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fleetgate.sync.mqtt.envelope import Message, pack_compact, pack_encoded, pack_rows, reheaded
from fleetgate.sync.store import Outbox, Priority
from fleetgate.sync.store.segments import Segment
from fleetgate.sync.store.wire import EncodedRow

log = logging.getLogger(__name__)

Publish = Callable[[Message], Awaitable[None]]
FETCH = 2000  # records read from the outbox per query
# Sealed segments (a message each) read per query: at most this many, and about PAGE_BYTES of them (twice
# that in memory, with the page read ahead).
FETCH_SEGMENTS = 32
PAGE_BYTES = 4 * 1024 * 1024
ACK_FLUSH_S = 0.2  # acknowledged records are deleted this often (one commit), and once the backlog is out
IDLE_POLL_S = 1.0
HOT_BATCH_MAX = 2000  # hot records that make a batch due before its window is up


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
        live_batch_s: float = 0.0,
        compact_live: bool = False,
    ) -> None:
        self._outbox = outbox
        self._device = device
        self._store_id = store_id
        self._max_inflight = max_inflight
        self._max_bytes = max_message_bytes
        self._compress_min = compress_min_bytes
        self._live_every = 0 if live_share <= 0 else max(1, round(1 / live_share))
        self._live_batch_s = live_batch_s
        self._compact_live = compact_live
        self._segment_page = max(2, min(FETCH_SEGMENTS, PAGE_BYTES // max_message_bytes))
        self.stats = DrainStats()
        self.wake = asyncio.Event()  # "sync now"
        self.lock = asyncio.Lock()  # held while draining: the packer seals only while it is free

    async def run(self, publish: Publish) -> None:
        """Publish until cancelled or a publish fails (which is raised)."""
        async with self.lock:
            await self._run(publish)

    async def _run(self, publish: Publish) -> None:
        window = asyncio.Semaphore(self._max_inflight)
        # Row and segment ids in flight, or acknowledged and not yet deleted: never taken again meanwhile.
        taken: set[int] = set()
        taken_segments: set[int] = set()
        acked: list[int] = []
        acked_segments: list[int] = []
        failure: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        tasks: set[asyncio.Task[None]] = set()
        backlog = self._backlog()
        live_after = await self._outbox.last_id()
        live_seen = self._outbox.records_committed  # the live lane asks again only after a commit
        flush_now = asyncio.Event()
        caught_up = False  # the backlog lane found nothing more to send
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
            if message.segment is not None:
                acked_segments.append(message.segment)
            else:
                acked.extend(message.ids)
            self.stats.published(message.records)
            if caught_up and len(tasks) <= 1:
                flush_now.set()  # the last one in flight at the end: delete now, not at the next tick

        async def delete_acked() -> None:
            ids, segs = acked[:], acked_segments[:]
            del acked[:], acked_segments[:]
            await self._outbox.acknowledge(ids, segs)
            taken.difference_update(ids)
            taken_segments.difference_update(segs)

        async def flush_acks() -> None:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(flush_now.wait(), ACK_FLUSH_S)
                flush_now.clear()
                if acked or acked_segments:
                    await delete_acked()

        acker = asyncio.create_task(flush_acks(), name="drain-acks")
        try:
            while not failure.done():
                turn += 1
                live_turn = self._live_every and turn % self._live_every == 0
                if self._hot_due() == 0.0:
                    messages = self._pack_hot()
                elif live_turn and self._outbox.records_committed != live_seen:
                    live_seen = self._outbox.records_committed
                    newest = await self._outbox.encoded_newest_after(live_after, FETCH)
                    records = [r for r in newest if r[0] not in taken]
                    if records:
                        live_after = records[-1][0]
                    messages = self._pack(records)
                else:
                    messages = await backlog.next(taken, taken_segments)
                    caught_up = messages is None
                    if caught_up:
                        await self._idle(failure)
                        # New records may sit anywhere in drain order: look again from the top.
                        backlog.close()
                        backlog = self._backlog()
                        continue
                for message in messages:
                    await window.acquire()
                    if failure.done():
                        window.release()
                        break
                    if message.segment is not None:
                        taken_segments.add(message.segment)
                    else:
                        taken.update(message.ids)
                    task = asyncio.create_task(send(message))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            raise failure.result()
        finally:
            backlog.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            acker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acker
            if acked or acked_segments:
                await asyncio.shield(delete_acked())
            self._outbox.release_hot([i for i in taken if i < 0])

    def _hot_due(self) -> float | None:
        """Seconds until a hot tier's batch is due (0: now), None if none holds anything to send."""
        dues = [
            d
            for t in self._outbox.hot.values()
            if (d := t.due_in(self._live_batch_s, HOT_BATCH_MAX)) is not None
        ]
        return min(dues, default=None)

    def _pack_hot(self) -> list[Message]:
        """Every hot tier's records waiting, once its batch is due (the others wait for theirs)."""
        messages: list[Message] = []
        for tier in self._outbox.hot.values():
            if tier.due_in(self._live_batch_s, HOT_BATCH_MAX) != 0.0:
                continue
            if self._compact_live:
                records = tier.take_records(HOT_BATCH_MAX)
                messages += pack_compact(
                    self._device,
                    self._store_id,
                    tier.stream,
                    tier.boot_id,
                    records,
                    self._max_bytes,
                    tier.index,
                )
                continue
            rows = tier.take(HOT_BATCH_MAX)  # in seq order: packed as they are (pack_rows would sort by id)
            messages += pack_encoded(
                self._device, tier.stream, [(r[0], r[3]) for r in rows], self._max_bytes, self._compress_min,
                self._store_id,
            )  # fmt: skip
        return messages

    def _pack(self, records: list[EncodedRow]) -> list[Message]:
        return pack_rows(self._device, self._store_id, records, self._max_bytes, self._compress_min)

    def _from_segment(self, g: Segment) -> Message:
        payload = g.payload
        if g.device != self._device:
            try:
                payload = reheaded(payload, g.compressed, g.device, self._device, self._store_id, g.stream)
            except (ValueError, zlib.error) as exc:
                # A damaged segment must not stall the uplink for ever: it goes as stored, and says so.
                log.error("sealed message could not be re-headed", extra={"segment": g.id, "error": str(exc)})
        return Message(g.stream, [], payload, g.compressed, g.id, g.records)

    def _backlog(self) -> _Backlog:
        return _Backlog(self._outbox, self._pack, self._from_segment, self._segment_page)

    async def _idle(self, failure: asyncio.Future[BaseException]) -> None:
        """Nothing to take: wait for new records, "sync now", a failure, or a second."""
        self._outbox.appended.clear()
        waiters = [
            asyncio.ensure_future(self._outbox.appended.wait()),
            asyncio.ensure_future(self.wake.wait()),
        ]
        hot_due = self._hot_due()
        timeout = IDLE_POLL_S if hot_due is None else min(IDLE_POLL_S, hot_due)
        try:
            await asyncio.wait([*waiters, failure], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        self.wake.clear()


class _Backlog:
    """The backlog lane's walk through the outbox in drain order: rows more urgent than telemetry (audit,
    events), then sealed segments (the oldest telemetry, already packed), then the remaining rows.

    The next page of the current phase is read ahead while this one is published, so the window does not
    run dry while the store thread answers (or commits a batch of deletions first)."""

    def __init__(
        self,
        outbox: Outbox,
        pack: Callable[[list[EncodedRow]], list[Message]],
        from_segment: Callable[[Segment], Message],
        segment_page: int,
    ) -> None:
        self._outbox = outbox
        self._pack = pack
        self._from_segment = from_segment
        self._segment_page = segment_page
        self.cursor = (-1, 0)  # (priority, id) of the last row read
        self.segment_after = 0
        self.phase = "urgent"
        self._ahead: asyncio.Task[Any] | None = None

    def _read(self) -> Awaitable[Any]:
        if self.phase == "urgent":
            return self._outbox.encoded_after(*self.cursor, FETCH, below=Priority.TELEMETRY)
        if self.phase == "segments":
            return self._outbox.segments_after(self.segment_after, self._segment_page)
        return self._outbox.encoded_after(*self.cursor, FETCH)

    async def next(self, taken: set[int], taken_segments: set[int]) -> list[Message] | None:
        """The next messages to publish ([] if all that was read is in flight), None at the end."""
        while True:
            ahead, self._ahead = self._ahead, None
            page = await (ahead if ahead is not None else self._read())
            if page:
                break
            if self.phase == "rows":
                return None
            self.phase = "segments" if self.phase == "urgent" else "rows"
        if self.phase == "segments":
            self.segment_after = page[-1].id
            messages = [self._from_segment(g) for g in page if g.id not in taken_segments]
        else:
            self.cursor = (page[-1][2], page[-1][0])
            messages = None
        self._ahead = asyncio.ensure_future(self._read())
        if messages is None:  # rows: packed after the read-ahead started, so the two overlap
            messages = self._pack([r for r in page if r[0] not in taken])
        return messages

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.cancel()
            self._ahead = None
