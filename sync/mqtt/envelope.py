"""The uplink message: many outbox records of one stream in one JSON document, compressed when worth it.

    {"v": 1, "device": "<id>", "store": "<database id>", "stream": "<name>", "records": [
        {"seq": 17, "ts": "2026-11-22T10:00:00.123Z", "wall_ns": ..., "mono_ns": ..., "boot": "<boot id>",
         "trusted": true, "corrected": false, "data": {<the record's payload>}}, ...]}

(device, store, stream, seq) identifies a record for ever: a consumer drops what it has seen. ``store`` is
the id of the gateway's database; it changes only when the database is replaced, and seq starts again then.
The store encodes each record (``Outbox.encoded_after``: SQLite builds the bytes, payload spliced in, never
parsed again); this module only packs them. A message at least ``compress_min_bytes`` long is
zlib-compressed; the MQTT 5 user property ``content-encoding: zlib`` says so. The drain compresses at level 1
(it is on the clock); the packer, which seals messages ahead of time while offline (sync/store/segments.py),
at level 6: ~16% fewer bytes on the link for ~3x the CPU, spent while there is nothing else to do.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter
from pathlib import Path

from fleetgate.sync.store.hot import HotRecord, hot_id
from fleetgate.sync.store.wire import EncodedRow

ENVELOPE_VERSION = 1
COMPACT_VERSION = 2
# The preset dictionary of compact messages (docs/mqtt.md, "Compact live telemetry"): fixed for version 2.
ZDICT = (Path(__file__).with_name("telemetry-v2.zdict")).read_bytes()
COMPACT_LEVEL = 9
CONTENT_TYPE = "application/json"
DRAIN_LEVEL = 1
SEAL_LEVEL = 6


@dataclass(frozen=True, slots=True)
class Message:
    stream: str
    ids: list[int]  # outbox row ids of the records it carries, in order (none for a segment)
    payload: bytes
    compressed: bool
    segment: int | None = None  # the sealed segment it is (sync/store/segments.py), acknowledged as one
    segment_records: int = 0

    @property
    def records(self) -> int:
        return self.segment_records if self.segment is not None else len(self.ids)


def pack_rows(
    device: str, store: str, rows: Sequence[EncodedRow], max_bytes: int, compress_min_bytes: int
) -> list[Message]:
    """Encoded outbox rows (``Outbox.encoded_after``) into messages of one stream each: by priority, then
    stream, records of a stream in order. The drain's packing; the benchmark and tests call it too."""
    out: list[Message] = []
    for stream, group in groupby(sorted(rows, key=itemgetter(2, 1, 0)), key=itemgetter(1)):
        out.extend(
            pack_encoded(device, stream, [(r[0], r[3]) for r in group], max_bytes, compress_min_bytes, store)
        )
    return out


def _head(device: str, store: str, stream: str) -> bytes:
    return (
        f'{{"v":{ENVELOPE_VERSION},"device":{json.dumps(device)},"store":{json.dumps(store)},'
        f'"stream":{json.dumps(stream)},"records":['
    ).encode()


def reheaded(payload: bytes, compressed: bool, sealed_by: str, device: str, store: str, stream: str) -> bytes:
    """A message packed ahead of time under device id ``sealed_by``, now carrying ``device`` (the id was
    changed in the configuration meanwhile: the envelope's device must equal the topic's). Rare; costs one
    decompression and compression."""
    body = zlib.decompress(payload) if compressed else payload
    old = _head(sealed_by, store, stream)
    if not body.startswith(old):
        raise ValueError(f"sealed message of stream {stream!r} does not start with its envelope head")
    body = _head(device, store, stream) + body[len(old) :]
    return zlib.compress(body, DRAIN_LEVEL) if compressed else body


def pack_encoded(
    device: str,
    stream: str,
    rows: Sequence[tuple[int, bytes]],
    max_bytes: int,
    compress_min_bytes: int,
    store: str,
    level: int = DRAIN_LEVEL,
) -> Iterator[Message]:
    """(id, encoded record) of one stream, in order, into messages of at most ``max_bytes`` before compression.

    The drain's path: the store hands records over already encoded (``Outbox.encoded_after``).
    """
    head = _head(device, store, stream)
    ids: list[int] = []
    parts: list[bytes] = []
    size = 0

    def finish() -> Message:
        body = head + b",".join(parts) + b"]}"
        if len(body) >= compress_min_bytes:
            return Message(stream, ids, zlib.compress(body, level), True)
        return Message(stream, ids, body, False)

    for id_, encoded in rows:
        if ids and size + len(encoded) + 1 > max_bytes:
            yield finish()
            ids, parts, size = [], [], 0
        ids.append(id_)
        parts.append(encoded)
        size += len(encoded) + 1
    if ids:
        yield finish()


def pack_compact(
    device: str,
    store: str,
    stream: str,
    boot: str,
    records: Sequence[HotRecord],
    max_bytes: int,
    tier: int = 0,
) -> Iterator[Message]:
    """Live records (in seq order) into compact messages, envelope version 2 (docs/mqtt.md): one base
    (seq, wall_ns, mono_ns) and each record as ``[dseq, dwall_ns, dmono_ns - dwall_ns, flags, data]`` from the
    one before, compressed with the preset dictionary ``ZDICT``. Record ids are the hot tier's (``hot_id``)."""
    if not records:
        return
    start = 0
    size = 0
    for i, record in enumerate(records):
        size += len(record.payload) + 40  # the numbers around it, at most
        if i > start and size > max_bytes:
            yield _compact(device, store, stream, boot, records[start:i], tier)
            start, size = i, len(record.payload) + 40
    yield _compact(device, store, stream, boot, records[start:], tier)


def _compact(
    device: str, store: str, stream: str, boot: str, records: Sequence[HotRecord], tier: int
) -> Message:
    first = records[0]
    head = (
        f'{{"v":{COMPACT_VERSION},"device":{json.dumps(device)},"store":{json.dumps(store)},'
        f'"stream":{json.dumps(stream)},"boot":{json.dumps(boot)},'
        f'"base":{{"seq":{first.seq},"wall_ns":{first.wall_ns},"mono_ns":{first.mono_ns}}},"records":['
    ).encode()
    parts = []
    seq, wall, mono = first.seq, first.wall_ns, first.mono_ns
    for r in records:
        dwall = r.wall_ns - wall
        flags = (1 if r.trusted else 0) | (2 if r.corrected else 0)
        parts.append(
            f"[{r.seq - seq},{dwall},{r.mono_ns - mono - dwall},{flags},".encode() + r.payload + b"]"
        )
        seq, wall, mono = r.seq, r.wall_ns, r.mono_ns
    body = head + b",".join(parts) + b"]}"
    packer = zlib.compressobj(COMPACT_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, ZDICT)
    payload = packer.compress(body) + packer.flush()
    return Message(stream, [hot_id(tier, r.seq) for r in records], payload, True)


def expand(envelope: dict) -> list[dict]:
    """The records of an envelope of either version as version 1 writes them (without ``ts``): what a
    consumer does with a compact message (docs/mqtt.md shows the same few lines)."""
    if envelope["v"] == ENVELOPE_VERSION:
        return list(envelope["records"])
    base = envelope["base"]
    seq, wall, mono = base["seq"], base["wall_ns"], base["mono_ns"]
    out = []
    for dseq, dwall, dmono, flags, data in envelope["records"]:
        seq, wall, mono = seq + dseq, wall + dwall, mono + dwall + dmono
        out.append(
            {"seq": seq, "wall_ns": wall, "mono_ns": mono, "boot": envelope["boot"],
             "trusted": bool(flags & 1), "corrected": bool(flags & 2), "data": data}
        )  # fmt: skip
    return out
