"""The rules of the PIN path that need no hardware: merging session sets from two channels, the offline
policy, and the lockout. The daemon-level tests (tests/test_access_daemon.py) run the same rules end to end."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from fleetgate.daemon.access.lockout import Lockout, LockoutPolicy
from fleetgate.daemon.access.session_book import LocalSession, SessionBook, SyncMark
from fleetgate.daemon.access.session_policy import OfflineAge, refusal_reason
from fleetgate.sync.crypto.device_keys import pin_matches

KEY = bytes(range(32))
T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
S = 1_000_000_000


@dataclass
class Incoming:
    id: int
    verification_id: str
    initialization: datetime
    completion: datetime | None = None
    pin: str | None = None


def ns(moment: datetime) -> int:
    return int(moment.timestamp()) * S


def test_a_new_active_session_is_kept_as_a_keyed_hash_only():
    book = SessionBook()
    changes = book.merge([Incoming(3, "v3", T0, pin="633911")], ns(T0), KEY, {})
    assert [(c.id, c.before, c.after) for c in changes] == [(3, None, "active")]
    stored = book.sessions[3]
    assert stored.pin_hash is not None and b"633911" not in stored.pin_hash
    assert "633911" not in repr(stored) and "633911" not in str(book.as_json())
    assert pin_matches(KEY, 3, "633911", stored.pin_hash)
    assert not pin_matches(KEY, 3, "633912", stored.pin_hash)


def test_an_ended_session_never_comes_back():
    """Guards against a late retained message (or a REEF answer in flight) re-opening a finished rental."""
    book = SessionBook()
    book.merge([Incoming(3, "v3", T0, pin="633911")], ns(T0), KEY, {})
    book.merge(
        [Incoming(3, "v3", T0, completion=T0 + timedelta(hours=1))], ns(T0 + timedelta(hours=1)), KEY, {}
    )
    # The hash stays while the session is remembered, so its PIN is answered "ended" (docs/security.md).
    assert book.sessions[3].state == "ended" and book.sessions[3].pin_hash is not None
    changes = book.merge([Incoming(3, "v3", T0, pin="633911")], ns(T0), KEY, {})
    assert changes == [] and book.sessions[3].state == "ended"


def test_a_channel_without_expiries_keeps_the_one_a_signed_set_gave_in_either_order():
    """Issue 18: REEF (expires None: not this channel's to say) never erases an expiry; the signed set sets
    it whether it comes first or second, and clears it when it lists the session without one."""
    end = ns(T0) + 3600 * S
    mqtt_first = SessionBook()
    mqtt_first.merge([Incoming(3, "v3", T0, pin="633911")], ns(T0), KEY, {3: end})
    mqtt_first.merge([Incoming(3, "v3", T0, pin="633911")], ns(T0), KEY, None)
    assert mqtt_first.sessions[3].expires_ns == end
    reef_first = SessionBook()
    reef_first.merge([Incoming(3, "v3", T0, pin="633911")], ns(T0), KEY, None)
    assert reef_first.sessions[3].expires_ns is None
    reef_first.merge([Incoming(3, "v3", T0)], ns(T0), KEY, {3: end})  # a set without the PIN in clear
    reef_first.merge([Incoming(3, "v3", T0, pin="633911")], ns(T0), KEY, None)
    assert reef_first.sessions[3].expires_ns == end and reef_first.sessions[3].pin_hash is not None
    reef_first.merge([Incoming(3, "v3", T0, pin="633911")], ns(T0), KEY, {})  # a newer set: no expiry now
    assert reef_first.sessions[3].expires_ns is None


def test_a_session_missing_from_a_newer_set_ends_but_an_older_set_cannot_end_a_newer_session():
    book = SessionBook()
    book.merge([Incoming(3, "v3", T0, pin="111111")], ns(T0), KEY, {})
    # A set made before session 4 started does not list it: it must not end it.
    book.merge(
        [Incoming(4, "v4", T0 + timedelta(minutes=10), pin="222222")], ns(T0 + timedelta(minutes=10)), KEY, {}
    )
    assert book.sessions[3].state == "ended" and book.sessions[3].ended == "removed"
    changes = book.merge([Incoming(3, "v3", T0, pin="111111")], ns(T0 + timedelta(minutes=5)), KEY, {})
    assert book.sessions[4].state == "active", "an older set ended a session it could not know"
    assert book.sessions[3].state == "ended" and changes == []


def test_the_book_survives_a_round_trip_through_json():
    book = SessionBook()
    book.merge(
        [Incoming(3, "v3", T0, pin="633911"), Incoming(2, "v2", T0, T0)], ns(T0), KEY, {3: ns(T0) + 3600 * S}
    )
    book.mark = SyncMark("mqtt", ns(T0), True, 7, T0.isoformat(), "ab" * 32)
    again = SessionBook.from_json(book.as_json())
    assert again.sessions == book.sessions and again.mark == book.mark
    assert again.sessions[3].expires_ns == ns(T0) + 3600 * S


def _session(**kw) -> LocalSession:
    base = {"id": 1, "verification_id": "v", "initialization_ns": 0, "pin_hash": b"x" * 32}
    return LocalSession(**{**base, **kw})


def test_offline_policy():
    now = ns(T0)
    ok = {"now_wall_ns": now, "wall_trusted": True, "offline_age_s": 10.0, "max_offline_age_s": 3600.0}
    assert refusal_reason(_session(), **ok) is None
    assert refusal_reason(_session(ended="completed"), **ok) == "ended"
    assert refusal_reason(_session(expires_ns=now - 1), **ok) == "expired"
    # An untrusted clock cannot end (or extend) a session by its expiry: only the offline age applies.
    assert refusal_reason(_session(expires_ns=now - 1), **{**ok, "wall_trusted": False}) is None
    assert refusal_reason(_session(), **{**ok, "offline_age_s": 3601.0}) == "sync-too-old"


def test_offline_age_counts_running_time_across_restarts_and_never_resets_without_a_sync():
    age = OfflineAge(0.0, 0)
    assert age.age_s(100 * S, 0, False, None) == 100
    saved = age.as_state(100 * S)
    # A restart (even a reboot: the monotonic clock starts again) carries the saved age on.
    again = OfflineAge.restore(saved, 5 * S, ever_synced=True)
    assert again.age_s(15 * S, 0, False, None) == 110
    # With trusted wall time on both ends, the wall-clock age counts too (time powered off included).
    mark = SyncMark("reef", ns(T0), True)
    assert again.age_s(15 * S, ns(T0) + 7200 * S, True, mark) == 7200
    # A lost age after a sync is the worst case, not zero.
    assert OfflineAge.restore(None, 0, ever_synced=True).age_s(0, 0, False, None) == float("inf")
    again.synced(20 * S)
    assert again.age_s(25 * S, 0, False, None) == 5


def test_lockout_grows_and_survives_a_restart():
    policy = LockoutPolicy(max_failures=3, base_delay_s=10, max_delay_s=25)
    lock = Lockout(policy, "boot-a")
    assert lock.failed(0) == 0 and lock.failed(0) == 0
    assert lock.failed(0) == 10 and lock.locked(5 * S) and not lock.locked(10 * S)
    for _ in range(2):
        lock.failed(11 * S)
    assert lock.failed(11 * S) == 20, "the second lockout doubles"
    saved = lock.as_state()
    same_boot = Lockout.restore(policy, "boot-a", saved, 12 * S)
    assert same_boot.remaining_s(12 * S) == 19
    rebooted = Lockout.restore(policy, "boot-b", saved, 1 * S)
    assert rebooted.remaining_s(1 * S) == 20, "a reboot restarts the lockout for its full length"
    for _ in range(3):
        rebooted.failed(40 * S)
    assert rebooted.remaining_s(40 * S) == 25, "capped at max_delay_s"
    rebooted.succeeded()
    assert not rebooted.locked(40 * S) and rebooted.lockouts == 0


def test_a_garbled_saved_lockout_is_refused_and_what_replaces_it_is_locked():
    """A saved lockout that cannot be decoded must not read as "no failures, open" (it did: failures "x"
    became 0): restore refuses it, and the fallback is a full lockout from now."""
    policy = LockoutPolicy(max_failures=3, base_delay_s=30, max_delay_s=3600)
    good = {"failures": 2, "lockouts": 1, "boot_id": "b", "locked_until_mono_ns": None}
    assert Lockout.restore(policy, "b", good, 0).failures == 2
    assert Lockout.restore(policy, "b", None, 0).failures == 0, "never saved: no failures"
    for bad in (
        {**good, "failures": "x"},
        {**good, "failures": -3},
        {**good, "lockouts": True},
        {**good, "locked_until_mono_ns": "y"},
        {**good, "boot_id": 7},
        {"failures": 2},  # a key missing
        {**good, "extra": 1},
        [1, 2],
        "locked",
    ):
        with pytest.raises(ValueError, match="lockout"):
            Lockout.restore(policy, "b", bad, 0)
    fallback = Lockout.undecodable(policy, "b", 5 * S)
    assert fallback.locked(5 * S) and fallback.remaining_s(5 * S) == 30
    again = Lockout.restore(policy, "b", fallback.as_state(), 6 * S)
    assert again.locked(6 * S), "the fail-closed lockout is saved like any other"


BOOK = {
    "sessions": [
        {
            "id": 3,
            "verification_id": "v3",
            "initialization_ns": 1,
            "completion_ns": None,
            "expires_ns": None,
            "pin_hash": "ab" * 32,
            "ended": None,
        }
    ],
    "mark": {
        "source": "mqtt",
        "wall_ns": 1,
        "wall_trusted": True,
        "mqtt_version": 4,
        "mqtt_issued": "2026-11-22T08:00:00+00:00",
        "mqtt_digest": "cd" * 32,
    },
}


def _bad(path: tuple, value: object = ..., drop: bool = False) -> dict:
    book = copy.deepcopy(BOOK)
    target = book
    for step in path[:-1]:
        target = target[step]
    if drop:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return book


def test_the_session_book_is_decoded_strictly():
    """Each of these made the daemon exit at start with a traceback (a session without an int id, an extra
    key in the sync mark ...) or silently accepted something that is not a book."""
    book = SessionBook.from_json(BOOK)
    assert book.sessions[3].pin_hash == bytes.fromhex("ab" * 32) and book.mark.mqtt_version == 4
    assert SessionBook.from_json(book.as_json()) == book
    assert SessionBook.from_json(None) == SessionBook(), "never saved: an empty book"
    cases = {
        "session id is str": _bad(("sessions", 0, "id"), "3"),
        "session id is float": _bad(("sessions", 0, "id"), 3.0),
        "session id is bool": _bad(("sessions", 0, "id"), True),
        "session: missing id": _bad(("sessions", 0, "id"), drop=True),
        "session pin_hash is not hex": _bad(("sessions", 0, "pin_hash"), "zz"),
        "session pin_hash is 2 bytes": _bad(("sessions", 0, "pin_hash"), "abcd"),
        "session ended is neither": _bad(("sessions", 0, "ended"), "maybe"),
        "session: unexpected pin": _bad(("sessions", 0, "pin"), "1234"),
        "sync mark: unexpected extra": _bad(("mark", "extra"), 1),
        "sync mark source": _bad(("mark", "source"), "sms"),
        "sync mark wall_trusted is int": _bad(("mark", "wall_trusted"), 1),
        "sync mark mqtt_version is str": _bad(("mark", "mqtt_version"), "4"),
        "sync mark mqtt_digest is not hex": _bad(("mark", "mqtt_digest"), "nope"),
        "sync mark mqtt_issued is not an ISO": _bad(("mark", "mqtt_issued"), "yesterday"),
        "sync mark is list": _bad(("mark",), []),
        "session book sessions is dict": _bad(("sessions",), {}),
        "session book: unexpected extra": _bad(("extra",), 1),
        "session book is list": [],
        "session book is int": 42,
        "session 3 twice": {**BOOK, "sessions": BOOK["sessions"] * 2},
    }
    for expected, raw in cases.items():
        with pytest.raises(ValueError) as caught:
            SessionBook.from_json(raw)
        assert expected in str(caught.value), (expected, str(caught.value))
        assert "ab" * 32 not in str(caught.value), "a reason names the field, never its value"


def test_the_saved_offline_age_is_decoded_strictly():
    assert OfflineAge.restore({"floor_s": 12.5}, 0, ever_synced=True).floor_s == 12.5
    assert OfflineAge.restore({"floor_s": float("inf")}, 0, ever_synced=True).floor_s == float("inf")
    assert OfflineAge.restore(None, 0, ever_synced=True).floor_s == float("inf")
    for bad in ({"floor_s": -1}, {"floor_s": "1"}, {"floor_s": float("nan")}, {"floor_s": 1, "x": 2}, [], 3):
        with pytest.raises(ValueError, match="offline age"):
            OfflineAge.restore(bad, 0, ever_synced=True)
    assert OfflineAge.lost(0, ever_synced=True).age_s(0, 0, False, None) == float("inf"), "fails closed"
    assert OfflineAge.lost(0, ever_synced=False).age_s(0, 0, False, None) == 0


def test_the_lockout_delay_stays_at_its_maximum_however_many_lockouts_came_before():
    """Guards against 2 ** lockouts overflowing a float after ~1025 lockouts (an OverflowError in the
    lockout, after the failure count was taken)."""
    lock = Lockout(LockoutPolicy(max_failures=1, base_delay_s=30, max_delay_s=604_800), "boot-a")
    assert [lock.delay_s(n) for n in (1, 2, 3)] == [30, 60, 120]
    assert lock.delay_s(1100) == lock.delay_s(10**9) == 604_800
