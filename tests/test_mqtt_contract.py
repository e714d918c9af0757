"""docs/mqtt.md is the MQTT contract: its schemas are valid, its examples validate, it names what the code emits,
and what a real daemon publishes to a real broker decodes and validates exactly as it says.

Schemas and examples are read from the document's fenced blocks (```json schema=<name>, ```json example=<name>);
the consumer sketch (```python consumer) is run against the real traffic too. Besides the documented (open,
forward-compatible) schemas, every real message is also checked against a "closed" copy that forbids fields the
document does not name, so a field the code starts sending cannot go undocumented.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import zlib
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from fleetgate.config.signals import CATALOGUE
from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.readings import ReadingSink
from fleetgate.sync.mqtt import envelope as envelope_module
from fleetgate.sync.mqtt.envelope import ZDICT, expand, pack_compact, pack_rows
from fleetgate.sync.store import Database, Outbox

from conftest import daemon_config, wait_until
from mosquitto_fixture import Mosquitto
from mqtt_consumer import Consumer
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "mqtt.md"
DEVICE = "test-0001"
TOPIC_ROOT = "fleetgate/v1"
# docs/mqtt.md, "Topics": the schema of each record's `data`, by stream.
STREAM_SCHEMA = {
    "telemetry": "telemetry",
    "events": "event",
    "heartbeat": "heartbeat",
    "audit": "audit",
    "sessions-ack": "sessions-ack",
    "scooters": "scooter-reading",
    "scooter-events": "scooter-event",
    "scooter-results": "scooter-result",
}
ZLIB = ("content-encoding", "zlib")
ZDICT_PATH = Path(envelope_module.__file__).with_name("telemetry-v2.zdict")


# -- reading the document -----------------------------------------------------------------------------


def fenced_blocks(text: str) -> list[tuple[str, dict[str, str], str]]:
    """(language, attributes from the info string, body) of every ``` fenced block."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```") and line.strip() != "```":
            info = line[3:].split()
            attrs = dict(part.split("=", 1) if "=" in part else (part, "") for part in info[1:])
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append((info[0], attrs, "\n".join(lines[i + 1 : end])))
            i = end + 1
        else:
            i += 1
    return blocks


def doc_blocks() -> tuple[dict[str, dict], list[tuple[str, Any]], str]:
    """The schemas by name, the examples as (schema name, value), and the consumer sketch's source."""
    schemas: dict[str, dict] = {}
    examples: list[tuple[str, Any]] = []
    sketch = ""
    for lang, attrs, body in fenced_blocks(DOC.read_text()):
        if lang == "json" and "schema" in attrs:
            assert attrs["schema"] not in schemas, f"schema {attrs['schema']!r} defined twice"
            schemas[attrs["schema"]] = json.loads(body)
        elif lang == "json" and "example" in attrs:
            examples.append((attrs["example"], json.loads(body)))
        elif lang == "python" and "consumer" in attrs:
            sketch = body
    return schemas, examples, sketch


SCHEMAS, EXAMPLES, SKETCH = doc_blocks()


def closed(schema: Any, *, top: bool = True) -> Any:
    """A copy in which every object schema that lists properties allows no others.

    A schema with ``oneOf`` branches is closed as a whole (``unevaluatedProperties``): a property named by
    the schema itself or by the branch that matched is allowed, nothing else.
    """
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items() if k != "oneOf"}
    if "oneOf" in schema:
        out["oneOf"] = [closed(branch, top=False) for branch in schema["oneOf"]]
        out.setdefault("unevaluatedProperties", False)
    elif top and isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


VALIDATORS = {name: Draft202012Validator(schema) for name, schema in SCHEMAS.items()}
STRICT = {name: Draft202012Validator(closed(copy.deepcopy(schema))) for name, schema in SCHEMAS.items()}


def check(name: str, value: Any, *, strict: bool = True) -> None:
    """Validate against the documented schema, and (strict) against its closed copy."""
    errors = [e.message for e in VALIDATORS[name].iter_errors(value)]
    assert not errors, f"{name}: {errors}\n{json.dumps(value)[:2000]}"
    if strict:
        errors = [e.message for e in STRICT[name].iter_errors(value)]
        assert not errors, f"{name}: a field docs/mqtt.md does not name: {errors}\n{json.dumps(value)[:2000]}"


def iso_ms(wall_ns: int) -> str:
    """docs/mqtt.md: ts is wall_ns as ISO 8601 UTC, truncated to milliseconds."""
    seconds, ns = divmod(wall_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns // 1_000_000:03d}Z"


def check_envelope(envelope: dict, *, topic: str | None = None, strict: bool = True) -> None:
    """Version 1, or version 2 (compact live telemetry) whose expanded records are checked as version 1's."""
    compact = envelope.get("v") == 2
    check("envelope-compact" if compact else "envelope", envelope, strict=strict)
    if topic is not None:
        assert topic == f"{TOPIC_ROOT}/{envelope['device']}/up/{envelope['stream']}"
    records = expand(envelope)
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"records not in ascending seq: {seqs}"
    for record in records:
        if compact:
            check("envelope", {**envelope, "v": 1, "records": [{**record, "ts": iso_ms(record["wall_ns"])}]},
                  strict=False)  # fmt: skip
        else:
            assert record["ts"] == iso_ms(record["wall_ns"]), record
        assert not (record["trusted"] and record["corrected"]), record
        if envelope["stream"] in STREAM_SCHEMA:
            check(STREAM_SCHEMA[envelope["stream"]], record["data"], strict=strict)


def event_branches() -> set[str]:
    """Every event name a branch of the event schema names (``const``, or ``enum`` for a shared shape)."""
    names: set[str] = set()
    for b in SCHEMAS["event"]["oneOf"]:
        event = b.get("properties", {}).get("event", {})
        names.update([event["const"]] if "const" in event else event.get("enum", []))
    return names


# -- the document on its own ------------------------------------------------------------------------------


def test_every_schema_is_valid_and_every_example_validates():
    assert set(SCHEMAS) >= {"envelope", *STREAM_SCHEMA.values(), "health"}
    for name, schema in SCHEMAS.items():
        assert schema.get("$schema") == "https://json-schema.org/draft/2020-12/schema", name
        Draft202012Validator.check_schema(schema)
        Draft202012Validator.check_schema(closed(copy.deepcopy(schema)))
    assert {name for name, _ in EXAMPLES} == set(SCHEMAS), (
        "every schema has an example, every example a schema"
    )
    for name, example in EXAMPLES:
        if name == "envelope":
            check_envelope(example)
        else:
            check(name, example)
    health = [e for n, e in EXAMPLES if n == "health"]
    assert {"online": False} in health and any(h["online"] is True for h in health)


def test_the_schemas_reject_what_the_document_rules_out():
    envelope = next(e for n, e in EXAMPLES if n == "envelope")
    wrong_version = {**envelope, "v": 2}
    assert not VALIDATORS["envelope"].is_valid(wrong_version)
    no_seq = copy.deepcopy(envelope)
    del no_seq["records"][0]["seq"]
    assert not VALIDATORS["envelope"].is_valid(no_seq)
    assert not VALIDATORS["telemetry"].is_valid({"signal": "vehicle_speed", "value": 47.0, "unit": "mph"})
    assert not VALIDATORS["event"].is_valid({"event": "dtc-on", "code": "P0301"})
    assert not VALIDATORS["health"].is_valid({"online": True})
    # ... and accept what the document says a consumer must tolerate: compatible additions.
    assert VALIDATORS["telemetry"].is_valid({"signal": "cabin_temp", "value": 21.5, "unit": "degC"})
    assert VALIDATORS["event"].is_valid({"event": "door-opened", "door": "rear"})
    assert VALIDATORS["heartbeat"].is_valid({"uptime_s": 1.0, "components": {}, "backlog": 0, "new": 1})


def test_the_schemas_name_every_signal_and_event_the_code_emits():
    branches = SCHEMAS["telemetry"]["oneOf"]
    documented = {
        b["properties"]["signal"]["const"]: b["properties"]["unit"]["const"]
        for b in branches
        if "const" in b["properties"]["signal"]
    }
    assert documented == {name: s.unit for name, s in CATALOGUE.items()}
    fallback = next(b for b in branches if "not" in b["properties"]["signal"])
    assert set(fallback["properties"]["signal"]["not"]["enum"]) == set(CATALOGUE)

    pattern = re.compile(r'(?:\.record|emit_now)\(\s*"([a-z][a-z0-9-]*)"')
    sources = [*ROOT.joinpath("daemon").rglob("*.py"), *ROOT.joinpath("sync").rglob("*.py")]
    emitted = {name for path in sources for name in pattern.findall(path.read_text())}
    assert len(emitted) >= 10, emitted  # the scan itself works
    assert event_branches() == emitted, "docs/mqtt.md's event schema differs from the events the code emits"
    fallback = next(b for b in SCHEMAS["event"]["oneOf"] if "not" in b["properties"]["event"])
    assert set(fallback["properties"]["event"]["not"]["enum"]) == emitted
    table = DOC.read_text()
    for name in emitted:
        assert f"| `{name}` |" in table, f"event {name} missing from the event table"


def test_telemetry_records_from_a_real_outbox_match_the_contract(tmp_path):
    """The daemon has no vehicle in the traffic test, so telemetry is built here from the real sink, outbox
    and envelope code: every catalogue signal, untrusted then corrected, and trusted."""
    samples: dict[str, Any] = {
        "gps_position": {"latitude": 52.520008, "longitude": 13.404954, "altitude": None},
        "gps_fix_mode": 3,
        "gps_satellites": 9,
    }

    async def main() -> list:
        db = await Database.open(tmp_path / "t.db")
        try:
            clock = Clock()
            outbox = Outbox(db)
            sink = ReadingSink(outbox, clock)
            for name in CATALOGUE:
                sink.add(name, samples.get(name, 12.5))
            await sink.flush()
            clock.set_ntp(True)  # trust arrives: later readings are trusted, earlier ones get corrected
            sink.add("gps_position", {"latitude": -33.9, "longitude": 151.2, "altitude": 58.0})
            sink.add("rpm", 1800)
            await sink.flush()
            trust = clock.trust
            assert trust.offset_ns is not None and trust.since_mono_ns is not None
            assert await outbox.correct_wall_times(trust.offset_ns, trust.since_mono_ns) == len(CATALOGUE)
            # The drain's own path: records encoded by the store, packed by pack_rows.
            return await outbox.next_batch(1000), await outbox.encoded_after(-1, 0, 1000), db.store_id
        finally:
            await db.close()

    records, encoded, store_id = asyncio.run(main())
    assert {(r.time_trusted, r.time_corrected) for r in records} == {(False, True), (True, False)}
    for compress_min in (0, 10**9):
        messages = pack_rows(DEVICE, store_id, encoded, 1024, compress_min)
        assert len(messages) > 1  # split by size
        delivered = []
        for message in messages:
            assert message.compressed == (compress_min == 0)
            envelope = json.loads(zlib.decompress(message.payload) if message.compressed else message.payload)
            check_envelope(envelope, topic=f"{TOPIC_ROOT}/{DEVICE}/up/telemetry")
            delivered += envelope["records"]
        assert [r["seq"] for r in delivered] == [r.seq for r in records]
        assert {r["data"]["signal"] for r in delivered} == set(CATALOGUE)


def test_compact_live_telemetry_expands_to_the_records_version_1_carries(tmp_path):
    """Envelope version 2 from the real hot tier and packer: valid against its schema, and expanded (by the
    document's own consumer sketch too) exactly the records version 1 encodes, less ts."""
    samples: dict[str, Any] = {
        "gps_position": {"latitude": 52.520008, "longitude": 13.404954, "altitude": None},
        "gps_fix_mode": 3,
        "gps_satellites": 9,
    }

    async def main() -> tuple[list[dict], list, str]:
        db = await Database.open(tmp_path / "t.db")
        try:
            clock = Clock()
            outbox = Outbox(db)
            await outbox.enable_hot("telemetry", 60.0, 10_000)
            sink = ReadingSink(outbox, clock)
            for name in CATALOGUE:
                sink.add(name, samples.get(name, 12.5))
            await sink.flush()
            clock.set_ntp(True)
            for rpm in range(800, 3000, 25):
                sink.add("rpm", rpm)
            await sink.flush()
            trust = clock.trust
            assert trust.offset_ns is not None and trust.since_mono_ns is not None
            await outbox.correct_wall_times(trust.offset_ns, trust.since_mono_ns)
            hot = outbox.hot["telemetry"]
            records = hot.take_records(10_000)
            version_1 = [json.loads(hot.encode(r)) for r in records]
            messages = list(pack_compact(DEVICE, db.store_id, "telemetry", hot.boot_id, records, 1024))
            return version_1, messages, db.store_id
        finally:
            await db.close()

    version_1, messages, _store = asyncio.run(main())
    assert len(messages) > 1 and all(m.compressed for m in messages)  # split by size; always compressed
    topic = f"{TOPIC_ROOT}/{DEVICE}/up/telemetry"
    props = {"ContentType": "application/json", "PayloadFormatIndicator": 0, "UserProperty": [ZLIB]}
    expanded = []
    for message in messages:
        envelope = check_message(topic, message.payload, 1, props)
        assert envelope["v"] == 2
        expanded += expand(envelope)
    assert {(r["trusted"], r["corrected"]) for r in expanded} == {(False, True), (True, False)}
    assert expanded == [{k: v for k, v in r.items() if k != "ts"} for r in version_1]
    stored, _health, _acked = run_sketch([(topic, m.payload, 1, False, props) for m in messages])
    assert stored == Counter({(DEVICE, "telemetry", r["seq"]): 1 for r in version_1})


# -- real traffic: a daemon, a broker, a subscriber ------------------------------------------------------


def raw(payload: bytes, props: dict[str, Any]) -> bytes:
    """docs/mqtt.md, "Encoding and compression": zlib exactly when the user property says so."""
    if ZLIB not in props.get("UserProperty", []):
        return payload
    return zlib.decompressobj(zdict=ZDICT).decompress(payload)  # reads both, with the dictionary or without


def decode(payload: bytes, props: dict[str, Any]) -> Any:
    return json.loads(raw(payload, props))


def backlog(daemon, stream: str) -> int:
    result = daemon.cli("status", "--json")
    assert result.returncode in (0, 4), result.stderr
    rows = json.loads(result.stdout)["outbox"]["streams"]
    return next((row["depth"] for row in rows if row["stream"] == stream), 0)


def check_message(topic: str, payload: bytes, qos: int, props: dict[str, Any]) -> dict:
    assert qos == 1, f"{topic} not delivered at QoS 1"
    prefix = f"{TOPIC_ROOT}/{DEVICE}/"
    assert topic.startswith(prefix), topic
    rest = topic[len(prefix) :]
    user = props.get("UserProperty", [])
    if rest.startswith("up/"):
        assert props.get("ContentType") == "application/json", props
        compressed = ZLIB in user
        assert props.get("PayloadFormatIndicator") == (0 if compressed else 1), props
        assert [p for p in user if p[0] == "content-encoding"] == ([ZLIB] if compressed else []), props
        if not compressed:
            payload.decode("utf-8")  # the format indicator promises UTF-8
        envelope = decode(payload, props)
        assert envelope["device"] == DEVICE
        check_envelope(envelope, topic=topic)
        return envelope
    assert rest == "health", f"a topic docs/mqtt.md does not list: {topic}"
    assert not user, props
    body = decode(payload, props)
    check("health", body)
    if body["online"]:
        assert props.get("ContentType") == "application/json", props
    else:
        assert body == {"online": False}
    return body


def run_sketch(messages: list) -> tuple[Counter, list[tuple[str, dict]], list[tuple[int, int]]]:
    """The consumer sketch of docs/mqtt.md, fed every real message twice (a duplicate of everything)."""
    namespace: dict[str, Any] = {"__name__": "mqtt_md_consumer"}
    with contextlib.chdir(Path(ZDICT_PATH).parent):  # the sketch reads the dictionary from its folder
        exec(compile(SKETCH, f"{DOC}#consumer", "exec"), namespace)  # noqa: S102 - the document's own code
    stored: Counter = Counter()
    health: list[tuple[str, dict]] = []
    acked: list[tuple[int, int]] = []
    namespace["store"] = lambda device, stream, record: stored.update([(device, stream, record["seq"])])
    namespace["store_health"] = lambda device, body: health.append((device, body))
    namespace["park"] = lambda msg: pytest.fail(f"the sketch parked a real message on {msg.topic}")
    client = SimpleNamespace(ack=lambda mid, qos: acked.append((mid, qos)))
    for mid, (topic, payload, qos, _retain, props) in enumerate(messages * 2, start=1):
        msg = SimpleNamespace(
            topic=topic, payload=payload, qos=qos, mid=mid, properties=SimpleNamespace(**props)
        )
        namespace["on_message"](client, None, msg)
    return stored, health, acked


def test_real_daemon_traffic_matches_the_contract(tmp_path, start_daemon):
    state = tmp_path / "state"
    state.mkdir()
    (state / "fleetgate.db").write_bytes(b"this is not a database\n" * 64)  # -> a store-recovered event
    with (
        Mosquitto() as broker,
        Consumer("127.0.0.1", broker.port, f"{TOPIC_ROOT}/{DEVICE}/#") as consumer,
        TcpProxy("127.0.0.1", broker.port) as proxy,
    ):
        proxy.cut("reset")  # the daemon builds a backlog first: one batch big enough to be compressed
        config = daemon_config(
            tmp_path,
            f"""
[supervisor]
backoff_initial_s = 0.1
backoff_max_s = 0.5

[mqtt]
enabled = true
host = "127.0.0.1"
port = {proxy.port}
tls = false
keepalive_s = 5
connect_timeout_s = 2
publish_timeout_s = 5
compress_min_bytes = 1000
""",
            heartbeat_s=0.2,
        )
        daemon = start_daemon(config)
        daemon.wait_ready()
        wait_until("a backlog of 3 heartbeats", lambda: backlog(daemon, "heartbeat") >= 3)
        proxy.restore()

        def seen_everything(messages: list) -> bool:
            ups = [
                (topic, ZLIB in props.get("UserProperty", []), raw(payload, props))
                for topic, payload, _q, _r, props in messages
                if "/up/" in topic
            ]
            return (
                any(topic.endswith("/health") for topic, *_ in messages)
                and any(
                    topic.endswith("/up/events") and b"store-recovered" in body for topic, _z, body in ups
                )
                and any(zipped for _t, zipped, _b in ups)
                and any(not zipped for _t, zipped, _b in ups)  # small version 1 messages go as they are
            )

        consumer.wait_for(seen_everything, timeout=30)

        with Consumer("127.0.0.1", broker.port, f"{TOPIC_ROOT}/{DEVICE}/#") as late:
            retained = late.wait_for(lambda msgs: msgs, timeout=10)
        [(topic, payload, _qos, retain, props)] = retained  # only health is retained
        assert topic == f"{TOPIC_ROOT}/{DEVICE}/health" and retain
        assert check_message(topic, payload, 1, props)["online"] is True

        daemon.kill()  # no clean disconnect: the broker publishes the Last Will
        will = f"{TOPIC_ROOT}/{DEVICE}/health"
        consumer.wait_for(
            lambda msgs: any(m[0] == will and json.loads(m[1]) == {"online": False} for m in msgs)
        )
        with Consumer("127.0.0.1", broker.port, will) as late:
            [(_t, payload, _q, retain, props)] = late.wait_for(lambda msgs: msgs, timeout=10)
        assert retain and json.loads(payload) == {"online": False} and props == {}

        messages = consumer.messages

    records: Counter = Counter()
    events: list[str] = []
    for topic, payload, qos, retain, props in messages:
        assert not retain  # a live subscriber gets even the retained health with the flag clear
        body = check_message(topic, payload, qos, props)
        if "/up/" in topic:
            for record in expand(body):
                records[(DEVICE, body["stream"], record["seq"])] += 1
                if body["stream"] == "events":
                    events.append(record["data"]["event"])
    assert "store-recovered" in events
    assert {stream for _d, stream, _s in records} >= {"events", "heartbeat"}

    stored, health, acked = run_sketch(messages)
    assert stored == Counter(set(records)), "the sketch stores every record exactly once, duplicates dropped"
    assert len(acked) == 2 * len(messages) and {qos for _mid, qos in acked} == {1}
    assert health and all(device == DEVICE for device, _b in health)
    assert health[-1][1] == {"online": False}
