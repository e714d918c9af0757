"""The telemetry feature: ignition and trips always; the OBD-II and GPS samplers when configured.

Control verbs ``obd`` and ``gps`` answer ``{"enabled": false ...}`` for a sampler that is not configured.
"""

from __future__ import annotations

from typing import Any

from fleetgate.daemon.runtime.core import Core
from fleetgate.daemon.runtime.feature import FeatureParts
from fleetgate.daemon.telemetry.dtc import DtcTracker
from fleetgate.daemon.telemetry.gps_sampler import GpsSampler, time_view
from fleetgate.daemon.telemetry.silence import SilenceWatch
from fleetgate.daemon.telemetry.trip_recorder import TripRecorder


async def build(core: Core) -> FeatureParts:
    config = core.config
    trips = TripRecorder(config.trips, core.clock, core.events, core.state, core.boot_id)
    parts = FeatureParts(components=[trips], alerts=[trips.saved.alerts])
    obd_view: Any = None
    gps_view: Any = None
    if config.obd.enabled:
        # Imported only when used: python-obd (and pint under it) costs ~0.5 s and ~18 MB at start.
        from fleetgate.daemon.telemetry.obd_sampler import ObdSampler

        dtcs = DtcTracker(core.clock, core.events, core.state)
        obd_view = ObdSampler(
            config.obd,
            config.trips.running_voltage_v,
            core.clock,
            core.sink,
            trips,
            dtcs,
            core.events,
            core.state,
            identity=core.vehicle,
        )
        parts.components.append(obd_view)
        parts.alerts += [dtcs.saved.alerts, obd_view.saved.alerts]
    if config.gps.enabled:
        gps_view = GpsSampler(config.gps, core.clock, core.sink, trips)
        parts.components.append(gps_view)

    def expected() -> dict[str, float]:
        """Signals whose silence is news now, with their intervals (silence.py)."""
        out: dict[str, float] = {}
        if obd_view is not None and obd_view.state == "connected" and not obd_view.ecu_silent:
            out.update(config.obd.schedule)
        if gps_view is not None:
            out["gps_position"] = config.gps.sample_interval_s  # no fix or no gpsd: both are news
        return out

    if obd_view is not None or gps_view is not None:
        parts.components.append(SilenceWatch(core.sink, core.events, expected))
    # For the retained health message (remote visibility: docs/mqtt.md): what went wrong, counted.
    if obd_view is not None:
        parts.status["counters.obd"] = lambda snap: dict(obd_view.adapter.counters)
    if gps_view is not None:
        parts.status["counters.gps"] = lambda snap: gps_view.snapshot()["counters"]
    parts.control["obd"] = lambda args: obd_view.snapshot() if obd_view else {"enabled": False}
    parts.control["gps"] = lambda args: (
        gps_view.snapshot() if gps_view else {"enabled": False, "time": time_view(core.clock)}
    )
    return parts
