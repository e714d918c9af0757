"""One record as the uplink envelope carries it (docs/mqtt.md), encoded by SQLite on the store thread.

SQLite releases the GIL while it steps, so the event loop does not pay for encoding (in Python it cost ~3 us
per record on the loop). The payload is spliced in as stored, never parsed again. json_quote writes what
json.dumps does for the ASCII boot ids (/proc's UUID, or "unknown").
"""

from __future__ import annotations

ENCODED_RECORD = (
    "CAST('{\"seq\":' || o.seq"
    " || ',\"ts\":\"' || strftime('%Y-%m-%dT%H:%M:%S', o.wall_ns / 1000000000, 'unixepoch')"
    ' || printf(\'.%03dZ","wall_ns":\', o.wall_ns / 1000000 % 1000) || o.wall_ns'
    " || ',\"mono_ns\":' || o.mono_ns || ',\"boot\":' || json_quote(b.boot_id)"
    " || CASE WHEN o.time_trusted THEN ',\"trusted\":true' ELSE ',\"trusted\":false' END"
    " || CASE WHEN o.time_corrected THEN ',\"corrected\":true' ELSE ',\"corrected\":false' END"
    " || ',\"data\":' || o.payload || '}' AS BLOB)"
)
FROM_RECORDS = " FROM outbox o JOIN streams s ON s.id = o.stream_id JOIN boots b ON b.id = o.boot "
SELECT_ENCODED = "SELECT o.id, s.name, o.priority, " + ENCODED_RECORD + FROM_RECORDS

EncodedRow = tuple[int, str, int, bytes]  # outbox row id, stream, priority, encoded record
