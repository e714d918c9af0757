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
        f"outbox: {s['outbox']['total']} records waiting" + _packed(s["outbox"]),
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
    up = s.get("uplink", {})
    if up.get("enabled"):
        transport = "TLS" if up["tls"] else "plain TCP"
        line = f"uplink: {'ONLINE' if up['online'] else 'OFFLINE'} {up['broker']} ({transport})"
        if up.get("last_publish"):
            line += f"  last publish {duration(time.time() - up['last_publish'])} ago"
        if up["online"] and up.get("drain_rate_per_s") is not None:  # offline: no rate is true now
            line += f"  drain {up['drain_rate_per_s']:g} records/s"
            if up.get("eta_s") is not None and s["outbox"]["total"]:
                line += f"  empty in ~{duration(up['eta_s'])}"
        out.append(line)
        if not up["online"] and up.get("last_error"):
            out.append(f"  last error: {up['last_error']}")
    else:
        out.append("uplink: disabled ([mqtt] enabled = false)")
    if s.get("segway"):
        out += _segway(s["segway"])
    for alert in s.get("alerts", []):
        out.append(f"ALERT: {alert}")
    ctl = s.get("control")
    if ctl and (ctl["bad_requests"] or ctl["timeouts"] or ctl["evicted"] or ctl["internal_errors"]):
        out.append(
            f"control socket: {ctl['requests']} requests, {ctl['bad_requests']} bad, {ctl['timeouts']} timed out,"
            f" {ctl['evicted']} idle clients dropped, {ctl['internal_errors']} internal errors"
        )
    store = s["store"]
    out.append(f"store: {store['path']} (schema v{store['schema_version']})")
    spool = store.get("spool")
    if spool and (spool["messages"] or spool["torn_tail_bytes"]):
        line = f"  spool: {spool['records']} records sealed in {spool['messages']} messages, {spool['files']} files"
        if spool["torn_tail_bytes"]:
            line += f"; a torn last write ({spool['torn_tail_bytes']} bytes) ignored at start"
        out.append(line)
    if store["recovered"]:
        rec = store["recovered"]
        out.append(f"  WARNING: database was corrupt ({rec['reason']}); old file kept at {rec['moved_to']}")
    return "\n".join(out)


def _segway(g: dict[str, Any]) -> list[str]:
    """The depot's lines of ``fleetgate status``: the yard, the API, pushes and commands in one glance."""
    api = g["api"]
    push = g["push"]
    cmds = g["commands"]
    refused = sum(v for k, v in push.get("counters", {}).items() if k.startswith("refused"))
    lines = [
        f"depot: {g['scooters']} scooters, {g['online']} online, {g['failing']} failing, "
        f"{g['keys_cached']} Bluetooth keys cached",
        f"  segway api: {api.get('requests', 0)} requests, {api.get('ok', 0)} ok, "
        f"{api.get('segway_error', 0)} Segway errors, {api.get('unavailable', 0)} unavailable, "
        f"{api.get('token_refused', 0)} token refusals",
        "  pushes: "
        + (
            f"listening on {push['bind']}:{push['port']}, {push['counters'].get('accepted', 0)} accepted, "
            f"{push['counters'].get('duplicates', 0)} duplicates, {refused} refused"
            if push.get("listening")
            else ("not listening" if push.get("enabled", True) else "disabled")
        ),
        f"  commands: {cmds['accepted']} from the downlink, rejected {cmds['rejected'] or 'none'}, "
        f"outcomes {cmds['outcomes'] or 'none'}",
    ]
    return lines


def _value(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_value(x)}" for k, x in v.items())
    return "-" if v is None else str(v)


def obd(s: dict[str, Any]) -> str:
    if not s.get("enabled"):
        return "OBD-II: disabled in the configuration ([obd] enabled = false)"
    out = [
        f"adapter: {s['state']} on {s['port']}"
        + (
            f" since {time.strftime('%H:%M:%S', time.localtime(s['connected_since']))}"
            if s["connected_since"]
            else ""
        ),
        f"vehicle: VIN {s['vin'] or 'unknown'}  protocol {s['protocol'] or '-'}  {s['elm_version'] or ''}".rstrip(),
        f"ignition: {s['trips']['ignition']}"
        + (f"  trip {s['trips']['trip']['id']}" if s["trips"]["trip"] else "")
        + f"  ({s['trips']['trips_completed']} trips completed since start)",
    ]
    values = s["values"]
    if values:
        out.append("live values:")
        out.append(
            table(
                ["SIGNAL", "VALUE", "UNIT", "AGE"],
                [
                    [name, _value(v["value"]), v["unit"], f"{v['age_s']:.1f}s"]
                    for name, v in sorted(values.items())
                ],
            )
        )
    dtc = s["dtc"]
    mil = {True: "ON", False: "off", None: "unknown"}[dtc["mil"]]
    out.append(f"MIL: {mil}  stored DTCs: {len(dtc['active'])}")
    for code in dtc["active"]:
        out.append(f"  {code['code']}  {code['description']}  since {code['start']}")
    counters = s["counters"]
    if counters:
        out.append("counters: " + "  ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    return "\n".join(out)


def gps(s: dict[str, Any]) -> str:
    trust = s["time"]
    trust_line = "time: " + (
        f"trusted ({trust['source']})" if trust["trusted"] else "UNTRUSTED (no NTP sync, no GPS time yet)"
    )
    if trust.get("system_clock_error_s") is not None:
        trust_line += f"  system clock off by {trust['system_clock_error_s']:+.3f} s"
    if not s.get("enabled"):
        return "GPS: disabled in the configuration ([gps] enabled = false)\n" + trust_line
    out = [f"gpsd: {s['gpsd']} {'connected' if s['connected'] else 'NOT CONNECTED'}"]
    if s.get("last_error"):
        out[0] += f"  (last error: {s['last_error']})"
    fix = s["fix"]
    if fix is None:
        out.append("fix: none received yet")
    else:
        mode = {0: "unknown", 1: "NO FIX", 2: "2D", 3: "3D"}.get(fix["mode"], str(fix["mode"]))
        out.append(f"fix: {mode}  ({fix['age_s']:.1f}s ago)")
        if fix["latitude"] is not None:
            out.append(
                f"  position {fix['latitude']:.6f}, {fix['longitude']:.6f}  altitude {_value(fix['altitude_m'])} m"
            )
            out.append(f"  speed {_value(fix['speed_kmh'])} km/h  heading {_value(fix['heading_deg'])} deg")
    sky = s["sky"]
    if sky is not None:
        out.append(
            f"satellites: {_value(sky['satellites_used'])} used of {_value(sky['satellites_visible'])} visible"
            f"  HDOP {_value(sky['hdop'])}"
        )
    out.append(trust_line)
    if s["counters"]:
        out.append("counters: " + "  ".join(f"{k}={v}" for k, v in sorted(s["counters"].items())))
    return "\n".join(out)


def _packed(outbox: dict[str, Any]) -> str:
    """The status line's note of how much of the backlog the packer has sealed, if any."""
    packed = outbox.get("packed") or 0
    return f" ({packed} packed into messages while offline)" if packed else ""


def queue(q: dict[str, Any]) -> str:
    now_ns = time.time_ns()
    rows = []
    for st in q["streams"]:
        quota = "-" if st["quota_bytes"] is None else f"{st['quota_bytes'] / 2**20:.0f} MiB"
        oldest = (
            "-" if st["oldest_wall_ns"] is None else duration((now_ns - st["oldest_wall_ns"]) / 1e9) + " ago"
        )
        flag = "  OVER QUOTA" if st["over_quota"] else ""
        rows.append(
            [
                st["stream"],
                str(st["depth"]),
                str(st.get("packed", 0)),
                f"{st['bytes'] / 2**20:.2f} MiB",
                quota,
                oldest,
                str(st["evicted"]) + flag,
            ]
        )
    return "outbox:\n" + table(["STREAM", "DEPTH", "PACKED", "SIZE", "QUOTA", "OLDEST", "EVICTED"], rows)


def _moment(ns: int | None) -> str:
    if ns is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9)) + "Z"


def sessions(s: dict[str, Any]) -> str:
    if not s.get("enabled", True):
        return "managed sessions: disabled"
    mark = s.get("sync") or {}
    access = s["access"]
    lockout = access["lockout"]
    lines = [
        f"vehicle:       {s['vin']}",
        "last sync:     "
        + (
            f"{mark['source']} {duration(access['offline_age_s'])} ago, set version {mark.get('mqtt_version') or '-'}"
            if mark
            else "never"
        ),
        f"offline limit: {duration(access['max_offline_age_s'])}",
        "start-enable:  "
        + ("ON" if access["start_enable"]["on"] else "off")
        + (f" (session {access['enabled_by']})" if access["enabled_by"] is not None else "")
        + (" - switch-off deferred until the vehicle stops" if access["off_deferred"] else "")
        + f"  [{access['start_enable']['output']}]",
        "lockout:       "
        + (
            f"LOCKED for {duration(lockout['remaining_s'])}"
            if lockout["locked"]
            else f"{lockout['failures']} of {lockout['max_failures']} wrong PINs"
        ),
    ]
    rows = [
        [
            str(x["id"]),
            x["state"] + (f" ({x['refused']})" if x.get("refused") and x["state"] == "active" else ""),
            x["verification_id"],
            _moment(x["initialization_ns"]),
            _moment(x["completion_ns"]) if x["completion_ns"] else "-",
            _moment(x["expires_ns"]),
        ]
        for x in s["sessions"]
    ]
    return (
        "\n".join(lines)
        + "\n\n"
        + table(["ID", "STATE", "VERIFICATION", "STARTED", "ENDED", "EXPIRES"], rows)
    )


def pin_test(r: dict[str, Any]) -> str:
    if r["outcome"] == "accepted":
        return f"accepted: session {r['session_id']} (verification {r['verification_id']}); start-enable not switched"
    if r["outcome"] == "locked-out":
        return f"locked out: try again in {duration(r.get('retry_after_s'))}"
    extra = f", lockout started: {duration(r['lockout_started_s'])}" if r.get("lockout_started_s") else ""
    return f"refused: {r.get('reason')}{extra}"


def scooters(s: dict[str, Any]) -> str:
    if not s.get("enabled", True):
        return "depot: disabled ([segway] enabled = false)"
    if not s["scooters"]:
        return "depot: no scooters yet (configure [[segway.scooters]] or wait for their pushes)"

    def last(x: dict[str, Any]) -> str:
        cmd = x.get("last_command")
        if not cmd:
            return "-"
        code = f" {cmd['code']}" if cmd.get("code") else ""
        via = f" via {cmd['channel']}" if cmd.get("channel") else ""
        return f"{cmd['op']}: {cmd['outcome']}{code}{via}"

    def radio(x: dict[str, Any]) -> str:
        ble = x.get("ble")
        if not ble:
            return "-"
        if not ble.get("in_range"):
            seen = ble.get("seen_age_s")
            return "out of range" + ("" if seen is None else f" ({duration(seen)} ago)")
        return f"{ble['rssi']} dBm" + (" connected" if ble.get("connected") else "")

    def queued(x: dict[str, Any]) -> str:
        pending = x.get("pending") or []
        return ", ".join(p["op"] for p in pending[:3]) + (" ..." if len(pending) > 3 else "") or "-"

    def flag(value: bool | None, yes: str, no: str) -> str:
        return "?" if value is None else yes if value else no

    rows = [
        [
            x["iot_code"] + (" (learnt)" if x.get("learnt") else ""),
            flag(x["online"], "online", "offline"),
            flag(x["locked"], "locked", "unlocked"),
            "-" if x["battery_percent"] is None else f"{x['battery_percent']}%",
            duration(x["status_age_s"]),
            duration(x["location_age_s"]),
            duration(x["key_age_s"]) if x["key_cached"] else "no",
            radio(x),
            queued(x),
            last(x),
            f"{x['failures']} ({x['last_error'][:40]})" if x["failures"] else "0",
        ]
        for x in s["scooters"]
    ]
    headers = ["IOT CODE", "ONLINE", "LOCK", "BATTERY", "STATUS AGE", "LOCATION AGE", "KEY", "BLE", "PENDING"]
    headers.append("LAST COMMAND")
    return table([*headers, "FAILURES"], rows)


def _route(r: dict[str, Any]) -> str:
    return ", ".join(f"{step.get('channel')}: {step.get('result')}" for step in r.get("route") or []) or "-"


def scooter_result(r: dict[str, Any]) -> str:
    outcome = r.get("outcome", "?")
    if outcome == "refused":
        return f"refused: {r.get('reason')}"
    parts = [f"{r.get('op')} on {r.get('iot_code')}: {outcome}"]
    if r.get("channel"):
        parts.append(f"via {r['channel']}")
    if outcome == "deferred":
        parts.append(f"queued until {r.get('expires')} (tried: {_route(r)})")
    elif r.get("route") and len(r["route"]) > 1:
        parts.append(f"tried {_route(r)}")
    if r.get("ble_status") and r["ble_status"] != "ok":
        parts.append(f"BLE: {r['ble_status']}")
    if r.get("reason") and outcome != "refused":
        parts.append(str(r["reason"]))
    if r.get("code") is not None:
        parts.append(f"code {r['code']} ({r.get('msg')})")
    if r.get("op_id"):
        parts.append(f"opId {r['op_id']}")
    if r.get("attempts", 1) > 1:
        parts.append(f"after {r['attempts']} attempts")
    if outcome == "failed":
        parts.append("a retry may help" if r.get("retryable") else "a retry will not help")
    text = ", ".join(parts)
    if r.get("data"):
        text += "\n" + "\n".join(f"  {k}: {_value(v)}" for k, v in r["data"].items())
    return text


def rules(r: dict[str, Any]) -> str:
    """``fleetgate rules``: the applied rule set, and each rule's state and last reported crossing."""
    if not r.get("enabled", True):
        return "edge rules: disabled"
    if r["version"] is None:
        return "edge rules: no rule set received yet"
    lines = [f"rule set version {r['version']}, issued {r['issued_at']}: {len(r['rules'])} rule(s)"]
    for rule in r["rules"]:
        state = "unevaluated" if not rule["evaluated"] else ("covered" if rule["covered"] else "uncovered")
        last = rule["last_crossing"]
        crossing = (
            "never"
            if last is None
            else f"{last['direction']} at {_moment(last['wall_ns'])} ({last['signal']})"
        )
        lines.append(f"  {rule['id']}  {rule['name'] or '-'}: {state}; last crossing {crossing}")
    odometer = r.get("odometer") or {}
    if odometer.get("estimate_m") is not None:
        triggers = ", ".join(
            f"{t['id']} ({t['type']} {t['threshold'] / 1000:g} km)" for t in odometer["triggers"]
        )
        lines.append(
            f"odometer {odometer['estimate_m'] / 1000:,.1f} km (anchored by {odometer['source']}); "
            f"distance triggers: {triggers or 'none'}"
        )
    counts, suppressed = r["counts"], r["suppressed"]
    lines.append(
        f"crossings {counts['crossings']} (dropped {counts['dropped']}); suppressed: "
        + ", ".join(f"{k} {v}" for k, v in suppressed.items())
        + (
            "; rejected sets: " + ", ".join(f"{k} {v}" for k, v in r["rejected"].items())
            if r["rejected"]
            else ""
        )
    )
    return "\n".join(lines)
