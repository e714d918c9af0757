"""The spool: sealed backlog kept in append-only files beside the database, written in whole pages.

Offline, live telemetry is spilled every ``offline_window_s`` already sealed: each message exactly as the
drain will publish it (sync/store/segments.py). In SQLite a spill of ~8 KB of such messages costs ~13 dirty
pages (WAL frames, the header page, the wal-index, then every page once more at the checkpoint), ~9x the
bytes it keeps (tools/bench/footprint.py). Here it costs the pages it fills: one ``pwrite`` of whole 4 KiB
pages at a page boundary and one ``fdatasync``. SQLite keeps only what changes online (acknowledgements).

A file (``<database>.spool/<number>.spool``) is a run of records, each starting on a page boundary::

    magic "FGS1" | body length u32 | crc32(body) u32 | body, zero-padded to the next page
    body = meta length u32 | meta (JSON, zlib) | the messages' bytes, back to back

``meta`` lists the messages (stream, device, seq range, count, first wall time, compressed, size), the
state values the record carries (a trip checkpoint kept for the spill instead of a write of its own:
``Outbox.checkpoint_state``). Files are numbered upwards; a new one is begun at 4 MiB. A record that did
not reach the disk whole (a power cut during the write) is the file's torn tail, found by its length or
checksum and cut off at the next start, which then appends after the last whole record; it was never
reported durable.

What SQLite keeps (state table):

- ``outbox.spool-done/<file>``: the messages of that file acknowledged (or evicted over a quota), by
  ordinal, written in the acknowledgement's (or eviction's) transaction. A file whose every message is done
  is deleted (the one being written once it holds 1 MiB: until then it waits for the next outage).
- ``outbox.spool-folded``: the last record whose state values were written into the state table. A spooled
  value is newer than the table's until then, so reads see it first (``overlay``) and the next transaction
  that writes state writes it too (``fold``): an older spooled value can never come back over a newer one.

Every method runs on the store thread (``Database.run``), which already serialises the database.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from fleetgate.sync.store.records import ROW_OVERHEAD

if TYPE_CHECKING:  # segments.py imports the database, which imports this
    from fleetgate.sync.store.segments import SpilledMessage

log = logging.getLogger(__name__)

PAGE = 4096
MAGIC = b"FGS1"
HEADER = struct.Struct("<4sII")  # magic, body length, crc32 of the body
META_LEN = struct.Struct("<I")
MAX_FILE_BYTES = 4 << 20  # a new file after this many bytes: a finished file is deleted whole
# The file being written is kept when everything in it is delivered, for the next outage (a new file costs
# ~6 pages of file-system metadata, as much as a minute of readings), unless it holds this much already.
KEEP_CURRENT_BYTES = 1 << 20
RESERVE_BYTES = 256 << 10  # blocks allocated ahead of the writes (``_reserve``)
ID_BASE = 1 << 52  # spool message ids sort after every SQLite segment id (the drain reads those first)
ORDINAL_BITS = 24  # messages per file at most 2**24
MAX_BODY = 256 << 20
DONE_PREFIX = "outbox.spool-done/"
FOLDED_KEY = "outbox.spool-folded"
SUFFIX = ".spool"


def spool_folder(database: Path) -> Path:
    return database.with_name(database.name + SUFFIX)


def spool_id(file_no: int, ordinal: int) -> int:
    return ID_BASE + (file_no << ORDINAL_BITS) + ordinal


def split_spool_id(message_id: int) -> tuple[int, int]:
    return divmod(message_id - ID_BASE, 1 << ORDINAL_BITS)


def is_spool_id(message_id: int) -> bool:
    return message_id >= ID_BASE


class SpoolMessage(NamedTuple):
    """A sealed message held in the spool."""

    id: int
    stream: str
    device: str
    first_seq: int
    last_seq: int
    records: int
    first_wall_ns: int
    compressed: bool
    offset: int  # of its bytes in the file
    size: int

    @property
    def file_no(self) -> int:
        return split_spool_id(self.id)[0]

    @property
    def held_bytes(self) -> int:
        return self.size + ROW_OVERHEAD  # what quotas count, as for a segment row


class NewMessage(NamedTuple):
    """A sealed message to append, with the stream and device it is for."""

    stream: str
    device: str
    sealed: SpilledMessage


@dataclass
class _File:
    number: int
    path: Path
    live: int = 0  # messages not done
    last_record: int = -1  # ordinal of its last whole record


class _Tail(NamedTuple):
    end: int  # where the last whole record ends (a page boundary)
    ordinal: int  # the next message's ordinal
    record: int  # the next record's
    torn: int  # bytes after ``end``


@dataclass
class SpoolReport:
    """What the start found: counted and shown in the status (``outbox.spool``)."""

    files: int = 0
    messages: int = 0
    torn_tail_bytes: int = 0  # after the last whole record of a file: a write the power cut interrupted
    damaged_records: int = 0  # a bad record followed by good ones: the disk, not a cut
    problems: list[str] = field(default_factory=list)


class SpoolDamaged(ValueError):
    pass


class Spool:
    def __init__(self, folder: Path, durable: bool = True) -> None:
        self.folder = folder
        self._durable = durable  # fdatasync each record (tests of the format may turn it off)
        self._files: dict[int, _File] = {}
        self._live: dict[int, SpoolMessage] = {}
        self._ids: list[int] = []  # every id written or loaded, ascending; dead ones skipped on read
        self._fd: int | None = None
        self._current: _File | None = None
        self._size = 0
        self._allocated = 0  # the file's allocated length (``_reserve``)
        self._ordinal = 0
        self._record = 0
        self._next_file = 1
        self._done: dict[int, set[int]] = {}  # file -> ordinals done (what SQLite holds)
        self.pending: dict[str, str | None] = {}  # spooled state values not yet in the state table
        self._pending_upto: tuple[int, int] | None = None
        self._folded: tuple[int, int] = (0, -1)
        self.report = SpoolReport()
        self.appends = 0
        self.bytes_written = 0

    # -- start -------------------------------------------------------------------------------------------

    def load(self, state: dict[str, str]) -> dict[str, str | None]:
        """Read every file (``state``: the table's ``outbox.spool-*`` values); returns state changes the
        caller commits: done lists of files that are gone. Whole files already finished are deleted."""
        self._done = {}
        stale: dict[str, str | None] = {}
        for key, text in state.items():
            if key == FOLDED_KEY:
                try:
                    file_no, record = json.loads(text)
                    self._folded = (int(file_no), int(record))
                except (TypeError, ValueError) as exc:
                    self.report.problems.append(f"{FOLDED_KEY}: {exc}")
                continue
            if not key.startswith(DONE_PREFIX):
                continue
            try:
                file_no = int(key[len(DONE_PREFIX) :])
                self._done[file_no] = {int(o) for o in json.loads(text)}
            except (TypeError, ValueError) as exc:
                self.report.problems.append(f"{key}: {exc}")
                stale[key] = None
        numbers = sorted(self._numbers())
        tail = None
        for file_no in numbers:
            tail = self._load_file(file_no)
        if tail is not None and tail.end < MAX_FILE_BYTES:
            self._resume(numbers[-1], tail)
        for file_no in list(self._done):
            if file_no not in self._files:
                stale[DONE_PREFIX + str(file_no)] = None  # its file was deleted: the list goes too
                del self._done[file_no]
        self._next_file = max([*numbers, *self._done, self._folded[0], 0]) + 1
        self._delete_finished()
        self.report.files = len(self._files)
        self.report.messages = len(self._live)
        return stale

    def _numbers(self) -> Iterable[int]:
        if not self.folder.is_dir():
            return []
        out = []
        for path in self.folder.iterdir():
            if path.suffix == SUFFIX and path.stem.isdigit():
                out.append(int(path.stem))
        return out

    def _path(self, file_no: int) -> Path:
        return self.folder / f"{file_no:08d}{SUFFIX}"

    def _load_file(self, file_no: int) -> _Tail:
        path = self._path(file_no)
        data = path.read_bytes()
        info = _File(file_no, path)
        self._files[file_no] = info
        done = self._done.get(file_no, set())
        offset, record, ordinal, good_end = 0, 0, 0, 0
        damaged_at: int | None = None
        while offset + HEADER.size <= len(data):
            try:
                meta, body_at, end = _parse(data, offset)
            except SpoolDamaged as exc:
                if damaged_at is None:
                    damaged_at = offset
                    detail = f"{path.name} at {offset}: {exc}"
                offset += PAGE
                continue
            if damaged_at is not None:  # good records after a bad one: the bad one was damage, not a cut
                self.report.damaged_records += 1
                self.report.problems.append(detail)
                log.error("spool record damaged, skipped", extra={"detail": detail})
                damaged_at = None
            for stream, device, first, last, count, wall, compressed, size in meta.get("m", []):
                if ordinal not in done:
                    message = SpoolMessage(
                        spool_id(file_no, ordinal), str(stream), str(device), int(first), int(last),
                        int(count), int(wall), bool(compressed), body_at, int(size),
                    )  # fmt: skip
                    self._add(message, info)
                body_at += int(size)
                ordinal += 1
            if (file_no, record) > self._folded and meta.get("s"):
                self.pending.update(meta["s"])
                self._pending_upto = (file_no, record)
            info.last_record = record
            record += 1
            offset = good_end = _page_end(end)
        # Preallocated space (``_reserve``) reads as zeros: the file's end, not a torn write.
        torn = 0 if data.count(0, good_end) == len(data) - good_end else len(data) - good_end
        if torn:
            self.report.torn_tail_bytes += torn
            log.warning(
                "spool file ends in a torn record (a write a stop interrupted): ignored",
                extra={"file": path.name, "bytes": torn},
            )
        return _Tail(good_end, ordinal, record, torn)

    def _resume(self, file_no: int, tail: _Tail) -> None:
        """Append to the newest file again (a new file costs ~6 pages of metadata): its torn tail, if any,
        cut off first, so what follows it is never taken for damage between good records."""
        info = self._files[file_no]
        fd = os.open(info.path, os.O_WRONLY | os.O_CLOEXEC)
        if tail.torn:
            os.ftruncate(fd, tail.end)
            os.fsync(fd)
        self._fd, self._current = fd, info
        self._size, self._ordinal, self._record = tail.end, tail.ordinal, tail.record
        self._allocated = os.fstat(fd).st_size

    def _add(self, message: SpoolMessage, info: _File) -> None:
        self._live[message.id] = message
        self._ids.append(message.id)
        info.live += 1

    # -- writing -----------------------------------------------------------------------------------------

    def append(
        self, messages: list[NewMessage], state: dict[str, str | None] | None = None
    ) -> list[SpoolMessage]:
        """Write one record, durably (``fdatasync``) before returning; returns the messages as held."""
        state = dict(state or {})
        if not messages and not state:
            return []
        if self._current is not None and self._size >= MAX_FILE_BYTES:
            self._close_current()
        if self._current is None:
            self._open_new()
        assert self._current is not None and self._fd is not None
        meta: dict[str, Any] = {
            "m": [
                [n.stream, n.device, m.first_seq, m.last_seq, m.records, m.first_wall_ns, int(m.compressed),
                 len(m.payload)]
                for n in messages
                for m in [n.sealed]
            ],
        }  # fmt: skip
        if state:
            meta["s"] = state
        # Compressed: a trip checkpoint is ~1.8 KB of JSON, a fifth of a minute's record (~400 B packed).
        meta_bytes = zlib.compress(json.dumps(meta, separators=(",", ":")).encode(), 6)
        body = b"".join([META_LEN.pack(len(meta_bytes)), meta_bytes, *(n.sealed.payload for n in messages)])
        record = HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body
        record += bytes(_page_end(len(record)) - len(record))
        self._reserve(len(record))
        os.pwrite(self._fd, record, self._size)
        if self._durable:
            os.fdatasync(self._fd)
        # Durable: only now does anything in memory change (a failed write is written again at the same place).
        at = self._size + HEADER.size + META_LEN.size + len(meta_bytes)
        info, held = self._current, []
        for n in messages:
            m = n.sealed
            message = SpoolMessage(
                spool_id(info.number, self._ordinal), n.stream, n.device, m.first_seq, m.last_seq, m.records,
                m.first_wall_ns, m.compressed, at, len(m.payload),
            )  # fmt: skip
            self._add(message, info)
            held.append(message)
            at += len(m.payload)
            self._ordinal += 1
        if state:
            self.pending.update(state)
            self._pending_upto = (info.number, self._record)
        info.last_record = self._record
        self._record += 1
        self._size += len(record)
        self.appends += 1
        self.bytes_written += len(record)
        return held

    def _open_new(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        number = self._next_file
        self._next_file += 1
        path = self._path(number)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        if self._durable:  # the file's name must survive a power cut as its records do
            dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._current = _File(number, path)
        self._files[number] = self._current
        self._size = self._ordinal = self._record = self._allocated = 0

    def _reserve(self, length: int) -> None:
        """Allocate the file's blocks ahead, ``RESERVE_BYTES`` at a time: appending into allocated blocks
        changes no block bitmap, group descriptor or size, which an append that grows the file does on every
        write (~3 pages of metadata a minute offline, as much as the readings). ``fallocate`` writes nothing
        (the blocks read as zeros); where the file system cannot, the file just grows as it is written."""
        if self._size + length <= self._allocated or self._fd is None:
            return
        want = _page_end(self._size + length) + RESERVE_BYTES
        if _fallocate(self._fd, self._allocated, want - self._allocated):
            self._allocated = want
        else:
            self._allocated = 1 << 62  # never again for this file

    def _close_current(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._current = None, None

    def close(self) -> None:
        self._close_current()

    # -- reading -----------------------------------------------------------------------------------------

    def after(self, after_id: int, limit: int) -> list[tuple[SpoolMessage, bytes]]:
        """Held messages in write order after ``after_id``, with their bytes (each file opened once a call)."""
        found: list[SpoolMessage] = []
        at = bisect.bisect_right(self._ids, after_id)
        while at < len(self._ids) and len(found) < limit:
            message = self._live.get(self._ids[at])
            at += 1
            if message is not None:
                found.append(message)
        out = []
        with contextlib.ExitStack() as files:
            opened: dict[int, Any] = {}
            for message in found:
                f = opened.get(message.file_no)
                if f is None:
                    f = opened[message.file_no] = files.enter_context(
                        open(self._files[message.file_no].path, "rb")
                    )
                out.append((message, _read_at(f, message)))
        return out

    def held(self) -> dict[str, list[SpoolMessage]]:
        """Held messages by stream, oldest first."""
        out: dict[str, list[SpoolMessage]] = {}
        for message in self._live.values():
            out.setdefault(message.stream, []).append(message)
        return out

    def streams(self) -> set[str]:
        return {m.stream for m in self._live.values()}

    def top(self, stream: str) -> int:
        return max((m.last_seq for m in self._live.values() if m.stream == stream), default=0)

    # -- acknowledgements --------------------------------------------------------------------------------

    def done_changes(self, ids: Iterable[int]) -> tuple[dict[str, str | None], list[SpoolMessage]]:
        """The state changes that record ``ids`` as done (for the caller's transaction), and the messages."""
        by_file: dict[int, set[int]] = {}
        gone = []
        for message_id in ids:
            message = self._live.get(message_id)
            if message is None:
                continue
            gone.append(message)
            file_no, ordinal = split_spool_id(message_id)
            by_file.setdefault(file_no, set()).add(ordinal)
        changes: dict[str, str | None] = {}
        for file_no, ordinals in by_file.items():
            merged = sorted(self._done.get(file_no, set()) | ordinals)
            changes[DONE_PREFIX + str(file_no)] = json.dumps(merged, separators=(",", ":"))
        return changes, gone

    def forget(self, messages: Iterable[SpoolMessage]) -> None:
        """After the transaction of ``done_changes`` committed: drop them; delete files now finished."""
        for message in messages:
            if self._live.pop(message.id, None) is None:
                continue
            file_no, ordinal = split_spool_id(message.id)
            self._done.setdefault(file_no, set()).add(ordinal)
            self._files[file_no].live -= 1
        self._delete_finished()

    def _delete_finished(self) -> None:
        """Delete files with nothing held and no state value still only here; their done lists stay in the
        table until the next start drops them (``load``), so a crash between the two is harmless."""
        for info in list(self._files.values()):
            if info.live or ((info.number, info.last_record) > self._folded and self._pending_in(info)):
                continue
            if info is self._current:
                if self._size < KEEP_CURRENT_BYTES:
                    continue
                self._close_current()
            info.path.unlink(missing_ok=True)
            del self._files[info.number]
        if len(self._ids) > 2 * len(self._live) + 64:
            self._ids = [i for i in self._ids if i in self._live]

    def _pending_in(self, info: _File) -> bool:
        return self._pending_upto is not None and self._pending_upto[0] >= info.number

    # -- state values carried by records -----------------------------------------------------------------

    def fold(self, changes: dict[str, str | None]) -> dict[str, str | None]:
        """``changes`` with every spooled value not yet in the state table put first (and the mark of how
        far that goes): what a transaction that writes state must write (``folded`` after its commit)."""
        if not self.pending:
            return changes
        assert self._pending_upto is not None
        merged = dict(self.pending)
        merged.update(changes)
        merged[FOLDED_KEY] = json.dumps(list(self._pending_upto))
        return merged

    def folded(self, changes: dict[str, str | None]) -> None:
        """The transaction that wrote ``fold``'s result committed."""
        if FOLDED_KEY not in changes or self._pending_upto is None:
            return
        self._folded = self._pending_upto
        self.pending = {}
        self._pending_upto = None
        self._delete_finished()

    def overlay(self, key: str) -> tuple[bool, str | None]:
        """(True, value) if ``key``'s newest value is spooled (None: deleted), else (False, None)."""
        if key in self.pending:
            return True, self.pending[key]
        return False, None

    def snapshot(self) -> dict[str, Any]:
        return {
            "files": len(self._files),
            "messages": len(self._live),
            "records": sum(m.records for m in self._live.values()),
            "bytes": sum(m.size for m in self._live.values()),
            "appends": self.appends,
            "bytes_written": self.bytes_written,
            "pending_state": sorted(self.pending),
            "torn_tail_bytes": self.report.torn_tail_bytes,
            "damaged_records": self.report.damaged_records,
            "problems": self.report.problems[-5:],
        }


def _read_at(f: Any, message: SpoolMessage) -> bytes:
    f.seek(message.offset)
    data = f.read(message.size)
    if len(data) != message.size:
        raise OSError(f"spool {message.file_no}: {len(data)} of {message.size} bytes at {message.offset}")
    return data


def _fallocate(fd: int, offset: int, length: int) -> bool:
    """Linux fallocate(2), mode 0, never glibc's posix_fallocate, whose fallback writes zeros."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done = libc.fallocate(fd, 0, ctypes.c_int64(offset), ctypes.c_int64(length))
    except (OSError, AttributeError):
        return False
    return done == 0


def _page_end(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _parse(data: bytes, offset: int) -> tuple[dict[str, Any], int, int]:
    """(meta, where the messages' bytes start, where the body ends) of the record at ``offset``."""
    magic, length, crc = HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        raise SpoolDamaged("no record here")
    start = offset + HEADER.size
    end = start + length
    if length < META_LEN.size or length > MAX_BODY or end > len(data):
        raise SpoolDamaged(f"record of {length} bytes does not fit")
    body = data[start:end]
    if zlib.crc32(body) != crc:
        raise SpoolDamaged("checksum mismatch")
    (meta_len,) = META_LEN.unpack_from(body, 0)
    if META_LEN.size + meta_len > length:
        raise SpoolDamaged("meta longer than the record")
    try:
        meta = json.loads(zlib.decompress(body[META_LEN.size : META_LEN.size + meta_len]))
        if not isinstance(meta, dict):
            raise TypeError("not an object")
        sizes = sum(int(m[7]) for m in meta.get("m", []))
    except (TypeError, ValueError, IndexError, zlib.error) as exc:
        raise SpoolDamaged(f"meta unreadable: {exc}") from None
    if META_LEN.size + meta_len + sizes != length:
        raise SpoolDamaged("message sizes do not add up to the record")
    return meta, start + META_LEN.size + meta_len, end
