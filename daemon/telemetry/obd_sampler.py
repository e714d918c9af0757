"""Supervised component: poll the OBD-II adapter on its schedule and feed readings, ignition, trips and DTCs.

The adapter (``fleetgate.drivers.obd``) does the serial work on its own thread; this module only decides
what to ask when. An adapter that fails (unplugged, not answering) raises ObdError; the supervisor then
restarts this component with backoff, which reconnects. "No data" answers are counted by the adapter and
are simply not readings: they never stop the schedule. The sampler keeps one adapter for the daemon's life:
its counters add up across reconnects, and it knows when a call of an earlier connection is still stuck in
the serial port.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from fleetgate.config.schema import ObdConfig
from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.events import Events
from fleetgate.daemon.runtime.readings import ReadingSink
from fleetgate.daemon.runtime.saved_state import SavedState
from fleetgate.daemon.runtime.vehicle import VIN_STATE_KEY, VehicleIdentity
from fleetgate.daemon.telemetry.dtc import DtcTracker
from fleetgate.daemon.telemetry.trip_recorder import TripRecorder
from fleetgate.drivers.obd import ObdAdapter, ObdError
from fleetgate.sync.store import StateStore

log = logging.getLogger(__name__)

PLUGGED_STATE_KEY = "obd.plugged"
# An adapter on a vehicle's port reads the 12 V battery; pulled out (but still on USB or Bluetooth) it reads
# next to nothing. Between the two thresholds nothing changes (no flapping on a sagging battery).
UNPLUGGED_BELOW_V = 4.0
PLUGGED_FROM_V = 8.0
DTC_TASK = "#dtc"
VOLTAGE_TASK = "#adapter_voltage"
VOLTAGE_FRESH_NS = 30 * 1_000_000_000  # a voltage older than this no longer counts as ignition evidence


class Evidence(NamedTuple):
    mono_ns: int  # when the sample was asked for
    running: bool
    answered: bool  # the ECU answered at all


class ObdSampler:
    name = "obd"
    expected_errors = (ObdError,)

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
        identity: VehicleIdentity | None = None,
    ) -> None:
        self._identity = identity or VehicleIdentity()
        self._config = config
        self._running_voltage_v = running_voltage_v
        self._clock = clock
        self._sink = sink
        self._trips = trips
        self._dtcs = dtcs
        self._events = events
        self._state = state
        self.saved = SavedState(state, events, clock)
        self.adapter: ObdAdapter = adapter_factory(
            config.port, config.baudrate, config.protocol, config.timeout_s
        )
        self.state = "disconnected"
        self.connected_since: float | None = None
        self.ecu_silent = False
        self.plugged: bool | None = (
            None  # None: not known yet this run (the saved value is loaded at connect)
        )
        # (mono_ns, volts) of the latest control-module voltage: the ECU answers it only while awake.
        self._voltage: tuple[int, float] | None = None

    async def run(self) -> None:
        cfg = self._config
        adapter = self.adapter
        self.state = "connecting"
        try:
            try:
                info = await adapter.connect()
            except ObdError:
                await self._set_plugged(False, "the adapter does not answer")
                raise
            self.state = "connected"
            self.connected_since = time.time()
            log.info("OBD adapter connected", extra={"port": cfg.port, "protocol": info.protocol})
            await self._set_plugged(True, "the adapter answers")
            await self._identify(info.vin, info.protocol)
            await self._trips.restore()
            await self._poll(adapter)
        except ObdError:
            await self._set_plugged(False, "the adapter link was lost")
            raise
        finally:
            self.state = "disconnected"
            self.connected_since = None
            await adapter.close()

    async def _set_plugged(self, plugged: bool, reason: str, volts: float | None = None) -> None:
        """``obd-plugged-in`` / ``obd-plugged-out`` on a change (the insurance portal's PluggedIn/PluggedOut),
        committed with the new state, so a restart with the adapter where it was announces nothing."""
        if self.plugged is None:
            self.plugged = await self.saved.load(
                PLUGGED_STATE_KEY, _plugged, lambda: (None, None), "the next plug state is announced as new"
            )
        if plugged == self.plugged:
            return
        self.plugged = plugged
        info = self.adapter.info
        body = {"reason": reason, "adapter_voltage": volts, "vin": info.vin if info else None}
        log.warning("OBD adapter " + ("plugged in" if plugged else "unplugged"), extra={"reason": reason})
        record = (
            self._events.record("obd-plugged-in", body)
            if plugged
            else self._events.record("obd-plugged-out", body)
        )
        await self._events.emit(record, state={PLUGGED_STATE_KEY: plugged})

    async def _identify(self, vin: str | None, protocol: str) -> None:
        if vin is None:
            return
        self._identity.observe(vin)
        previous = await self.saved.load(
            VIN_STATE_KEY,
            _vin,
            lambda: (None, None),
            "the last VIN is forgotten: this one is announced as new",
        )
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
        probe = next((s for s in ("rpm", "vehicle_speed") if s in cfg.schedule), None)
        due = dict.fromkeys(intervals, time.monotonic())
        while True:
            now = time.monotonic()
            ready = [task for task, at in due.items() if at <= now]
            for task in ready:
                due[task] = now + intervals[task]
            if self.ecu_silent and probe is not None:
                # With the ignition off every PID query waits out the adapter's search (seconds each): ask
                # only the probe until the ECU answers again, and the adapter-level voltage.
                ready = [t for t in ready if t in (probe, VOLTAGE_TASK)]
            evidence: Evidence | None = None
            for task in ready:
                found = await self._do(adapter, task)
                if found is None:
                    continue
                evidence = (
                    found
                    if evidence is None
                    else evidence._replace(running=evidence.running or found.running)
                )
                if task == probe:
                    self.ecu_silent = not found.answered
                    if self.ecu_silent:
                        self._voltage = None  # an ECU that sleeps charges nothing: its last voltage is stale
                        break  # the rest of this round would only wait out the same silence
            if evidence is not None:
                await self._trips.observe_running(evidence.mono_ns, evidence.running or self._charging())
            await self._trips.flush_harsh()
            await self._sink.wait_for_room()
            await asyncio.sleep(max(0.0, min(due.values()) - time.monotonic()))

    async def _do(self, adapter: ObdAdapter, task: str) -> Evidence | None:
        """Run one scheduled task; returns ignition evidence for the tasks that give some (RPM, speed)."""
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
                if volts < UNPLUGGED_BELOW_V:
                    await self._set_plugged(False, f"no vehicle voltage at the port ({volts:.1f} V)", volts)
                elif volts >= PLUGGED_FROM_V:
                    await self._set_plugged(True, f"vehicle voltage at the port ({volts:.1f} V)", volts)
            return None
        stamp = self._clock.stamp()  # the moment asked about, not the moment the (maybe slow) answer came
        sample = await adapter.sample(task)
        if sample is None:
            # An ECU that does not answer RPM or speed is asleep: ignition off.
            return Evidence(stamp.mono_ns, False, False) if task in ("rpm", "vehicle_speed") else None
        self._sink.add(task, sample.value, stamp)
        if task == "vehicle_speed":
            self._trips.observe_speed(stamp.mono_ns, sample.value)
            return Evidence(stamp.mono_ns, sample.value > 0, True)
        if task == "rpm":
            return Evidence(stamp.mono_ns, sample.value > 0, True)
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
        info = adapter.info
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
            "ecu": "silent (ignition off?)" if self.ecu_silent else "answering",
            "port": self._config.port,
            "connected_since": self.connected_since,
            "vin": info.vin if info else None,
            "protocol": info.protocol if info else None,
            "elm_version": info.elm_version if info else None,
            "counters": dict(adapter.counters),
            "values": values,
            "dtc": self._dtcs.snapshot(),
            "trips": self._trips.snapshot(),
        }


def _vin(raw: Any) -> str | None:
    if raw is not None and not isinstance(raw, str):
        raise ValueError("not a VIN string")
    return raw


def _plugged(raw: Any) -> bool | None:
    if raw is not None and not isinstance(raw, bool):
        raise ValueError("the saved plug state is not true, false or null")
    return raw
