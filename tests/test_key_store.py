"""Segway Bluetooth keys sealed at rest (``daemon.scooters.key_store``) with the device's at-rest SecretBox."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from fleetgate.daemon.scooters.key_store import KeyStore
from fleetgate.sync.crypto.device_keys import DeviceSecretError, at_rest_box

SECRET = bytes(range(100, 132))
OTHER_SECRET = bytes(range(140, 172))
BOX = at_rest_box(SECRET)
KEY, OTHER_KEY = "Ab3dE6gH", "ZZ99yy00"
IOT, OTHER_IOT = "861477038719116", "861477038719117"
WALL = 1_764_842_400_000_000_000


def sealed(plain: bytes, box: SecretBox = BOX) -> str:
    return base64.b64encode(box.encrypt(plain)).decode("ascii")


def good_entry(key: str = KEY, wall_ns: int = WALL) -> dict[str, Any]:
    return {"sealed": sealed(key.encode()), "fetched_wall_ns": wall_ns}


def saved_state() -> dict[str, Any]:
    store = KeyStore(BOX)
    store.put(IOT, KEY, WALL)
    state = store.put(OTHER_IOT, OTHER_KEY, WALL + 1)
    return json.loads(json.dumps(state))  # as the state table gives it back


def test_at_rest_box_is_deterministic_per_secret_and_refuses_short_secrets() -> None:
    box = at_rest_box(SECRET)
    assert box.decrypt(BOX.encrypt(b"x")) == b"x"  # the same secret gives the same key
    with pytest.raises(CryptoError):
        at_rest_box(OTHER_SECRET).decrypt(BOX.encrypt(b"x"))
    with pytest.raises(DeviceSecretError, match="31 bytes"):
        at_rest_box(SECRET[:31])


def test_put_then_get() -> None:
    store = KeyStore(BOX)
    assert store.get(IOT) is None
    state = store.put(IOT, KEY, WALL)
    assert store.get(IOT) == KEY
    assert set(state) == {IOT}
    assert state[IOT]["fetched_wall_ns"] == WALL
    store.put(IOT, OTHER_KEY, WALL + 5)  # a newer key replaces the old one
    assert store.get(IOT) == OTHER_KEY
    assert store.dropped == 0


def test_the_saved_state_loads_into_a_new_store_with_the_same_box() -> None:
    state = saved_state()
    again = KeyStore(at_rest_box(SECRET))
    assert again.load(state) == {IOT: WALL, OTHER_IOT: WALL + 1}
    assert again.get(IOT) == KEY and again.get(OTHER_IOT) == OTHER_KEY
    assert again.dropped == 0


def test_loaded_keys_are_kept_in_the_next_state_to_save() -> None:
    store = KeyStore(BOX)
    store.load(saved_state())
    state = store.put("861477038719118", "Q1w2E3r4", WALL + 2)
    assert set(state) == {IOT, OTHER_IOT, "861477038719118"}
    third = KeyStore(BOX)
    third.load(json.loads(json.dumps(state)))
    assert [third.get(c) for c in (IOT, OTHER_IOT, "861477038719118")] == [KEY, OTHER_KEY, "Q1w2E3r4"]


def test_another_devices_state_is_dropped_and_counted() -> None:
    other = KeyStore(at_rest_box(OTHER_SECRET))
    assert other.load(saved_state()) == {}
    assert other.get(IOT) is None and other.get(OTHER_IOT) is None
    assert other.dropped == 2
    assert set(other.put("861477038719118", "Q1w2E3r4", WALL)) == {"861477038719118"}  # not saved again


@pytest.mark.parametrize(
    "entry",
    [
        "not a dict",
        ["sealed", "fetched_wall_ns"],
        None,
        42,
        {},
        {"sealed": sealed(KEY.encode())},  # no fetch time
        {"fetched_wall_ns": WALL},  # no sealed key
        {"sealed": "!!! not base64 !!!", "fetched_wall_ns": WALL},
        {"sealed": sealed(KEY.encode())[:-1], "fetched_wall_ns": WALL},  # cut short
        {"sealed": 12345, "fetched_wall_ns": WALL},
        {"sealed": None, "fetched_wall_ns": WALL},
        {"sealed": sealed(KEY.encode()), "fetched_wall_ns": "1764842400000000000"},
        {"sealed": sealed(KEY.encode()), "fetched_wall_ns": 1.5},
        {"sealed": sealed(KEY.encode()), "fetched_wall_ns": None},
        {"sealed": base64.b64encode(b"short").decode(), "fetched_wall_ns": WALL},  # shorter than a nonce
        {"sealed": base64.b64encode(b"\0" * 60).decode(), "fetched_wall_ns": WALL},  # does not open
        {"sealed": sealed(b"not a key"), "fetched_wall_ns": WALL},
        {"sealed": sealed(b"Ab3dE6g"), "fetched_wall_ns": WALL},  # 7 characters
        {"sealed": sealed(b"Ab3dE6gH9"), "fetched_wall_ns": WALL},  # 9 characters
        {"sealed": sealed(b"Ab3dE6g\n"), "fetched_wall_ns": WALL},
        {"sealed": sealed("Äb3dE6gH".encode()), "fetched_wall_ns": WALL},  # not ASCII
        {"sealed": sealed(b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8"), "fetched_wall_ns": WALL},
    ],
)
def test_a_malformed_entry_is_dropped_and_counted_and_good_ones_are_kept(entry: Any) -> None:
    store = KeyStore(BOX)
    fetched = store.load({IOT: good_entry(), "861477038719118": entry, OTHER_IOT: good_entry(OTHER_KEY)})
    assert fetched == {IOT: WALL, OTHER_IOT: WALL}
    assert store.dropped == 1
    assert store.get("861477038719118") is None
    assert store.get(IOT) == KEY and store.get(OTHER_IOT) == OTHER_KEY
    assert "861477038719118" not in store.put(IOT, KEY, WALL)  # the bad entry is not written back


def test_a_boolean_fetch_time_is_dropped() -> None:
    """``True`` is an ``int`` to Python; the rest of fleetgate refuses booleans where integers belong."""
    store = KeyStore(BOX)
    assert store.load({IOT: {"sealed": sealed(KEY.encode()), "fetched_wall_ns": True}}) == {}
    assert store.dropped == 1 and store.get(IOT) is None


@pytest.mark.parametrize(("raw", "dropped"), [(None, 0), ([good_entry()], 1), ("state", 1), (7, 1)])
def test_a_state_that_is_not_an_object_loads_nothing(raw: Any, dropped: int) -> None:
    store = KeyStore(BOX)
    assert store.load(raw) == {}
    assert store.dropped == dropped


def test_dropped_counts_across_loads() -> None:
    store = KeyStore(at_rest_box(OTHER_SECRET))
    store.load(saved_state())
    store.load({IOT: "junk"})
    assert store.dropped == 3


@pytest.mark.parametrize(
    "key",
    [
        "",
        "Ab3dE6g",
        "Ab3dE6gH9",
        "Ab3d-6gH",
        "Ab3d 6gH",
        "Ab3dE6g\n",
        "Ab3dE6gH\n",
        "Äb3dE6gH",
        "Ab3dE6g\u0661",
    ],
)
def test_put_refuses_a_key_that_is_not_8_letters_and_digits(key: str) -> None:
    store = KeyStore(BOX)
    store.put(IOT, KEY, WALL)
    with pytest.raises(ValueError, match="8 letters and digits") as info:
        store.put(OTHER_IOT, key, WALL)
    if key:
        assert key not in str(info.value)
    assert store.get(OTHER_IOT) is None and store.get(IOT) == KEY
    assert set(store.put(IOT, KEY, WALL)) == {IOT}  # nothing of the refused key kept


def test_the_clear_key_is_never_in_the_state_or_the_repr() -> None:
    store = KeyStore(BOX)
    store.put(OTHER_IOT, OTHER_KEY, WALL)
    state = store.put(IOT, KEY, WALL)
    text = json.dumps(state)
    for key in (KEY, OTHER_KEY):
        assert key not in text and key.encode() not in text.encode()
        for entry in state.values():
            assert key.encode() not in base64.b64decode(entry["sealed"])
    assert set(state[IOT]) == {"sealed", "fetched_wall_ns"}
    assert KEY not in repr(store) and OTHER_KEY not in repr(store)
    assert repr(store) == "<KeyStore 2 keys>"
    assert KEY not in str(store)


def test_sealing_is_randomised() -> None:
    store = KeyStore(BOX)
    first = store.put(IOT, KEY, WALL)[IOT]["sealed"]
    second = store.put(IOT, KEY, WALL)[IOT]["sealed"]
    assert first != second
    assert BOX.decrypt(base64.b64decode(first)) == BOX.decrypt(base64.b64decode(second)) == KEY.encode()
