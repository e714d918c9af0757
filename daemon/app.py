"""The daemon's lifecycle: open the store, start the supervised components, notify systemd, stop cleanly.

This module only wires parts together; each part lives in its own module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from fleetgate import __version__
from fleetgate.config import Config
from fleetgate.daemon.clock import Clock, NtpWatch
from fleetgate.daemon.control import ControlServer, ControlSocketError
from fleetgate.daemon.heartbeat import Heartbeat
from fleetgate.daemon.notify import Notifier
from fleetgate.daemon.status import StatusSource
from fleetgate.daemon.supervisor import Supervisor
from fleetgate.sync.store import Database, NewRecord, Outbox, Priority, StoreError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
STATUS_INTERVAL_S = 10.0


async def _record_recovery(outbox: Outbox, clock: Clock, database: Database) -> None:
    recovery = database.recovery
    if recovery is None:
        return
    body = {"event": "store-recovered", "reason": recovery.reason, "moved_to": str(recovery.moved_to)}
    await outbox.append_one(NewRecord.json("events", Priority.EVENT, clock.stamp(), body))


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

    clock = Clock()
    outbox = Outbox(database, max_batch=config.store.max_batch)
    sup = config.supervisor
    supervisor = Supervisor(sup.backoff_initial_s, sup.backoff_max_s, sup.stable_after_s)
    status = StatusSource(config, clock, supervisor, database, outbox, started)
    control = ControlServer(
        config.control.socket_path, config.control.socket_group, config.control.max_clients
    )
    control.register("status", lambda args: status.snapshot())
    control.register("ping", lambda args: _pong())

    try:
        await _record_recovery(outbox, clock, database)
        await control.bind()
    except (ControlSocketError, OSError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        await database.close()
        return EXIT_FAILURE

    for component in (
        control,
        NtpWatch(clock),
        Heartbeat(outbox, clock, status, config.heartbeat.interval_s),
    ):
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
    await outbox.drain_pending()
    await database.close()
    notifier.close()
    log.info("stopped", extra={"uptime_s": round(time.monotonic() - started, 1)})
    return EXIT_OK


async def _pong() -> dict[str, str]:
    return {"pong": __version__}
