"""The seam between the gateway's BLE plumbing and a scooter's lock protocol (docs/ble-profile.md).

A ``ScooterProfile`` knows one protocol: which GATT service it lives on, how to recognise a scooter in an
advertisement, and how to run one operation over an open link with the scooter's Bluetooth key. Everything
else (scanning, connecting, retrying, idle disconnects, the key's storage, BLE-or-cloud) is the gateway's.
Segway's own protocol is not public: the vendor's routine is another implementation of this interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class BleError(Exception):
    """Something went wrong on the BLE path; ``retryable``: trying again (or the cloud) may help."""

    retryable = True


class BleUnreachable(BleError):
    """The scooter cannot be reached over BLE now: not seen, out of range, the connection failed or dropped."""


class BleProtocolError(BleError):
    """The scooter answered something the profile cannot take (a bad frame, a wrong answer, no answer)."""


class BleUnsupported(BleError):
    """The profile (or this scooter) has no such operation over BLE."""

    retryable = False


@dataclass(frozen=True)
class Advertisement:
    """What a scan saw of one peripheral (bleak's AdvertisementData, reduced)."""

    address: str
    name: str | None
    rssi: int
    manufacturer_data: Mapping[int, bytes] = field(default_factory=dict)
    service_uuids: tuple[str, ...] = ()


@dataclass(frozen=True)
class BleAnswer:
    """The scooter's answer to one operation. ``status`` is the profile's word (``ok``, ``auth-failed``,
    ``unsupported``, ``busy``, ``refused``, ``bad-frame``, ``internal-error``); ``ok`` says it was done."""

    ok: bool
    status: str
    retryable: bool
    key_rejected: bool = False  # the key did not open it: fetch the key again
    state: Mapping[str, Any] = field(default_factory=dict)  # what the scooter said of itself (locked ...)


class GattLink(Protocol):
    """An open, authenticated-by-nothing GATT connection to one scooter, as a profile uses it."""

    address: str

    async def write(self, char_uuid: str, data: bytes) -> None:
        """Write ``data`` (with response). ``BleUnreachable`` if the link is gone."""

    async def notification(self, char_uuid: str, timeout_s: float) -> bytes:
        """The next notification of ``char_uuid`` (subscribed when the link opened). ``BleProtocolError``
        after ``timeout_s`` with none; ``BleUnreachable`` if the link drops while waiting."""


class ScooterProfile(Protocol):
    name: str
    service_uuid: str
    notify_uuids: tuple[str, ...]  # subscribed on every connection, before ``run``
    operations: frozenset[str]  # Segway operation names it can run (``unlock``, ``lock`` ...)

    def identify(self, adv: Advertisement) -> str | None:
        """The iotCode this advertisement says it is, if the profile's advertising carries one."""

    async def run(self, link: GattLink, iot_code: str, key: str, op: str, timeout_s: float) -> BleAnswer:
        """Run ``op`` on the scooter. Raises ``BleUnsupported`` for an op not in ``operations``,
        ``BleProtocolError`` for answers it cannot take, ``BleUnreachable`` if the link goes."""
