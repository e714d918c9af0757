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

from fleetgate.sync.store import StoredRecord

ENVELOPE_VERSION = 1
CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class Message:
    stream: str
    records: list[StoredRecord]
    payload: bytes
    compressed: bool

    @property
    def ids(self) -> list[int]:
        return [r.id for r in self.records]


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
    current: list[StoredRecord] = []
    parts: list[bytes] = []
    size = 0
    stream: str | None = None

    def finish() -> Message:
        head = (
            f'{{"v":{ENVELOPE_VERSION},"device":{json.dumps(device)},"store":{json.dumps(store)},'
            f'"stream":{json.dumps(stream)},"records":['
        )
        body = head.encode() + b",".join(parts) + b"]}"
        if len(body) >= compress_min_bytes:
            return Message(stream or "", list(current), zlib.compress(body, 1), True)
        return Message(stream or "", list(current), body, False)

    for record in records:
        encoded = encode_record(record)
        if current and (record.stream != stream or size + len(encoded) + 1 > max_bytes):
            yield finish()
            current, parts, size = [], [], 0
        stream = record.stream
        current.append(record)
        parts.append(encoded)
        size += len(encoded) + 1
    if current:
        yield finish()


def unpack(payload: bytes, compressed: bool) -> dict:
    """What a consumer does (tests use it): inflate if declared, then parse."""
    return json.loads(zlib.decompress(payload) if compressed else payload)
