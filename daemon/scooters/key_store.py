"""Segway Bluetooth keys, kept only sealed at rest (for the BLE unlock that follows this feature).

A key (8 letters and digits, ``GET /api/v2/vehicle/query/current/bluetooth-key``) opens a scooter to whoever
holds it, so it is a secret like a PIN: sealed with a SecretBox whose key is derived from the device secret
(``device_keys.at_rest_box``), in the state table under ``scooters.keys``; the clear key lives only in
memory. A stored value that does not open (another device's database, tampering) is dropped and fetched
again. No key is ever logged or shown: ``fleetgate scooters`` says whether one is cached and how old it is.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

STATE_KEY = "scooters.keys"
_KEY = re.compile(r"[0-9A-Za-z]{8}", re.ASCII)


class KeyStore:
    def __init__(self, box: SecretBox) -> None:
        self._box = box
        self._keys: dict[str, str] = {}
        self._sealed: dict[str, dict[str, Any]] = {}
        self._generation: dict[str, int] = {}  # bumped by every put: a fetch that started before is stale
        self.dropped = 0  # stored values that did not open or were malformed

    def load(self, raw: Any) -> dict[str, int]:
        """Take the saved state; returns each scooter's fetch time (wall ns). Bad entries are dropped."""
        fetched: dict[str, int] = {}
        if not isinstance(raw, dict):
            self.dropped += raw is not None
            return fetched
        for iot_code, entry in raw.items():
            try:
                sealed = base64.b64decode(entry["sealed"], validate=True)
                key = self._box.decrypt(sealed).decode("ascii")
                wall_ns = entry["fetched_wall_ns"]
                if not _KEY.fullmatch(key) or type(wall_ns) is not int:  # bool is an int in Python
                    raise ValueError("not a key")
            except (KeyError, TypeError, ValueError, binascii.Error, CryptoError, UnicodeDecodeError):
                self.dropped += 1
                continue
            self._keys[iot_code] = key
            self._sealed[iot_code] = entry
            fetched[iot_code] = wall_ns
        return fetched

    def generation(self, iot_code: str) -> int:
        """Take before asking the cloud for a key, give to ``put``: a rotation in between wins."""
        return self._generation.get(iot_code, 0)

    def put(
        self, iot_code: str, key: str, wall_ns: int, generation: int | None = None
    ) -> dict[str, Any] | None:
        """Keep ``key``; returns the whole sealed state to write (``{STATE_KEY: ...}`` in a commit), or None
        if ``generation`` is given and another key was kept since (a fetch that raced a rotation)."""
        if not _KEY.fullmatch(key):
            raise ValueError("a Segway Bluetooth key is 8 letters and digits")
        if generation is not None and generation != self.generation(iot_code):
            return None
        self._generation[iot_code] = self.generation(iot_code) + 1
        self._keys[iot_code] = key
        sealed = base64.b64encode(self._box.encrypt(key.encode("ascii"))).decode("ascii")
        self._sealed[iot_code] = {"sealed": sealed, "fetched_wall_ns": wall_ns}
        return dict(self._sealed)

    def get(self, iot_code: str) -> str | None:
        return self._keys.get(iot_code)

    def __repr__(self) -> str:
        return f"<KeyStore {len(self._keys)} keys>"
