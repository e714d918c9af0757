"""The core every feature is handed, and the runtime's own parts.

``Core.open`` builds what all features share: the outbox and state over the open store, the clock and its time
trust, events, the reading sink, the supervisor, the control socket, the status source and the downlink
registry. Features' parts are added to it with ``add``; ``start`` and ``stop`` run and end the whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fleetgate import __version__
from fleetgate.config.schema import Config
from fleetgate.daemon.runtime.certificates import CertificateWatch, presented
from fleetgate.daemon.runtime.clock import Clock, NtpWatch, Trust
from fleetgate.daemon.runtime.control import ControlServer
from fleetgate.daemon.runtime.events import Events
from fleetgate.daemon.runtime.feature import Downlink, FeatureParts
from fleetgate.daemon.runtime.heartbeat import Heartbeat
from fleetgate.daemon.runtime.notify import Notifier
from fleetgate.daemon.runtime.quota_watch import QuotaWatch
from fleetgate.daemon.runtime.readings import ReadingSink
from fleetgate.daemon.runtime.status import StatusSource, stream_rows
from fleetgate.daemon.runtime.supervisor import Supervisor
from fleetgate.daemon.runtime.vehicle import VehicleIdentity
from fleetgate.sync.store import Database, Outbox, StateStore
from fleetgate.sync.store.outbox import read_boot_id

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 10.0


@dataclass
class Core:
    config: Config
    database: Database
    boot_id: str
    outbox: Outbox
    state: StateStore
    clock: Clock
    events: Events
    sink: ReadingSink
    supervisor: Supervisor
    control: ControlServer
    status: StatusSource
    # MQTT downlink handlers by topic name, from every feature; the uplink subscribes to each when it connects.
    downlink: dict[str, Downlink] = field(default_factory=dict)
    # Set by the uplink on every connect (coverage is back); the one feature that waits for it clears it.
    uplink_connected: asyncio.Event = field(default_factory=asyncio.Event)
    vehicle: VehicleIdentity = field(default_factory=VehicleIdentity)  # the VIN the vehicle answers

    @classmethod
    def open(cls, config: Config, database: Database, started_mono: float) -> Core:
        """The core over an open store, with the runtime's own components and control verbs added."""
        boot_id = read_boot_id()
        tc = config.time
        clock = Clock(tc.gps_confirmations, tc.gps_max_spread_s, trust_gps=tc.trust_gps)
        outbox = Outbox(
            database, boot_id=boot_id, max_batch=config.store.max_batch, quotas=config.store.quota_bytes
        )
        events = Events(outbox, clock)
        sink = ReadingSink(outbox, clock)
        sup = config.supervisor
        supervisor = Supervisor(sup.backoff_initial_s, sup.backoff_max_s, sup.stable_after_s)
        cc = config.control
        core = cls(
            config=config,
            database=database,
            boot_id=boot_id,
            outbox=outbox,
            state=StateStore(database, outbox),
            clock=clock,
            events=events,
            sink=sink,
            supervisor=supervisor,
            control=ControlServer(cc.socket_path, cc.socket_group, cc.max_clients),
            status=StatusSource(config, clock, supervisor, database, outbox, started_mono),
        )
        clock.on_trust(core._correct_times_on_trust)
        core.add(core._own_parts())
        return core

    def add(self, parts: FeatureParts) -> None:
        """Register a feature's parts; nothing runs before ``start``."""
        for component in parts.components:
            self.supervisor.add(component)
        for verb, handler in parts.control.items():
            if verb in self.control.commands:
                raise ValueError(f"control verb {verb!r} registered twice")
            self.control.register(verb, handler)
        for name, handler in parts.downlink.items():
            if name in self.downlink:
                raise ValueError(f"downlink {name!r} registered twice")
            self.downlink[name] = handler
        for path, view in parts.status.items():
            self.status.add_view(path, view)
        for source in parts.alerts:
            self.status.add_alerts(source)

    async def start(self) -> None:
        """Report a recovered store, bind the control socket, start every component."""
        recovery = self.database.recovery
        if recovery is not None:
            await self.events.emit_now(
                "store-recovered", {"reason": recovery.reason, "moved_to": str(recovery.moved_to)}
            )
        await self.control.bind()
        self.supervisor.start()

    async def stop(self) -> None:
        """Stop every component, then make what is still in memory durable and close the store."""
        await self.supervisor.stop(self.config.supervisor.stop_timeout_s)
        await self.sink.flush()  # in case the sink was in backoff when the stop came
        await self.outbox.spill(everything=True)  # live telemetry still in memory, and its seq reservation
        await self.outbox.drain_pending()
        await self.database.close()

    async def keep_systemd_informed(self, notifier: Notifier) -> None:
        """Watchdog pings prove the event loop and the store thread both still turn; status line every 10 s."""
        interval = notifier.watchdog_interval_s
        last_status = 0.0
        while True:
            await self.database.run(lambda conn: conn.execute("SELECT 1").fetchone())
            if interval is not None:
                notifier.watchdog()
            if time.monotonic() - last_status >= STATUS_INTERVAL_S:
                notifier.status(self.status.summary_line())
                last_status = time.monotonic()
            await asyncio.sleep(min(interval or STATUS_INTERVAL_S, STATUS_INTERVAL_S))

    def _own_parts(self) -> FeatureParts:
        cfg = self.config
        parts = FeatureParts(
            components=[
                self.control,
                self.sink,
                Heartbeat(self.outbox, self.clock, self.status, cfg.heartbeat.interval_s),
                QuotaWatch(self.outbox, self.events),
            ],
            control={
                "status": lambda args: self.status.snapshot(),
                "ping": lambda args: {"pong": __version__},
                "queue": lambda args: self._queue(),
                "store": lambda args: self.database.report(),
            },
            status={"control": lambda snap: self.control.counters()},
        )
        if cfg.time.trust_ntp:
            parts.components.append(NtpWatch(self.clock))
        certificates = presented(cfg)
        if certificates:
            watch = CertificateWatch(certificates)
            parts.components.append(watch)
            parts.status["certificates"] = lambda snap: watch.view()
            parts.alerts.append(watch.alerts)
        return parts

    async def _queue(self) -> dict[str, Any]:
        return {"streams": stream_rows(await self.outbox.depth(), self.outbox.quotas)}

    async def _correct_times_on_trust(self, trust: Trust) -> None:
        if trust.offset_ns is None or trust.since_mono_ns is None:
            return
        await self.sink.flush()  # readings still in memory were taken untrusted too
        corrected = await self.outbox.correct_wall_times(trust.offset_ns, trust.since_mono_ns)
        body: dict[str, Any] = {
            **trust.as_dict(),
            "offset_ns": trust.offset_ns,
            "corrected_records": corrected,
        }
        await self.events.emit_now("time-trusted", body)
