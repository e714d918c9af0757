"""python-dbusmock template: bluetoothd (BlueZ 5) as bleak's BlueZ D-Bus backend sees it, with scriptable LE
peripherals. Loaded by path (``python -m dbusmock --system -t tests/bluez_template.py``) by tests/bluez_mock.py,
whose docstring documents the control interface ``org.fleetgate.Mock`` on ``/``; it runs in the mock process.

On top of the stock ``bluez5`` template (its ``load()`` gives ``/org/bluez`` with AgentManager1 and
ProfileManager1), this has its own adapter, device and GATT objects, because bleak needs what the stock ones
lack: ManufacturerData typed ``a{qv}`` and ServiceData ``a{sv}``; GattService1 / GattCharacteristic1 objects
added on Connect, then ServicesResolved=True; ReadValue / WriteValue / StartNotify / StopNotify, notifications
as PropertiesChanged(Value); and advertising repeated every ``advertise_interval_ms`` while the adapter
discovers (bleak may subscribe after discovery has started, and a one-shot advertisement is then missed).

Parameters (``-p`` JSON): ``adapter`` (default "hci0"), ``advertise_interval_ms`` (default 100).
"""

import ctypes
import functools
import hashlib
import hmac
import itertools
import json
import os
import sys
import time
import traceback

import dbus
import dbus.service
from dbusmock import mockobject
from dbusmock.mockobject import OBJECT_MANAGER_IFACE, DBusMockObject
from dbusmock.templates import bluez5

BUS_NAME = bluez5.BUS_NAME
MAIN_OBJ = bluez5.MAIN_OBJ
SYSTEM_BUS = True
IS_OBJECT_MANAGER = True

CONTROL_IFACE = "org.fleetgate.Mock"
ADAPTER_IFACE = "org.bluez.Adapter1"
DEVICE_IFACE = "org.bluez.Device1"
SERVICE_IFACE = "org.bluez.GattService1"
CHAR_IFACE = "org.bluez.GattCharacteristic1"
ERR = "org.bluez.Error."
BASE_UUID_TAIL = "-0000-1000-8000-00805f9b34fb"
DEFAULT_CONNECT_ERROR = "Software caused connection abort"

_state = {"main": None, "adapter": None, "interval_ms": 100}
_peripherals = {}  # address (upper case) -> _Peripheral


# -- timers on the mock's GLib main loop (dbusmock's __main__ iterates the default GLib context) ----------

_glib = ctypes.CDLL("libglib-2.0.so.0")
_SOURCE_FUNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_glib.g_timeout_add.argtypes = [ctypes.c_uint, _SOURCE_FUNC, ctypes.c_void_p]
_glib.g_timeout_add.restype = ctypes.c_uint
_timers = {}  # key -> (function, repeat); one C thunk (below) serves them all, so none is freed while running
_timer_keys = itertools.count(1)


def _run_timer(key):
    fn, repeat = _timers.get(key, (None, False))
    if fn is None:
        return 0  # cancelled
    try:
        fn()
    except Exception:
        traceback.print_exc(file=sys.stderr)
    if repeat and key in _timers:
        return 1
    _timers.pop(key, None)
    return 0


_timer_thunk = _SOURCE_FUNC(_run_timer)


def _later(ms, fn, repeat=False):
    """Run ``fn`` from the main loop after ``ms`` milliseconds (0: after the current D-Bus reply is sent)."""
    key = next(_timer_keys)
    _timers[key] = (fn, repeat)
    _glib.g_timeout_add(max(0, int(ms)), _timer_thunk, key)
    return key


def _cancel(key):
    _timers.pop(key, None)


# -- helpers ----------------------------------------------------------------------------------------------


def _uuid(value):
    value = str(value).lower()
    if len(value) == 4:
        return f"0000{value}{BASE_UUID_TAIL}"
    if len(value) == 8:
        return f"{value}{BASE_UUID_TAIL}"
    return value


def _ay(data):
    return dbus.Array([dbus.Byte(b) for b in data], signature="y")


def _error(name, message=""):
    return dbus.exceptions.DBusException(message, name=name if "." in name else ERR + name)


def _set_props(obj, iface, changed, invalidated=()):
    """Set properties and emit PropertiesChanged, as bluetoothd does (adds properties that are missing)."""
    obj.props.setdefault(iface, {}).update(changed)
    for name in invalidated:
        obj.props[iface].pop(name, None)
    obj.EmitSignal(
        dbus.PROPERTIES_IFACE,
        "PropertiesChanged",
        "sa{sv}as",
        [iface, dbus.Dictionary(changed, signature="sv"), dbus.Array(invalidated, signature="s")],
    )


def _add_object(path, iface, props, mock_class=DBusMockObject, mock_data=None):
    main = _state["main"]
    main.AddObject(path, iface, props, [], mock_class=mock_class, mock_data=mock_data)
    main.EmitSignal(
        OBJECT_MANAGER_IFACE,
        "InterfacesAdded",
        "oa{sa{sv}}",
        [dbus.ObjectPath(path), dbus.Dictionary({iface: props}, signature="sa{sv}")],
    )
    return mockobject.objects[path]


def _remove_object(path, iface):
    if path not in mockobject.objects:
        return
    main = _state["main"]
    main.RemoveObject(path)
    main.EmitSignal(
        OBJECT_MANAGER_IFACE, "InterfacesRemoved", "oas", [dbus.ObjectPath(path), dbus.Array([iface], "s")]
    )


class _Missing(Exception):
    """A rule refers to a variable that is not set (yet): the rule does not match."""


def _eval(expr, peripheral, written):
    """Bytes from a value expression (see tests/bluez_mock.py)."""
    if isinstance(expr, list):
        return b"".join(_eval(part, peripheral, written) for part in expr)
    if isinstance(expr, str):
        return bytes.fromhex(expr)
    if isinstance(expr, dict):
        if "hex" in expr:
            return bytes.fromhex(expr["hex"])
        if "text" in expr:
            return expr["text"].encode()
        if "var" in expr:
            try:
                return peripheral.vars[expr["var"]]
            except KeyError:
                raise _Missing(expr["var"]) from None
        if "random" in expr:
            return os.urandom(int(expr["random"]))
        if "written" in expr:
            start, end = ([*expr["written"], None])[:2]
            return written[start:end]
        if "hmac_sha256" in expr:
            key = _eval(expr.get("key", []), peripheral, written)
            digest = hmac.new(key, _eval(expr["hmac_sha256"], peripheral, written), hashlib.sha256).digest()
            return digest[: int(expr.get("len", 32))]
    raise ValueError(f"not a value expression: {expr!r}")


# -- the fleetgate BLE lock profile (docs/ble-profile.md), written from that text alone ----------------------
# Independent of fleetgate's own code on purpose: the gateway's central side is tested against this.

FG_SERVICE = "f1ee7001-5e9a-4c1b-9a07-6a7c0de0b1e0"
FG_COMMAND = "f1ee7002-5e9a-4c1b-9a07-6a7c0de0b1e0"  # write (with response)
FG_EVENT = "f1ee7003-5e9a-4c1b-9a07-6a7c0de0b1e0"  # notify
FG_COMPANY = 0xFFFF
FG_ADV_PREFIX = b"FG\x01"  # then the iotCode in ASCII
FG_START = 0xA5
FG_HELLO, FG_CHALLENGE, FG_AUTH, FG_RESULT, FG_ERROR = 0x01, 0x02, 0x03, 0x04, 0x7F
FG_OK, FG_AUTH_FAILED, FG_UNSUPPORTED, FG_BUSY, FG_REFUSED, FG_BAD_FRAME, FG_INTERNAL = range(7)
FG_OPS = {
    0x01: "unlock",
    0x02: "lock",
    0x03: "start-rental",
    0x04: "end-rental",
    0x05: "saddle",
    0x06: "tailbox",
    0x07: "battery-cover",
}
FG_MAC_LABEL = b"fleetgate-ble/v1"
FG_MAX_AUTH_FAILURES = 3


def fg_crc16(data):
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, not reflected, no final XOR."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


assert fg_crc16(b"123456789") == 0x29B1


def fg_frame(ftype, seq, payload, garble=False):
    """0xA5 | type | seq | len | payload | crc (big endian) over type..payload; ``garble``: a wrong CRC."""
    body = bytes([ftype, seq & 0xFF, len(payload)]) + bytes(payload)
    crc = fg_crc16(body) ^ (0xA55A if garble else 0)
    return bytes([FG_START]) + body + crc.to_bytes(2, "big")


def fg_parse(data):
    """(type, seq, payload) of a well-formed frame, else None (start byte, length or CRC wrong)."""
    if len(data) < 6 or data[0] != FG_START or len(data) != 6 + data[3]:
        return None
    if fg_crc16(data[1:-2]) != int.from_bytes(data[-2:], "big"):
        return None
    return data[1], data[2], bytes(data[4:-2])


def fg_mac(key, iot_code, nonce, op, seq):
    message = FG_MAC_LABEL + iot_code.encode("ascii") + bytes(nonce) + bytes([op, seq & 0xFF])
    return hmac.new(key.encode("ascii"), message, hashlib.sha256).digest()[:8]


class _LockProfile:
    """The scooter's side of the fleetgate profile, with fault injection (see tests/bluez_mock.py)."""

    def __init__(self, peripheral, config):
        name = config.get("name", "fleetgate")
        if name != "fleetgate":
            raise ValueError(f"unknown BLE profile {name!r}")
        self.peripheral = peripheral
        self.key = str(config.get("key", ""))
        self.iot_code = str(config.get("iot_code", ""))
        self.locked = bool(config.get("locked", True))
        self.rental = bool(config.get("rental", False))
        self.unsupported = {int(op) for op in config.get("unsupported", [])}
        self.busy = bool(config.get("busy", False))
        self.refuse = bool(config.get("refuse", False))
        self.delay_ms = int(config.get("delay_ms", 0))
        self.nonce_ttl_s = float(config.get("nonce_ttl_s", 5.0))
        self.pending = None  # the nonce issued on this connection: {"nonce", "op", "seq", "at"}
        self.auth_failures = 0  # on this connection (reset when a connection starts)
        self.auth_failures_total = 0
        self.ops = []  # the operations done, by name, in order
        self.received = []  # every frame written to the command characteristic, hex
        self.sent = []  # every notification attempted: {"frame": hex, "delivered": bool}
        self.garble = 0
        self.stale = 0
        self.silent = 0
        self.silent_process = False
        self.drop = None  # {"op", "times", "run"}

    def advertisement_defaults(self):
        return {
            "service_uuids": [FG_SERVICE],
            "manufacturer_data": {str(FG_COMPANY): (FG_ADV_PREFIX + self.iot_code.encode("ascii")).hex()},
        }

    @staticmethod
    def service():
        return {
            "uuid": FG_SERVICE,
            "primary": True,
            "characteristics": [
                {"uuid": FG_COMMAND, "flags": ["write"]},
                {"uuid": FG_EVENT, "flags": ["notify"]},
            ],
        }

    def update(self, changes):
        for key, value in changes.items():
            if key == "key":
                self.key = str(value)
            elif key == "iot_code":
                self.iot_code = str(value)
            elif key in ("locked", "rental", "busy", "refuse"):
                setattr(self, key, bool(value))
            elif key == "unsupported":
                self.unsupported = {int(op) for op in value}
            elif key == "delay_ms":
                self.delay_ms = int(value)
            elif key == "nonce_ttl_s":
                self.nonce_ttl_s = float(value)
            else:
                raise ValueError(f"not a profile setting: {key}")

    @property
    def state_bits(self):
        return (0x01 if self.locked else 0) | (0x02 if self.rental else 0)

    def connected(self):
        self.pending = None
        self.auth_failures = 0

    def disconnected(self):
        self.pending = None

    # frames in

    def written(self, data):
        self.received.append(data.hex())
        silent = self.silent > 0
        if silent:
            self.silent -= 1
            if not self.silent_process:
                return  # lost on the way: not processed, no answer
        answer, drop = self._handle(data)
        frames = self._outgoing(*answer) if answer is not None and not silent else []
        if not frames and not drop:
            return

        def send():
            for frame in frames:
                delivered = self.peripheral.notify(FG_EVENT, frame)
                self.sent.append({"frame": frame.hex(), "delivered": delivered})
            if drop:
                self.peripheral.disconnect()

        _later(self.delay_ms if frames else 0, send)  # after the write's reply

    def _handle(self, data):
        """The answer (type, seq, payload) or None, and whether the scooter drops the link afterwards."""
        frame = fg_parse(data)
        if frame is None:
            return (FG_ERROR, data[2] if len(data) > 2 else 0, bytes([FG_BAD_FRAME])), False
        ftype, seq, payload = frame
        if ftype == FG_HELLO and len(payload) == 1:
            return self._hello(seq, payload[0]), False
        if ftype == FG_AUTH and len(payload) == 9:
            return self._auth(seq, payload[0], payload[1:])
        return (FG_ERROR, seq, bytes([FG_BAD_FRAME])), False

    def _hello(self, seq, op):
        if op not in FG_OPS or op in self.unsupported:
            self.pending = None
            return FG_RESULT, seq, bytes([op, FG_UNSUPPORTED, self.state_bits])
        nonce = os.urandom(8)
        self.pending = {"nonce": nonce, "op": op, "seq": seq, "at": time.monotonic()}
        return FG_CHALLENGE, seq, nonce

    def _auth(self, seq, op, mac):
        pending, self.pending = self.pending, None  # the nonce is spent, whatever the result
        drop = self.drop is not None and self.drop["op"] == op
        if drop:
            self.drop["times"] -= 1
            run = self.drop["run"]
            if self.drop["times"] <= 0:
                self.drop = None
            if run:
                self._check_and_run(pending, seq, op, mac)
            return None, True  # out of range before answering
        status = self._check_and_run(pending, seq, op, mac)
        answer = (FG_RESULT, seq, bytes([op, status, self.state_bits]))
        return answer, status == FG_AUTH_FAILED and self.auth_failures >= FG_MAX_AUTH_FAILURES

    def _check_and_run(self, pending, seq, op, mac):
        fresh = pending is not None and time.monotonic() - pending["at"] <= self.nonce_ttl_s
        if fresh:
            expected = fg_mac(self.key, self.iot_code, pending["nonce"], pending["op"], pending["seq"])
        else:
            expected = os.urandom(8)  # compare anyway: the same time whatever failed
        mac_ok = hmac.compare_digest(bytes(mac), expected)
        if not (fresh and mac_ok and op == pending["op"] and seq == pending["seq"]):
            self.auth_failures += 1
            self.auth_failures_total += 1
            return FG_AUTH_FAILED
        if self.busy:
            return FG_BUSY
        if self.refuse:
            return FG_REFUSED
        if op == 0x01:
            self.locked = False
        elif op == 0x02:
            self.locked = True
        elif op == 0x03:
            self.rental, self.locked = True, False
        elif op == 0x04:
            self.rental, self.locked = False, True
        self.ops.append(FG_OPS[op])
        return FG_OK

    # frames out, with the faults asked for

    def _outgoing(self, ftype, seq, payload):
        frames = []
        if self.stale > 0:
            self.stale -= 1
            # an answer from an earlier exchange: the previous seq, and a payload that would mislead
            if ftype == FG_CHALLENGE:
                misleading = os.urandom(8)
            elif ftype == FG_RESULT:
                misleading = bytes([payload[0], FG_INTERNAL, payload[2]])
            else:
                misleading = bytes([FG_INTERNAL])
            frames.append(fg_frame(ftype, (seq - 1) & 0xFF, misleading))
        garble = self.garble > 0
        if garble:
            self.garble -= 1
        frames.append(fg_frame(ftype, seq, payload, garble=garble))
        return frames

    def state(self):
        return {
            "name": "fleetgate",
            "iot_code": self.iot_code,
            "locked": self.locked,
            "rental": self.rental,
            "state": self.state_bits,
            "busy": self.busy,
            "refuse": self.refuse,
            "unsupported": sorted(self.unsupported),
            "auth_failures": self.auth_failures,
            "auth_failures_total": self.auth_failures_total,
            "ops": list(self.ops),
            "nonce_pending": self.pending is not None,
            "received": list(self.received),
            "sent": list(self.sent),
            "faults": {
                "garble": self.garble,
                "stale": self.stale,
                "silent": self.silent,
                "drop_on": dict(self.drop) if self.drop else None,
            },
        }


# -- the peripherals (state lives here, in the mock process) ----------------------------------------------


class _Peripheral:
    def __init__(self, address, config):
        self.address = address.upper()
        self.profile = _LockProfile(self, config["profile"]) if config.get("profile") else None
        self.adv = {}
        self.update_advertisement(
            {
                "name": None,
                "rssi": -60,
                "manufacturer_data": {},
                "service_data": {},
                "service_uuids": [],
                "tx_power": None,
                "address_type": "public",
                **(self.profile.advertisement_defaults() if self.profile else {}),
                **{
                    k: v
                    for k, v in config.items()
                    if k not in ("services", "rules", "mtu", "profile") and v is not None
                },
            }
        )
        services = list(config.get("services", []))
        if self.profile and not any(_uuid(s["uuid"]) == FG_SERVICE for s in services):
            services.append(self.profile.service())
        self.services = services
        self.rules = config.get("rules", [])
        self.mtu = int(config.get("mtu", 247))
        self.values = {}  # char uuid -> bytes, what a read returns (the peripheral's own state)
        self.set_services(self.services)
        self.vars = {}  # rule variables; cleared on disconnect
        self.in_range = True
        self.connected = False
        self.fail_connects = 0
        self.fail_message = DEFAULT_CONNECT_ERROR
        self.connect_delay_ms = 0
        self.pending_connect = None  # (timer key, err callback)
        self.connect_calls = 0
        self.ticks = 0
        self.char_objs = {}  # uuid -> characteristic object, while connected
        self.gatt_paths = []  # (path, iface) in creation order, while connected
        self.writes = []

    @property
    def device_path(self):
        return f"{_state['adapter'].path}/dev_{self.address.replace(':', '_')}"

    @property
    def device(self):
        return mockobject.objects.get(self.device_path)

    def update_advertisement(self, changes):
        for key, value in changes.items():
            if key == "service_uuids":
                value = [_uuid(u) for u in value]
            elif key == "service_data":
                value = {_uuid(u): bytes.fromhex(v) for u, v in value.items()}
            elif key == "manufacturer_data":
                value = {int(k): bytes.fromhex(v) for k, v in value.items()}
            self.adv[key] = value

    def set_services(self, services):
        self.services = services
        for service in services:
            for char in service.get("characteristics", []):
                self.values.setdefault(_uuid(char["uuid"]), bytes.fromhex(char.get("value", "")))

    def adv_props(self):
        """The Device1 properties that come from an advertisement, RSSI changing on each one."""
        adv = self.adv
        props = {
            "RSSI": dbus.Int16(int(adv["rssi"]) - self.ticks % 3),
            "UUIDs": dbus.Array(adv["service_uuids"], signature="s"),
        }
        if adv["name"]:
            props["Name"] = dbus.String(adv["name"])
            props["Alias"] = dbus.String(adv["name"])
        if adv["tx_power"] is not None:
            props["TxPower"] = dbus.Int16(int(adv["tx_power"]))
        if adv["manufacturer_data"]:
            props["ManufacturerData"] = dbus.Dictionary(
                {dbus.UInt16(k): _ay(v) for k, v in adv["manufacturer_data"].items()}, signature="qv"
            )
        if adv["service_data"]:
            props["ServiceData"] = dbus.Dictionary(
                {dbus.String(k): _ay(v) for k, v in adv["service_data"].items()}, signature="sv"
            )
        return props

    def advertise(self):
        """One advertisement received by the adapter: the device appears, or its properties change."""
        self.ticks += 1
        props = self.adv_props()
        device = self.device
        if device is None:
            props.update(
                {
                    "Address": dbus.String(self.address),
                    "AddressType": dbus.String(self.adv["address_type"]),
                    "Alias": props.get("Alias", dbus.String(self.address.replace(":", "-"))),
                    "Paired": dbus.Boolean(False),
                    "Bonded": dbus.Boolean(False),
                    "Trusted": dbus.Boolean(False),
                    "Blocked": dbus.Boolean(False),
                    "LegacyPairing": dbus.Boolean(False),
                    "Connected": dbus.Boolean(False),
                    "ServicesResolved": dbus.Boolean(False),
                    "Adapter": dbus.ObjectPath(_state["adapter"].path),
                    "AdvertisingFlags": _ay(b"\x06"),
                }
            )
            _add_object(self.device_path, DEVICE_IFACE, props, mock_class=_Device, mock_data=self)
            return
        current = device.props[DEVICE_IFACE]
        changed = {k: v for k, v in props.items() if k not in current or current[k] != v}
        if changed:
            _set_props(device, DEVICE_IFACE, changed)

    # connection

    def connect(self, ok, err):
        if self.connected:
            err(_error("AlreadyConnected", "Already Connected"))
            return
        if self.pending_connect is not None:
            err(_error("InProgress", "In Progress"))
            return
        self.connect_calls += 1

        def finish():
            self.pending_connect = None
            if not self.in_range:
                err(_error("Failed", self.fail_message))
            elif self.fail_connects > 0:
                self.fail_connects -= 1
                err(_error("Failed", self.fail_message))
            else:
                self.connected = True
                if self.profile:
                    self.profile.connected()
                _set_props(self.device, DEVICE_IFACE, {"Connected": dbus.Boolean(True)})
                ok()
                _later(0, self.resolve_services)

        if self.connect_delay_ms:
            self.pending_connect = (_later(self.connect_delay_ms, finish), err)
        else:
            finish()

    def resolve_services(self):
        if not self.connected:
            return
        handle = 0x000A
        for service in self.services:
            service_path = f"{self.device_path}/service{handle:04x}"
            handle += 1
            self._add_gatt(
                service_path,
                SERVICE_IFACE,
                {
                    "UUID": dbus.String(_uuid(service["uuid"])),
                    "Device": dbus.ObjectPath(self.device_path),
                    "Primary": dbus.Boolean(service.get("primary", True)),
                    "Includes": dbus.Array([], signature="o"),
                },
            )
            for char in service.get("characteristics", []):
                uuid = _uuid(char["uuid"])
                flags = list(char.get("flags", ["read"]))
                props = {
                    "UUID": dbus.String(uuid),
                    "Service": dbus.ObjectPath(service_path),
                    "Value": _ay(b""),
                    "Flags": dbus.Array(flags, signature="s"),
                    "MTU": dbus.UInt16(self.mtu),
                }
                if "notify" in flags or "indicate" in flags:
                    props["Notifying"] = dbus.Boolean(False)
                path = f"{service_path}/char{handle:04x}"
                handle += 3 if "Notifying" in props else 2  # declaration, value (and the CCCD)
                obj = self._add_gatt(path, CHAR_IFACE, props, _Characteristic, (self, uuid))
                self.char_objs.setdefault(uuid, obj)
        _set_props(self.device, DEVICE_IFACE, {"ServicesResolved": dbus.Boolean(True)})

    def _add_gatt(self, path, iface, props, mock_class=DBusMockObject, mock_data=None):
        self.gatt_paths.append((path, iface))
        return _add_object(path, iface, props, mock_class, mock_data)

    def disconnect(self):
        """The link is gone (either side): GATT objects removed, then Connected=False, as bluetoothd does."""
        if self.pending_connect is not None:
            key, err = self.pending_connect
            self.pending_connect = None
            _cancel(key)
            err(_error("Failed", "Operation was cancelled"))
        if not self.connected:
            return
        self.connected = False
        self.vars.clear()
        if self.profile:
            self.profile.disconnected()
        device = self.device
        _set_props(device, DEVICE_IFACE, {"ServicesResolved": dbus.Boolean(False)})
        for path, iface in reversed(self.gatt_paths):
            _remove_object(path, iface)
        self.gatt_paths = []
        self.char_objs = {}
        _set_props(device, DEVICE_IFACE, {"Connected": dbus.Boolean(False)})

    def remove_device(self):
        self.disconnect()
        _remove_object(self.device_path, DEVICE_IFACE)

    # GATT

    def notify(self, uuid, value):
        """The peripheral sends a notification; dropped unless the client enabled them (StartNotify)."""
        obj = self.char_objs.get(uuid)
        if not self.connected or obj is None or not obj.props[CHAR_IFACE].get("Notifying"):
            return False
        _set_props(obj, CHAR_IFACE, {"Value": _ay(value)})
        return True

    def written(self, uuid, value, kind):
        self.writes.append({"char": uuid, "value": value.hex(), "type": kind})
        if self.profile and uuid == FG_COMMAND:
            self.profile.written(value)
            return
        for rule in self.rules:
            if _uuid(rule["on"]) != uuid:
                continue
            try:
                if "prefix" in rule and not value.startswith(_eval(rule["prefix"], self, value)):
                    continue
                if "equals" in rule and value != _eval(rule["equals"], self, value):
                    continue
            except _Missing:
                continue
            self._apply(rule, value)
            return

    def _apply(self, rule, value):
        if "error" in rule:
            raise _error(rule["error"], rule.get("error_message", ""))
        for name, expr in rule.get("save", {}).items():
            self.vars[name] = _eval(expr, self, value)
        for uuid, expr in rule.get("set", {}).items():
            self.values[_uuid(uuid)] = _eval(expr, self, value)
        notes = rule.get("notify", [])
        last = 0
        for note in notes if isinstance(notes, list) else [notes]:
            data = _eval(note["value"], self, value)
            delay = int(note.get("delay_ms", 0))
            last = max(last, delay)
            _later(delay, functools.partial(self.notify, _uuid(note["char"]), data))
        if rule.get("disconnect"):
            extra = 0 if rule["disconnect"] is True else int(rule["disconnect"])
            _later(last + extra, self.disconnect)  # after the notifications

    def state(self):
        return {
            "address": self.address,
            "device_path": self.device_path,
            "discovered": self.device is not None,
            "in_range": self.in_range,
            "connected": self.connected,
            "services_resolved": bool(self.device and self.device.props[DEVICE_IFACE]["ServicesResolved"]),
            "notifying": sorted(
                uuid for uuid, obj in self.char_objs.items() if obj.props[CHAR_IFACE].get("Notifying")
            ),
            "connect_calls": self.connect_calls,
            "fail_connects": self.fail_connects,
            "vars": {k: v.hex() for k, v in self.vars.items()},
            "values": {k: v.hex() for k, v in self.values.items()},
            "discovering": bool(_state["adapter"].props[ADAPTER_IFACE]["Discovering"]),
            "profile": self.profile.state() if self.profile else None,
        }


# -- D-Bus objects ----------------------------------------------------------------------------------------


class _Adapter(DBusMockObject):
    """org.bluez.Adapter1 with per-client discovery sessions, as bluetoothd keeps them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sessions = set()

    def _discovering(self, on):
        if bool(self.props[ADAPTER_IFACE]["Discovering"]) != on:
            _set_props(self, ADAPTER_IFACE, {"Discovering": dbus.Boolean(on)})

    @dbus.service.method(ADAPTER_IFACE, in_signature="", out_signature="", sender_keyword="sender")
    def StartDiscovery(self, sender=None):
        if sender in self.sessions:
            # bluetoothd: "Every client can only start one discovery" (btd_error_busy); so one process (one
            # bus connection, as bleak has per event loop) cannot run two scanners at once
            raise _error("InProgress", "Operation already in progress")
        self.sessions.add(sender)

        def started():  # as bluetoothd: the reply, then Discovering=True, then the first advertisements
            if self.sessions:
                self._discovering(True)
                _advertise_all()

        _later(0, started)

    @dbus.service.method(ADAPTER_IFACE, in_signature="", out_signature="", sender_keyword="sender")
    def StopDiscovery(self, sender=None):
        if sender not in self.sessions:
            raise _error("Failed", "No discovery started")
        self.sessions.discard(sender)
        self._discovering(bool(self.sessions))

    def client_gone(self, name, _old, new):
        if not new and name in self.sessions:
            self.sessions.discard(name)
            self._discovering(bool(self.sessions))

    @dbus.service.method(ADAPTER_IFACE, in_signature="a{sv}", out_signature="")
    def SetDiscoveryFilter(self, _filter):
        pass

    @dbus.service.method(ADAPTER_IFACE, in_signature="", out_signature="as")
    def GetDiscoveryFilters(self):
        return ["UUIDs", "RSSI", "Pathloss", "Transport", "DuplicateData", "Discoverable", "Pattern"]

    @dbus.service.method(ADAPTER_IFACE, in_signature="o", out_signature="")
    def RemoveDevice(self, path):
        for peripheral in _peripherals.values():
            if peripheral.device_path == path and peripheral.device is not None:
                peripheral.remove_device()
                return
        raise _error("DoesNotExist", "Does Not Exist")


class _Device(DBusMockObject):
    @property
    def peripheral(self):
        return self.mock_data

    @dbus.service.method(DEVICE_IFACE, in_signature="", out_signature="", async_callbacks=("ok", "err"))
    def Connect(self, ok, err):
        self.peripheral.connect(ok, err)

    @dbus.service.method(DEVICE_IFACE, in_signature="", out_signature="")
    def Disconnect(self):
        if not self.peripheral.connected and self.peripheral.pending_connect is None:
            raise _error("NotConnected", "Not Connected")
        self.peripheral.disconnect()

    @dbus.service.method(DEVICE_IFACE, in_signature="", out_signature="")
    def Pair(self):
        if self.props[DEVICE_IFACE]["Paired"]:
            raise _error("AlreadyExists", "Already Exists")
        _set_props(self, DEVICE_IFACE, {"Paired": dbus.Boolean(True), "Bonded": dbus.Boolean(True)})

    @dbus.service.method(DEVICE_IFACE, in_signature="", out_signature="")
    def CancelPairing(self):
        pass


class _Characteristic(DBusMockObject):
    @property
    def peripheral(self):
        return self.mock_data[0]

    @property
    def uuid(self):
        return self.mock_data[1]

    def _flags(self):
        return self.props[CHAR_IFACE]["Flags"]

    @dbus.service.method(CHAR_IFACE, in_signature="a{sv}", out_signature="ay")
    def ReadValue(self, _options):
        if "read" not in self._flags():
            raise _error("NotPermitted", "Read not permitted")
        value = self.peripheral.values.get(self.uuid, b"")
        if bytes(self.props[CHAR_IFACE]["Value"]) != value:
            # bluetoothd caches what it read in Value and says so (a notified client sees it, too)
            _set_props(self, CHAR_IFACE, {"Value": _ay(value)})
        return _ay(value)

    @dbus.service.method(CHAR_IFACE, in_signature="aya{sv}", out_signature="")
    def WriteValue(self, value, options):
        kind = str(options.get("type", "request"))
        needed = "write-without-response" if kind == "command" else "write"
        if needed not in self._flags():
            raise _error("NotPermitted", "Write not permitted")
        if not self.peripheral.connected:
            raise _error("Failed", "Not connected")
        self.peripheral.written(self.uuid, bytes(value), kind)

    @dbus.service.method(CHAR_IFACE, in_signature="", out_signature="")
    def StartNotify(self):
        if "Notifying" not in self.props[CHAR_IFACE]:
            raise _error("NotSupported", "Operation is not supported")
        if not self.props[CHAR_IFACE]["Notifying"]:
            _set_props(self, CHAR_IFACE, {"Notifying": dbus.Boolean(True)})

    @dbus.service.method(CHAR_IFACE, in_signature="", out_signature="")
    def StopNotify(self):
        if "Notifying" not in self.props[CHAR_IFACE]:
            raise _error("NotSupported", "Operation is not supported")
        if self.props[CHAR_IFACE]["Notifying"]:
            _set_props(self, CHAR_IFACE, {"Notifying": dbus.Boolean(False)})


def _advertise_all():
    if not _state["adapter"].props[ADAPTER_IFACE]["Discovering"]:
        return
    for peripheral in _peripherals.values():
        # like most LE peripherals, these stop advertising while connected
        if peripheral.in_range and not peripheral.connected and peripheral.adv.get("advertise", True):
            peripheral.advertise()


def _add_adapter(name):
    address = "00:1A:7D:DA:71:0" + name[-1]
    props = {
        "Address": dbus.String(address),
        "AddressType": dbus.String("public"),
        "Name": dbus.String("fleetgate-test"),
        "Alias": dbus.String("fleetgate-test"),
        "Class": dbus.UInt32(0),
        "Powered": dbus.Boolean(True),
        "Discoverable": dbus.Boolean(False),
        "DiscoverableTimeout": dbus.UInt32(180),
        "Pairable": dbus.Boolean(True),
        "PairableTimeout": dbus.UInt32(0),
        "Discovering": dbus.Boolean(False),
        "UUIDs": dbus.Array(["00001800" + BASE_UUID_TAIL, "00001801" + BASE_UUID_TAIL], signature="s"),
        "Modalias": dbus.String("usb:v1D6Bp0246d054F"),
        "Roles": dbus.Array(["central", "peripheral"], signature="s"),
    }
    return _add_object(f"/org/bluez/{name}", ADAPTER_IFACE, props, mock_class=_Adapter)


def load(mock, parameters):
    bluez5.load(mock, parameters)  # /org/bluez: AgentManager1, ProfileManager1
    _state["main"] = mock
    _state["interval_ms"] = int(parameters.get("advertise_interval_ms", 100))
    adapter = _state["adapter"] = _add_adapter(str(parameters.get("adapter", "hci0")))
    mock.bus_name.get_bus().add_signal_receiver(
        adapter.client_gone,
        signal_name="NameOwnerChanged",
        dbus_interface="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
    )
    _later(_state["interval_ms"], _advertise_all, repeat=True)


# -- the control interface (documented in tests/bluez_mock.py) -------------------------------------------


def _peripheral(address):
    try:
        return _peripherals[str(address).upper()]
    except KeyError:
        raise _error(CONTROL_IFACE + ".NoSuchPeripheral", f"no peripheral {address}") from None


@dbus.service.method(CONTROL_IFACE, in_signature="ss", out_signature="s")
def AddPeripheral(_self, address, config_json):
    if str(address).upper() in _peripherals:
        raise _error(CONTROL_IFACE + ".Exists", f"peripheral {address} exists")
    try:
        peripheral = _Peripheral(str(address), json.loads(config_json))
    except (ValueError, KeyError, TypeError) as e:
        raise _error(CONTROL_IFACE + ".InvalidArguments", f"bad peripheral config: {e!r}") from None
    _peripherals[peripheral.address] = peripheral
    return peripheral.device_path


@dbus.service.method(CONTROL_IFACE, in_signature="ss", out_signature="")
def SetAdvertisement(_self, address, changes_json):
    _peripheral(address).update_advertisement(json.loads(changes_json))


@dbus.service.method(CONTROL_IFACE, in_signature="ss", out_signature="")
def SetServices(_self, address, services_json):
    _peripheral(address).set_services(json.loads(services_json))


@dbus.service.method(CONTROL_IFACE, in_signature="ss", out_signature="")
def SetResponder(_self, address, rules_json):
    _peripheral(address).rules = json.loads(rules_json)


@dbus.service.method(CONTROL_IFACE, in_signature="sb", out_signature="")
def GoOutOfRange(_self, address, remove):
    peripheral = _peripheral(address)
    peripheral.in_range = False
    if remove:
        peripheral.remove_device()
    else:
        peripheral.disconnect()


@dbus.service.method(CONTROL_IFACE, in_signature="s", out_signature="")
def ComeBack(_self, address):
    _peripheral(address).in_range = True


@dbus.service.method(CONTROL_IFACE, in_signature="sis", out_signature="")
def FailConnects(_self, address, count, message):
    peripheral = _peripheral(address)
    peripheral.fail_connects = int(count)
    peripheral.fail_message = str(message) or DEFAULT_CONNECT_ERROR


@dbus.service.method(CONTROL_IFACE, in_signature="si", out_signature="")
def SetConnectDelay(_self, address, ms):
    _peripheral(address).connect_delay_ms = int(ms)


@dbus.service.method(CONTROL_IFACE, in_signature="s", out_signature="")
def DropConnection(_self, address):
    _peripheral(address).disconnect()


@dbus.service.method(CONTROL_IFACE, in_signature="sss", out_signature="b")
def Notify(_self, address, char_uuid, value_hex):
    return _peripheral(address).notify(_uuid(char_uuid), bytes.fromhex(value_hex))


@dbus.service.method(CONTROL_IFACE, in_signature="sss", out_signature="")
def SetValue(_self, address, char_uuid, value_hex):
    _peripheral(address).values[_uuid(char_uuid)] = bytes.fromhex(value_hex)


@dbus.service.method(CONTROL_IFACE, in_signature="s", out_signature="s")
def GetWrites(_self, address):
    return json.dumps(_peripheral(address).writes)


@dbus.service.method(CONTROL_IFACE, in_signature="s", out_signature="s")
def GetState(_self, address):
    return json.dumps(_peripheral(address).state())


def _profile(address):
    peripheral = _peripheral(address)
    if peripheral.profile is None:
        raise _error(CONTROL_IFACE + ".NoProfile", f"peripheral {address} has no lock profile")
    return peripheral.profile


@dbus.service.method(CONTROL_IFACE, in_signature="ss", out_signature="")
def SetProfile(_self, address, changes_json):
    try:
        _profile(address).update(json.loads(changes_json))
    except ValueError as e:
        raise _error(CONTROL_IFACE + ".InvalidArguments", str(e)) from None


@dbus.service.method(CONTROL_IFACE, in_signature="si", out_signature="")
def GarbleNext(_self, address, count):
    _profile(address).garble = int(count)


@dbus.service.method(CONTROL_IFACE, in_signature="si", out_signature="")
def StaleNext(_self, address, count):
    _profile(address).stale = int(count)


@dbus.service.method(CONTROL_IFACE, in_signature="sib", out_signature="")
def SilentNext(_self, address, count, process):
    profile = _profile(address)
    profile.silent = int(count)
    profile.silent_process = bool(process)


@dbus.service.method(CONTROL_IFACE, in_signature="siib", out_signature="")
def DropOn(_self, address, op, times, run):
    profile = _profile(address)
    profile.drop = {"op": int(op), "times": int(times), "run": bool(run)} if op > 0 and times > 0 else None
