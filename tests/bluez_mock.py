"""BlueZ for tests: a private system bus with a python-dbusmock bluetoothd (tests/bluez_template.py) that bleak's
BlueZ backend talks to through its real code, with scriptable LE peripherals.

    from bluez_mock import BlueZ, Characteristic, Service

    with BlueZ() as bluez:                        # dbus-daemon + the mock with adapter hci0, ≈ 0.2 s
        lock = bluez.add_peripheral(
            "C4:64:E3:11:22:33", name="Segway-1", rssi=-55, manufacturer_data={0x0969: b"\\x01\\x02"},
            service_uuids=["6e400001-b5a3-f393-e0a9-e50e24dcca9e"],
            services=[Service("6e400001-b5a3-f393-e0a9-e50e24dcca9e", [
                Characteristic("6e400002-b5a3-f393-e0a9-e50e24dcca9e", ("write", "write-without-response")),
                Characteristic("6e400003-b5a3-f393-e0a9-e50e24dcca9e", ("notify",)),
                Characteristic("2a19", ("read",), b"\\x50"),
            ])],
            rules=[...],                          # the peripheral's answers to writes (below)
        )
        asyncio.run(code_under_test())            # bleak finds the bus through DBUS_SYSTEM_BUS_ADDRESS
        lock.go_out_of_range(); lock.come_back(); lock.fail_connects(2); lock.writes(); lock.state()
        subprocess.Popen([...], env={**os.environ, **bluez.env})    # a daemon process: same bus

While a ``BlueZ`` is open, ``DBUS_SYSTEM_BUS_ADDRESS`` in ``os.environ`` points at its bus (restored on close);
``bluez.address`` / ``bluez.env`` give it to a subprocess. bleak keeps one BlueZ manager per event loop: open the
``BlueZ`` before the loop's first bleak call (``asyncio.run`` per test does). The dbus-daemon and the mock run
in their own sessions with stdin/stdout/stderr on files in a temp dir (no inherited pipe keeps a caller's
``communicate()`` waiting) and get SIGTERM when the thread that started them ends (PR_SET_PDEATHSIG).
``bluez.log`` is the mock's log (every D-Bus call and signal).

What bluetoothd-as-mocked does (adapter ``/org/bluez/hci0``, powered, roles central+peripheral):
- Discovery: StartDiscovery/StopDiscovery are per D-Bus client (a client that leaves the bus stops its own).
  As in bluetoothd, a client has one discovery session at most: a second StartDiscovery from it fails with
  org.bluez.Error.InProgress ("Operation already in progress") and a StopDiscovery without one with
  org.bluez.Error.Failed ("No discovery started"). bleak has one bus connection per event loop, so one
  BleakScanner (find_device_by_address, BleakClient(address) ...) at a time per loop, as on a real gateway.
  StartDiscovery replies first, then Discovering=True goes out (bluetoothd's start_discovery_complete);
  StopDiscovery sets Discovering=False before its reply. A scanner task cancelled while its StartDiscovery is
  in flight never sends its StopDiscovery (bleak), so the session stays until its client leaves the bus.
  While discovering, every peripheral that is in range, advertising and not connected advertises every
  ``advertise_interval`` (0.1 s) and right after StartDiscovery: the first time its Device1 object appears
  (InterfacesAdded), then its RSSI changes each time (``rssi``, ``rssi``-1, ``rssi``-2 ...), and changed
  advertisement fields go out with it. Device objects stay after discovery stops (as for bluetoothd's 30 s).
  Device1 has ManufacturerData ``a{qv}``, ServiceData ``a{sv}``, UUIDs, Name/Alias, RSSI, TxPower.
- Connect: fails with org.bluez.Error.Failed ("Software caused connection abort", or the given message) when
  out of range or while ``fail_connects`` lasts, after the connect delay if one is set; otherwise
  Connected=True, the reply, then the GATT objects (``…/serviceXXXX``, ``…/serviceXXXX/charYYYY``; handles
  from 0x000a) and ServicesResolved=True. Disconnect (or the peripheral dropping the link, or going out of
  range): ServicesResolved=False, the GATT objects removed, Connected=False; rule variables are cleared.
  Disconnect during a delayed Connect cancels it (Failed "Operation was cancelled"). Pair sets Paired/Bonded.
- GattCharacteristic1: UUID, Service, Flags, Value, MTU (``mtu``, 247), Notifying (notify/indicate only).
  ReadValue needs "read" (else NotPermitted "Read not permitted"); it returns the peripheral's value and, when
  that differs from the cached Value, emits PropertiesChanged(Value) as bluetoothd does (a client notified on
  that characteristic sees the read as a notification too). WriteValue needs "write" (type request) or
  "write-without-response" (type command), else NotPermitted "Write not permitted"; it is recorded, then the
  rules run. StartNotify/StopNotify set Notifying (NotSupported without notify/indicate). A notification is
  PropertiesChanged(Value), sent only while Notifying (else dropped, as without the CCCD written). No
  AcquireNotify/AcquireWrite and no NotifyAcquired property: bleak then always uses StartNotify. No descriptors.

Rules (``rules=`` / ``set_responder``): a list, tried in order on each write; the first match applies:
    {"on": CHAR,                          the characteristic written (UUID; 16-bit "2a19" is expanded)
     "prefix": VALUE, "equals": VALUE,    optional: the written bytes start with / are; a rule naming an
                                          unset variable does not match
     "save": {NAME: VALUE, ...},          set variables (per connection), in order
     "set": {CHAR: VALUE, ...},           set what a read of CHAR returns from now on
     "notify": {"char": CHAR, "value": VALUE, "delay_ms": 0} or a list of them (sent after the write's
                                          reply, in order; the VALUE is computed at the write)
     "error": "NotPermitted", "error_message": "..."   fail the write with org.bluez.Error.<error>
     "disconnect": true or MS}            the peripheral drops the link after the notifications (+ MS)
A VALUE is bytes (``b"..."``, a hex string on the wire) or a list of parts joined: bytes; {"text": "abc"};
{"var": NAME}; {"random": N} (N random bytes); {"written": [START, END]} (a slice of what was written; END may
be omitted or null); {"hmac_sha256": VALUE, "key": VALUE, "len": N} (HMAC-SHA256, first N bytes). E.g. a
challenge-response unlock, key K:
    [{"on": W, "prefix": b"\\x01", "save": {"nonce": [{"random": 8}]},
      "notify": {"char": N, "value": [b"\\x02", {"var": "nonce"}]}},
     {"on": W, "equals": [b"\\x03", {"hmac_sha256": {"var": "nonce"}, "key": K, "len": 8}],
      "set": {STATE: b"\\x00"}, "notify": {"char": N, "value": b"\\x04\\x00"}},
     {"on": W, "prefix": b"\\x03", "notify": {"char": N, "value": b"\\x04\\xff"}}]

The fleetgate lock profile (docs/ble-profile.md, implemented in the template from that text alone, none of
fleetgate's code): ``add_peripheral(ADDR, name=..., profile=fleetgate_profile("AB12cd34", "861234567890123"))``
or the dict itself, ``profile={"name": "fleetgate", "key": "AB12cd34", "iot_code": "861234567890123",
"locked": True, "rental": False, "unsupported": [], "busy": False, "refuse": False}`` (optional "delay_ms":
answer latency, 0; "nonce_ttl_s": 5.0). The peripheral then also has the lock service (FLEETGATE_SERVICE) with
the command characteristic (FLEETGATE_COMMAND, "write") and the event characteristic (FLEETGATE_EVENT,
"notify"), unless ``services`` lists that service already, and advertises FLEETGATE_SERVICE and manufacturer
data {0xFFFF: b"FG\x01" + iotCode} unless ``service_uuids`` / ``manufacturer_data`` are given. Writes to the
command characteristic are frames (rules do not see them); answers are notifications on the event
characteristic, sent after the write's reply and only while Notifying (else dropped):
- a frame with a wrong start byte, length or CRC, an unknown type, or a payload of the wrong size:
  ERROR(0x05), seq echoed (the received seq byte, 0 if the frame is shorter).
- HELLO(op): CHALLENGE(nonce), 8 fresh random bytes, replacing any earlier nonce; for an op outside
  0x01..0x07 or in ``unsupported``: RESULT(op, 0x02, state).
- AUTH(op, mac): the nonce is spent whatever happens. The MAC is compared (hmac.compare_digest) with
  HMAC-SHA256(key, "fleetgate-ble/v1" + iotCode + nonce + op + seq)[:8] for the HELLO's op and seq; no nonce,
  one older than nonce_ttl_s, a wrong MAC, or an op or seq other than the HELLO's: RESULT(op, 0x01, state),
  and the third such failure on one connection drops the link after that answer. Authenticated: busy →
  RESULT(op, 0x03, state); refuse → 0x04; else the operation runs (unlock: unlocked; lock: locked;
  start-rental: rental, unlocked; end-rental: no rental, locked; saddle/tailbox/battery-cover: nothing
  changes), is added to ``ops`` and RESULT(op, 0x00, state) answers. state = bit 0 locked | bit 1 rental.
- Faults (Peripheral methods): garble_next(n) (the next N answers with a wrong CRC), stale_next(n) (each of
  the next N answers preceded by a copy with seq-1 and a misleading payload), silent_next(n, process=False)
  (no answer to the next N frames; not processed unless ``process``), drop_on(op, times=1, run=False) (the
  link drops at that op's AUTH, before answering; the op runs only with ``run``), set_profile_key(key),
  set_busy(), set_refuse(), set_profile(locked=..., rental=..., unsupported=[...], delay=s, nonce_ttl=s).
  ``set_services`` replaces the whole GATT profile, lock service included (add Service(FLEETGATE_SERVICE,
  ...) to keep it).
- profile_state() (= state()["profile"]): locked, rental, state, busy, refuse, unsupported, auth_failures
  (this connection), auth_failures_total, ops ["unlock", ...], nonce_pending, received [hex frames],
  sent [{"frame": hex, "delivered": bool}], faults {garble, stale, silent, drop_on}. Not the key.

The control interface, org.fleetgate.Mock on ``/`` of org.bluez (what ``Peripheral`` calls; JSON strings,
bytes as hex; ADDR is the peripheral's address):
    AddPeripheral(s ADDR, s config) -> s device path    config: name, rssi, manufacturer_data {id: hex},
        service_data {uuid: hex}, service_uuids [uuid], tx_power, address_type, advertise (bool), mtu,
        services [{"uuid", "primary", "characteristics": [{"uuid", "flags": [...], "value": hex}]}], rules,
        profile {...} (above)
    SetAdvertisement(s ADDR, s changes)    the config's advertisement keys, from the next advertisement
    SetServices(s ADDR, s services)        the GATT profile, from the next connection
    SetResponder(s ADDR, s rules)
    GoOutOfRange(s ADDR, b remove)         stop advertising, drop the link, Connect fails; remove: the
                                           Device1 object goes too (bluetoothd's temporary-device expiry)
    ComeBack(s ADDR)
    FailConnects(s ADDR, i count, s message)    the next COUNT Connect calls fail (Failed, MESSAGE)
    SetConnectDelay(s ADDR, i ms)          Connect answers after MS
    DropConnection(s ADDR)                 the peripheral ends the link (stays in range)
    Notify(s ADDR, s char, s hex) -> b     a notification from the peripheral; false if dropped
    SetValue(s ADDR, s char, s hex)        what a read returns
    GetWrites(s ADDR) -> s                 [{"char", "value", "type": "request"|"command"}, ...]
    GetState(s ADDR) -> s                  {discovered, in_range, connected, services_resolved, notifying,
                                           connect_calls, fail_connects, vars, values, discovering,
                                           profile (null without one), ...}
    for a peripheral with a lock profile (else org.fleetgate.Mock.NoProfile):
    SetProfile(s ADDR, s changes)          {key, iot_code, locked, rental, unsupported, busy, refuse,
                                           delay_ms, nonce_ttl_s}, any of them
    GarbleNext(s ADDR, i n)   StaleNext(s ADDR, i n)   SilentNext(s ADDR, i n, b process)
    DropOn(s ADDR, i op, i times, b run)   op 0 (or times 0) clears
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dbus

TEMPLATE = Path(__file__).with_name("bluez_template.py")
DBUS_DAEMON = shutil.which("dbus-daemon") or "/usr/bin/dbus-daemon"
BUS_NAME = "org.bluez"
CONTROL_IFACE = "org.fleetgate.Mock"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 3.0
PR_SET_PDEATHSIG = 1

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <keep_umask/>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@dataclass(frozen=True)
class Characteristic:
    uuid: str
    flags: tuple[str, ...] = ("read",)  # read, write, write-without-response, notify, indicate
    value: bytes = b""  # what a read returns until a rule or set_value changes it


@dataclass(frozen=True)
class Service:
    uuid: str
    characteristics: tuple[Characteristic, ...] | list[Characteristic] = ()
    primary: bool = True


# the fleetgate BLE lock profile (docs/ble-profile.md)
FLEETGATE_SERVICE = "f1ee7001-5e9a-4c1b-9a07-6a7c0de0b1e0"
FLEETGATE_COMMAND = "f1ee7002-5e9a-4c1b-9a07-6a7c0de0b1e0"  # write (with response)
FLEETGATE_EVENT = "f1ee7003-5e9a-4c1b-9a07-6a7c0de0b1e0"  # notify
FLEETGATE_COMPANY = 0xFFFF


def fleetgate_profile(
    key: str,
    iot_code: str,
    *,
    locked: bool = True,
    rental: bool = False,
    unsupported: Iterable[int] = (),
    busy: bool = False,
    refuse: bool = False,
    delay: float = 0.0,
    nonce_ttl: float = 5.0,
) -> dict[str, Any]:
    """The ``profile=`` of ``add_peripheral`` for a scooter speaking the fleetgate lock profile."""
    return {
        "name": "fleetgate",
        "key": key,
        "iot_code": iot_code,
        "locked": locked,
        "rental": rental,
        "unsupported": list(unsupported),
        "busy": busy,
        "refuse": refuse,
        "delay_ms": round(delay * 1000),
        "nonce_ttl_s": nonce_ttl,
    }


@dataclass(frozen=True)
class Write:
    char: str  # the characteristic's 128-bit UUID
    value: bytes
    with_response: bool  # a write request (True) or a write command (False)


def _wire(value: Any) -> Any:
    """JSON-ready: bytes as hex strings, Service/Characteristic as dicts, tuples as lists."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k if isinstance(k, str | int) else str(k): _wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_wire(v) for v in value]
    return value


def _json(value: Any) -> str:
    return json.dumps(_wire(value))


def _die_with_parent() -> None:
    # preexec_fn: SIGTERM when the starting thread ends, so a killed test run leaves no bus behind
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


class Peripheral:
    """A mocked LE peripheral; every method is one call to the mock (blocking, a few ms)."""

    def __init__(self, bluez: BlueZ, address: str, device_path: str) -> None:
        self._bluez = bluez
        self.address = address.upper()
        self.device_path = device_path

    def _call(self, method: str, *args: Any) -> Any:
        return self._bluez.control(method, self.address, *args)

    def set_advertisement(self, **changes: Any) -> None:
        """name, rssi, manufacturer_data, service_data, service_uuids, tx_power, advertise (bool)."""
        self._call("SetAdvertisement", _json(changes))

    def set_services(self, services: Iterable[Service]) -> None:
        self._call("SetServices", _json(list(services)))

    def set_responder(self, rules: Iterable[Mapping[str, Any]]) -> None:
        self._call("SetResponder", _json(list(rules)))

    def go_out_of_range(self, remove: bool = False) -> None:
        self._call("GoOutOfRange", dbus.Boolean(remove))

    def come_back(self) -> None:
        self._call("ComeBack")

    def fail_connects(self, count: int, message: str = "") -> None:
        self._call("FailConnects", dbus.Int32(count), dbus.String(message))

    def set_connect_delay(self, seconds: float) -> None:
        self._call("SetConnectDelay", dbus.Int32(round(seconds * 1000)))

    def drop_connection(self) -> None:
        self._call("DropConnection")

    def notify(self, char: str, data: bytes) -> bool:
        """Send a notification now; False when dropped (not connected, or notifications not started)."""
        return bool(self._call("Notify", char, bytes(data).hex()))

    def set_value(self, char: str, data: bytes) -> None:
        self._call("SetValue", char, bytes(data).hex())

    def writes(self) -> list[Write]:
        return [
            Write(w["char"], bytes.fromhex(w["value"]), w["type"] == "request")
            for w in json.loads(self._call("GetWrites"))
        ]

    def state(self) -> dict[str, Any]:
        return json.loads(self._call("GetState"))

    # the fleetgate lock profile (peripherals added with ``profile=``; others raise DBusException NoProfile)

    def set_profile(self, **changes: Any) -> None:
        """key, iot_code, locked, rental, unsupported, busy, refuse, delay (s), nonce_ttl (s); from now on."""
        if "delay" in changes:
            changes["delay_ms"] = round(changes.pop("delay") * 1000)
        if "nonce_ttl" in changes:
            changes["nonce_ttl_s"] = changes.pop("nonce_ttl")
        self._call("SetProfile", _json(changes))

    def set_profile_key(self, key: str) -> None:
        """The scooter's Bluetooth key changes (a rotation): MACs made with the old one fail (0x01)."""
        self.set_profile(key=key)

    def set_busy(self, busy: bool = True) -> None:
        """While busy, an authenticated AUTH answers RESULT(op, 0x03, state) and does nothing."""
        self.set_profile(busy=busy)

    def set_refuse(self, refuse: bool = True) -> None:
        """While refusing (e.g. moving), an authenticated AUTH answers RESULT(op, 0x04, state)."""
        self.set_profile(refuse=refuse)

    def garble_next(self, n: int = 1) -> None:
        """The next N answers go out with a wrong CRC (the scooter's state changes as usual)."""
        self._call("GarbleNext", dbus.Int32(n))

    def stale_next(self, n: int = 1) -> None:
        """Each of the next N answers is preceded by a stale copy: seq - 1 and a misleading payload (another
        nonce in a CHALLENGE, status 0x06 in a RESULT or ERROR)."""
        self._call("StaleNext", dbus.Int32(n))

    def silent_next(self, n: int = 1, process: bool = False) -> None:
        """The next N frames written get no answer: lost on the way (not processed), or with ``process``
        processed (a nonce issued, an operation run) with the answer lost."""
        self._call("SilentNext", dbus.Int32(n), dbus.Boolean(process))

    def drop_on(self, op: int | None, times: int = 1, run: bool = False) -> None:
        """The next ``times`` AUTHs for ``op`` make the scooter drop the link right after the write's reply,
        before answering (the nonce is spent; with ``run`` the AUTH is checked and the operation run
        first). ``None`` clears. Add ``go_out_of_range()`` for a scooter that does not come back."""
        self._call("DropOn", dbus.Int32(op or 0), dbus.Int32(times), dbus.Boolean(run))

    def profile_state(self) -> dict[str, Any]:
        """``state()["profile"]``: locked, rental, state, auth_failures, ops, received, sent, faults ..."""
        profile = self.state()["profile"]
        if profile is None:
            raise ValueError(f"{self.address} has no lock profile")
        return dict(profile)

    def wait_until(self, what: str, check: Callable[[dict[str, Any]], Any], timeout: float = 5.0) -> None:
        """Poll ``state()`` until ``check(state)`` is truthy. Blocks: not from inside a running bleak loop."""
        deadline = time.monotonic() + timeout
        while not check(state := self.state()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {state}")
            time.sleep(0.02)

    async def until(self, what: str, check: Callable[[dict[str, Any]], Any], timeout: float = 5.0) -> None:
        """``wait_until`` for async tests: the event loop keeps running between polls."""
        deadline = time.monotonic() + timeout
        while not check(state := self.state()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {state}")
            await asyncio.sleep(0.02)

    def __repr__(self) -> str:
        return f"<Peripheral {self.address} {self.device_path}>"


class BlueZ:
    """A private system bus (dbus-daemon) and the BlueZ mock on it. Context manager, or start()/close()."""

    def __init__(self, adapter: str = "hci0", advertise_interval: float = 0.1) -> None:
        self.adapter = adapter
        self.advertise_interval = advertise_interval
        self.tmp = Path(tempfile.mkdtemp(prefix="fleetgate-bluez-"))
        self.socket_path = self.tmp / "system_bus_socket"
        self.address = f"unix:path={self.socket_path}"
        self.env = {"DBUS_SYSTEM_BUS_ADDRESS": self.address}
        self.log_path = self.tmp / "mock.log"
        self.bus_log_path = self.tmp / "dbus-daemon.log"
        self.peripherals: dict[str, Peripheral] = {}
        self._bus_proc: subprocess.Popen[bytes] | None = None
        self._mock_proc: subprocess.Popen[bytes] | None = None
        self._conn: Any = None
        self._control: Any = None
        self._saved_env: str | None = None
        self._env_set = False
        self._finalizer = weakref.finalize(self, BlueZ._cleanup, [], self.tmp)

    @staticmethod
    def _cleanup(procs: list[subprocess.Popen[bytes]], tmp: Path) -> None:
        for proc in procs:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> BlueZ:
        try:
            self._start_bus()
            self._start_mock()
        except BaseException:
            self.close()
            raise
        self._saved_env = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        self._env_set = True
        return self

    def _spawn(
        self, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=self.tmp,  # not the checkout: its top-level folders would shadow modules
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # the test process starts no threads that fork
            )
        procs = [p for p in (self._bus_proc, self._mock_proc, proc) if p is not None]
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, BlueZ._cleanup, procs, self.tmp)
        return proc

    def _start_bus(self) -> None:
        config = self.tmp / "system.conf"
        config.write_text(BUS_CONFIG.format(socket=self.socket_path))
        self._bus_proc = self._spawn(
            [DBUS_DAEMON, f"--config-file={config}", "--nofork", "--nopidfile", "--nosyslog"],
            self.bus_log_path,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._bus_proc.poll() is not None:
                raise RuntimeError(f"dbus-daemon exited with {self._bus_proc.returncode}:\n{self.bus_log}")
            if self.socket_path.exists():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    if probe.connect_ex(str(self.socket_path)) == 0:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"dbus-daemon did not listen within {START_TIMEOUT} s:\n{self.bus_log}")
            time.sleep(0.005)

    def _start_mock(self) -> None:
        params = {"adapter": self.adapter, "advertise_interval_ms": round(self.advertise_interval * 1000)}
        self._mock_proc = self._spawn(
            [sys.executable, "-m", "dbusmock", "--system", "-t", str(TEMPLATE), "-p", json.dumps(params)],
            self.log_path,
            env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
        )
        self._conn = dbus.bus.BusConnection(self.address)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._conn.name_has_owner(BUS_NAME):
            if self._mock_proc.poll() is not None:
                raise RuntimeError(f"the BlueZ mock exited with {self._mock_proc.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the BlueZ mock did not start within {START_TIMEOUT} s:\n{self.log}")
            time.sleep(0.005)
        root = self._conn.get_object(BUS_NAME, "/", introspect=False)
        self._control = dbus.Interface(root, CONTROL_IFACE)
        # answered once the template is loaded and the main loop runs
        objects = root.GetManagedObjects(dbus_interface="org.freedesktop.DBus.ObjectManager")
        if f"/org/bluez/{self.adapter}" not in objects:
            raise RuntimeError(f"the BlueZ mock has no adapter {self.adapter}:\n{self.log}")

    def close(self) -> None:
        if self._env_set:
            if self._saved_env is None:
                os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
            else:
                os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self._saved_env
            self._env_set = False
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = self._control = None
        _stop(self._mock_proc)  # it would also leave when the bus goes
        _stop(self._bus_proc)
        self._finalizer()

    def __enter__(self) -> BlueZ:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- peripherals ----------------------------------------------------------------------------------

    def control(self, method: str, *args: Any) -> Any:
        """Call a method of org.fleetgate.Mock (see the module docstring)."""
        if self._control is None:
            raise RuntimeError("BlueZ is not running")
        return getattr(self._control, method)(*args)

    def add_peripheral(
        self,
        address: str,
        *,
        name: str | None = None,
        rssi: int = -60,
        manufacturer_data: Mapping[int, bytes] | None = None,
        service_data: Mapping[str, bytes] | None = None,
        service_uuids: Iterable[str] | None = None,
        tx_power: int | None = None,
        address_type: str = "public",
        services: Iterable[Service] = (),
        rules: Iterable[Mapping[str, Any]] = (),
        mtu: int = 247,
        advertise: bool = True,
        profile: Mapping[str, Any] | None = None,
    ) -> Peripheral:
        """A peripheral, in range and advertising. ``manufacturer_data`` / ``service_uuids`` left at None: none,
        or the lock profile's (``profile=``); given (even empty), they replace the profile's."""
        config: dict[str, Any] = {
            "name": name,
            "rssi": rssi,
            "service_data": dict(service_data or {}),
            "tx_power": tx_power,
            "address_type": address_type,
            "services": list(services),
            "rules": list(rules),
            "mtu": mtu,
            "advertise": advertise,
        }
        if manufacturer_data is not None:
            config["manufacturer_data"] = dict(manufacturer_data)
        if service_uuids is not None:
            config["service_uuids"] = list(service_uuids)
        if profile is not None:
            config["profile"] = dict(profile)
        path = self.control("AddPeripheral", address, _json(config))
        peripheral = self.peripherals[address.upper()] = Peripheral(self, address, str(path))
        return peripheral

    # -- logs -----------------------------------------------------------------------------------------

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def bus_log(self) -> str:
        return self.bus_log_path.read_text(errors="replace") if self.bus_log_path.exists() else ""

    def __repr__(self) -> str:
        return f"<BlueZ {self.address} adapter={self.adapter}>"
