"""The uplink message: many outbox records of one stream in one JSON document, compressed when worth it.

    {"v": 1, "device": "<id>", "store": "<database id>", "stream": "<name>", "records": [
        {"seq": 17, "ts": "2026-11-22T10:00:00.123Z", "wall_ns": ..., "mono_ns": ..., "boot": "<boot id>",
         "trusted": true, "corrected": false, "data": {<the record's payload>}}, ...]}

(device, store, stream, seq) identifies a record for ever: a consumer drops what it has seen. ``store`` is
the id of the gateway's database; it changes only when the database is replaced, and seq starts again then.
Payloads are already JSON in the outbox, so they are spliced in as bytes, never parsed again. A payload at least
``compress_min_bytes`` long is zlib-compressed; the MQTT 5 user property ``content-encoding: zlib`` says so.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from operator import attrgetter

from fleetgate.sync.store import StoredRecord

ENVELOPE_VERSION = 1
CONTENT_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Message:
    stream: str
    ids: list[int]  # outbox row ids of the records it carries, in order
    payload: bytes
    compressed: bool


def _iso(wall_ns: int) -> str:
    seconds, ns = divmod(wall_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ns // 1_000_000:03d}Z"


def encode_record(r: StoredRecord) -> bytes:
    head = (
        f'{{"seq":{r.seq},"ts":"{_iso(r.wall_ns)}","wall_ns":{r.wall_ns},"mono_ns":{r.mono_ns},'
        f'"boot":{json.dumps(r.boot_id)},"trusted":{"true" if r.time_trusted else "false"},'
        f'"corrected":{"true" if r.time_corrected else "false"},"data":'
    )
    return head.encode() + r.payload + b"}"


def pack(
    device: str, records: Sequence[StoredRecord], max_bytes: int, compress_min_bytes: int, store: str
) -> Iterator[Message]:
    """Split records (in order) into messages of one stream each, at most ``max_bytes`` before compression."""
    for stream, group in groupby(records, key=attrgetter("stream")):
        rows = [(r.id, encode_record(r)) for r in group]
        yield from pack_encoded(device, stream, rows, max_bytes, compress_min_bytes, store)


def pack_encoded(
    device: str,
    stream: str,
    rows: Sequence[tuple[int, bytes]],
    max_bytes: int,
    compress_min_bytes: int,
    store: str,
) -> Iterator[Message]:
    """(id, encoded record) of one stream, in order, into messages of at most ``max_bytes`` before compression.

    The drain's path: the store hands records over already encoded (``Outbox.encoded_after``).
    """
    head = (
        f'{{"v":{ENVELOPE_VERSION},"device":{json.dumps(device)},"store":{json.dumps(store)},'
        f'"stream":{json.dumps(stream)},"records":['
    ).encode()
    ids: list[int] = []
    parts: list[bytes] = []
    size = 0

    def finish() -> Message:
        body = head + b",".join(parts) + b"]}"
        if len(body) >= compress_min_bytes:
            return Message(stream, ids, zlib.compress(body, 1), True)
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


def unpack(payload: bytes, compressed: bool) -> dict:
    """What a consumer does (tests use it): inflate if declared, then parse."""
    return json.loads(zlib.decompress(payload) if compressed else payload)
