"""The uplink feature: the outbox's drain to the MQTT broker, the packer that seals the backlog while offline,
the network watch that reconnects as soon as coverage returns, the retained health message, ``sync now``.

Its status sections are ``uplink`` and ``outbox.packer``; with MQTT disabled they say so.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from fleetgate.daemon.runtime.core import Core
from fleetgate.daemon.runtime.feature import FeatureParts
from fleetgate.daemon.runtime.heartbeat import STREAM as HEARTBEAT
from fleetgate.daemon.runtime.readings import STREAM as TELEMETRY
from fleetgate.daemon.runtime.status import StatusSource
from fleetgate.daemon.uplink.net_watch import NetWatch
from fleetgate.sync.mqtt.drain import Drain
from fleetgate.sync.mqtt.packer import Packer
from fleetgate.sync.mqtt.topics import Topics

DISABLED = {"enabled": False, "online": False}
HOT_MAX_RECORDS = 20_000  # live readings held in memory at most (~ 50 min at a vehicle's rate, a few MB)
SPILL_EVERY_S = 0.5


async def build(core: Core) -> FeatureParts:
    mq = core.config.mqtt
    if not mq.enabled:
        return FeatureParts(
            status={"uplink": lambda snap: dict(DISABLED), "outbox.packer": lambda snap: None}
        )
    # Imported only when MQTT is on: aiomqtt and paho are not needed otherwise.
    from fleetgate.sync.mqtt.link import Uplink

    device, store_id = core.config.device.id, core.database.store_id
    spill = mq.memory_window_s > 0  # live telemetry in memory (sync/store/hot.py), stored when due
    if spill:
        for stream in (TELEMETRY, HEARTBEAT):
            skipped = await core.outbox.enable_hot(
                stream, mq.memory_window_s, HOT_MAX_RECORDS, mq.offline_window_s
            )
            if skipped is not None:
                await core.events.emit_now(
                    "records-skipped",
                    {"stream": skipped.stream, "first_seq": skipped.first, "last_seq": skipped.last,
                     "reason": "unclean-stop"},
                )  # fmt: skip
    drain = Drain(
        core.outbox,
        device,
        mq.max_inflight,
        mq.max_message_bytes,
        mq.compress_min_bytes,
        mq.live_share,
        store_id,
        mq.live_batch_s,
        mq.live_encoding == "compact",
    )
    uplink = Uplink(
        mq,
        Topics(mq.topic_root, device),
        drain,
        lambda: health(core.status),
        core.downlink,
        core.uplink_connected,
        lambda: health_state(core.status),
    )
    reconnect_now = functools.partial(core.supervisor.retry_now, uplink.name)
    parts = FeatureParts(
        components=[uplink],
        control={"sync": lambda args: sync_now(drain, reconnect_now)},
        status={"uplink": lambda snap: uplink_view(uplink.snapshot(), snap["outbox"]["total"])},
    )
    packer = None
    if mq.pack_offline:
        packer = Packer(core.outbox, drain, device, store_id, mq.max_message_bytes, mq.compress_min_bytes)
        parts.components.append(packer)
        core.outbox.seal_spills(device, packer.seal_spilled)
    parts.status["outbox.packer"] = lambda snap: None if packer is None else packer.snapshot()
    parts.components.append(NetWatch(reconnect_now))
    if spill:
        parts.components.append(HotSpiller(core.outbox, lambda: uplink.online))
        parts.status["outbox.memory"] = lambda snap: {s: t.snapshot() for s, t in core.outbox.hot.items()}
    return parts


class HotSpiller:
    """Component ``outbox-spill``: live telemetry the broker has not acknowledged within the memory window
    goes to the store (sync/store/hot.py), checked twice a second."""

    name = "outbox-spill"

    def __init__(self, outbox: Any, online: Callable[[], bool]) -> None:
        self._outbox = outbox
        self._online = online  # the uplink is connected: else the longer offline window applies

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SPILL_EVERY_S)
            await self._outbox.spill(offline=not self._online())


def uplink_view(view: dict[str, Any], backlog: int) -> dict[str, Any]:
    """The uplink's status section: its snapshot and how long the backlog will take at the current rate."""
    if not view.get("online"):  # a rate measured before the outage says nothing about now
        view["drain_rate_per_s"] = None
        view["eta_s"] = None if backlog else 0.0
        return view
    rate = view["drain_rate_per_s"]
    view["eta_s"] = round(backlog / rate, 1) if rate > 0 and backlog else (0.0 if not backlog else None)
    return view


def sync_now(drain: Drain, reconnect_now: Callable[[], bool]) -> dict[str, bool]:
    """Wake the drain; if the uplink is waiting out a backoff after a failed connect, connect now."""
    drain.wake.set()
    return {"woken": True, "reconnecting": reconnect_now()}


def health_state(status: StatusSource) -> tuple[Any, ...]:
    """What makes the health message worth publishing at once when it changes: each component's state and
    wall-time trust (read from memory; the uplink asks every few seconds)."""
    return (
        tuple((s.name, s.state) for s in status.supervisor.statuses),
        status.clock.trust.trusted,
    )


async def health(status: StatusSource) -> dict[str, Any]:
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
        "counters": snap["counters"],
        "certificates": snap.get("certificates", []),
    }
