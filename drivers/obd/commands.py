"""The signal catalogue, and the OBD commands and decoders python-obd 0.7.3 lacks or gets wrong."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from obd import OBDCommand, Unit, commands
from obd.protocols import ECU

_VIN = re.compile(r"[A-Z0-9]{17}")


def odometer_km(data: bytes) -> float | None:
    """SAE J1979-DA PID A6: bytes A..D, (A*2^24 + B*2^16 + C*2^8 + D) / 10 km."""
    if len(data) < 4:
        return None
    return int.from_bytes(data[:4], "big") / 10


def decode_vin(payload: bytes) -> str | None:
    """The VIN in a mode 09 PID 02 payload, with or without its `49 02` and item-count bytes.

    python-obd's own decoder strips the characters 0, 1, 2, x and \\ from both ends of the text, so a VIN such
    as WP0ZZZ99ZTS390000 loses its tail; here only NUL padding (ISO-TP, legacy frames) is removed.
    """
    data = bytes(payload)
    if data[:2] == b"\x49\x02":
        data = data[2:]
    if data[:1] == b"\x01":  # number of data items; never a VIN character
        data = data[1:]
    text = data.strip(b"\x00").decode("ascii", "replace").strip().upper()
    return text if _VIN.fullmatch(text) else None


def _vin_decoder(messages: Sequence[Any]) -> str | None:
    for message in messages:
        vin = decode_vin(message.data)
        if vin is not None:
            return vin
    return None


def _odometer_decoder(messages: Sequence[Any]) -> Any:
    km = odometer_km(bytes(messages[0].data[2:]))
    return None if km is None else Unit.Quantity(km, Unit.kilometer)


def _pid_bitmap(messages: Sequence[Any]) -> frozenset[int]:
    """Union over the answering ECUs of a `41 xx` supported-PIDs bitmap, as absolute PID numbers."""
    pids: set[int] = set()
    for message in messages:
        base, bits = message.data[1], bytes(message.data[2:6])
        if len(bits) == 4:
            word = int.from_bytes(bits, "big")
            pids.update(base + i + 1 for i in range(32) if word & (1 << (31 - i)))
    return frozenset(pids)


# bytes=0 everywhere: python-obd would otherwise pad an adapter's text answer ("NO DATA") into fake data.
ODOMETER = OBDCommand("ODOMETER", "Odometer", b"01A6", 0, _odometer_decoder, ECU.ALL, True)
VIN_RAW = OBDCommand(
    "VIN_RAW", "Vehicle Identification Number, raw", b"0902", 0, _vin_decoder, ECU.ALL, False
)
# Mode 01 supported-PID bitmaps 0100, 0120, ... 01E0; python-obd only knows the first three.
PID_BITMAPS = tuple(
    OBDCommand(
        f"PIDS_01_{base:02X}", "Supported PIDs", f"01{base:02X}".encode(), 0, _pid_bitmap, ECU.ALL, True
    )
    for base in range(0x00, 0x100, 0x20)
)

SIGNALS: dict[str, tuple[OBDCommand, str]] = {
    "vehicle_speed": (commands.SPEED, "km/h"),
    "rpm": (commands.RPM, "rpm"),
    "engine_load": (commands.ENGINE_LOAD, "%"),
    "throttle_position": (commands.THROTTLE_POS, "%"),
    "coolant_temp": (commands.COOLANT_TEMP, "degC"),
    "fuel_level": (commands.FUEL_LEVEL, "%"),
    "control_module_voltage": (commands.CONTROL_MODULE_VOLTAGE, "V"),
    "bms_pack_soc": (commands.HYBRID_BATTERY_REMAINING, "%"),
    "odometer": (ODOMETER, "km"),
}

# Catalogue unit -> the unit python-obd's Pint registry converts to.
PINT_UNITS: dict[str, Any] = {
    "km/h": Unit.kilometer_per_hour,
    "rpm": Unit.revolutions_per_minute,
    "%": Unit.percent,
    "degC": Unit.degree_Celsius,
    "V": Unit.volt,
    "km": Unit.kilometer,
}
