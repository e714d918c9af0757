"""The BlueZ test bed (bluez_mock.py, bluez_template.py) against bleak's real BlueZ D-Bus backend: scanning,
connecting, the GATT profile, reads, writes answered by the peripheral's rules with notifications, and a
peripheral that goes out of range, refuses connections or drops the link.

Async code runs under ``asyncio.run`` in plain tests; every wait is for a condition, with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakDBusError, BleakGATTProtocolError

from bluez_mock import BlueZ, Characteristic, Peripheral, Service

pytestmark = pytest.mark.timeout(30)

ADDRESS = "C4:64:E3:11:22:33"
LOCK_SERVICE = "6e400001-b5a3-f393-e0a9-e50e24dcca9e"
COMMAND = "6e400002-b5a3-f393-e0a9-e50e24dcca9e"  # write, write-without-response
EVENTS = "6e400003-b5a3-f393-e0a9-e50e24dcca9e"  # notify
LOCK_STATE = "6e400004-b5a3-f393-e0a9-e50e24dcca9e"  # read: 01 locked, 00 unlocked
BATTERY_SERVICE = "0000180f-0000-1000-8000-00805f9b34fb"
BATTERY_LEVEL = "00002a19-0000-1000-8000-00805f9b34fb"
SEGWAY_COMPANY = 0x0969
KEY = bytes.fromhex("00112233445566778899aabbccddeeff")

PROFILE = [
    Service(
        LOCK_SERVICE,
        [
            Characteristic(COMMAND, ("write", "write-without-response")),
            Characteristic(EVENTS, ("notify",)),
            Characteristic(LOCK_STATE, ("read",), b"\x01"),
        ],
    ),
    Service("180f", [Characteristic("2a19", ("read", "notify"), b"\x50")]),
]

# The lock's challenge-response: 01 → 02 + nonce; 03 + HMAC-SHA256(KEY, nonce)[:8] → 04 00 (unlocked) or 04 ff.
UNLOCK_RULES = [
    {
        "on": COMMAND,
        "prefix": b"\x01",
        "save": {"nonce": [{"random": 8}]},
        "notify": {"char": EVENTS, "value": [b"\x02", {"var": "nonce"}]},
    },
    {
        "on": COMMAND,
        "equals": [b"\x03", {"hmac_sha256": {"var": "nonce"}, "key": KEY, "len": 8}],
        "set": {LOCK_STATE: b"\x00"},
        "notify": {"char": EVENTS, "value": b"\x04\x00"},
    },
    {"on": COMMAND, "prefix": b"\x03", "notify": {"char": EVENTS, "value": b"\x04\xff"}},
    {"on": COMMAND, "prefix": b"\x09", "notify": {"char": EVENTS, "value": b"\x09"}, "disconnect": True},
    {"on": COMMAND, "prefix": b"\xee", "error": "NotPermitted", "error_message": "Write not permitted"},
]


@pytest.fixture
def bluez() -> Iterator[BlueZ]:
    with BlueZ() as bz:
        yield bz


@pytest.fixture
def scooter(bluez: BlueZ) -> Peripheral:
    return bluez.add_peripheral(
        ADDRESS,
        name="Segway-ES4",
        rssi=-55,
        tx_power=4,
        manufacturer_data={SEGWAY_COMPANY: b"\x01\x02\x03"},
        service_data={BATTERY_SERVICE: b"\x50"},
        service_uuids=[LOCK_SERVICE],
        services=PROFILE,
        rules=UNLOCK_RULES,
    )


async def find(address: str = ADDRESS, timeout: float = 3.0) -> BLEDevice:
    device = await BleakScanner.find_device_by_address(address, timeout=timeout)
    assert device is not None, f"{address} not found within {timeout} s"
    return device


class Inbox:
    """Notifications as they arrive, for awaiting one at a time."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def __call__(self, _char: object, data: bytearray) -> None:
        self.queue.put_nowait(bytes(data))

    async def next(self, timeout: float = 2.0) -> bytes:
        return await asyncio.wait_for(self.queue.get(), timeout)


def test_the_scanner_sees_repeated_advertisements_with_their_data(bluez: BlueZ, scooter: Peripheral) -> None:
    async def main() -> list[tuple[BLEDevice, AdvertisementData]]:
        seen: list[tuple[BLEDevice, AdvertisementData]] = []
        three = asyncio.Event()

        def detected(device: BLEDevice, adv: AdvertisementData) -> None:
            if device.address == ADDRESS:
                seen.append((device, adv))
                if len(seen) >= 3:
                    three.set()

        async with BleakScanner(detected):
            await asyncio.wait_for(three.wait(), 3.0)
        return seen

    seen = asyncio.run(main())
    device, adv = seen[-1]
    assert device.name == "Segway-ES4"
    assert adv.local_name == "Segway-ES4"
    assert adv.manufacturer_data == {SEGWAY_COMPANY: b"\x01\x02\x03"}
    assert adv.service_data == {BATTERY_SERVICE: b"\x50"}
    assert adv.service_uuids == [LOCK_SERVICE]
    assert adv.tx_power == 4
    rssis = [a.rssi for _, a in seen]
    assert all(-57 <= r <= -55 for r in rssis) and len(set(rssis)) > 1, rssis
    assert scooter.state()["discovering"] is False  # the scanner's StopDiscovery ended the session


def test_a_changed_advertisement_reaches_the_scanner(bluez: BlueZ, scooter: Peripheral) -> None:
    async def main() -> AdvertisementData:
        seen = asyncio.Event()
        changed: asyncio.Future[AdvertisementData] = asyncio.get_running_loop().create_future()

        def detected(device: BLEDevice, adv: AdvertisementData) -> None:
            if device.address != ADDRESS:
                return
            seen.set()
            if adv.manufacturer_data.get(SEGWAY_COMPANY) == b"\x00" and not changed.done():
                changed.set_result(adv)

        async with BleakScanner(detected):  # one scanner at a time per bus connection (see below)
            await asyncio.wait_for(seen.wait(), 3.0)
            scooter.set_advertisement(manufacturer_data={SEGWAY_COMPANY: b"\x00"}, name="Segway-ES4b")
            return await asyncio.wait_for(changed, 3.0)

    assert asyncio.run(main()).local_name == "Segway-ES4b"


def test_a_second_scanner_in_one_process_is_refused_as_bluetoothd_does(
    bluez: BlueZ, scooter: Peripheral
) -> None:
    """bluetoothd keeps one discovery session per D-Bus client and bleak one bus connection per event loop:
    a second StartDiscovery from it fails with InProgress, a StopDiscovery without one with Failed."""

    async def main() -> None:
        async with BleakScanner():
            with pytest.raises(BleakDBusError) as refused:
                await BleakScanner.find_device_by_address(ADDRESS, timeout=0.5)
            assert refused.value.dbus_error == "org.bluez.Error.InProgress"
            assert scooter.state()["discovering"] is True  # the first session is untouched
        assert scooter.state()["discovering"] is False

    asyncio.run(main())


def test_find_device_by_address_finds_the_peripheral_and_not_an_absent_one(
    bluez: BlueZ, scooter: Peripheral
) -> None:
    async def main() -> tuple[BLEDevice, BLEDevice | None]:
        return await find(), await BleakScanner.find_device_by_address("AA:BB:CC:DD:EE:FF", timeout=0.5)

    device, absent = asyncio.run(main())
    assert (device.address, device.name) == (ADDRESS, "Segway-ES4")
    assert absent is None


def test_the_client_sees_the_gatt_profile_and_reads(bluez: BlueZ, scooter: Peripheral) -> None:
    async def main() -> None:
        async with BleakClient(ADDRESS, timeout=5.0) as client:  # by address: bleak scans for it first
            services = {s.uuid: s for s in client.services}
            assert set(services) == {LOCK_SERVICE, BATTERY_SERVICE}
            flags = {c.uuid: sorted(c.properties) for c in services[LOCK_SERVICE].characteristics}
            assert flags == {
                COMMAND: ["write", "write-without-response"],
                EVENTS: ["notify"],
                LOCK_STATE: ["read"],
            }
            assert client.services.get_characteristic(COMMAND).max_write_without_response_size == 244
            assert await client.read_gatt_char(LOCK_STATE) == b"\x01"
            assert await client.read_gatt_char(BATTERY_LEVEL) == b"\x50"
            scooter.set_value(BATTERY_LEVEL, b"\x4f")
            assert await client.read_gatt_char(BATTERY_LEVEL) == b"\x4f"
            with pytest.raises(BleakGATTProtocolError):
                await client.read_gatt_char(COMMAND)  # not readable
            assert scooter.state()["services_resolved"] is True

    asyncio.run(main())
    assert scooter.state()["connected"] is False  # the client's Disconnect at the end


def test_a_challenge_response_unlock_through_write_and_notify(bluez: BlueZ, scooter: Peripheral) -> None:
    async def main() -> None:
        async with BleakClient(await find()) as client:
            inbox = Inbox()
            await client.start_notify(EVENTS, inbox)
            await client.write_gatt_char(COMMAND, b"\x01", response=True)
            challenge = await inbox.next()
            assert challenge[:1] == b"\x02" and len(challenge) == 9
            mac = hmac.new(KEY, challenge[1:], hashlib.sha256).digest()[:8]
            await client.write_gatt_char(COMMAND, b"\x03" + mac, response=False)
            assert await inbox.next() == b"\x04\x00"
            assert await client.read_gatt_char(LOCK_STATE) == b"\x00"

    asyncio.run(main())
    writes = scooter.writes()
    assert [(w.char, w.value[:1], w.with_response) for w in writes] == [
        (COMMAND, b"\x01", True),
        (COMMAND, b"\x03", False),
    ]


def test_a_wrong_or_unasked_response_is_refused(bluez: BlueZ, scooter: Peripheral) -> None:
    async def main() -> None:
        async with BleakClient(await find()) as client:
            inbox = Inbox()
            await client.start_notify(EVENTS, inbox)
            await client.write_gatt_char(COMMAND, b"\x03" + bytes(8), response=True)  # no challenge yet
            assert await inbox.next() == b"\x04\xff"
            await client.write_gatt_char(COMMAND, b"\x01", response=True)
            await inbox.next()
            await client.write_gatt_char(COMMAND, b"\x03" + bytes(8), response=True)  # a wrong MAC
            assert await inbox.next() == b"\x04\xff"
            assert await client.read_gatt_char(LOCK_STATE) == b"\x01"
            with pytest.raises(BleakGATTProtocolError):
                await client.write_gatt_char(COMMAND, b"\xee", response=True)  # the rule's error

    asyncio.run(main())


def test_notifications_need_start_notify(bluez: BlueZ, scooter: Peripheral) -> None:
    async def main() -> None:
        async with BleakClient(await find()) as client:
            assert scooter.notify(EVENTS, b"\x07") is False  # no CCCD written: dropped
            inbox = Inbox()
            await client.start_notify(EVENTS, inbox)
            assert scooter.state()["notifying"] == [EVENTS]
            assert scooter.notify(EVENTS, b"\x08") is True
            assert await inbox.next() == b"\x08"
            await client.stop_notify(EVENTS)
            assert scooter.notify(EVENTS, b"\x09") is False

    asyncio.run(main())


def test_out_of_range_disconnects_and_connects_fail_until_it_comes_back(
    bluez: BlueZ, scooter: Peripheral
) -> None:
    async def main() -> None:
        device = await find()
        gone = asyncio.Event()
        client = BleakClient(device, disconnected_callback=lambda _c: gone.set())
        await client.connect()
        scooter.go_out_of_range()
        await asyncio.wait_for(gone.wait(), 2.0)
        assert not client.is_connected
        with pytest.raises(BleakDBusError) as failed:
            await client.connect()
        assert failed.value.dbus_error == "org.bluez.Error.Failed"
        assert await BleakScanner.find_device_by_address(ADDRESS, timeout=0.3) is None  # not advertising
        scooter.come_back()
        await client.connect()
        try:
            assert await client.read_gatt_char(LOCK_STATE) == b"\x01"
        finally:
            await client.disconnect()

    asyncio.run(main())
    assert scooter.state()["connect_calls"] == 3


def test_a_removed_device_is_found_again_when_it_comes_back(bluez: BlueZ, scooter: Peripheral) -> None:
    async def main() -> None:
        await find()
        scooter.go_out_of_range(remove=True)
        assert scooter.state()["discovered"] is False
        assert await BleakScanner.find_device_by_address(ADDRESS, timeout=0.3) is None
        scooter.come_back()
        async with BleakClient(await find()) as client:
            assert await client.read_gatt_char(BATTERY_LEVEL) == b"\x50"

    asyncio.run(main())


def test_connects_fail_as_often_as_asked(bluez: BlueZ, scooter: Peripheral) -> None:
    scooter.fail_connects(2, "le-connection-abort-by-remote")

    async def main() -> None:
        device = await find()
        for _ in range(2):
            with pytest.raises(BleakDBusError) as failed:
                await BleakClient(device).connect()
            assert failed.value.dbus_error_details == "le-connection-abort-by-remote"
        async with BleakClient(device) as client:
            assert client.is_connected

    asyncio.run(main())
    assert scooter.state()["connect_calls"] == 3


def test_a_slow_connect_times_out_and_is_cancelled(bluez: BlueZ, scooter: Peripheral) -> None:
    scooter.set_connect_delay(3.0)

    async def main() -> None:
        device = await find()
        with pytest.raises(TimeoutError):
            await BleakClient(device, timeout=0.3).connect()
        await scooter.until("the pending connect cancelled", lambda s: not s["connected"])
        scooter.set_connect_delay(0.05)
        async with BleakClient(device, timeout=2.0) as client:
            assert client.is_connected

    asyncio.run(main())


def test_the_peripheral_drops_the_link(bluez: BlueZ, scooter: Peripheral) -> None:
    async def main() -> None:
        gone = asyncio.Event()
        client = BleakClient(await find(), disconnected_callback=lambda _c: gone.set())
        await client.connect()
        inbox = Inbox()
        await client.start_notify(EVENTS, inbox)
        await client.write_gatt_char(COMMAND, b"\x09", response=True)  # the rule: notify, then disconnect
        assert await inbox.next() == b"\x09"
        await asyncio.wait_for(gone.wait(), 2.0)
        await client.connect()  # in range: connects again
        scooter.drop_connection()
        gone.clear()
        await asyncio.wait_for(gone.wait(), 2.0)
        assert not client.is_connected

    asyncio.run(main())


def test_a_subprocess_reaches_the_mock_through_bluez_env(bluez: BlueZ, scooter: Peripheral) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio
        from bleak import BleakClient

        async def main():
            async with BleakClient({ADDRESS!r}, timeout=5.0) as client:
                print((await client.read_gatt_char({BATTERY_LEVEL!r})).hex())

        asyncio.run(main())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "DBUS_SYSTEM_BUS_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, **bluez.env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "50"


# -- the fleetgate lock profile (docs/ble-profile.md): frames built here, from the document ------------------

FG_ADDRESS = "D0:5A:FE:00:00:01"
FG_KEY = "AB12cd34"
FG_IOT = "861234567890123"
FG_SERVICE = "f1ee7001-5e9a-4c1b-9a07-6a7c0de0b1e0"
FG_COMMAND = "f1ee7002-5e9a-4c1b-9a07-6a7c0de0b1e0"
FG_EVENT = "f1ee7003-5e9a-4c1b-9a07-6a7c0de0b1e0"
HELLO, CHALLENGE, AUTH, RESULT, ERROR = 0x01, 0x02, 0x03, 0x04, 0x7F
UNLOCK, LOCK, START_RENTAL, END_RENTAL, SADDLE, TAILBOX = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
LOCKED, RENTAL = 0x01, 0x02


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


def frame(ftype: int, seq: int, payload: bytes = b"") -> bytes:
    body = bytes([ftype, seq, len(payload)]) + payload
    return b"\xa5" + body + crc16(body).to_bytes(2, "big")


def parse(data: bytes) -> tuple[int, int, bytes] | None:
    ok = len(data) >= 6 and data[0] == 0xA5 and len(data) == 6 + data[3]
    if not ok or crc16(data[1:-2]) != int.from_bytes(data[-2:], "big"):
        return None
    return data[1], data[2], data[4:-2]


def mac(nonce: bytes, op: int, seq: int, key: str = FG_KEY, iot: str = FG_IOT) -> bytes:
    message = b"fleetgate-ble/v1" + iot.encode() + nonce + bytes([op, seq])
    return hmac.new(key.encode(), message, hashlib.sha256).digest()[:8]


def test_the_crc_and_the_documented_test_vector() -> None:
    assert crc16(b"123456789") == 0x29B1
    nonce = bytes.fromhex("0001020304050607")
    vector = {
        "HELLO": frame(HELLO, 0x07, bytes([UNLOCK])),
        "CHALLENGE": frame(CHALLENGE, 0x07, nonce),
        "mac": mac(nonce, UNLOCK, 0x07),
        "AUTH": frame(AUTH, 0x07, bytes([UNLOCK]) + mac(nonce, UNLOCK, 0x07)),
        "RESULT": frame(RESULT, 0x07, bytes([UNLOCK, 0x00, 0x00])),
        "ERROR": frame(ERROR, 0x07, b"\x05"),
    }
    assert {k: v.hex(" ") for k, v in vector.items()} == {
        "HELLO": "a5 01 07 01 01 54 f4",
        "CHALLENGE": "a5 02 07 08 00 01 02 03 04 05 06 07 67 0a",
        "mac": "20 e9 41 5e e4 30 21 0d",
        "AUTH": "a5 03 07 09 01 20 e9 41 5e e4 30 21 0d b4 5f",
        "RESULT": "a5 04 07 03 01 00 00 c3 89",
        "ERROR": "a5 7f 07 01 05 f4 5f",
    }
    doc = (Path(__file__).parents[1] / "docs" / "ble-profile.md").read_text()
    section = doc[doc.index("## Test vector") :]
    for value in vector.values():
        assert f"`{value.hex(' ')}`" in section
    assert all(parse(v) is not None for k, v in vector.items() if k != "mac")


@pytest.fixture
def lock(bluez: BlueZ) -> Peripheral:
    return bluez.add_peripheral(
        FG_ADDRESS,
        name="FG-" + FG_IOT,
        profile={
            "name": "fleetgate",
            "key": FG_KEY,
            "iot_code": FG_IOT,
            "locked": True,
            "rental": False,
            "unsupported": [],
            "busy": False,
            "refuse": False,
        },
    )


class Link:
    """A connected client speaking frames: write, then await a notification."""

    def __init__(self, client: BleakClient, inbox: Inbox, gone: asyncio.Event) -> None:
        self.client, self.inbox, self.gone = client, inbox, gone

    async def send(self, data: bytes) -> None:
        await self.client.write_gatt_char(FG_COMMAND, data, response=True)

    async def raw(self, timeout: float = 2.0) -> bytes:
        return await self.inbox.next(timeout)

    async def answer(self, timeout: float = 2.0) -> tuple[int, int, bytes]:
        data = await self.raw(timeout)
        parsed = parse(data)
        assert parsed is not None, f"a bad frame: {data.hex()}"
        return parsed

    async def nothing(self, within: float = 0.3) -> None:
        with pytest.raises(TimeoutError):
            await self.raw(within)

    async def challenge(self, op: int, seq: int) -> bytes:
        await self.send(frame(HELLO, seq, bytes([op])))
        ftype, aseq, nonce = await self.answer()
        assert (ftype, aseq, len(nonce)) == (CHALLENGE, seq, 8)
        return nonce

    async def command(self, op: int, seq: int, key: str = FG_KEY) -> tuple[int, int, bytes]:
        nonce = await self.challenge(op, seq)
        await self.send(frame(AUTH, seq, bytes([op]) + mac(nonce, op, seq, key)))
        return await self.answer()


@contextlib.asynccontextmanager
async def link(notify: bool = True) -> AsyncIterator[Link]:
    gone = asyncio.Event()
    async with BleakClient(await find(FG_ADDRESS), disconnected_callback=lambda _c: gone.set()) as client:
        inbox = Inbox()
        if notify:
            await client.start_notify(FG_EVENT, inbox)
        yield Link(client, inbox, gone)


def test_a_profile_scooter_advertises_its_service_and_iot_code(bluez: BlueZ, lock: Peripheral) -> None:
    async def main() -> AdvertisementData:
        seen: asyncio.Future[AdvertisementData] = asyncio.get_running_loop().create_future()

        def detected(device: BLEDevice, adv: AdvertisementData) -> None:
            if device.address == FG_ADDRESS and not seen.done():
                seen.set_result(adv)

        async with BleakScanner(detected):
            adv = await asyncio.wait_for(seen, 3.0)
        async with BleakClient(FG_ADDRESS, timeout=5.0) as client:
            service = client.services.get_service(FG_SERVICE)
            assert service is not None
            flags = {c.uuid: sorted(c.properties) for c in service.characteristics}
            assert flags == {FG_COMMAND: ["write"], FG_EVENT: ["notify"]}
        return adv

    adv = asyncio.run(main())
    assert adv.manufacturer_data == {0xFFFF: b"FG\x01" + FG_IOT.encode()}
    assert adv.service_uuids == [FG_SERVICE]
    assert adv.local_name == "FG-" + FG_IOT


def test_a_full_unlock_exchange_and_the_other_operations(bluez: BlueZ, lock: Peripheral) -> None:
    async def main() -> None:
        async with link() as fg:
            assert await fg.command(UNLOCK, 0x07) == (RESULT, 0x07, bytes([UNLOCK, 0x00, 0x00]))
            assert await fg.command(START_RENTAL, 0x08) == (RESULT, 0x08, bytes([START_RENTAL, 0x00, RENTAL]))
            assert await fg.command(SADDLE, 0x09) == (RESULT, 0x09, bytes([SADDLE, 0x00, RENTAL]))
            assert await fg.command(END_RENTAL, 0x0A) == (RESULT, 0x0A, bytes([END_RENTAL, 0x00, LOCKED]))
            assert await fg.command(UNLOCK, 0xFF) == (RESULT, 0xFF, bytes([UNLOCK, 0x00, 0x00]))
            assert await fg.command(LOCK, 0x00) == (RESULT, 0x00, bytes([LOCK, 0x00, LOCKED]))

    asyncio.run(main())
    state = lock.profile_state()
    assert state["ops"] == ["unlock", "start-rental", "saddle", "end-rental", "unlock", "lock"]
    assert (state["locked"], state["rental"], state["auth_failures"]) == (True, False, 0)
    assert all(w.char == FG_COMMAND and w.with_response for w in lock.writes())


def test_a_wrong_or_rotated_key_fails_and_three_failures_drop_the_link(
    bluez: BlueZ, lock: Peripheral
) -> None:
    async def main() -> None:
        async with link() as fg:
            assert await fg.command(UNLOCK, 1, key="AB12cd35") == (RESULT, 1, bytes([UNLOCK, 0x01, LOCKED]))
            lock.set_profile_key("Zz98yX76")  # rotated: the old key fails, the new one works
            assert await fg.command(UNLOCK, 2) == (RESULT, 2, bytes([UNLOCK, 0x01, LOCKED]))
            assert await fg.command(UNLOCK, 3, key="Zz98yX76") == (RESULT, 3, bytes([UNLOCK, 0x00, 0x00]))
            assert lock.profile_state()["auth_failures"] == 2
            assert not fg.gone.is_set()
            assert await fg.command(LOCK, 4) == (RESULT, 4, bytes([LOCK, 0x01, 0x00]))  # the third
            await asyncio.wait_for(fg.gone.wait(), 2.0)
        async with link() as fg:  # a new connection starts counting again
            assert lock.profile_state()["auth_failures"] == 0
            assert await fg.command(LOCK, 5, key="Zz98yX76") == (RESULT, 5, bytes([LOCK, 0x00, LOCKED]))

    asyncio.run(main())
    state = lock.profile_state()
    assert (state["ops"], state["auth_failures_total"]) == (["unlock", "lock"], 3)


def test_a_replayed_or_mismatched_auth_is_refused(bluez: BlueZ, lock: Peripheral) -> None:
    async def main() -> None:
        async with link() as fg:
            nonce = await fg.challenge(UNLOCK, 1)
            auth = frame(AUTH, 1, bytes([UNLOCK]) + mac(nonce, UNLOCK, 1))
            await fg.send(auth)
            assert await fg.answer() == (RESULT, 1, bytes([UNLOCK, 0x00, 0x00]))
            await fg.send(auth)  # replayed: its nonce is spent
            assert await fg.answer() == (RESULT, 1, bytes([UNLOCK, 0x01, 0x00]))
            nonce = await fg.challenge(UNLOCK, 2)  # a MAC for another op than the HELLO's
            await fg.send(frame(AUTH, 2, bytes([LOCK]) + mac(nonce, LOCK, 2)))
            assert await fg.answer() == (RESULT, 2, bytes([LOCK, 0x01, 0x00]))
        async with link() as fg:
            nonce = await fg.challenge(LOCK, 3)  # the AUTH with another seq than its HELLO's
            await fg.send(frame(AUTH, 4, bytes([LOCK]) + mac(nonce, LOCK, 4)))
            assert await fg.answer() == (RESULT, 4, bytes([LOCK, 0x01, 0x00]))
            lock.set_profile(nonce_ttl=0.1)
            nonce = await fg.challenge(LOCK, 5)  # too late
            await asyncio.sleep(0.2)
            await fg.send(frame(AUTH, 5, bytes([LOCK]) + mac(nonce, LOCK, 5)))
            assert await fg.answer() == (RESULT, 5, bytes([LOCK, 0x01, 0x00]))

    asyncio.run(main())
    assert lock.profile_state()["ops"] == ["unlock"]


def test_unsupported_busy_and_refused(bluez: BlueZ, lock: Peripheral) -> None:
    lock.set_profile(unsupported=[TAILBOX])

    async def main() -> None:
        async with link() as fg:
            await fg.send(frame(HELLO, 1, bytes([TAILBOX])))
            assert await fg.answer() == (RESULT, 1, bytes([TAILBOX, 0x02, LOCKED]))
            await fg.send(frame(HELLO, 2, b"\x42"))  # no such op
            assert await fg.answer() == (RESULT, 2, bytes([0x42, 0x02, LOCKED]))
            assert lock.profile_state()["nonce_pending"] is False
            lock.set_busy()
            assert await fg.command(UNLOCK, 3) == (RESULT, 3, bytes([UNLOCK, 0x03, LOCKED]))
            lock.set_busy(False)
            lock.set_refuse()
            assert await fg.command(UNLOCK, 4) == (RESULT, 4, bytes([UNLOCK, 0x04, LOCKED]))
            lock.set_refuse(False)
            assert await fg.command(UNLOCK, 5) == (RESULT, 5, bytes([UNLOCK, 0x00, 0x00]))

    asyncio.run(main())
    assert lock.profile_state()["ops"] == ["unlock"]


def test_a_bad_frame_is_answered_with_error_05(bluez: BlueZ, lock: Peripheral) -> None:
    hello = frame(HELLO, 9, bytes([UNLOCK]))
    bad = [
        hello[:-1] + bytes([hello[-1] ^ 0x01]),  # CRC
        b"\x5a" + hello[1:],  # start byte
        hello[:3] + b"\x02" + hello[4:],  # length
        frame(CHALLENGE, 9, bytes(8)),  # a type the scooter does not take
        frame(HELLO, 9, b"\x01\x02"),  # a payload of the wrong size
        frame(AUTH, 9, bytes(8)),
    ]

    async def main() -> None:
        async with link() as fg:
            for data in bad:
                await fg.send(data)
                assert await fg.answer() == (ERROR, 9, b"\x05"), data.hex()
            await fg.send(b"\xa5")  # too short to carry a seq
            assert await fg.answer() == (ERROR, 0, b"\x05")
            assert await fg.command(UNLOCK, 10) == (RESULT, 10, bytes([UNLOCK, 0x00, 0x00]))

    asyncio.run(main())
    assert lock.profile_state()["auth_failures"] == 0


def test_answers_are_notified_only_while_notifying(bluez: BlueZ, lock: Peripheral) -> None:
    async def main() -> None:
        async with link(notify=False) as fg:
            await fg.send(frame(HELLO, 1, bytes([UNLOCK])))
            await lock.until("the answer", lambda s: s["profile"]["sent"])
            assert lock.profile_state()["sent"][0]["delivered"] is False
            await fg.client.start_notify(FG_EVENT, fg.inbox)
            assert await fg.command(UNLOCK, 2) == (RESULT, 2, bytes([UNLOCK, 0x00, 0x00]))
            await fg.client.stop_notify(FG_EVENT)
            await fg.send(frame(HELLO, 3, bytes([LOCK])))
            await lock.until("the answer", lambda s: len(s["profile"]["sent"]) == 4)
            assert lock.profile_state()["sent"][-1]["delivered"] is False

    asyncio.run(main())


def test_garbled_answers_have_a_bad_crc(bluez: BlueZ, lock: Peripheral) -> None:
    async def main() -> None:
        async with link() as fg:
            lock.garble_next(2)
            await fg.send(frame(HELLO, 1, bytes([UNLOCK])))
            garbled = await fg.raw()
            assert parse(garbled) is None and garbled[:4] == bytes([0xA5, CHALLENGE, 1, 8])
            nonce = garbled[4:12]  # the CRC is wrong, not the nonce
            await fg.send(frame(AUTH, 1, bytes([UNLOCK]) + mac(nonce, UNLOCK, 1)))
            garbled = await fg.raw()
            assert parse(garbled) is None and garbled[:-2] == bytes([0xA5, RESULT, 1, 3, UNLOCK, 0, 0])
            assert lock.profile_state()["locked"] is False  # done, only the answer was garbled
            assert await fg.command(LOCK, 2) == (RESULT, 2, bytes([LOCK, 0x00, LOCKED]))

    asyncio.run(main())


def test_a_stale_answer_comes_before_the_right_one(bluez: BlueZ, lock: Peripheral) -> None:
    async def main() -> None:
        async with link() as fg:
            lock.stale_next(2)
            await fg.send(frame(HELLO, 5, bytes([UNLOCK])))
            stale, right = await fg.answer(), await fg.answer()
            assert (stale[:2], right[:2]) == ((CHALLENGE, 4), (CHALLENGE, 5))
            assert stale[2] != right[2]  # a nonce that is not valid
            await fg.send(frame(AUTH, 5, bytes([UNLOCK]) + mac(right[2], UNLOCK, 5)))
            assert await fg.answer() == (RESULT, 4, bytes([UNLOCK, 0x06, 0x00]))
            assert await fg.answer() == (RESULT, 5, bytes([UNLOCK, 0x00, 0x00]))
            assert await fg.command(LOCK, 6) == (RESULT, 6, bytes([LOCK, 0x00, LOCKED]))  # one answer each

    asyncio.run(main())


def test_silent_frames_get_no_answer(bluez: BlueZ, lock: Peripheral) -> None:
    async def main() -> None:
        async with link() as fg:
            lock.silent_next(1)
            await fg.send(frame(HELLO, 1, bytes([UNLOCK])))
            await fg.nothing()
            assert lock.profile_state()["nonce_pending"] is False  # lost: not processed
            nonce = await fg.challenge(UNLOCK, 2)
            lock.silent_next(1, process=True)
            await fg.send(frame(AUTH, 2, bytes([UNLOCK]) + mac(nonce, UNLOCK, 2)))
            await fg.nothing()
            assert lock.profile_state()["locked"] is False  # done, the answer lost
            assert await fg.command(LOCK, 3) == (RESULT, 3, bytes([LOCK, 0x00, LOCKED]))

    asyncio.run(main())


def test_drop_on_an_op_drops_the_link_before_answering(bluez: BlueZ, lock: Peripheral) -> None:
    async def main() -> None:
        lock.drop_on(UNLOCK)
        async with link() as fg:
            assert await fg.command(LOCK, 1) == (RESULT, 1, bytes([LOCK, 0x00, LOCKED]))  # another op
            nonce = await fg.challenge(UNLOCK, 2)
            await fg.send(frame(AUTH, 2, bytes([UNLOCK]) + mac(nonce, UNLOCK, 2)))
            await asyncio.wait_for(fg.gone.wait(), 2.0)
            assert fg.inbox.queue.empty()
        assert lock.profile_state()["locked"] is True  # not run
        lock.drop_on(LOCK, run=True)
        async with link() as fg:  # once: unlocks now
            assert await fg.command(UNLOCK, 3) == (RESULT, 3, bytes([UNLOCK, 0x00, 0x00]))
            nonce = await fg.challenge(LOCK, 4)
            await fg.send(frame(AUTH, 4, bytes([LOCK]) + mac(nonce, LOCK, 4)))
            await asyncio.wait_for(fg.gone.wait(), 2.0)
            assert fg.inbox.queue.empty()

    asyncio.run(main())
    state = lock.profile_state()
    assert (state["ops"], state["locked"], state["faults"]["drop_on"]) == (
        ["lock", "unlock", "lock"],
        True,
        None,
    )
