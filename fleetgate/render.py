"""Human-readable rendering of control-socket results for the CLI."""

from __future__ import annotations

import time
from typing import Any


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join("  " + line for line in lines)


def status(s: dict[str, Any]) -> str:
    now_ns = time.time_ns()
    device = s["device"]
    trust = s["time"]
    out = [
        f"fleetgate {s['version']}  device {device['id']} ({device['role']})  up {duration(s['uptime_s'])}",
        "time: "
        + (f"trusted ({trust['source']})" if trust["trusted"] else "UNTRUSTED (no NTP sync, no GPS fix)"),
        "components:",
        table(
            ["NAME", "STATE", "RESTARTS", "UP", "LAST ERROR"],
            [
                [c["name"], c["state"], str(c["restarts"]), duration(c["up_s"]), c["last_error"] or ""]
                for c in s["components"]
            ],
        ),
        f"outbox: {s['outbox']['total']} records waiting",
    ]
    streams = s["outbox"]["streams"]
    if streams:
        out.append(
            table(
                ["STREAM", "DEPTH", "LAST SEQ", "OLDEST"],
                [
                    [
                        st["stream"],
                        str(st["depth"]),
                        str(st["last_seq"]),
                        "-"
                        if st["oldest_wall_ns"] is None
                        else duration((now_ns - st["oldest_wall_ns"]) / 1e9) + " ago",
                    ]
                    for st in streams
                ],
            )
        )
    store = s["store"]
    out.append(f"store: {store['path']} (schema v{store['schema_version']})")
    if store["recovered"]:
        rec = store["recovered"]
        out.append(f"  WARNING: database was corrupt ({rec['reason']}); old file kept at {rec['moved_to']}")
    return "\n".join(out)
