"""``fleetgate top``: a live view of the running daemon for the technician at the vehicle (rich).

It reads only the control socket, as every other command does: ``status``, ``obd``, ``gps`` and ``sessions``
once a refresh. A part that is disabled shows as such; a daemon that stops shows "not running" and the view
waits for it to come back (a restart under the technician's hands is the usual case).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fleetgate.daemon.runtime.control_protocol import ControlError, DaemonNotRunning
from fleetgate.render import duration

Ask = Callable[[str], Any]
VIEWS = ("status", "obd", "gps", "sessions")


def gather(ask: Ask) -> dict[str, Any]:
    """One reading of every view; a disabled feature's view is None. Raises DaemonNotRunning."""
    out: dict[str, Any] = {}
    for view in VIEWS:
        try:
            out[view] = ask(view)
        except ControlError as exc:  # "not-running" (DaemonNotRunning) goes up as it is
            if exc.code != "unknown-command":
                raise
            out[view] = None
    return out


def frame(data: dict[str, Any], now: float | None = None) -> RenderableType:
    """The whole screen for one reading."""
    now = time.time() if now is None else now
    s = data["status"]
    trust = s["time"]
    head = Text.assemble(
        (f"fleetgate {s['version']}", "bold"),
        f"  {s['device']['id']} ({s['device']['role']})  up {duration(s['uptime_s'])}  time ",
        (f"trusted ({trust['source']})", "green") if trust["trusted"] else ("UNTRUSTED", "bold red"),
        f"  {time.strftime('%H:%M:%S', time.localtime(now))}",
    )
    parts: list[RenderableType] = [head, _components(s)]
    parts.append(_signals(data.get("obd"), data.get("gps")))
    parts.append(_access(data.get("sessions")))
    parts.append(_outbox(s, now))
    alerts = s.get("alerts") or []
    if alerts:
        parts.append(Panel(Text("\n".join(alerts), style="bold red"), title="alerts", title_align="left"))
    return Group(*parts)


def _components(s: dict[str, Any]) -> Table:
    t = Table(title="components", title_justify="left", expand=True, box=None, header_style="bold")
    for col in ("name", "state", "restarts", "up", "last error"):
        t.add_column(col, overflow="ellipsis", no_wrap=True)
    for c in s["components"]:
        state = Text(c["state"], style="green" if c["state"] == "running" else "bold red")
        t.add_row(c["name"], state, str(c["restarts"]), duration(c["up_s"]), c["last_error"] or "")
    return t


def _signals(obd: dict[str, Any] | None, gps: dict[str, Any] | None) -> Table:
    t = Table(title="signals", title_justify="left", expand=True, box=None, header_style="bold")
    for col in ("signal", "value", "unit", "age"):
        t.add_column(col, no_wrap=True)
    if obd is None or not obd.get("enabled"):
        t.add_row("OBD-II", "disabled", "", "")
    else:
        adapter = f"{obd['state']}" + (f"  VIN {obd['vin']}" if obd.get("vin") else "")
        t.add_row("adapter", adapter, "", "")
        trips = obd["trips"]
        trip = trips["trip"]
        ignition = f"ignition {trips['ignition']}"
        if trip:
            stats = trip["stats"]
            ignition += f"  trip {str(trip['id'])[:8]}  {stats.get('distance', 0) / 1000:.2f} km"
        t.add_row("trip", ignition, "", "")
        for name, v in sorted(obd["values"].items()):
            t.add_row(name, _value(v["value"]), v["unit"], f"{v['age_s']:.1f}s")
    if gps is None or not gps.get("enabled"):
        t.add_row("GPS", "disabled", "", "")
    elif gps.get("fix") and gps["fix"].get("latitude") is not None:
        fix = gps["fix"]
        mode = {1: "no fix", 2: "2D", 3: "3D"}.get(fix["mode"], str(fix["mode"]))
        where = f"{fix['latitude']:.5f}, {fix['longitude']:.5f}  {mode}"
        t.add_row("position", where, "", f"{fix['age_s']:.1f}s")
        t.add_row("gps speed", _value(fix["speed_kmh"]), "km/h", f"{fix['age_s']:.1f}s")
    else:
        t.add_row("GPS", "connected, no fix" if gps.get("connected") else "gpsd NOT CONNECTED", "", "")
    return t


def _access(s: dict[str, Any] | None) -> Table:
    t = Table(
        title="sessions and start-enable", title_justify="left", expand=True, box=None, header_style="bold"
    )
    t.add_column("", no_wrap=True)
    t.add_column("", overflow="fold")
    if s is None or not s.get("enabled", True):
        t.add_row("sessions", "disabled")
        return t
    access = s["access"]
    on = access["start_enable"]["on"]
    enable = Text("ON", style="bold green") if on else Text("off")
    if access.get("enabled_by") is not None:
        enable.append(f"  (session {access['enabled_by']})")
    t.add_row("start-enable", enable)
    lockout = access["lockout"]
    t.add_row(
        "lockout",
        Text(f"LOCKED {duration(lockout['remaining_s'])}", style="bold red")
        if lockout["locked"]
        else f"{lockout['failures']} of {lockout['max_failures']} wrong PINs",
    )
    mark = s.get("sync") or {}
    t.add_row("last sync", f"{mark['source']} {duration(access['offline_age_s'])} ago" if mark else "never")
    active = [x for x in s.get("sessions", []) if x["state"] == "active"]
    t.add_row("sessions", f"{len(active)} active of {len(s.get('sessions', []))}")
    return t


def _outbox(s: dict[str, Any], now: float) -> Table:
    t = Table(title="outbox and uplink", title_justify="left", expand=True, box=None, header_style="bold")
    for col in ("stream", "depth", "packed", "oldest"):
        t.add_column(col, no_wrap=True)
    now_ns = int(now * 1e9)
    for st in s["outbox"]["streams"]:
        oldest = (
            "-" if st["oldest_wall_ns"] is None else duration((now_ns - st["oldest_wall_ns"]) / 1e9) + " ago"
        )
        t.add_row(st["stream"], str(st["depth"]), str(st.get("packed", 0)), oldest)
    up = s.get("uplink") or {}
    if not up.get("enabled"):
        line = Text("uplink disabled")
    elif up["online"]:
        line = Text("uplink ONLINE", style="bold green")
        line.append(f"  {up['broker']}  drain {up['drain_rate_per_s'] or 0:g} records/s")
        if up.get("eta_s") is not None and s["outbox"]["total"]:
            line.append(f"  empty in ~{duration(up['eta_s'])}")
    else:  # a drain rate from before the outage would say nothing true now
        line = Text("uplink OFFLINE", style="bold yellow")
        line.append(
            f"  {up['broker']}" + (f"  last error: {up['last_error']}" if up.get("last_error") else "")
        )
    t.add_row(line, "", "", "")
    t.add_row(f"total {s['outbox']['total']} records waiting", "", "", "")
    return t


def _value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def not_running(reason: str) -> RenderableType:
    return Panel(
        Text(f"{reason}\nwaiting for it to come back ...\nsee: systemctl status fleetgate", style="bold red"),
        title="fleetgate top",
    )


def run(ask: Ask, interval_s: float, once: bool, console: Console | None = None) -> int:
    """Refresh every ``interval_s`` until Ctrl-C; ``once``: print one frame and return (3 if not running)."""
    console = console or Console()
    if once:
        console.print(frame(gather(ask)))
        return 0
    from rich.live import Live

    with Live(console=console, screen=True, auto_refresh=False) as live:
        try:
            while True:
                try:
                    live.update(frame(gather(ask)), refresh=True)
                except DaemonNotRunning as exc:
                    live.update(not_running(str(exc)), refresh=True)
                time.sleep(interval_s)
        except KeyboardInterrupt:
            return 0
