"""The daemon's lifecycle: open the store, start the supervised components, notify systemd, stop cleanly.

This module only wires parts together; each part lives in its own module.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from fleetgate import __version__
from fleetgate.config import Config
from fleetgate.daemon.clock import Clock, NtpWatch, Trust
from fleetgate.daemon.control import ControlServer, ControlSocketError
from fleetgate.daemon.dtc import DtcTracker
from fleetgate.daemon.events import Events
from fleetgate.daemon.heartbeat import Heartbeat
from fleetgate.daemon.notify import Notifier
from fleetgate.daemon.quota_watch import QuotaWatch
from fleetgate.daemon.readings import ReadingSink
from fleetgate.daemon.status import StatusSource, stream_rows
from fleetgate.daemon.supervisor import Component, Supervisor
from fleetgate.daemon.trip_recorder import TripRecorder
from fleetgate.sync.store import Database, Outbox, StateStore, StoreError
from fleetgate.sync.store.outbox import read_boot_id

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
STATUS_INTERVAL_S = 10.0


async def _keep_systemd_informed(notifier: Notifier, status: StatusSource, database: Database) -> None:
    """Watchdog pings prove the event loop and the store thread both still turn; status line every 10 s."""
    interval = notifier.watchdog_interval_s
    last_status = 0.0
    while True:
        await database.run(lambda conn: conn.execute("SELECT 1").fetchone())
        if interval is not None:
            notifier.watchdog()
        if time.monotonic() - last_status >= STATUS_INTERVAL_S:
            notifier.status(status.summary_line())
            last_status = time.monotonic()
        await asyncio.sleep(min(interval or STATUS_INTERVAL_S, STATUS_INTERVAL_S))


def _correct_times_on_trust(sink: ReadingSink, outbox: Outbox, events: Events):
    async def on_trust(trust: Trust) -> None:
        if trust.offset_ns is None or trust.since_mono_ns is None:
            return
        await sink.flush()  # readings still in memory were taken untrusted too
        corrected = await outbox.correct_wall_times(trust.offset_ns, trust.since_mono_ns)
        body: dict[str, Any] = {
            **trust.as_dict(),
            "offset_ns": trust.offset_ns,
            "corrected_records": corrected,
        }
        await events.emit_now("time-trusted", body)

    return on_trust


async def run_daemon(config: Config, notifier: Notifier | None = None) -> int:
    notifier = notifier or Notifier()
    started = time.monotonic()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    log.info("starting", extra={"version": __version__, "device": config.device.id, "pid": os.getpid()})
    try:
        database = await Database.open(config.store.db_path, config.store.synchronous)
    except StoreError as exc:
        log.error("cannot open store", extra={"error": str(exc)})
        return EXIT_FAILURE

    boot_id = read_boot_id()
    tc = config.time
    clock = Clock(tc.gps_confirmations, tc.gps_max_spread_s, trust_gps=tc.trust_gps)
    outbox = Outbox(
        database, boot_id=boot_id, max_batch=config.store.max_batch, quotas=config.store.quota_bytes
    )
    state = StateStore(database)
    events = Events(outbox, clock)
    sink = ReadingSink(outbox, clock)
    trips = TripRecorder(config.trips, clock, events, state, boot_id)
    clock.on_trust(_correct_times_on_trust(sink, outbox, events))

    sup = config.supervisor
    supervisor = Supervisor(sup.backoff_initial_s, sup.backoff_max_s, sup.stable_after_s)
    status = StatusSource(config, clock, supervisor, database, outbox, started)
    control = ControlServer(
        config.control.socket_path, config.control.socket_group, config.control.max_clients
    )
    control.register("status", lambda args: status.snapshot())
    control.register("ping", lambda args: {"pong": __version__})

    components: list[Component] = [
        control,
        sink,
        trips,
        Heartbeat(outbox, clock, status, config.heartbeat.interval_s),
        QuotaWatch(outbox, events),
    ]
    if tc.trust_ntp:
        components.append(NtpWatch(clock))
    obd_view: Any = None
    gps_view: Any = None
    if config.obd.enabled:
        from fleetgate.daemon.obd_sampler import ObdSampler

        obd_view = ObdSampler(
            config.obd,
            config.trips.running_voltage_v,
            clock,
            sink,
            trips,
            DtcTracker(clock, events, state),
            events,
            state,
        )
        components.append(obd_view)
    if config.gps.enabled:
        from fleetgate.daemon.gps_sampler import GpsSampler

        gps_view = GpsSampler(config.gps, clock, sink, trips)
        components.append(gps_view)
    pin_access = None
    if config.sessions.enabled:
        from fleetgate.daemon import pin_access as pin_wiring
        from fleetgate.sync.device_keys import DeviceSecretError

        try:
            pin_access = await pin_wiring.build(config, outbox, state, clock, events, sink, boot_id)
        except (DeviceSecretError, OSError) as exc:
            log.error("cannot start PIN access", extra={"error": str(exc)})
            await database.close()
            return EXIT_FAILURE
        components.extend(pin_access.components)
        for name, handler in pin_access.control.items():
            control.register(name, handler)
    else:
        control.register("sessions", lambda args: {"enabled": False})
    if config.mqtt.enabled:
        from fleetgate.sync.drain import Drain
        from fleetgate.sync.mqtt_link import Uplink
        from fleetgate.sync.topics import Topics

        mq = config.mqtt
        drain = Drain(
            outbox,
            config.device.id,
            mq.max_inflight,
            mq.max_message_bytes,
            mq.compress_min_bytes,
            mq.live_share,
            database.store_id,
        )
        status.uplink = Uplink(
            mq,
            Topics(mq.topic_root, config.device.id),
            drain,
            lambda: _health(status),
            pin_access.downlink if pin_access else None,
        )
        components.append(status.uplink)
        if mq.pack_offline:
            from fleetgate.sync.packer import Packer

            status.packer = Packer(
                outbox,
                drain,
                config.device.id,
                database.store_id,
                mq.max_message_bytes,
                mq.compress_min_bytes,
            )
            components.append(status.packer)
        if pin_access is not None and pin_access.reef is not None:
            pin_access.reef.reconnected = status.uplink.connected
        reconnect_now = functools.partial(supervisor.retry_now, status.uplink.name)
        control.register("sync", lambda args: _sync_now(drain, reconnect_now))
        from fleetgate.daemon.net_watch import NetWatch

        components.append(NetWatch(reconnect_now))
    control.register("queue", lambda args: _queue(outbox))
    control.register("obd", lambda args: obd_view.snapshot() if obd_view else {"enabled": False})
    control.register(
        "gps",
        lambda args: gps_view.snapshot() if gps_view else {"enabled": False, "time": clock.trust.as_dict()},
    )

    try:
        recovery = database.recovery
        if recovery is not None:
            await events.emit_now(
                "store-recovered", {"reason": recovery.reason, "moved_to": str(recovery.moved_to)}
            )
        await control.bind()
    except (ControlSocketError, OSError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        await database.close()
        return EXIT_FAILURE

    for component in components:
        supervisor.add(component)
    supervisor.start()
    informer = asyncio.create_task(_keep_systemd_informed(notifier, status, database), name="systemd-notify")
    notifier.ready(status.summary_line())
    log.info("ready", extra={"socket": str(config.control.socket_path), "store": str(database.path)})

    await stop.wait()
    log.info("stopping")
    notifier.stopping()
    informer.cancel()
    await supervisor.stop(sup.stop_timeout_s)
    await sink.flush()  # in case the sink was in backoff when the stop came
    await outbox.drain_pending()
    await database.close()
    notifier.close()
    log.info("stopped", extra={"uptime_s": round(time.monotonic() - started, 1)})
    return EXIT_OK


def _sync_now(drain: Any, reconnect_now: Callable[[], bool]) -> dict[str, bool]:
    """Wake the drain; if the uplink is waiting out a backoff after a failed connect, connect now."""
    drain.wake.set()
    return {"woken": True, "reconnecting": reconnect_now()}


async def _queue(outbox: Outbox) -> dict[str, Any]:
    return {"streams": stream_rows(await outbox.depth(), outbox.quotas)}


async def _health(status: StatusSource) -> dict[str, Any]:
    """The retained health message's body (besides "online")."""
    snap = await status.snapshot()
    return {
        "version": snap["version"],
        "uptime_s": snap["uptime_s"],
        "time_trusted": snap["time"]["trusted"],
        "components": {c["name"]: c["state"] for c in snap["components"]},
        "backlog": {s["stream"]: s["depth"] for s in snap["outbox"]["streams"]},
        "alerts": snap["alerts"],
        "last_publish": snap["uplink"].get("last_publish"),
        "drain_rate_per_s": snap["uplink"].get("drain_rate_per_s"),
        "eta_s": snap["uplink"].get("eta_s"),
    }
