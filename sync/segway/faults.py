"""The E-moped fault codes of the seed's Appendix 2, so a fault push can say what broke and where.

A fault push carries only ``code``; an operator reading "12" learns nothing, "drive: Motor Hall failure,
please check the motor ..." tells them which part to bring. The table is the seed's, word for word (its typo
"he brake switch" included: a test compares it with the seed, and a silent fix would hide a seed update).
"Reserved" codes are known codes with that description. Codes are strings, since the IoT box's are "E0".."E9".

``decode`` is lenient about form, not about meaning: it strips blanks, upper-cases the letter ("e1" is E1)
and drops leading zeros ("012" is 12, "E01" is E1), since the seed types ``code`` as a Number and a sender
may format it either way. A code that is not in the table is ``None``: Segway adds codes, the push is still
kept with its code, only without a description.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IOT = "IoT"
CENTRAL = "centralControl"
DRIVE = "drive"
BMS = "BMS"


@dataclass(frozen=True)
class Fault:
    code: str  # as the seed writes it: "E0".."E9", "10".."47"
    system: str  # the seed's system column: IoT, centralControl, drive, BMS
    description: str  # the seed's wording


_ROWS = [
    ("E0", IOT, "ECU communication error"),
    ("E1", IOT, "Backup battery abnormality"),
    ("E2", IOT, "RTC clock error"),
    ("E3", IOT, "File system error"),
    ("E4", IOT, "I2C communication error"),
    ("E5", IOT, "GNSS communication error"),
    ("E6", IOT, "4G Modem communication error"),
    ("E7", IOT, "Bluetooth communication error"),
    ("E8", IOT, "NFC communication error"),
    ("E9", IOT, "G-Sensor communication error"),
    (
        "10",
        CENTRAL,
        "ECU (Electronic Control Unit) communication error, please check the ECU, dashboard and the connecting cables",
    ),
    ("11", DRIVE, "Motor controller undervoltage protection, please charge before use"),
    ("12", DRIVE, "Motor Hall failure, please check the motor, motor controller and the connecting cables"),
    ("13", DRIVE, "MOS tube malfunction, please check the motor, motor controller and the connecting cables"),
    (
        "14",
        DRIVE,
        "Throttle malfunction, please check the throttle handle, motor controller and the connecting cables",
    ),
    (
        "15",
        DRIVE,
        "he brake switch is abnormal, please check the brake lever, motor controller and the connecting cables",
    ),
    ("16", CENTRAL, "An error occurred when saving the configuration, please replace the ECU"),
    ("17", CENTRAL, "Dashboard communication error, please check the LCD cables in the dashboard"),
    ("18", BMS, "Reserved"),
    ("19", BMS, "Lithium-ion battery 1 temperature sensor error, please check the battery"),
    (
        "20",
        BMS,
        "Lithium-ion battery 1 communication error, please check the dashboard, battery and the connecting cables",
    ),
    (
        "21",
        BMS,
        "Lithium-ion battery 1 has the default serial number, please confirm whether it is a genuine battery",
    ),
    ("22", BMS, "Lithium-ion battery 1 password error, please confirm whether it is a genuine battery"),
    ("23", BMS, "Lithium-ion battery 2 temperature sensor error, please check the battery"),
    (
        "24",
        BMS,
        "Lithium-ion battery 2 communication error, please check the dashboard, battery and the connecting cables",
    ),
    (
        "25",
        BMS,
        "Lithium-ion battery 2 has the default serial number, please confirm whether it is a genuine battery",
    ),
    ("26", BMS, "Lithium-ion battery 2 password error, please confirm whether it is a genuine battery"),
    ("27", BMS, "Reserved"),
    ("28", BMS, "Reserved"),
    ("29", BMS, "Reserved"),
    ("30", BMS, "Reserved"),
    (
        "31",
        CENTRAL,
        "The vehicle has the default serial number, please confirm whether it is a genuine product",
    ),
    ("32", CENTRAL, "Vehicle password error, please confirm whether it is a genuine product"),
    ("33", CENTRAL, "Program error. The dashboard program upgrade has failed"),
    ("34", CENTRAL, "Abnormal vehicle temperature detection, please check the dashboard temperature sensor"),
    (
        "35",
        CENTRAL,
        "Dashboard and ECU communication error, please check the ECU, dashboard and the connecting cables",
    ),
    ("36", CENTRAL, "Reserved"),
    ("37", CENTRAL, "Reserved"),
    (
        "38",
        CENTRAL,
        "Electric lock malfunction, please check whether the cables are short-circuited or broken",
    ),
    ("39", CENTRAL, "The storage compartment is not locked"),
    ("40", CENTRAL, "Reserved"),
    (
        "41",
        CENTRAL,
        "The handlebar lock is not in place. Please restart the vehicle and move the handlebar so that the lock "
        "pin is retracted",
    ),
    ("42", CENTRAL, "The tail box is not locked"),
    ("43", CENTRAL, "Reserved"),
    ("44", CENTRAL, "Reserved"),
    ("45", CENTRAL, "Reserved"),
    ("46", CENTRAL, "Reserved"),
    ("47", CENTRAL, "Battery compartment is unlocked"),
]

FAULTS: dict[str, Fault] = {code: Fault(code, system, description) for code, system, description in _ROWS}
_FORM = re.compile(r"(E?)([0-9]{1,6})")


def decode(code: str) -> Fault | None:
    """The fault ``code`` names (blanks, letter case and leading zeros aside), or None when it is not known."""
    match = _FORM.fullmatch(code.strip().upper())
    if match is None:
        return None
    return FAULTS.get(match[1] + str(int(match[2])))
