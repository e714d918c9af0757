"""The composition root: open the store, build the core, let each feature build itself, run, stop cleanly.

Nothing here knows what a feature contains. A new capability is a folder under daemon/ with an async
``build(core) -> FeatureParts`` (runtime/feature.py), named in ``FEATURES``; docs/architecture.md says more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from fleetgate import __version__
from fleetgate.config.schema import Config
from fleetgate.daemon.access import feature as access
from fleetgate.daemon.rules import feature as rules
from fleetgate.daemon.runtime.control import ControlSocketError
from fleetgate.daemon.runtime.core import Core
from fleetgate.daemon.runtime.feature import Build, FeatureError
from fleetgate.daemon.runtime.notify import Notifier
from fleetgate.daemon.scooters import feature as scooters
from fleetgate.daemon.telemetry import feature as telemetry
from fleetgate.daemon.uplink import feature as uplink
from fleetgate.sync.store import Database, StoreError
from fleetgate.sync.store.database import StoreTooNewError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78  # EX_CONFIG, as the CLI's: systemd does not restart on it (RestartPreventExitStatus=78)

# Built in this order; each decides from the configuration what of it runs (a disabled one may still answer).
FEATURES: tuple[Build, ...] = (telemetry.build, access.build, rules.build, scooters.build, uplink.build)


async def run_daemon(config: Config, notifier: Notifier | None = None) -> int:
    notifier = notifier or Notifier()
    started = time.monotonic()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)

    log.info("starting", extra={"version": __version__, "device": config.device.id, "pid": os.getpid()})
    try:
        database = await Database.open(config.store.db_path, config.store.synchronous)
    except StoreError as exc:
        log.error("cannot open store", extra={"error": str(exc)})
        # A newer fleetgate's database stays refused however often we restart; anything else may pass.
        return EXIT_CONFIG if isinstance(exc, StoreTooNewError) else EXIT_FAILURE
    core = Core.open(config, database, started)
    try:
        for build in FEATURES:
            core.add(await build(core))
        await core.start()
    except (FeatureError, ControlSocketError, OSError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        await database.close()
        # A feature refused this configuration or device (its secret unreadable ...): a restart cures nothing.
        return EXIT_CONFIG if isinstance(exc, FeatureError) else EXIT_FAILURE

    informer = asyncio.create_task(core.keep_systemd_informed(notifier), name="systemd-notify")
    notifier.ready(core.status.summary_line())
    log.info("ready", extra={"socket": str(config.control.socket_path), "store": str(database.path)})

    await stop.wait()
    log.info("stopping")
    notifier.stopping()
    informer.cancel()
    await core.stop()
    notifier.close()
    log.info("stopped", extra={"uptime_s": round(time.monotonic() - started, 1)})
    return EXIT_OK
