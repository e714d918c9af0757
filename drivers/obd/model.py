"""Values the OBD-II driver hands to the daemon."""

from __future__ import annotations

from dataclasses import dataclass


class ObdError(Exception):
    """The adapter is unreachable, unplugged or not answering at all: close it and reconnect."""


@dataclass(frozen=True, slots=True)
class Sample:
    signal: str  # catalogue name (SIGNALS)
    value: float  # in `unit`, full precision
    unit: str


@dataclass(frozen=True, slots=True)
class Dtc:
    code: str  # "P0104"
    description: str  # from python-obd's table; "" when it has none


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    port: str
    protocol: str  # python-obd's name, e.g. "ISO 15765-4 (CAN 11/500)"
    elm_version: str  # ATI, e.g. "ELM327 v1.5"
    vin: str | None  # None when the vehicle does not report one (mode 09 PID 02)
