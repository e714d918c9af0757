"""What ``fleetgate status`` shows, the heartbeat carries and systemd's status line summarises.

The runtime's own sections (device, time, components, outbox, alerts, store) are built here; each feature adds
its own (``uplink``, ``outbox.packer`` ...) as a view, given the snapshot built so far.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

from fleetgate import __version__
from fleetgate.config.schema import Config
from fleetgate.daemon.runtime.clock import Clock
from fleetgate.daemon.runtime.feature import AlertSource, StatusView
from fleetgate.daemon.runtime.supervisor import State, Supervisor
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
    _views: dict[tuple[str, ...], StatusView] = field(default_factory=dict)
    _alert_sources: list[AlertSource] = field(default_factory=list)

    def add_view(self, path: str, view: StatusView) -> None:
        """``view`` fills the section at ``path`` ("uplink", or "outbox.packer" inside a runtime section)."""
        key = tuple(path.split("."))
        if key in self._views:
            raise ValueError(f"status section {path!r} added twice")
        self._views[key] = view

    def add_alerts(self, source: AlertSource) -> None:
        self._alert_sources.append(source)

    async def snapshot(self) -> dict[str, Any]:
        trust = self.clock.trust
        depth = await self.outbox.depth()
        streams = stream_rows(depth, self.outbox.quotas)
        recovery = self.database.recovery
        spool = await self.database.run(lambda _conn: self.database.spool.snapshot())
        snap: dict[str, Any] = {
            "version": __version__,
            "device": {"id": self.config.device.id, "role": self.config.device.role},
            "uptime_s": round(time.monotonic() - self.started_mono, 1),
            "time": {"trusted": trust.trusted, "source": trust.source, "wall": time.time()},
            "components": self.supervisor.status_dicts(),
            "outbox": {
                "total": sum(d.depth for d in depth),
                "packed": sum(d.packed for d in depth),
                "commits": self.outbox.commits,
                "records_committed": self.outbox.records_committed,
                "streams": streams,
            },
            "counters": {},  # filled by the features (counters.obd, counters.sessions ...)
            "alerts": [
                f"{s['stream']} holds {s['bytes'] / 2**20:.1f} MiB, over its quota of "
                f"{s['quota_bytes'] / 2**20:.1f} MiB, in records that are never evicted"
                for s in streams
                if s["over_quota"]
            ]
            + self._store_alerts()
            + spool_alerts(spool)
            + [line for source in self._alert_sources for line in source()],
            "store": {
                "path": str(self.database.path),
                "schema_version": self.database.schema_version,
                "disk_full_since": self.database.disk_full_since,
                "disk_full_errors": self.database.disk_full_errors,
                "spool": spool,
                "recovered": None
                if recovery is None
                else {"reason": recovery.reason, "moved_to": str(recovery.moved_to)},
            },
        }
        for (*parents, name), view in self._views.items():
            section = snap
            for parent in parents:
                section = section[parent]
            value = view(snap)
            section[name] = await value if inspect.isawaitable(value) else value
        return snap

    def _store_alerts(self) -> list[str]:
        since = self.database.disk_full_since
        if since is None:
            return []
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
        return [
            f"disk-full: the store refuses writes since {at} ({self.database.disk_full_errors} refused so far); "
            f"what was committed is kept, new readings wait in memory; free space on {self.database.path.parent}"
        ]

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


def spool_alerts(spool: dict[str, Any]) -> list[str]:
    """Damage the start found in the spool (sync/store/spool.py): a torn tail is a cut write, no alert."""
    if not spool["damaged_records"]:
        return []
    return [
        f"spool: {spool['damaged_records']} damaged records skipped at start (the disk, not a power cut): "
        + "; ".join(spool["problems"])
    ]
