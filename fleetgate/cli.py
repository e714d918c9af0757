# PYTHON_ARGCOMPLETE_OK
"""The ``fleetgate`` command: run the daemon, and the technician's view of it over the control socket.

Apart from ``run``, no command opens hardware or the database: they ask the running daemon (``keys`` reads
the device secret file to print the public keys derived from it, ``config`` and ``signals`` read no state).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetgate import __version__, render
from fleetgate.config.loader import DEFAULT_CONFIG_PATH, ConfigError, device_warnings, load_config
from fleetgate.config.schema import Config, schema_markdown
from fleetgate.daemon.runtime.control_protocol import ControlError, DaemonNotRunning, request

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_DEGRADED = 4  # status: a component in backoff (failing) or an alert raised
EX_CONFIG = 78  # sysexits.h; the systemd unit does not restart on it

EXIT_CODES = f"""exit codes:
  0    ok
  {EXIT_FAILURE}    failure: a problem found (config check), a PIN refused, a command not done
  {EXIT_USAGE}    bad command line
  {EXIT_NOT_RUNNING}    the daemon is not running (demo: the demo is not); never from run, keys, signals, config, diag
  {EXIT_DEGRADED}    status: running, but a component is failing (in backoff) or an alert is raised
  {EX_CONFIG}   the configuration cannot be used, or the database is newer than this fleetgate
  130  interrupted (Ctrl-C)"""


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the raw JSON reply")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleetgate",
        description="fleetgate edge gateway daemon and diagnostics",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"configuration file (default: $FLEETGATE_CONFIG or {DEFAULT_CONFIG_PATH})",
    )
    p.add_argument(
        "--socket", type=Path, default=None, help="control socket (default: from the configuration)"
    )
    p.add_argument("--version", action="version", version=f"fleetgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", help="run the daemon in the foreground (systemd starts it this way)")

    st = sub.add_parser("status", help="components, backlog, uptime and time trust of the running daemon")
    _json_flag(st)

    for name, what in (
        ("obd", "adapter, VIN, live values, MIL and DTCs, ignition"),
        ("gps", "fix, satellites, time trust"),
        ("rules", "edge rules: each rule, its state and last crossing; the rule set's version"),
    ):
        view = sub.add_parser(name, help=f"{what} (from the running daemon)")
        _json_flag(view)

    q = sub.add_parser("queue", help="outbox per stream: depth, size, quota, oldest record, evictions")
    _json_flag(q)
    sync = sub.add_parser("sync", help="uplink actions")
    sync_sub = sync.add_subparsers(dest="sync_command", required=True, metavar="ACTION")
    now = sync_sub.add_parser(
        "now", help="connect to the broker now if waiting to retry, and wake the drain at once"
    )
    _json_flag(now)

    ses = sub.add_parser(
        "sessions", help="managed sessions: ids, state, sync version and age, lockout (no PINs)"
    )
    _json_flag(ses)
    pin = sub.add_parser("pin", help="PIN access actions")
    pin_sub = pin.add_subparsers(dest="pin_command", required=True, metavar="ACTION")
    pin_test = pin_sub.add_parser(
        "test",
        help="check a PIN against the synchronized sessions without switching start-enable (asks for the PIN "
        "without echo, or reads one line from standard input; a wrong PIN counts towards the lockout)",
    )
    _json_flag(pin_test)

    sco = sub.add_parser(
        "scooters", help="depot: each scooter's status, battery, location age, key cached, last command"
    )
    _json_flag(sco)
    one = sub.add_parser(
        "scooter",
        help="depot: run a Segway query, control or setting for one scooter through the daemon (audited)",
        description="Operations: "
        + ", ".join(_operation_names())
        + ". Parameters use the Segway API's names, "
        'e.g. "fleetgate scooter 861477038719116 speed-mode speedMode=2"; a value is JSON if it parses as JSON '
        "(numbers, true/false, objects), else a string.",
    )
    one.add_argument("iot_code", help="the scooter's iotCode (IMEI)")
    one.add_argument("op", help="operation, e.g. unlock, lock, status, speed-mode")
    one.add_argument("params", nargs="*", metavar="NAME=VALUE", help="the operation's parameters")
    one.add_argument(
        "--via",
        choices=("auto", "ble", "cloud"),
        default="auto",
        help="the channel: auto (BLE when the scooter is in range and its key cached, else the cloud; "
        "queued if neither can run it now), ble or cloud (default: auto)",
    )
    _json_flag(one)

    keys = sub.add_parser(
        "keys", help="provisioning: this gateway's public keys (the PIN sealing key for the cloud); no secret"
    )
    keys.add_argument(
        "--generate",
        action="store_true",
        help="make the device secret first if it does not exist (mode 0600)",
    )
    keys.add_argument("--secret-file", type=Path, help="the device secret (default: device.secret_file)")
    keys.add_argument("--json", action="store_true", help="print JSON")

    sig = sub.add_parser(
        "signals", help="the signal catalogue: names, units, sources, REEF/Vinli names (Markdown)"
    )
    sig.add_argument("--json", action="store_true", help="print JSON")

    cfg = sub.add_parser("config", help="check a configuration file or show the schema")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = cfg_sub.add_parser("check", help="print every problem in FILE with its key path; non-zero if any")
    check.add_argument("file", type=Path, nargs="?", help="file to check (default: the --config file)")
    check.add_argument("--json", action="store_true", help="print JSON: the file, ok, every problem")
    schema = cfg_sub.add_parser("schema", help="every key with its type, default and description (Markdown)")
    schema.add_argument("--json", action="store_true", help="print the JSON Schema instead")

    top = sub.add_parser(
        "top",
        help="a live view: components, signals, trip, sessions and start-enable, outbox and uplink (Ctrl-C ends)",
    )
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--once", action="store_true", help="print one frame and exit (no full screen)")

    diag = sub.add_parser("diag", help="diagnostics for support")
    diag_sub = diag.add_subparsers(dest="diag_command", required=True, metavar="ACTION")
    bundle = diag_sub.add_parser(
        "bundle",
        help="one tar.gz to send: every view as JSON, the config (secrets masked), the journal, store integrity, "
        "versions; never a PIN, key or secret",
    )
    bundle.add_argument(
        "-o", "--output", type=Path, help="the file (default: fleetgate-diag-<device>-<UTC>.tar.gz)"
    )
    bundle.add_argument("--json", action="store_true", help="print what was written as JSON")

    demo = sub.add_parser(
        "demo", help="drive ./dev demo --interactive: type a PIN, switch coverage, start or end the session"
    )
    demo_sub = demo.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    typed = demo_sub.add_parser("type-pin", help="type PIN and # on the demo's keypad; prints its answer")
    typed.add_argument("pin")
    cov = demo_sub.add_parser("coverage", help="cellular coverage for the gateway's uplink")
    cov.add_argument("state", choices=("on", "off"))
    sess = demo_sub.add_parser("session", help="the cloud starts a new session or ends the current one")
    sess.add_argument("action", choices=("start", "end"))
    sess.add_argument("--pin", help="the new session's PIN (default 482916)")
    demo_sub.add_parser("status", help="uplink, backlog, start-enable, what the cloud received")
    for action in demo_sub.choices.values():
        _json_flag(action)

    comp = sub.add_parser(
        "completion",
        help="print the shell completion script (argcomplete): "
        'eval "$(fleetgate completion bash)" in ~/.bashrc, or the file in /usr/share/bash-completion/completions',
    )
    comp.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    return p


def _config_path(args: argparse.Namespace) -> tuple[Path, bool]:
    """The config file to use and whether it was asked for explicitly."""
    if args.config is not None:
        return args.config, True
    env = os.environ.get("FLEETGATE_CONFIG")
    if env:
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


def _load(args: argparse.Namespace) -> Config:
    path, explicit = _config_path(args)
    if not explicit and not path.exists():
        return load_config(None)
    return load_config(path)


def _print_problems(error: ConfigError) -> None:
    for problem in error.problems:
        print(f"error: {problem}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    from fleetgate.daemon.app import run_daemon
    from fleetgate.daemon.runtime.logs import setup_logging

    try:
        config = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return EX_CONFIG
    setup_logging(config.log.level, config.log.format)
    os.umask(0o077)  # the database holds session data: owner only
    # Not asyncio.run(): its clean-up waits for every task, and a component that ignores cancellation would
    # then hold up the stop forever. The supervisor has already waited stop_timeout_s and logged stragglers.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(run_daemon(config))
    finally:
        loop.close()


def _ask(
    args: argparse.Namespace, cmd: str, cmd_args: dict[str, Any] | None = None, timeout_s: float = 10.0
) -> Any:
    socket_path = args.socket
    if socket_path is None:
        socket_path = _load(args).control.socket_path
    return request(socket_path, cmd, cmd_args, timeout_s)


def _view(cmd: str, human: Callable[[dict[str, Any]], str]) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        result = _ask(args, cmd)
        print(json.dumps(result, indent=2) if args.json else human(result))
        return EXIT_DEGRADED if cmd == "status" and degraded(result) else 0

    return show


def degraded(status: dict[str, Any]) -> bool:
    """A component failing (in backoff after an error) or an alert: what a monitoring script must not call OK.
    A component still starting is not (the first seconds after a start)."""
    return bool(status.get("alerts")) or any(c["state"] == "backoff" for c in status.get("components", []))


def _sync(args: argparse.Namespace) -> int:
    try:
        reply = _ask(args, "sync")
    except ControlError as exc:
        if exc.code == "unknown-command":
            print("fleetgate: the uplink is disabled ([mqtt] enabled = false)", file=sys.stderr)
            return EXIT_FAILURE
        raise
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print("reconnecting to the broker now, then draining" if reply.get("reconnecting") else "drain woken")
    return 0


def _read_pin() -> str:
    """The PIN from the terminal without echo, or one line of standard input; never from the command line,
    where it would land in the shell history and in /proc/*/cmdline."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("PIN: ")
    return sys.stdin.readline().strip()


def _pin(args: argparse.Namespace) -> int:
    pin = _read_pin()
    # ASCII digits only: str.isdigit() is also true for fullwidth and Arabic-Indic digits, which no keypad sends
    if not (pin.isascii() and pin.isdigit()) or not 4 <= len(pin) <= 32:
        print("fleetgate: a PIN is 4 to 32 digits (0-9)", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = _ask(args, "pin-test", {"pin": pin})
    except ControlError as exc:
        if exc.code == "unknown-command":
            print("fleetgate: PIN access is disabled ([sessions] enabled = false)", file=sys.stderr)
            return EXIT_FAILURE
        raise
    print(json.dumps(result, indent=2) if args.json else render.pin_test(result))
    return 0 if result.get("outcome") == "accepted" else EXIT_FAILURE


def _operation_names() -> list[str]:
    from fleetgate.sync.segway.operations import OPERATIONS

    return sorted([*OPERATIONS, "rotate-key"])  # rotate-key: the gateway's own (daemon/scooters/commands.py)


def _scooter(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    for item in args.params:
        name, sep, text = item.partition("=")
        if not sep or not name:
            print(f"fleetgate: parameter {item!r} is not NAME=VALUE", file=sys.stderr)
            return EXIT_USAGE
        try:
            params[name] = json.loads(text)
        except ValueError:
            params[name] = text
    if args.op not in _operation_names():
        print(
            f"fleetgate: {args.op!r} is not an operation; one of: {', '.join(_operation_names())}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        # Segway may take a while (the device answers through the cloud) and retryable codes are tried again.
        request = {"iot_code": args.iot_code, "op": args.op, "params": params, "via": args.via}
        result = _ask(args, "scooter", request, 180.0)
    except ControlError as exc:
        if exc.code == "unknown-command":
            print("fleetgate: the depot is disabled ([segway] enabled = false)", file=sys.stderr)
            return EXIT_FAILURE
        raise
    print(json.dumps(result, indent=2) if args.json else render.scooter_result(result))
    # "deferred": queued, not done; the exit code says so (a script waiting for the lock must not go on).
    return 0 if result.get("outcome") in ("done", "partial") else EXIT_FAILURE


def _cmd_keys(args: argparse.Namespace) -> int:
    from fleetgate import provisioning

    path, explicit = _config_path(args)
    try:
        keys = provisioning.report(
            path if explicit or path.exists() else None, args.secret_file, args.generate
        )
    except provisioning.ProvisioningError as exc:
        print(f"fleetgate: {exc}", file=sys.stderr)
        return EX_CONFIG
    print(json.dumps(keys, indent=2) if args.json else provisioning.render(keys))
    return 0


def _cmd_signals(args: argparse.Namespace) -> int:
    from fleetgate.config.signals import signals_json, signals_markdown

    if args.json:
        print(json.dumps(signals_json(), indent=2))
    else:
        sys.stdout.write(signals_markdown())
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.config_command == "schema":
        if args.json:
            print(json.dumps(Config.model_json_schema(), indent=2))
        else:
            sys.stdout.write(schema_markdown())
        return 0
    path = args.file or _config_path(args)[0]
    try:
        config = load_config(path)
    except ConfigError as exc:
        if args.json:
            problems = [{"key": p.key, "message": p.message} for p in exc.problems]
            print(json.dumps({"file": str(path), "ok": False, "problems": problems}, indent=2))
        else:
            _print_problems(exc)
            print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return EXIT_FAILURE
    warnings = device_warnings(config)
    if args.json:
        print(json.dumps({"file": str(path), "ok": True, "problems": [], "warnings": warnings}, indent=2))
    else:
        for warning in warnings:
            print(f"warning: {path}: {warning}", file=sys.stderr)
        print(f"{path}: OK")
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    from fleetgate import top

    if not 0.1 <= args.interval <= 3600:
        print("fleetgate: --interval is 0.1 to 3600 seconds", file=sys.stderr)
        return EXIT_USAGE
    return top.run(lambda cmd: _ask(args, cmd), args.interval, args.once)


def _cmd_diag(args: argparse.Namespace) -> int:
    from fleetgate import diag

    path, explicit = _config_path(args)
    try:
        config = _load(args)
        device, socket_path = config.device.id, config.control.socket_path
    except ConfigError:
        # Wanted most when the configuration is wrong: the file goes in as it is, the daemon found where the
        # file says it listens (a daemon still running was started with a file that worked).
        device, socket_path = diag.raw_identity(path)
    socket_path = args.socket or socket_path

    def ask(view: str) -> Any:
        return request(socket_path, view, None, 60.0)

    files = diag.collect(ask, path if explicit or path.exists() else None)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.output or Path(f"fleetgate-diag-{device}-{stamp}.tar.gz")
    try:
        diag.write(files, out)
    except OSError as exc:
        print(f"fleetgate: cannot write {out}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    report = {"file": str(out), "members": sorted(files), "bytes": out.stat().st_size}
    print(
        json.dumps(report, indent=2)
        if args.json
        else f"wrote {out} ({report['bytes']} bytes, {len(files)} files)"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import socket

    path = Path(os.environ.get("FLEETGATE_DEMO_SOCKET", ".run/demo/demo.sock"))
    body: dict[str, Any] = {"cmd": args.demo_command}
    if args.demo_command == "type-pin":
        body["pin"] = args.pin
    elif args.demo_command == "coverage":
        body["state"] = args.state
    elif args.demo_command == "session":
        body |= {"action": args.action, "pin": args.pin}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(str(path))
            sock.sendall(json.dumps(body).encode() + b"\n")
            reply = json.loads(sock.makefile("rb").readline())
    except (FileNotFoundError, ConnectionRefusedError):
        print(
            f"fleetgate: the demo is not running (no {path}): start ./dev demo --interactive", file=sys.stderr
        )
        return EXIT_NOT_RUNNING
    print(json.dumps(reply, indent=2) if args.json else "  ".join(f"{k}: {v}" for k, v in reply.items()))
    return EXIT_FAILURE if "error" in reply else 0


def _cmd_completion(args: argparse.Namespace) -> int:
    import argcomplete

    sys.stdout.write(argcomplete.shellcode(["fleetgate"], shell=args.shell))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "status": _view("status", render.status),
    "obd": _view("obd", render.obd),
    "gps": _view("gps", render.gps),
    "queue": _view("queue", render.queue),
    "sync": lambda args: _sync(args),
    "sessions": _view("sessions", render.sessions),
    "rules": _view("rules", render.rules),
    "pin": _pin,
    "scooters": _view("scooters", render.scooters),
    "scooter": _scooter,
    "keys": _cmd_keys,
    "signals": _cmd_signals,
    "config": _cmd_config,
    "completion": _cmd_completion,
    "demo": _cmd_demo,
    "diag": _cmd_diag,
    "top": _cmd_top,
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    if argv is None and "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (fleetgate completion)
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        _print_problems(exc)
        return EX_CONFIG
    except DaemonNotRunning as exc:
        print(f"fleetgate: {exc}", file=sys.stderr)
        print("  see: systemctl status fleetgate; journalctl -u fleetgate -n 50", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ControlError as exc:
        print(f"fleetgate: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
