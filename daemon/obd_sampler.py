"""Supervised component: poll the OBD-II adapter on its schedule and feed readings, ignition, trips and DTCs.

The adapter (``fleetgate.drivers.obd``) does the serial work on its own thread; this module only decides
what to ask when. An adapter that fails (unplugged, not answering) raises ObdError; the supervisor then
restarts this component with backoff, which reconnects. "No data" answers are counted by the adapter and
are simply not readings: they never stop the schedule.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from fleetgate.config.schema import ObdConfig
from fleetgate.daemon.clock import Clock
from fleetgate.daemon.dtc import DtcTracker
from fleetgate.daemon.events import Events
from fleetgate.daemon.readings import ReadingSink
from fleetgate.daemon.trip_recorder import TripRecorder
from fleetgate.drivers.obd import ObdAdapter
from fleetgate.sync.store import StateStore

log = logging.getLogger(__name__)

VIN_STATE_KEY = "vehicle.vin"
DTC_TASK = "#dtc"
VOLTAGE_TASK = "#adapter_voltage"
VOLTAGE_FRESH_NS = 30 * 1_000_000_000  # a voltage older than this no longer counts as ignition evidence


class ObdSampler:
    name = "obd"

    def __init__(
        self,
        config: ObdConfig,
        running_voltage_v: float,
        clock: Clock,
        sink: ReadingSink,
        trips: TripRecorder,
        dtcs: DtcTracker,
        events: Events,
        state: StateStore,
        adapter_factory: Callable[..., ObdAdapter] = ObdAdapter,
    ) -> None:
        self._config = config
        self._running_voltage_v = running_voltage_v
        self._clock = clock
        self._sink = sink
        self._trips = trips
        self._dtcs = dtcs
        self._events = events
        self._state = state
        self._factory = adapter_factory
        self.adapter: ObdAdapter | None = None
        self.state = "disconnected"
        self.connected_since: float | None = None
        # (mono_ns, volts) of the latest control-module voltage: the ECU answers it only while awake.
        self._voltage: tuple[int, float] | None = None

    async def run(self) -> None:
        cfg = self._config
        adapter = self.adapter = self._factory(cfg.port, cfg.baudrate, cfg.protocol, cfg.timeout_s)
        self.state = "connecting"
        try:
            info = await adapter.connect()
            self.state = "connected"
            self.connected_since = time.time()
            log.info("OBD adapter connected", extra={"port": cfg.port, "protocol": info.protocol})
            await self._identify(info.vin, info.protocol)
            await self._trips.restore()
            await self._poll(adapter)
        finally:
            self.state = "disconnected"
            self.connected_since = None
            await adapter.close()

    async def _identify(self, vin: str | None, protocol: str) -> None:
        if vin is None:
            return
        previous = await self._state.get(VIN_STATE_KEY)
        if vin != previous:
            await self._events.emit(
                self._events.record(
                    "vehicle-identified", {"vin": vin, "previous_vin": previous, "protocol": protocol}
                ),
                state={VIN_STATE_KEY: vin},
            )

    async def _poll(self, adapter: ObdAdapter) -> None:
        cfg = self._config
        intervals = {
            **cfg.schedule,
            DTC_TASK: cfg.dtc_interval_s,
            VOLTAGE_TASK: cfg.adapter_voltage_interval_s,
        }
        due = dict.fromkeys(intervals, time.monotonic())
        while True:
            now = time.monotonic()
            ready = [task for task, at in due.items() if at <= now]
            for task in ready:
                due[task] = now + intervals[task]
            evidence: bool | None = None
            for task in ready:
                running = await self._do(adapter, task)
                if running is not None:
                    evidence = bool(evidence) or running
            if evidence is not None:
                await self._trips.observe_running(self._clock.stamp().mono_ns, evidence or self._charging())
            await asyncio.sleep(max(0.0, min(due.values()) - time.monotonic()))

    async def _do(self, adapter: ObdAdapter, task: str) -> bool | None:
        """Run one scheduled task; returns running evidence when the task gives some (RPM, speed)."""
        if task == DTC_TASK:
            mil, dtcs = await adapter.read_dtcs()
            if mil is not None:  # ECU silent (ignition off): no verdict, so no code is closed for it
                await self._dtcs.update(mil, [(d.code, d.description) for d in dtcs])
            return None
        if task == VOLTAGE_TASK:
            # Not ignition evidence: it is the 12 V battery at the port, there with the ignition off too, and
            # above 13 V for minutes after the engine stops (surface charge).
            volts = await adapter.adapter_voltage()
            if volts is not None:
                self._sink.add("adapter_voltage", volts)
            return None
        sample = await adapter.sample(task)
        stamp = self._clock.stamp()
        if sample is None:
            return False if task in ("rpm", "vehicle_speed") else None  # an ECU that stays silent is "off"
        self._sink.add(task, sample.value, stamp)
        if task == "vehicle_speed":
            self._trips.observe_speed(stamp.mono_ns, sample.value)
            return sample.value > 0
        if task == "rpm":
            return sample.value > 0
        if task == "control_module_voltage":
            self._voltage = (stamp.mono_ns, sample.value)
        return None

    def _charging(self) -> bool:
        if self._voltage is None:
            return False
        at, volts = self._voltage
        return self._clock.stamp().mono_ns - at <= VOLTAGE_FRESH_NS and volts >= self._running_voltage_v

    def snapshot(self) -> dict[str, Any]:
        adapter = self.adapter
        info = adapter.info if adapter is not None else None
        now = self._clock.stamp().mono_ns
        values = {
            name: {
                "value": latest.value,
                "unit": latest.unit,
                "age_s": round((now - latest.stamp.mono_ns) / 1e9, 1),
            }
            for name, latest in self._sink.latest.items()
            if name in self._config.schedule or name == "adapter_voltage"
        }
        return {
            "enabled": True,
            "state": self.state,
            "port": self._config.port,
            "connected_since": self.connected_since,
            "vin": info.vin if info else None,
            "protocol": info.protocol if info else None,
            "elm_version": info.elm_version if info else None,
            "counters": dict(adapter.counters) if adapter is not None else {},
            "values": values,
            "dtc": self._dtcs.snapshot(),
            "trips": self._trips.snapshot(),
        }
