"""``fleetgate diag bundle``: one tar.gz a technician can send, with never a PIN, key or secret in it.

What goes in: every view of the running daemon as JSON (status, obd, gps, queue, sessions, rules, scooters,
store: integrity and sizes), the configuration file with secret-looking values masked, the unit's recent
journal, and versions (fleetgate, Python, SQLite, the libraries, the OS). What stays out by construction:
the daemon's views carry no PIN, key or secret (tests/test_access_daemon.py and the depot's tests search
them), the configuration names secret files and the bundle never opens one, and a line of the
configuration whose key looks secret has its value replaced. A view that fails (the daemon not running,
a feature disabled) is recorded with its error: the bundle is made anyway.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import sqlite3
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fleetgate import __version__
from fleetgate.config.schema import Config
from fleetgate.daemon.runtime.control_protocol import ControlError, DaemonNotRunning

Ask = Callable[[str], Any]
VIEWS = ("status", "obd", "gps", "queue", "sessions", "rules", "scooters", "store")
LIBRARIES = (
    "obd",
    "pyserial",
    "aiomqtt",
    "paho-mqtt",
    "pydantic",
    "pynacl",
    "httpx",
    "aiohttp",
    "bleak",
    "rich",
)
JOURNAL_LINES = 2000
# A key whose value is secret if it is ever written inline (fleetgate itself only takes files naming them).
SECRET_KEY = re.compile(r"secret|password|passphrase|token|private|(^|_)key$", re.IGNORECASE)
ASSIGNMENT = re.compile(r"^(\s*)([A-Za-z0-9_.\"'-]+)(\s*=\s*)(.+)$")
MASK = '"(masked)"'


def mask_config(text: str) -> str:
    """The TOML text with the value of every secret-looking key replaced; a file path (``*_file``) stays,
    it says where a secret is, not what it is."""
    out = []
    for line in text.splitlines():
        m = ASSIGNMENT.match(line)
        if m and not line.lstrip().startswith("#"):
            key = m.group(2).strip("\"'").rsplit(".", 1)[-1]
            if SECRET_KEY.search(key) and not key.endswith("_file"):
                line = f"{m.group(1)}{m.group(2)}{m.group(3)}{MASK}"
        out.append(line)
    return "\n".join(out) + "\n"


def raw_identity(config_path: Path) -> tuple[str, Path]:
    """(device id, control socket) read straight from a file that does not validate; the defaults where the
    file does not say."""
    defaults = Config()
    device, socket_path = defaults.device.id, defaults.control.socket_path
    try:
        raw = tomllib.loads(config_path.read_text())
    except (OSError, ValueError):
        return device, socket_path
    device = str(raw.get("device", {}).get("id", device))
    if isinstance(raw.get("control", {}).get("socket_path"), str):
        socket_path = Path(raw["control"]["socket_path"])
    return device, socket_path


def versions() -> dict[str, Any]:
    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            libs[name] = None
    os_release = Path("/etc/os-release")
    return {
        "fleetgate": __version__,
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "libraries": libs,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "os_release": os_release.read_text(errors="replace") if os_release.exists() else None,
    }


def journal(unit: str = "fleetgate") -> str:
    try:
        done = subprocess.run(
            ["journalctl", "-u", unit, "-n", str(JOURNAL_LINES), "--no-pager", "-o", "short-iso-precise"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(no journal: {exc})\n"
    return done.stdout or f"(journalctl exited {done.returncode}: {done.stderr.strip()})\n"


def collect(ask: Ask, config_path: Path | None) -> dict[str, bytes]:
    """The bundle's files by name."""
    files: dict[str, bytes] = {}
    errors: dict[str, str] = {}
    down: str | None = None  # a daemon that is not running is asked once, not once a view
    for view in VIEWS:
        if down is not None:
            errors[view] = down
            continue
        try:
            result = ask(view)
        except ControlError as exc:
            errors[view] = f"{exc.code}: {exc}"
            if isinstance(exc, DaemonNotRunning):
                down = errors[view]
            continue
        files[f"{view}.json"] = json.dumps(result, indent=2).encode()
    if config_path is not None and config_path.is_file():
        files["config.toml"] = mask_config(config_path.read_text(errors="replace")).encode()
    else:
        errors["config"] = f"no configuration file at {config_path} (the embedded defaults apply)"
    files["journal.txt"] = journal().encode()
    files["versions.json"] = json.dumps(versions(), indent=2).encode()
    made = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    files["README.txt"] = (
        f"fleetgate diagnostics bundle, made {made}.\n"
        "Views of the running daemon (*.json), the configuration with secret-looking values masked, the unit's\n"
        "journal, versions. No PIN, key or secret is in it.\n"
        + ("".join(f"not included: {k}: {v}\n" for k, v in errors.items()) if errors else "")
    ).encode()
    return files


def write(files: dict[str, bytes], out: Path) -> None:
    """A tar.gz readable by its owner only (it holds positions and identifiers)."""
    buffer = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"fleetgate-diag/{name}")
            info.size, info.mtime, info.mode = len(data), int(now), 0o600
            tar.addfile(info, io.BytesIO(data))
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(buffer.getvalue())
