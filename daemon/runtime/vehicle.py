"""The vehicle this gateway is in, as the vehicle itself says (OBD-II 09 02), for the features that must
know: managed sessions are for one VIN, and a gateway moved to another vehicle must not start it with the
old vehicle's PINs (daemon/access, docs/security.md)."""

from __future__ import annotations

VIN_STATE_KEY = "vehicle.vin"  # the last VIN read over OBD (written by daemon/telemetry/obd_sampler.py)


class VehicleIdentity:
    """The last VIN read: this run's (``source`` "obd"), else the one saved by an earlier run ("saved"),
    else unknown (None: no OBD adapter, or it never answered 09 02)."""

    def __init__(self) -> None:
        self.vin: str | None = None
        self.source: str | None = None

    def observe(self, vin: str) -> None:
        self.vin, self.source = vin, "obd"

    def remember(self, vin: object) -> None:
        """The VIN an earlier run read, unless this run has read one already."""
        if self.vin is None and isinstance(vin, str) and vin:
            self.vin, self.source = vin, "saved"
