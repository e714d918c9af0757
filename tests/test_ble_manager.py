"""BleManager through bleak's real BlueZ backend against the dbusmock bluetoothd (tests/bluez_mock.py), with
scooters that speak the fleetgate lock profile as the template implements it from docs/ble-profile.md.

One ``BlueZ`` per test, opened before the event loop's first bleak call; ``asyncio.run`` per test. Settings are
short; every wait is for a condition (polled), with a timeout; no test asserts how long something took.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

from fleetgate.drivers.ble.fleetgate_profile import FleetgateProfile
from fleetgate.drivers.ble.manager import BleManager, BleSettings, Sighting
from fleetgate.drivers.ble.profile import BleProtocolError, BleUnreachable, BleUnsupported

from bluez_mock import (
    FLEETGATE_COMMAND,
    FLEETGATE_COMPANY,
    FLEETGATE_EVENT,
    FLEETGATE_SERVICE,
    BlueZ,
    Characteristic,
    Peripheral,
    Service,
    fleetgate_profile,
)

pytestmark = pytest.mark.timeout(30)

KEY = "AB12cd34"
IOTS = ["861234567890123", "861234567890124", "861234567890125"]
ADDRESSES = ["C4:64:E3:11:22:33", "C4:64:E3:11:22:34", "C4:64:E3:11:22:35"]
IOT, ADDRESS = IOTS[0], ADDRESSES[0]

FAST = BleSettings(
    scan_s=0.3,
    scan_every_s=0.3,  # continuous
    range_timeout_s=1.0,
    connect_timeout_s=2.0,
    connect_attempts=3,
    connect_backoff_s=0.05,
    command_timeout_s=1.0,
    idle_disconnect_s=0.6,
)


def settings(**changes: Any) -> BleSettings:
    return BleSettings(**{**FAST.__dict__, **changes})


@pytest.fixture
def bluez() -> Iterator[BlueZ]:
    with BlueZ() as bz:
        yield bz


def add_scooter(bluez: BlueZ, n: int = 0, key: str = KEY, rssi: int = -55, **profile: Any) -> Peripheral:
    return bluez.add_peripheral(
        ADDRESSES[n], name=f"Scooter-{n}", rssi=rssi, profile=fleetgate_profile(key, IOTS[n], **profile)
    )


async def until(what: str, check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return result


@contextlib.asynccontextmanager
async def running(manager: BleManager) -> AsyncIterator[BleManager]:
    task = asyncio.create_task(manager.run())
    try:
        yield manager
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def manager(s: BleSettings = FAST, *watch: tuple[str, str | None]) -> BleManager:
    m = BleManager(FleetgateProfile(), s)
    for iot, address in watch or [(IOT, None)]:
        m.watch(iot, address)
    return m


# -- scanning --------------------------------------------------------------------------------------------


def test_scanning_sees_a_configured_scooter_and_keeps_its_rssi(bluez: BlueZ) -> None:
    bluez.add_peripheral(ADDRESS, name="Segway-1", rssi=-55)  # no fleetgate advertising: by address only
    bluez.add_peripheral(ADDRESSES[1], name="far", rssi=-100)
    bluez.add_peripheral(ADDRESSES[2], name="stranger", rssi=-40)

    async def main() -> None:
        m = manager(settings(scan_s=0.2, scan_every_s=0.4), (IOT, ADDRESS.lower()), (IOTS[1], ADDRESSES[1]))
        async with running(m):
            sighting = await until("a sighting", lambda: m.sighting(IOT))
            assert isinstance(sighting, Sighting)
            assert (sighting.address, sighting.name) == (ADDRESS, "Segway-1")
            assert -57 <= sighting.rssi <= -55
            assert m.in_range(IOT)
            await until("two scan windows", lambda: m.status()["scans"] >= 2)
            rssis = {m.sighting(IOT).rssi}
            await until("the RSSI moving", lambda: rssis.add(m.sighting(IOT).rssi) or len(rssis) > 1)
            view = m.view(IOT)
            assert view["address"] == ADDRESS and view["in_range"] and not view["connected"]
            assert -57 <= view["rssi"] <= -55 and view["seen_age_s"] >= 0
            # heard, but weaker than min_rssi: not in range
            assert (await until("the far one", lambda: m.sighting(IOTS[1]))).rssi <= -100
            assert not m.in_range(IOTS[1])
            status = m.status()
            assert status["in_range"] == [IOT] and status["watched"] == 2
            assert status["adverts"] > 0 and status["bad_adverts"] == 0
            assert m.sighting("stranger") is None and len(m._devices) == 2  # nothing kept of others

    asyncio.run(main())


def test_scanning_runs_in_windows(bluez: BlueZ) -> None:
    scooter = add_scooter(bluez)

    async def main() -> None:
        m = manager(settings(scan_s=0.2, scan_every_s=0.5))
        async with running(m):
            await scooter.until("discovery on", lambda s: s["discovering"])
            await scooter.until("discovery off between windows", lambda s: not s["discovering"])
            await scooter.until("discovery on again", lambda s: s["discovering"])
        assert scooter.state()["discovering"] is False  # run() cancelled: the scanner stopped

    asyncio.run(main())


def test_a_scooter_is_identified_by_its_advertisement(bluez: BlueZ) -> None:
    add_scooter(bluez, 0)
    add_scooter(bluez, 1)  # advertises an iotCode nobody watches
    bluez.add_peripheral(ADDRESSES[2], rssi=-50, manufacturer_data={FLEETGATE_COMPANY: b"FG\x01\xff\x00bad"})

    async def main() -> None:
        m = manager(FAST, (IOT, None))
        async with running(m):
            sighting = await until("the scooter identified", lambda: m.sighting(IOT))
            assert sighting.address == ADDRESS
            assert m.view(IOT)["address"] == ADDRESS
            await until("the bad advertisement", lambda: m.status()["profile"]["bad_adverts"] > 0)
            assert m.sighting(IOTS[1]) is None
            assert m.status()["in_range"] == [IOT]

    asyncio.run(main())


def test_a_configured_address_wins_over_an_advertised_iot_code(bluez: BlueZ) -> None:
    add_scooter(bluez, 0)
    impostor = bluez.add_peripheral(
        ADDRESSES[1], rssi=-40, manufacturer_data={FLEETGATE_COMPANY: b"FG\x01" + IOT.encode()}
    )

    async def main() -> None:
        m = manager(FAST, (IOT, ADDRESS))
        async with running(m):
            await until("the scooter", lambda: m.sighting(IOT))
            await impostor.until("the impostor advertising", lambda s: s["discovered"])
            adverts = m.status()["adverts"]
            await until("a few more advertisements", lambda: m.status()["adverts"] >= adverts + 6)
            assert m.sighting(IOT).address == ADDRESS

    asyncio.run(main())


def test_out_of_range_after_range_timeout(bluez: BlueZ) -> None:
    scooter = add_scooter(bluez)

    async def main() -> None:
        m = manager(settings(range_timeout_s=0.5))
        async with running(m):
            await until("in range", lambda: m.in_range(IOT))
            scooter.go_out_of_range()
            await until("out of range", lambda: not m.in_range(IOT))
            assert m.status()["in_range"] == [] and m.view(IOT)["in_range"] is False
            assert m.sighting(IOT) is not None  # the last sighting stays, for the view
            with pytest.raises(BleUnreachable, match="not in range"):
                await m.run_op(IOT, KEY, "unlock")
            assert scooter.state()["connect_calls"] == 0
            scooter.come_back()
            await until("back in range", lambda: m.in_range(IOT))

    asyncio.run(main())


def test_bad_advertisement_input_is_counted_not_raised() -> None:
    """The detection callback with what no bleak would hand over: it counts, never raises."""
    m = manager()
    device = BLEDevice(ADDRESS, None, {"path": "/x"})

    def adv(**changes: Any) -> AdvertisementData:
        fields = {
            "local_name": None,
            "manufacturer_data": {FLEETGATE_COMPANY: b"FG\x01" + IOT.encode()},
            "service_data": {},
            "service_uuids": [FLEETGATE_SERVICE],
            "tx_power": None,
            "rssi": -60,
            "platform_data": (),
        }
        return AdvertisementData(**{**fields, **changes})

    for bad in (adv(rssi=None), adv(rssi=99), adv(manufacturer_data=None), adv(service_uuids=5)):
        m._detected(device, bad)
    m._detected(None, adv())  # type: ignore[arg-type]
    assert m.status()["bad_adverts"] == 5 and m.sighting(IOT) is None
    m._detected(device, adv())
    assert m.sighting(IOT).address == ADDRESS


# -- operations end to end -------------------------------------------------------------------------------


def test_unlock_and_lock_end_to_end(bluez: BlueZ) -> None:
    scooter = add_scooter(bluez, locked=True)

    async def main() -> None:
        m = manager()
        async with running(m):
            await until("in range", lambda: m.in_range(IOT))
            unlocked = await m.run_op(IOT, KEY, "unlock")
            assert (unlocked.ok, unlocked.status, unlocked.key_rejected) == (True, "ok", False)
            assert unlocked.state == {"locked": False, "rental": False}
            assert scooter.profile_state()["locked"] is False
            assert m.view(IOT)["connected"] is True
            locked = await m.run_op(IOT, KEY, "lock")
            assert locked.ok and locked.state == {"locked": True, "rental": False}
            rental = await m.run_op(IOT, KEY, "start-rental")
            assert rental.state == {"locked": False, "rental": True}
            status = m.status()
            assert status["ops"] == {"ok": 3} and status["connects"] == 1 and status["links_open"] == 1

    asyncio.run(main())
    state = scooter.profile_state()
    assert state["ops"] == ["unlock", "lock", "start-rental"]
    assert state["locked"] is False and state["rental"] is True
    assert scooter.state()["connected"] is False  # run() cancelled: links closed


def test_a_wrong_key_is_key_rejected(bluez: BlueZ) -> None:
    scooter = add_scooter(bluez)

    async def main() -> None:
        m = manager()
        async with running(m):
            await until("in range", lambda: m.in_range(IOT))
            answer = await m.run_op(IOT, "zz99ZZ99", "unlock")
            assert (answer.ok, answer.status, answer.key_rejected, answer.retryable) == (
                False,
                "auth-failed",
                True,
                True,
            )
            scooter.set_profile_key("Qw3rty12")  # rotated: the old key fails too
            assert (await m.run_op(IOT, KEY, "unlock")).key_rejected
            assert (await m.run_op(IOT, "Qw3rty12", "unlock")).ok
            assert m.status()["ops"] == {"auth-failed": 2, "ok": 1}

    asyncio.run(main())
    assert scooter.profile_state()["ops"] == ["unlock"]


def test_busy_refused_and_unsupported_answers(bluez: BlueZ) -> None:
    scooter = add_scooter(bluez, unsupported=[0x05])

    async def main() -> None:
        m = manager()
        async with running(m):
            await until("in range", lambda: m.in_range(IOT))
            answer = await m.run_op(IOT, KEY, "saddle")
            assert (answer.status, answer.retryable) == ("unsupported", False)
            scooter.set_busy()
            answer = await m.run_op(IOT, KEY, "unlock")
            assert (answer.status, answer.retryable) == ("busy", True)
            scooter.set_busy(False)
            scooter.set_refuse()
            answer = await m.run_op(IOT, KEY, "unlock")
            assert (answer.status, answer.retryable) == ("refused", False)
            with pytest.raises(BleUnsupported):
                await m.run_op(IOT, KEY, "horn")
            with pytest.raises(BleUnreachable, match="not a watched"):
                await m.run_op(IOTS[2], KEY, "unlock")

    asyncio.run(main())


def test_garbled_stale_and_silent_answers(bluez: BlueZ) -> None:
    scooter = add_scooter(bluez)

    async def main() -> None:
        m = manager(settings(command_timeout_s=0.5))
        async with running(m):
            await until("in range", lambda: m.in_range(IOT))
            scooter.stale_next(2)  # the CHALLENGE and the RESULT each preceded by a stale copy
            assert (await m.run_op(IOT, KEY, "unlock")).ok
            assert m.status()["profile"]["stale"] == 2

            scooter.garble_next(1)  # the CHALLENGE with a bad CRC: dropped, then no answer
            with pytest.raises(BleProtocolError):
                await m.run_op(IOT, KEY, "lock")
            assert m.status()["profile"]["bad_frames"] == 1
            await until("the errored link closed", lambda: not scooter.state()["connected"])

            scooter.silent_next(1, process=True)  # the HELLO processed, its CHALLENGE lost
            with pytest.raises(BleProtocolError):
                await m.run_op(IOT, KEY, "lock")
            scooter.silent_next(1)  # the next HELLO lost on the way
            with pytest.raises(BleProtocolError):
                await m.run_op(IOT, KEY, "lock")

            assert (await m.run_op(IOT, KEY, "lock")).ok  # and then it works
            status = m.status()
            assert status["profile"]["timeouts"] == 3
            assert status["ops"] == {"ok": 2, "protocol-error": 3}
            assert status["connects"] == 4  # a link that erred is never reused

    asyncio.run(main())
    assert scooter.profile_state()["ops"] == ["unlock", "lock"]


def test_a_scooter_without_the_lock_service_is_unsupported(bluez: BlueZ) -> None:
    other = bluez.add_peripheral(
        ADDRESS, rssi=-50, services=[Service("180f", [Characteristic("2a19", ("read",), b"\x50")])]
    )

    async def main() -> None:
        m = manager(FAST, (IOT, ADDRESS))
        async with running(m):
            await until("in range", lambda: m.in_range(IOT))
            with pytest.raises(BleUnsupported, match=FLEETGATE_SERVICE):
                await m.run_op(IOT, KEY, "unlock")
            await other.until("disconnected", lambda s: not s["connected"])
            assert m.status()["links_open"] == 0

    asyncio.run(main())
    assert other.state()["connect_calls"] == 1  # not retried


# -- connections -----------------------------------------------------------------------------------------


def test_connect_retries_with_backoff_then_gives_up(bluez: BlueZ) -> None:
    scooter = add_scooter(bluez)

    async def main() -> None:
        m = manager()
        async with running(m):
            await until("in range", lambda: m.in_range(IOT))
            scooter.fail_connects(2)
            assert (await m.run_op(IOT, KEY, "unlock")).ok
            assert scooter.state()["connect_calls"] == 3
            assert (m.status()["connects"], m.status()["connect_failures"]) == (1, 2)

            await until("the idle link closed", lambda: m.status()["links_open"] == 0)
            scooter.fail_connects(5)
            with pytest.raises(BleUnreachable, match="3 attempts"):
                await m.run_op(IOT, KEY, "lock")
            assert scooter.state()["connect_calls"] == 6
            assert m.status()["connect_failures"] == 5 and m.status()["ops"]["unreachable"] == 1

    asyncio.run(main())


def test_the_link_is_reused_then_closed_when_idle(bluez: BlueZ) -> None:
    scooter = add_scooter(bluez)

    async def main() -> None:
        m = manager()
        async with running(m):
            await until("in range", lambda: m.in_range(IOT))
            assert (await m.run_op(IOT, KEY, "unlock")).ok
            assert (await m.run_op(IOT, KEY, "lock")).ok
            assert scooter.state()["connect_calls"] == 1 and scooter.state()["connected"]
            await scooter.until("the idle link closed", lambda s: not s["connected"])
            assert m.status()["links_open"] == 0 and m.status()["drops"] == 0
            assert m.view(IOT)["connected"] is False
            assert m.in_range(IOT)  # link traffic counts as heard
            assert (await m.run_op(IOT, KEY, "unlock")).ok
            assert scooter.state()["connect_calls"] == 2

    asyncio.run(main())


def test_a_link_dropped_while_idle_is_counted_and_reopened(bluez: BlueZ) -> None:
    scooter = add_scooter(bluez)

    async def main() -> None:
        m = manager(settings(idle_disconnect_s=10.0))
        async with running(m):
            await until("in range", lambda: m.in_range(IOT))
            assert (await m.run_op(IOT, KEY, "unlock")).ok
            scooter.drop_connection()
            await until("the drop seen", lambda: m.status()["drops"] == 1 and m.status()["links_open"] == 0)
            await until("advertising again", lambda: m.in_range(IOT))
            assert (await m.run_op(IOT, KEY, "lock")).ok
            assert scooter.state()["connect_calls"] == 2

    asyncio.run(main())


def test_max_connections_bounds_concurrent_links(bluez: BlueZ) -> None:
    scooters = [add_scooter(bluez, n, delay=0.15) for n in range(3)]
    most = {"mock": 0, "manager": 0}

    async def main() -> None:
        m = manager(settings(max_connections=2, idle_disconnect_s=10.0), *zip(IOTS, [None] * 3, strict=True))

        async def watch_links() -> None:
            while True:
                connected = sum(s.state()["connected"] for s in scooters)
                most["mock"] = max(most["mock"], connected)
                most["manager"] = max(most["manager"], m.status()["links_open"])
                await asyncio.sleep(0.01)

        async with running(m):
            await until("all in range", lambda: all(m.in_range(i) for i in IOTS))
            watcher = asyncio.create_task(watch_links())
            try:
                answers = await asyncio.gather(
                    *(m.run_op(i, KEY, op) for i in IOTS for op in ("unlock", "lock"))
                )
            finally:
                watcher.cancel()
            assert all(a.ok for a in answers)
            assert m.status()["links_open"] <= 2

    asyncio.run(main())
    assert most["mock"] == 2 and most["manager"] == 2  # reached, never passed
    assert [s.profile_state()["ops"] for s in scooters] == [["unlock", "lock"]] * 3


def test_an_idle_link_makes_room_for_another_scooter(bluez: BlueZ) -> None:
    first, second = add_scooter(bluez, 0), add_scooter(bluez, 1)

    async def main() -> None:
        m = manager(settings(max_connections=1, idle_disconnect_s=10.0), (IOTS[0], None), (IOTS[1], None))
        async with running(m):
            await until("both in range", lambda: m.in_range(IOTS[0]) and m.in_range(IOTS[1]))
            assert (await m.run_op(IOTS[0], KEY, "unlock")).ok
            assert (await m.run_op(IOTS[1], KEY, "unlock")).ok  # not after idle_disconnect_s: at once
            assert not first.state()["connected"] and second.state()["connected"]

    asyncio.run(main())


def test_out_of_range_mid_command_is_unreachable(bluez: BlueZ) -> None:
    scooter = add_scooter(bluez)

    async def main() -> None:
        m = manager(settings(command_timeout_s=5.0))  # a timeout would be a BleProtocolError, not this
        async with running(m):
            await until("in range", lambda: m.in_range(IOT))
            scooter.drop_on(0x01)  # the link drops at the unlock's AUTH, before the answer
            with pytest.raises(BleUnreachable):
                await m.run_op(IOT, KEY, "unlock")
            assert scooter.profile_state()["ops"] == []

            await until("advertising again", lambda: m.in_range(IOT))
            scooter.set_profile(delay=1.0)  # answers come late ...
            received = len(scooter.profile_state()["received"])
            op = asyncio.create_task(m.run_op(IOT, KEY, "lock"))
            await scooter.until("the HELLO written", lambda s: len(s["profile"]["received"]) > received)
            scooter.go_out_of_range()  # ... and it leaves meanwhile
            with pytest.raises(BleUnreachable):
                await op
            assert m.status()["drops"] == 2 and m.status()["ops"]["unreachable"] == 2
            await until("out of range", lambda: not m.in_range(IOT))

    asyncio.run(main())


def test_cancelling_run_closes_links_and_stops_scanning(bluez: BlueZ) -> None:
    scooters = [add_scooter(bluez, n) for n in range(2)]

    async def main() -> None:
        m = manager(settings(idle_disconnect_s=10.0), (IOTS[0], None), (IOTS[1], None))
        async with running(m):
            await until("in range", lambda: m.in_range(IOTS[0]) and m.in_range(IOTS[1]))
            await asyncio.gather(m.run_op(IOTS[0], KEY, "unlock"), m.run_op(IOTS[1], KEY, "unlock"))
            assert m.status()["links_open"] == 2
        assert m.status()["links_open"] == 0

    asyncio.run(main())
    for scooter in scooters:
        assert not scooter.state()["connected"] and not scooter.state()["discovering"]


@pytest.mark.parametrize(
    ("characteristics", "error", "connects"),
    [
        # the command characteristic takes no write with response: the write is refused (an ATT error)
        ((("w", ("write-without-response",)), ("n", ("notify",))), BleProtocolError, 1),
        # the event characteristic does not notify: StartNotify refused, not retried
        ((("w", ("write",)), ("n", ("read",))), BleProtocolError, 1),
        # no event characteristic at all
        ((("w", ("write",)),), BleUnsupported, 1),
    ],
)
def test_a_broken_gatt_profile_is_an_error_not_a_crash(
    bluez: BlueZ, characteristics: tuple, error: type[Exception], connects: int
) -> None:
    uuids = {"w": FLEETGATE_COMMAND, "n": FLEETGATE_EVENT}
    service = Service(FLEETGATE_SERVICE, [Characteristic(uuids[c], flags) for c, flags in characteristics])
    scooter = bluez.add_peripheral(ADDRESS, rssi=-50, services=[service], profile=fleetgate_profile(KEY, IOT))

    async def main() -> None:
        m = manager()
        async with running(m):
            await until("in range", lambda: m.in_range(IOT))
            with pytest.raises(error):
                await m.run_op(IOT, KEY, "unlock")
            await scooter.until("disconnected", lambda s: not s["connected"])
            assert m.status()["links_open"] == 0

    asyncio.run(main())
    assert scooter.state()["connect_calls"] == connects
    assert scooter.profile_state()["ops"] == []


def test_junk_notified_on_an_idle_link_is_ignored(bluez: BlueZ) -> None:
    scooter = add_scooter(bluez)

    async def main() -> None:
        m = BleManager(FleetgateProfile(first_seq=100), settings(idle_disconnect_s=10.0))
        m.watch(IOT, None)
        async with running(m):
            await until("in range", lambda: m.in_range(IOT))
            assert (await m.run_op(IOT, KEY, "unlock")).ok
            junk = [b"", b"\xa5", bytes(range(40)), b"\xa5\x04\x00\x03\x01\x00\x00\x00\x00"]
            junk.append(bytes.fromhex("a5040703010000c389"))  # a valid RESULT "done", for seq 7
            for data in junk:
                assert scooter.notify(FLEETGATE_EVENT, data)
            answer = await m.run_op(IOT, KEY, "lock")
            assert answer.ok and answer.state == {"locked": True, "rental": False}
            profile = m.status()["profile"]
            assert profile["bad_frames"] + profile["stale"] == len(junk)
            assert m.status()["connects"] == 1

    asyncio.run(main())
