"""What ``fleetgate status`` shows, the heartbeat carries and systemd's status line summarises."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fleetgate import __version__
from fleetgate.config import Config
from fleetgate.daemon.clock import Clock
from fleetgate.daemon.supervisor import State, Supervisor
from fleetgate.sync.store import Database, Outbox
from fleetgate.sync.store.outbox import StreamDepth


@dataclass
class StatusSource:
    config: Config
    clock: Clock
    supervisor: Supervisor
    database: Database
    outbox: Outbox
    started_mono: float
    uplink: Any = None  # fleetgate.sync.mqtt_link.Uplink when MQTT is enabled
    packer: Any = None  # fleetgate.sync.packer.Packer when it seals the backlog offline

    async def snapshot(self) -> dict[str, Any]:
        trust = self.clock.trust
        depth = await self.outbox.depth()
        streams = stream_rows(depth, self.outbox.quotas)
        recovery = self.database.recovery
        return {
            "version": __version__,
            "device": {"id": self.config.device.id, "role": self.config.device.role},
            "uptime_s": round(time.monotonic() - self.started_mono, 1),
            "time": {"trusted": trust.trusted, "source": trust.source, "wall": time.time()},
            "components": self.supervisor.status_dicts(),
            "outbox": {
                "total": sum(d.depth for d in depth),
                "packed": sum(d.packed for d in depth),
                "packer": None if self.packer is None else self.packer.snapshot(),
                "commits": self.outbox.commits,
                "records_committed": self.outbox.records_committed,
                "streams": streams,
            },
            "alerts": [
                f"{s['stream']} holds {s['bytes'] / 2**20:.1f} MiB, over its quota of "
                f"{s['quota_bytes'] / 2**20:.1f} MiB, in records that are never evicted"
                for s in streams
                if s["over_quota"]
            ],
            "uplink": self._uplink(sum(d.depth for d in depth)),
            "store": {
                "path": str(self.database.path),
                "schema_version": self.database.schema_version,
                "recovered": None
                if recovery is None
                else {"reason": recovery.reason, "moved_to": str(recovery.moved_to)},
            },
        }

    def summary_line(self) -> str:
        statuses = self.supervisor.statuses
        up = sum(1 for s in statuses if s.state == State.RUNNING)
        down = [s.name for s in statuses if s.state != State.RUNNING]
        line = f"{up}/{len(statuses)} components running"
        if down:
            line += f"; down: {', '.join(down)}"
        line += "; time " + (
            "trusted (" + self.clock.trust.source + ")" if self.clock.trust.trusted else "untrusted"
        )
        return line

    def _uplink(self, backlog: int) -> dict[str, Any]:
        if self.uplink is None:
            return {"enabled": False, "online": False}
        view = self.uplink.snapshot()
        rate = view["drain_rate_per_s"]
        view["eta_s"] = round(backlog / rate, 1) if rate > 0 and backlog else (0.0 if not backlog else None)
        return view


def stream_rows(depth: list[StreamDepth], quotas: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {
            "stream": d.stream,
            "depth": d.depth,
            "packed": d.packed,
            "last_seq": d.last_seq,
            "oldest_wall_ns": d.oldest_wall_ns,
            "bytes": d.bytes,
            "quota_bytes": quotas.get(d.stream),
            "evicted": d.evicted,
            # Eviction runs with every append, so a stream still over quota holds only what may not be evicted.
            "over_quota": d.stream in quotas and d.bytes > quotas[d.stream],
        }
        for d in depth
    ]
