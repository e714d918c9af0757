"""The signal catalogue: every reading the gateway takes, its unit, its source and its cloud equivalents.

Configuration names signals by it (the OBD schedule), telemetry stamps readings with it, and the CLI prints it:
as in AWS IoT FleetWise, the catalogue is configuration data that every part reads, so it lives here.

docs/signals.md is generated from this table (``fleetgate signals``); a test keeps it current.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Signal:
    name: str
    unit: str
    source: str
    reef: str  # REEF managed-session telemetry field, "" if none
    vinli: str  # Vinli telemetry key, "" if none
    description: str


CATALOGUE: dict[str, Signal] = {
    s.name: s
    for s in (
        Signal("vehicle_speed", "km/h", "OBD 01 0D", "speed", "vehicleSpeed", "Vehicle speed sensor."),
        Signal("rpm", "rpm", "OBD 01 0C", "", "rpm", "Engine (or motor) speed."),
        Signal("engine_load", "%", "OBD 01 04", "", "calculatedLoadValue", "Calculated engine load."),
        Signal(
            "throttle_position",
            "%",
            "OBD 01 11",
            "",
            "absoluteThrottleSensorPosition",
            "Absolute throttle position.",
        ),
        Signal("coolant_temp", "degC", "OBD 01 05", "", "", "Engine coolant temperature."),
        Signal("fuel_level", "%", "OBD 01 2F", "", "", "Fuel tank level input."),
        Signal(
            "control_module_voltage", "V", "OBD 01 42", "", "", "Control module (vehicle system) voltage."
        ),
        Signal(
            "bms_pack_soc",
            "%",
            "OBD 01 5B",
            "bms_pack_soc",
            "",
            "Traction battery state of charge (hybrid/EV battery pack remaining life).",
        ),
        Signal("odometer", "km", "OBD 01 A6", "odometer", "", "Odometer as the vehicle reports it."),
        Signal(
            "adapter_voltage", "V", "ELM327 ATRV", "", "", "Supply voltage at the OBD port (12 V battery)."
        ),
        Signal(
            "gps_position",
            "deg,deg,m",
            "gpsd TPV",
            "gps_position",
            "location",
            'Object {"latitude", "longitude", "altitude"}: WGS84 degrees, altitude in metres above mean sea '
            "level (null without a 3D fix). Vinli's location is the GeoJSON Point [longitude, latitude].",
        ),
        Signal(
            "gps_speed", "km/h", "gpsd TPV speed", "", "", "Speed over ground (gpsd gives m/s; converted)."
        ),
        Signal(
            "gps_heading", "deg", "gpsd TPV track", "", "", "Course over ground, degrees from true north."
        ),
        Signal("gps_fix_mode", "mode", "gpsd TPV mode", "", "", "1 no fix, 2 2D fix, 3 3D fix."),
        Signal("gps_satellites", "count", "gpsd SKY uSat", "", "", "Satellites used in the fix."),
        Signal("gps_hdop", "", "gpsd SKY hdop", "", "", "Horizontal dilution of precision."),
    )
}


def signals_json() -> list[dict[str, str | None]]:
    """The catalogue as data (``fleetgate signals --json``); a missing REEF or Vinli name is null."""
    return [
        {"name": s.name, "unit": s.unit, "source": s.source, "reef": s.reef or None, "vinli": s.vinli or None,
         "description": s.description}
        for s in CATALOGUE.values()
    ]  # fmt: skip


def signals_markdown() -> str:
    lines = [
        "# Signal catalogue",
        "",
        "Generated from `config/signals.py` by `fleetgate signals`; a test keeps this file current.",
        "Every telemetry record carries one reading: `signal` (a name below), `value` in `unit`, and the",
        "record's wall time, monotonic time, boot id and time-trust flags (`docs/mqtt.md`, stream `telemetry`; its",
        'table "REEF session telemetry" says how each REEF field is filled from these readings).',
        "The REEF column names the field of `GET /managed-sessions/{id}/telemetry` the signal feeds; the",
        "Vinli column names the telemetry key a Vinli-style consumer expects.",
        "",
        "| signal | unit | source | REEF | Vinli | description |",
        "|---|---|---|---|---|---|",
    ]
    for s in CATALOGUE.values():
        reef = f"`{s.reef}`" if s.reef else ""
        vinli = f"`{s.vinli}`" if s.vinli else ""
        lines.append(f"| `{s.name}` | {s.unit} | {s.source} | {reef} | {vinli} | {s.description} |")
    return "\n".join(lines) + "\n"
