"""Imports flow one way between the rooms of the house (docs/architecture.md), and this keeps them so.

Every fleetgate source file is parsed (not imported), and every ``fleetgate`` import in it counts: at the top,
inside a function (a lazy import) or under ``TYPE_CHECKING`` alike, since each is a dependency a reader has to
follow. A room is ``config``, a driver (``drivers.obd``), a sync room (``sync.store``, ``sync.mqtt`` ...), the
daemon's ``runtime``, a feature (``daemon.telemetry``, ``daemon.access`` ...), the composition root
(``daemon.app``) or the command line (``cli``). import-linter would say the same in a contract file, but its
graph builder (grimp) walks the root package's own folder, and ours has its subpackages in sibling folders.
"""

from __future__ import annotations

import ast
import tomllib
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).parent.parent

# room -> the rooms it may import ("{self}" is the room itself). The first matching pattern wins.
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("root", ()),
    ("cli", ("*",)),
    ("config", ("config",)),
    ("drivers", ()),
    ("drivers.*", ("{self}",)),
    ("sync", ()),
    ("sync.store", ("sync.store",)),
    ("sync.*", ("{self}", "sync.store", "config", "root")),
    ("daemon", ()),
    ("daemon.app", ("daemon.*", "sync.*", "config", "root")),
    ("daemon.runtime", ("daemon.runtime", "sync.*", "config", "root")),
    ("daemon.*", ("{self}", "daemon.runtime", "sync.*", "drivers.*", "config", "root")),
]


def folder_packages(root: Path) -> dict[Path, str]:
    """The folder of each package, from pyproject's package-dir mapping."""
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {root / folder: package for package, folder in mapping.items()}


def module_files(root: Path) -> dict[str, Path]:
    folders = folder_packages(root)
    found: dict[str, Path] = {}
    for folder, package in folders.items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def room(module: str) -> str:
    parts = module.split(".")
    if parts == ["fleetgate"]:
        return "root"
    top = parts[1]
    if top in ("cli", "render", "provisioning", "top", "diag", "__main__"):
        return "cli"
    if top == "config":
        return "config"
    if top == "daemon" and len(parts) > 2 and parts[2] == "app":
        return "daemon.app"
    return ".".join(parts[1:3])  # "drivers.obd", "sync.mqtt", "daemon.runtime", "daemon.access", or "daemon"


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every fleetgate import in the file, relative ones resolved."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from fleetgate.daemon.access import feature` imports a module
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in known else target))
    return [(line, name) for line, name in found if name == "fleetgate" or name.startswith("fleetgate.")]


def allowed(importer: str, imported: str) -> bool:
    for pattern, may in RULES:
        if fnmatch(importer, pattern):
            return any(fnmatch(imported, p.replace("{self}", importer)) for p in may)
    raise AssertionError(f"no rule for room {importer!r}: add one to RULES and docs/architecture.md")


def violations(root: Path) -> list[str]:
    files = module_files(root)
    known = set(files)
    found = []
    for module, path in sorted(files.items()):
        source = room(module)
        for line, imported in imports_of(module, path, known):
            target = room(imported)
            if target != source and not allowed(source, target):
                found.append(f"{path.relative_to(root)}:{line}: {source} imports {imported} ({target})")
    return found


def test_every_import_between_rooms_follows_the_rules():
    assert violations(ROOT) == []


def test_the_scan_sees_the_imports_it_checks():
    """Guards against a scan that finds nothing (a wrong folder map, a parse that skips) and so passes."""
    files = module_files(ROOT)
    known = set(files)
    assert {"fleetgate.cli", "fleetgate.daemon.app", "fleetgate.drivers.obd.adapter"} <= known
    app = {name for _, name in imports_of("fleetgate.daemon.app", files["fleetgate.daemon.app"], known)}
    assert {"fleetgate.daemon.runtime.core", "fleetgate.daemon.access.feature"} <= app
    adapter = files["fleetgate.drivers.obd.adapter"]
    assert any(
        name.startswith("fleetgate.drivers.obd.")
        for _, name in imports_of("fleetgate.drivers.obd.adapter", adapter, known)
    ), "relative imports resolved"
    assert {room(m) for m in known} >= {"daemon.runtime", "daemon.telemetry", "sync.store", "drivers.gps"}


def test_each_kind_of_forbidden_import_is_reported(tmp_path):
    """The rules catch what docs/architecture.md forbids, whether the import is at the top or deferred."""
    tree = {
        "pyproject.toml": (ROOT / "pyproject.toml").read_text(),
        "drivers/gps.py": "from fleetgate.sync.store import Outbox\n",
        "sync/mqtt/link.py": "def f():\n    from fleetgate.daemon.runtime.clock import Clock\n",
        "sync/store/outbox.py": "import fleetgate.config\n",
        "daemon/runtime/status.py": "from fleetgate.daemon.uplink.feature import health\n",
        "daemon/telemetry/feature.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from fleetgate.daemon.access.controller import AccessController\n"
        ),
        "config/schema.py": "from fleetgate.drivers.obd import SIGNALS\n",
        "daemon/access/feature.py": "from fleetgate.daemon.runtime.core import Core\nfrom . import lockout\n",
        "daemon/access/lockout.py": "",
    }
    for name, text in tree.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    for package in ("fleetgate", "daemon", "sync", "drivers"):
        (tmp_path / package).mkdir(exist_ok=True)
    found = violations(tmp_path)
    assert found == [
        "config/schema.py:1: config imports fleetgate.drivers.obd (drivers.obd)",
        "daemon/runtime/status.py:1: daemon.runtime imports fleetgate.daemon.uplink.feature (daemon.uplink)",
        "daemon/telemetry/feature.py:3: daemon.telemetry imports fleetgate.daemon.access.controller "
        "(daemon.access)",
        "drivers/gps.py:1: drivers.gps imports fleetgate.sync.store (sync.store)",
        "sync/mqtt/link.py:2: sync.mqtt imports fleetgate.daemon.runtime.clock (daemon.runtime)",
        "sync/store/outbox.py:1: sync.store imports fleetgate.config (config)",
    ]
