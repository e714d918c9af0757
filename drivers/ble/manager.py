"""The gateway's BLE plumbing (bleak): duty-cycled scanning, who is in range, and connections to run one
profile operation at a time per scooter.

A supervised component (``name``, ``run``): ``run`` scans in windows of ``scan_s`` every ``scan_every_s`` and
closes idle links. ``run_op`` connects (bounded by ``max_connections``, first come first served; an idle link
of another scooter is closed to make room), keeps the link for the next operation and closes it after
``idle_disconnect_s`` idle, or at once when anything went wrong on it. Everything a peripheral or the stack
sends is untrusted: a bad advertisement or an odd exception from bleak / D-Bus is counted and never ends
``run``, and ``run_op`` raises only ``BleError`` subclasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.backends.service import BleakGATTService
from bleak.exc import BleakGATTProtocolError

from fleetgate.drivers.ble.profile import (
    Advertisement,
    BleAnswer,
    BleError,
    BleProtocolError,
    BleUnreachable,
    BleUnsupported,
    ScooterProfile,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

NOTIFY_QUEUE = 64  # notifications kept per characteristic while nobody reads; older ones are dropped
DISCONNECT_TIMEOUT_S = 5.0
RSSI_RANGE = (-127, 20)  # dBm an adapter can report


@dataclass(frozen=True)
class BleSettings:
    adapter: str = "hci0"
    max_connections: int = 2
    scan_s: float = 4.0  # one scan window
    scan_every_s: float = 10.0  # a window starts this often; equal to scan_s: scan continuously
    range_timeout_s: float = 30.0  # not heard this long: out of range
    min_rssi: int = -95  # weaker: out of range
    connect_timeout_s: float = 10.0
    connect_attempts: int = 3
    connect_backoff_s: float = 0.5  # before the second attempt, doubling
    command_timeout_s: float = 5.0  # per protocol step
    idle_disconnect_s: float = 20.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.connect_attempts < 1:
            raise ValueError("max_connections and connect_attempts must be at least 1")
        if not 0 < self.scan_s <= self.scan_every_s:
            raise ValueError("scan_s must be > 0 and <= scan_every_s")
        for name in ("range_timeout_s", "connect_timeout_s", "command_timeout_s", "idle_disconnect_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.connect_backoff_s < 0:
            raise ValueError("connect_backoff_s must be >= 0")


@dataclass(frozen=True)
class Sighting:
    address: str
    rssi: int
    seen_mono: float  # time.monotonic() of the last advertisement (or link traffic)
    name: str | None


class _Slots:
    """A semaphore whose waiters are served in arrival order, with a look at who waits."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(not f.done() for f in self._waiters)

    def try_acquire(self) -> bool:
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as we were cancelled: pass it on
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class _Link:
    """One open connection, as the profile's ``GattLink``: writes with response, queued notifications, and
    every wait cut short when the link drops."""

    def __init__(self, iot_code: str, address: str, notify_uuids: tuple[str, ...], write_timeout_s: float):
        self.iot_code = iot_code
        self.address = address
        self.client: BleakClient | None = None
        self.service: BleakGATTService | None = None  # the profile's: characteristics are looked up in it
        self.gone = asyncio.Event()
        self.registered = False  # in the manager's links, holding a connection slot
        self.closing = False
        self.closed = asyncio.Event()
        self.busy = False
        self.last_used = time.monotonic()
        self.dropped_notifications = 0
        self._write_timeout_s = write_timeout_s
        self._queues: dict[str, asyncio.Queue[bytes]] = {
            u.lower(): asyncio.Queue(NOTIFY_QUEUE) for u in notify_uuids
        }

    def on_notification(self, uuid: str, data: bytes) -> None:
        queue = self._queues[uuid.lower()]
        if queue.full():
            queue.get_nowait()
            self.dropped_notifications += 1
        queue.put_nowait(bytes(data))

    async def _until_gone(self, aw: Awaitable[T], timeout_s: float) -> T:
        """``aw``'s result; ``BleUnreachable`` as soon as the link drops, ``TimeoutError`` after ``timeout_s``."""
        task = asyncio.ensure_future(aw)
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait((task, gone), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        if self.gone.is_set():
            raise BleUnreachable(f"{self.address}: the link dropped")
        raise TimeoutError

    async def write(self, char_uuid: str, data: bytes) -> None:
        if self.gone.is_set() or self.client is None or self.service is None:
            raise BleUnreachable(f"{self.address}: the link dropped")
        char = self.service.get_characteristic(char_uuid)
        if char is None:
            raise BleProtocolError(f"{self.address} has no characteristic {char_uuid}")
        try:
            await self._until_gone(
                self.client.write_gatt_char(char, data, response=True), self._write_timeout_s
            )
        except BleError:
            raise
        except TimeoutError:
            raise BleUnreachable(f"{self.address}: the write was not answered") from None
        except BleakGATTProtocolError as exc:
            raise BleProtocolError(f"{self.address}: the write was refused ({exc})") from None
        except Exception as exc:  # bleak / D-Bus: "Not connected", a D-Bus error ...
            raise BleUnreachable(f"{self.address}: the write failed ({type(exc).__name__})") from None

    async def notification(self, char_uuid: str, timeout_s: float) -> bytes:
        queue = self._queues.get(char_uuid.lower())
        if queue is None:
            raise BleProtocolError(f"{char_uuid} is not subscribed")
        if not queue.empty():
            return queue.get_nowait()  # what arrived before a drop is still read
        if self.gone.is_set():
            raise BleUnreachable(f"{self.address}: the link dropped")
        try:
            return await self._until_gone(queue.get(), timeout_s)
        except TimeoutError:
            raise BleProtocolError(f"{self.address}: no notification within {timeout_s} s") from None


class BleManager:
    """Scanning, presence and connections for the scooters ``watch``-ed, speaking ``profile``."""

    name = "ble"

    def __init__(self, profile: ScooterProfile, settings: BleSettings | None = None) -> None:
        self._profile = profile
        self._settings = settings or BleSettings()
        self._watched: dict[str, str | None] = {}  # iotCode -> configured address
        self._by_address: dict[str, str] = {}  # configured address -> iotCode
        self._learnt: dict[str, str] = {}  # iotCode -> address its advertisement came from
        self._sightings: dict[str, Sighting] = {}
        self._devices: dict[str, BLEDevice] = {}  # address -> bleak's last device object (watched only)
        self._links: dict[str, _Link] = {}  # iotCode -> open link
        self._locks: dict[str, asyncio.Lock] = {}  # one operation at a time per scooter
        self._slots = _Slots(self._settings.max_connections)
        self._tasks: set[asyncio.Task[None]] = set()
        self._counters: Counter[str] = Counter()
        self._ops: Counter[str] = Counter()

    # -- what is followed, and where it is ---------------------------------------------------------------

    def watch(self, iot_code: str, address: str | None = None) -> None:
        """Follow ``iot_code``: at ``address`` (from the configuration) or wherever it advertises itself."""
        old = self._watched.get(iot_code)
        if old is not None:
            self._by_address.pop(old, None)
        address = address.upper() if address else None
        if address is not None:
            previous = self._by_address.get(address)
            if previous is not None and previous != iot_code:
                self._watched[previous] = None
            self._by_address[address] = iot_code
            self._learnt.pop(iot_code, None)
        self._watched[iot_code] = address

    def address_of(self, iot_code: str) -> str | None:
        return self._watched.get(iot_code) or self._learnt.get(iot_code)

    def sighting(self, iot_code: str) -> Sighting | None:
        return self._sightings.get(iot_code)

    def in_range(self, iot_code: str) -> bool:
        """Heard within ``range_timeout_s`` at ``min_rssi`` or better, or connected now."""
        link = self._links.get(iot_code)
        if link is not None and not link.gone.is_set():
            return True
        seen = self._sightings.get(iot_code)
        return (
            seen is not None
            and time.monotonic() - seen.seen_mono <= self._settings.range_timeout_s
            and seen.rssi >= self._settings.min_rssi
        )

    def status(self) -> dict[str, Any]:
        counters = {
            k: self._counters[k]
            for k in ("scans", "scan_failures", "adverts", "bad_adverts", "connects", "connect_failures")
        }
        counters |= {k: self._counters[k] for k in ("drops", "errors", "notifications_dropped")}
        return {
            **counters,
            "ops": dict(self._ops),
            "profile": dict(getattr(self._profile, "counters", {})),
            "links_open": sum(not link.closing for link in self._links.values()),
            "waiting_for_link": self._slots.waiting,
            "watched": len(self._watched),
            "in_range": sorted(i for i in self._watched if self.in_range(i)),
        }

    def view(self, iot_code: str) -> dict[str, Any]:
        seen = self._sightings.get(iot_code)
        link = self._links.get(iot_code)
        return {
            "address": self.address_of(iot_code) or (seen.address if seen else None),
            "in_range": self.in_range(iot_code),
            "rssi": seen.rssi if seen else None,
            "seen_age_s": round(time.monotonic() - seen.seen_mono, 1) if seen else None,
            "connected": link is not None and not link.gone.is_set() and not link.closing,
        }

    # -- the component -----------------------------------------------------------------------------------

    async def run(self) -> None:
        scanner = BleakScanner(self._detected, bluez={"adapter": self._settings.adapter})
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._scan_forever(scanner))
                group.create_task(self._reap_forever())
        finally:
            # cancelled (or, never expected, a bug): leave no discovery session nor link behind
            with contextlib.suppress(Exception):
                await asyncio.wait_for(scanner.stop(), DISCONNECT_TIMEOUT_S)
            await self.close_all()

    async def close_all(self) -> None:
        links = list(self._links.values())
        if links:
            await asyncio.gather(*(self._close(link) for link in links), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()

    async def _scan_forever(self, scanner: BleakScanner) -> None:
        s = self._settings
        continuous = s.scan_s >= s.scan_every_s
        loop = asyncio.get_running_loop()
        scanning = False
        while True:
            started = loop.time()
            if not scanning:
                scanning = await self._scanner_call(scanner.start(), "start")
                self._counters["scans"] += scanning
            await asyncio.sleep(s.scan_s)
            if scanning and not continuous:
                await self._scanner_call(scanner.stop(), "stop")
                scanning = False
            await asyncio.sleep(max(0.0, s.scan_every_s - (loop.time() - started)))

    async def _scanner_call(self, aw: Awaitable[None], what: str) -> bool:
        try:
            await asyncio.wait_for(aw, DISCONNECT_TIMEOUT_S)
            return True
        except Exception as exc:  # no adapter, bluetoothd gone or restarting ...: try again next window
            self._counters["scan_failures"] += 1
            log.warning("ble scan failed", extra={"step": what, "error": f"{type(exc).__name__}: {exc}"})
            return False

    async def _reap_forever(self) -> None:
        tick = min(1.0, max(0.05, self._settings.idle_disconnect_s / 4))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for link in list(self._links.values()):
                idle = now - link.last_used >= self._settings.idle_disconnect_s
                if not link.busy and (idle or link.gone.is_set()):
                    self._close_soon(link)

    def _detected(self, device: BLEDevice, adv: AdvertisementData) -> None:
        try:
            self._counters["adverts"] += 1
            self._advertised(device, adv)
        except Exception as exc:  # whatever an advertisement holds, the scan goes on
            self._counters["bad_adverts"] += 1
            log.debug("ble bad advertisement", extra={"error": f"{type(exc).__name__}: {exc}"})

    def _advertised(self, device: BLEDevice, adv: AdvertisementData) -> None:
        address = str(device.address).upper()
        rssi = adv.rssi
        if isinstance(rssi, bool) or not isinstance(rssi, int) or not RSSI_RANGE[0] <= rssi <= RSSI_RANGE[1]:
            raise ValueError(f"RSSI {rssi!r}")
        name = adv.local_name or device.name
        iot_code = self._by_address.get(address)
        if iot_code is None:
            seen = Advertisement(
                address=address,
                name=name if isinstance(name, str) else None,
                rssi=rssi,
                manufacturer_data={int(k): bytes(v) for k, v in adv.manufacturer_data.items()},
                service_uuids=tuple(str(u) for u in adv.service_uuids),
            )
            iot_code = self._profile.identify(seen)
            if iot_code is None or iot_code not in self._watched or self._watched[iot_code] is not None:
                return  # not ours, or a configured address wins over what others advertise
            self._learnt[iot_code] = address
        self._sightings[iot_code] = Sighting(address, rssi, time.monotonic(), name)
        self._devices[address] = device

    def _heard(self, iot_code: str) -> None:
        """Link traffic is as good as an advertisement (a connected peripheral stops advertising)."""
        seen = self._sightings.get(iot_code)
        if seen is not None:
            self._sightings[iot_code] = Sighting(seen.address, seen.rssi, time.monotonic(), seen.name)

    # -- operations --------------------------------------------------------------------------------------

    async def run_op(self, iot_code: str, key: str, op: str) -> BleAnswer:
        """Run ``op`` on the scooter with its Bluetooth ``key``; only ``BleError`` subclasses are raised."""
        if op not in self._profile.operations:
            raise BleUnsupported(f"the {self._profile.name} profile has no operation {op!r}")
        if iot_code not in self._watched:
            raise BleUnreachable(f"{iot_code} is not a watched scooter")
        lock = self._locks.setdefault(iot_code, asyncio.Lock())
        async with lock:
            try:
                answer = await self._run_locked(iot_code, key, op)
            except BleUnreachable:
                self._ops["unreachable"] += 1
                raise
            except BleProtocolError:
                self._ops["protocol-error"] += 1
                raise
            except BleError:
                self._ops["error"] += 1
                raise
            except Exception as exc:  # an odd one from bleak / D-Bus: the link is unusable
                self._counters["errors"] += 1
                self._ops["unreachable"] += 1
                log.warning("ble operation failed", extra={"iot_code": iot_code, "error": type(exc).__name__})
                raise BleUnreachable(f"{iot_code}: {type(exc).__name__}") from None
            self._ops[answer.status] += 1
            return answer

    async def _run_locked(self, iot_code: str, key: str, op: str) -> BleAnswer:
        link = self._links.get(iot_code)
        if link is not None and (link.gone.is_set() or link.closing):
            # BlueZ has one connection per device: a new one made while the old one's Disconnect is on its
            # way would be taken for the old (bleak skips Connect) and dropped with it
            await self._close(link)
            link = None
        if link is None:
            if not self.in_range(iot_code):
                raise BleUnreachable(f"{iot_code} is not in range")
            link = await self._open(iot_code)
        link.busy = True
        try:
            answer = await self._profile.run(link, iot_code, key, op, self._settings.command_timeout_s)
        except BleUnsupported:
            raise  # nothing was said on the link
        except BaseException:
            self._close_soon(link)  # the link is in an unknown state: never reuse it
            raise
        finally:
            link.busy = False
            link.last_used = time.monotonic()
            if not link.gone.is_set():
                self._heard(iot_code)
        if self._slots.waiting:
            self._close_soon(link)  # another scooter waits for a link: make room now
        return answer

    async def _open(self, iot_code: str) -> _Link:
        await self._make_room(iot_code)
        try:
            s = self._settings
            last: Exception | None = None
            for attempt in range(s.connect_attempts):
                if attempt:
                    await asyncio.sleep(s.connect_backoff_s * 2 ** (attempt - 1))
                try:
                    link = await self._connect(iot_code)
                except (BleUnsupported, BleProtocolError):
                    raise  # connected, but this is not a scooter of the profile: retrying will not help
                except Exception as exc:
                    self._counters["connect_failures"] += 1
                    last = exc
                    log.info(
                        "ble connect failed",
                        extra={"iot_code": iot_code, "attempt": attempt + 1, "error": type(exc).__name__},
                    )
                    continue
                self._counters["connects"] += 1
                self._links[iot_code] = link
                link.registered = True  # from here on, closing the link releases the slot
                return link
            detail = f"{type(last).__name__}: {last}" if last else "no attempt"
            raise BleUnreachable(f"{iot_code}: no connection after {s.connect_attempts} attempts ({detail})")
        except BaseException:
            self._slots.release()
            raise

    async def _make_room(self, iot_code: str) -> None:
        """Take a connection slot, closing another scooter's idle link if all are held."""
        if self._slots.try_acquire():
            return
        idle = [
            link
            for link in self._links.values()
            if not (link.busy or link.closing) and link.iot_code != iot_code
        ]
        if idle:
            self._close_soon(min(idle, key=lambda link: link.last_used))
        await self._slots.acquire()

    async def _connect(self, iot_code: str) -> _Link:
        address = self.address_of(iot_code)
        # Always the scanned device: by address, bleak would start a discovery of its own, which BlueZ
        # refuses (InProgress) while our scanner's session runs on the same bus connection.
        device = self._devices.get(address) if address else None
        if address is None or device is None:
            raise BleUnreachable(f"{iot_code}: not seen yet")
        link = _Link(iot_code, address, self._profile.notify_uuids, self._settings.command_timeout_s)
        client = link.client = BleakClient(
            device,
            disconnected_callback=lambda _client: self._dropped(link),
            timeout=self._settings.connect_timeout_s,
            bluez={"adapter": self._settings.adapter},
        )
        try:
            async with asyncio.timeout(self._settings.connect_timeout_s):
                await client.connect()
                service = link.service = client.services.get_service(self._profile.service_uuid)
                if service is None:
                    raise BleUnsupported(f"{address} has no service {self._profile.service_uuid}")
                for uuid in self._profile.notify_uuids:
                    char = service.get_characteristic(uuid)
                    if char is None:
                        raise BleUnsupported(f"{address} has no characteristic {uuid}")
                    try:
                        await client.start_notify(char, self._notified(link, uuid))
                    except Exception as exc:
                        if link.gone.is_set():
                            raise  # dropped meanwhile: worth another attempt
                        raise BleProtocolError(f"{address}: no notifications on {uuid} ({exc})") from None
        except BaseException:
            link.closing = True
            await self._disconnect(client)
            raise
        return link

    def _notified(self, link: _Link, uuid: str) -> Any:
        def callback(_char: object, data: bytearray) -> None:
            before = link.dropped_notifications
            link.on_notification(uuid, data)
            self._counters["notifications_dropped"] += link.dropped_notifications - before

        return callback

    def _dropped(self, link: _Link) -> None:
        """bleak's disconnected callback: whoever waits on the link hears it now."""
        link.gone.set()
        if not link.registered:
            return  # while connecting: the connect fails and cleans up
        if not link.closing:
            self._counters["drops"] += 1
            log.info("ble link dropped", extra={"iot_code": link.iot_code})
        if not link.busy:
            self._close_soon(link)  # a busy one is closed when its operation fails

    def _close_soon(self, link: _Link) -> None:
        """Close in the background; from now on the link is not handed out again."""
        if not link.closing:
            link.closing = True
            self._spawn(self._finish_close(link))

    async def _close(self, link: _Link) -> None:
        """Close and wait until done (or until the close already under way is)."""
        if not link.closing:
            link.closing = True
            await self._finish_close(link)
        elif link.registered:
            await link.closed.wait()

    async def _finish_close(self, link: _Link) -> None:
        try:
            if link.client is not None:
                await self._disconnect(link.client)
        finally:
            if self._links.get(link.iot_code) is link:
                del self._links[link.iot_code]
            link.gone.set()
            link.closed.set()
            if link.registered:
                self._slots.release()

    @staticmethod
    async def _disconnect(client: BleakClient) -> None:
        try:
            await asyncio.wait_for(client.disconnect(), DISCONNECT_TIMEOUT_S)
        except Exception as exc:
            log.debug("ble disconnect failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    def _spawn(self, aw: Awaitable[None]) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
