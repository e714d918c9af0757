"""The PIN path under hostile input and tampered state, end to end: a real daemon, a real mosquitto, the keypad
and relay on socat ptys (the rig of tests/test_access_daemon.py).

- A keypad hammered during a lockout: refusals are audited in aggregates (a count per record), so the audit
  stream stays bounded, and the counts add up to every entry made.
- Bad values in the ``state`` table (written with sqlite3 into a stopped daemon's database): the daemon starts
  anyway, moves each bad value aside, reports it (event, status alert) and fails closed.
- Digits that are not ASCII (fullwidth, Arabic-Indic ...: ``str.isdigit`` is true for them) are not a PIN and
  never count toward the lockout.
- A full disk: ``fleetgate pin test`` answers a clear refusal (``store-unavailable``), not an internal error.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import test_access_daemon as access_rig
from nacl.signing import SigningKey
from test_access_daemon import PIN, WRONG_PIN, _pin_test, session, sessions, synced_version, type_pin
from test_mqtt_contract import check_envelope
from test_uplink_daemon import decode

from fleetgate.daemon.runtime.control_protocol import request
from fleetgate.sync.crypto.device_keys import generate_secret_file
from fleetgate.sync.mqtt.envelope import expand

from conftest import wait_until, write_config
from mosquitto_fixture import free_port
from small_disk import fill, small_tmpfs

pytestmark = pytest.mark.timeout(240)
rig = access_rig.rig  # fixtures: the daemon with broker, keypad and relay; the pty pairs it uses
pty_pairs = access_rig.pty_pairs


def unique_records(consumer, stream: str) -> list[dict[str, Any]]:
    """Every record on ``stream`` the consumer saw, once each (a QoS 1 redelivery is not a new record),
    checked against docs/mqtt.md."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for topic, payload, _q, _r, props in consumer.messages:
        if topic.endswith(f"/up/{stream}"):
            envelope = decode(topic, payload, props)
            check_envelope(envelope, topic=topic)
            for record in expand(envelope):
                seen[(envelope.get("store", ""), record["seq"])] = record["data"]
    return list(seen.values())


def status(daemon) -> dict[str, Any]:
    result = daemon.cli("status", "--json")
    assert result.returncode in (0, 4), result.stderr + daemon.log[-3000:]
    return json.loads(result.stdout)


def read_feedback(keypad, wanted: bytes, count: int) -> int:
    """Read keypad feedback until ``count`` ``wanted`` lines arrived; return how many arrived."""
    got = b""

    def enough() -> bool:
        nonlocal got
        got += keypad.read(0.2)
        return got.count(wanted) >= count

    wait_until(f"{count} {wanted!r} feedback lines", enough, timeout=60)
    return got.count(wanted)


# -- finding 4: keypad input during a lockout -------------------------------------------------------------


def test_refusals_during_a_lockout_are_audited_in_aggregates_that_add_up(rig, start_daemon):
    rig.cloud.publish(rig.cloud.sign([session(3)]))
    wait_until("set applied", lambda: synced_version(rig.daemon) == 1)
    for guess in ("000000", "123456", "999999"):
        assert type_pin(rig.keypad, guess) == b"R\n"
    rig.keypad.drain()
    bursts, per_burst = 4, 100  # a burst stays below the driver's event queue (256): nothing is dropped
    for _ in range(bursts):
        rig.keypad.write(b"1#" * per_burst)
        assert read_feedback(rig.keypad, b"L\n", per_burst) == per_burst
    entries = bursts * per_burst
    view = sessions(rig.daemon)["access"]["lockout"]
    assert view["locked"] and view["refused_while_locked"] == entries

    # The period's count is written when the lockout ends, every minute, or at the latest when the daemon
    # stops; the restarted daemon publishes it.
    assert rig.daemon.terminate() == 0
    daemon = start_daemon(rig.config)
    daemon.wait_ready()

    def locked_out() -> list[dict[str, Any]]:
        return [a for a in unique_records(rig.consumer, "audit") if a.get("reason") == "locked-out"]

    wait_until("every refusal accounted for", lambda: sum(a["count"] for a in locked_out()) >= entries)
    records = locked_out()
    assert sum(a["count"] for a in records) == entries, records
    assert len(records) <= 5, f"{len(records)} audit records for {entries} refusals: not aggregated"
    assert records[0]["count"] == 1, "the first refusal of a lockout is audited at once"
    assert all(a["event"] == "pin-refused" and a["outcome"] == "locked-out" for a in records)
    log = daemon.log + rig.daemon.log
    assert log.count("event queue full") <= 5


# -- finding 6: bad values in the state table --------------------------------------------------------------


def _state_db(rig) -> Path:
    return rig.tmp_path / "state" / "fleetgate.db"


def _write_state(db: Path, values: dict[str, str]) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            for key, text in values.items():
                conn.execute(
                    "INSERT INTO state(key, value, updated_wall_ns) VALUES (?, ?, 0) ON CONFLICT(key)"
                    " DO UPDATE SET value = excluded.value",
                    (key, text),
                )
    finally:
        conn.close()


def _read_state(db: Path) -> dict[str, str]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT key, value FROM state").fetchall())
    finally:
        conn.close()


def _book_with(mutate) -> str:
    """A valid saved session book (session 3, synchronized), changed by ``mutate``, as JSON text."""
    book = {
        "sessions": [
            {
                "id": 3,
                "verification_id": "verif-3",
                "initialization_ns": 1,
                "completion_ns": None,
                "expires_ns": None,
                "pin_hash": "00" * 32,
                "ended": None,
            }
        ],
        "mark": {
            "source": "mqtt",
            "wall_ns": 1,
            "wall_trusted": False,
            "mqtt_version": 1,
            "mqtt_issued": "2026-11-22T06:01:00+00:00",
            "mqtt_digest": "ab" * 32,
        },
    }
    mutate(book)
    return json.dumps(book)


def test_bad_state_values_are_quarantined_and_the_daemon_starts_locked(rig, start_daemon):
    rig.cloud.publish(rig.cloud.sign([session(3)]))
    wait_until("set applied", lambda: synced_version(rig.daemon) == 1)
    assert type_pin(rig.keypad, PIN) == b"G\n"
    assert rig.daemon.terminate() == 0
    db = _state_db(rig)
    bad = {
        "sessions.book": _book_with(lambda b: b["sessions"][0].update(id="3")),  # a session without an int id
        "access.lockout": "{not json",
        "sessions.offline_age": '{"floor_s": 12.5, "extra": 1}',
        "access.enabled": '{"session_id": [3]}',
    }
    _write_state(db, bad)

    rig.proxy.cut("reset")  # no coverage: the retained set would otherwise re-sync the book at once
    daemon = start_daemon(rig.config)
    daemon.wait_ready()  # it starts: before the fix, a traceback and exit 1 on every start
    alerts = status(daemon)["alerts"]
    for key in bad:
        assert any(key in line for line in alerts), (key, alerts)
    view = sessions(daemon)
    assert view["sessions"] == [] and view["sync"] is None, "an undecodable book holds no session"
    assert view["access"]["lockout"]["locked"], "an undecodable lockout means locked out, not open"
    assert view["access"]["enabled_by"] is None
    assert {q["key"] for q in view["quarantined"]} == set(bad)
    assert type_pin(rig.keypad, PIN) == b"L\n"

    def quarantined() -> set[str]:
        return {e["key"] for e in unique_records(rig.consumer, "events") if e["event"] == "state-quarantined"}

    rig.proxy.restore()
    wait_until("a state-quarantined event per bad value", lambda: quarantined() == set(bad))
    wait_until("the retained set synchronizes the book again", lambda: synced_version(daemon) == 1)
    assert daemon.terminate() == 0
    saved = _read_state(db)
    for key, text in bad.items():
        moved = [json.loads(v) for k, v in saved.items() if k.startswith(f"quarantine/{key}/")]
        assert [m["text"] for m in moved] == [text], f"the bad value of {key} is kept aside as it was"
        assert moved[0]["reason"]
    assert "access.enabled" not in saved
    assert json.loads(saved["sessions.book"])["sessions"][0]["id"] == 3, (
        "re-synchronized from the retained set"
    )
    assert json.loads(saved["access.lockout"])["locked_until_mono_ns"], "the fail-closed lockout is saved"

    # A clean start: nothing left to quarantine, no alert.
    daemon = start_daemon(rig.config)
    daemon.wait_ready()
    assert not [line for line in status(daemon)["alerts"] if "quarantine" in line]


@pytest.mark.parametrize(
    "text",
    [
        _book_with(lambda b: b["mark"].update(extra="x")),  # an extra key in the sync mark
        _book_with(lambda b: b["sessions"][0].pop("id")),
        "[1, 2",  # not JSON
        "42",
    ],
    ids=["extra-key-in-mark", "session-without-id", "not-json", "not-an-object"],
)
def test_an_undecodable_session_book_refuses_every_pin_until_the_next_sync(rig, start_daemon, text):
    rig.cloud.publish(rig.cloud.sign([session(3)]))
    wait_until("set applied", lambda: synced_version(rig.daemon) == 1)
    assert rig.daemon.terminate() == 0
    _write_state(_state_db(rig), {"sessions.book": text})
    rig.proxy.cut("reset")  # the retained set must not re-sync the vehicle at once: the gap is what is tested
    daemon = start_daemon(rig.config)
    daemon.wait_ready()
    assert any("sessions.book" in line for line in status(daemon)["alerts"])
    assert type_pin(rig.keypad, PIN) == b"R\n"
    assert sessions(daemon)["access"]["lockout"]["failures"] == 1
    rig.proxy.restore()
    wait_until("the retained set synchronizes again", lambda: synced_version(daemon) == 1, timeout=60)
    assert type_pin(rig.keypad, PIN) == b"G\n"


# -- finding 5 (part): digits that are not ASCII ----------------------------------------------------------


def digits(zero: int, ascii_digits: str) -> str:
    """``ascii_digits`` written with the digits of another script (``zero``: its code point for 0)."""
    return "".join(chr(zero + int(d)) for d in ascii_digits)


FULLWIDTH, ARABIC_INDIC, PERSIAN, DEVANAGARI = 0xFF10, 0x0660, 0x06F0, 0x0966
NOT_ASCII = [
    digits(FULLWIDTH, "123456"),
    digits(ARABIC_INDIC, "123456"),
    digits(PERSIAN, "123456"),
    digits(DEVANAGARI, "123456"),
    digits(FULLWIDTH, PIN),  # the right PIN, in other digits
    "12" + digits(ARABIC_INDIC, "3") + "456",
]


def test_non_ascii_digits_are_not_a_pin_and_never_count(rig):
    rig.cloud.publish(rig.cloud.sign([session(3)]))
    wait_until("set applied", lambda: synced_version(rig.daemon) == 1)
    socket_path = rig.tmp_path / "control.sock"
    for pin in NOT_ASCII:
        cli = _pin_test(rig.daemon, pin)
        assert cli.returncode == 2 and "a PIN is 4 to 32 digits" in cli.stderr, (pin, cli.stdout, cli.stderr)
        assert request(socket_path, "pin-test", {"pin": pin}) == {"outcome": "refused", "reason": "not-a-pin"}
    lockout = sessions(rig.daemon)["access"]["lockout"]
    assert lockout["failures"] == 0 and not lockout["locked"]
    assert _pin_test(rig.daemon, PIN).returncode == 0


# -- a full disk ------------------------------------------------------------------------------------------


def test_pin_test_on_a_full_disk_answers_store_unavailable(tmp_path, start_daemon):
    secret = tmp_path / "device.secret"
    generate_secret_file(secret)
    with small_tmpfs(tmp_path / "state") as state:
        config = write_config(
            tmp_path / "fleetgate.toml",
            f"""
[device]
id = "test-0001"
secret_file = "{secret}"

[store]
state_dir = "{state}"

[control]
socket_path = "{tmp_path / "control.sock"}"

[mqtt]
enabled = true
host = "127.0.0.1"
port = {free_port()}
tls = false

[sessions]
enabled = true
vin = "1D4PT4GKXBW600841"
signing_keys = ["{base64.b64encode(bytes(SigningKey.generate().verify_key)).decode()}"]

[sessions.lockout]
max_failures = 3
""",
        )
        daemon = start_daemon(config)
        daemon.wait_ready()
        assert _pin_test(daemon, WRONG_PIN).stdout.startswith("refused: no-match")
        filler = fill(state)
        full = _pin_test(daemon, WRONG_PIN)
        assert full.returncode == 1, full.stderr
        assert "refused: store-unavailable" in full.stdout and "internal" not in full.stderr, full
        assert "database or disk is full" in daemon.log
        filler.unlink()
        again = _pin_test(daemon, WRONG_PIN)
        assert again.returncode == 1 and again.stdout.startswith("refused: no-match"), again
        # The refusal the store could not take still counted (in memory) and is durable now.
        assert json.loads(daemon.cli("sessions", "--json").stdout)["access"]["lockout"]["failures"] == 0
        assert "lockout started" in again.stdout
        assert daemon.terminate() == 0
