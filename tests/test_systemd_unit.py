"""The production unit systemd/fleetgate.service, checked by the real ``systemd-analyze`` (no systemd as PID 1).

``systemd-analyze verify`` exits 0 even for unknown keys and bad values (it only warns on stderr), so the
tests require an empty stderr too. It checks User=, Group= and SupplementaryGroups= for valid names only and
does not look them up, so the ``fleetgate`` user and ``bluetooth`` group need not exist on the test machine
(test_verify_warns_on_stderr_only shows a bad name is still caught).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleetgate.cli import EX_CONFIG
from fleetgate.config.loader import DEFAULT_CONFIG_PATH, load_config
from fleetgate.config.schema import ControlConfig, StoreConfig

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "fleetgate.service"
PRODUCTION_BINARY = "/opt/fleetgate/venv/bin/fleetgate"
LOCAL_BINARY = Path(sys.executable).parent / "fleetgate"
MAX_EXPOSURE = 4.0
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)"
)


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # An inherited SYSTEMD_LOG_LEVEL=debug would fill stderr with noise; without it the default (info) shows
    # every warning that verify can print.
    env = {k: v for k, v in os.environ.items() if k != "SYSTEMD_LOG_LEVEL"}
    return subprocess.run(
        [str(SYSTEMD_ANALYZE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env=env,
    )


def local_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit verbatim except for ExecStart's binary, which verify requires to exist on this machine."""
    text = UNIT.read_text() if text is None else text
    assert text.count(f"ExecStart={PRODUCTION_BINARY} ") == 1
    assert LOCAL_BINARY.is_file(), f"{LOCAL_BINARY} missing: is fleetgate installed in this venv?"
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={PRODUCTION_BINARY} ", f"ExecStart={LOCAL_BINARY} "))
    return unit


def directives(section: str) -> list[tuple[str, str]]:
    """(key, value) pairs of one section in file order; a key may repeat, as systemd allows."""
    pairs: list[tuple[str, str]] = []
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"continuation lines are not parsed here: {line!r}"
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section:
            key, sep, value = line.partition("=")
            assert sep, f"not a key=value line: {line!r}"
            pairs.append((key.strip(), value.strip()))
    return pairs


def values(section: str, key: str) -> list[str]:
    return [v for k, v in directives(section) if k == key]


def single(section: str, key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"[{section}] {key}= expected once, found {found}"
    return found[0]


def syscall_groups() -> dict[str, list[str]]:
    """systemd's own @group tables, from ``systemd-analyze syscall-filter``."""
    result = analyze("syscall-filter", "--no-pager", cwd=REPO)
    assert result.returncode == 0, result.stderr
    groups: dict[str, list[str]] = {}
    current = None
    for raw in result.stdout.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not raw[0].isspace():
            current = line
            groups[current] = []
        elif current is not None:
            groups[current].append(line)
    return groups


def effective_syscall_allow_list(filters: list[str]) -> set[str]:
    """SystemCallFilter= lines combined as systemd does for an allow list: later lines add, ~ lines remove."""
    assert filters and not filters[0].startswith("~"), "the first SystemCallFilter= must be an allow list"
    groups = syscall_groups()

    def expand(name: str) -> set[str]:
        return set().union(*(expand(n) for n in groups[name])) if name.startswith("@") else {name}

    allowed = expand("@default")  # systemd always adds it to an allow list
    for value in filters:
        names = set().union(*(expand(n) for n in value.removeprefix("~").split()))
        allowed = allowed - names if value.startswith("~") else allowed | names
    return allowed


def test_verify_is_clean(tmp_path):
    unit = local_copy(tmp_path)
    result = analyze("verify", str(unit), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"systemd-analyze verify warned:\n{result.stderr}"


def test_verify_warns_on_stderr_only(tmp_path):
    """Guards the test above: a bad key or user name exits 0 and shows up on stderr alone."""
    broken = UNIT.read_text().replace("[Service]\n", "[Service]\nNoSuchKey=1\nUser=9 bad\n", 1)
    result = analyze("verify", str(local_copy(tmp_path, broken)), cwd=tmp_path)
    assert result.returncode == 0
    assert "NoSuchKey" in result.stderr
    assert "9 bad" in result.stderr


def test_security_exposure_is_low(tmp_path):
    unit = local_copy(tmp_path)
    result = analyze("security", "--offline=yes", str(unit), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no overall exposure in:\n{result.stdout}"
    score = float(match.group(1))
    print(f"systemd-analyze security: overall exposure {score}")
    assert score <= MAX_EXPOSURE, result.stdout


def test_unit_matches_what_the_daemon_relies_on():
    assert single("Service", "Type") == "notify"
    assert single("Service", "NotifyAccess") == "main"
    assert single("Service", "WatchdogSec") == "30"
    assert str(EX_CONFIG) in single("Service", "RestartPreventExitStatus").split()
    assert not values("Service", "ExecStartPre")

    exec_start = single("Service", "ExecStart").split()
    assert exec_start[0] == PRODUCTION_BINARY
    assert exec_start[-1] == "run"
    assert Path(exec_start[exec_start.index("--config") + 1]) == DEFAULT_CONFIG_PATH

    runtime_dirs = [Path("/run", d) for d in single("Service", "RuntimeDirectory").split()]
    state_dirs = [Path("/var/lib", d) for d in single("Service", "StateDirectory").split()]
    config_dirs = [Path("/etc", d) for d in single("Service", "ConfigurationDirectory").split()]
    assert ControlConfig().socket_path.parent in runtime_dirs
    assert StoreConfig().state_dir in state_dirs
    assert DEFAULT_CONFIG_PATH.parent in config_dirs

    for shipped in ("vehicle.toml", "depot.toml"):  # the README tells installers to copy one of these
        config = load_config(REPO / "config" / shipped)
        assert config.control.socket_path.parent in runtime_dirs, shipped
        assert config.store.state_dir in state_dirs, shipped


def test_sandbox_leaves_the_daemon_its_system_calls_and_boot_id():
    # ProtectClock= blocks all of @clock with EPERM, even the read-only adjtimex behind ntp_synchronized().
    assert values("Service", "ProtectClock") in ([], ["no"])
    # ProcSubset=pid hides /proc/sys, and with it /proc/sys/kernel/random/boot_id.
    assert values("Service", "ProcSubset") in ([], ["all"])
    allowed = effective_syscall_allow_list(values("Service", "SystemCallFilter"))
    # ~@privileged removes @clock and @chown, and a call outside the filter kills the daemon with SIGSYS:
    # glibc's adjtimex() is the clock_adjtime system call (clock_adjtime64 on 32-bit ARM), and the control
    # socket is chowned to control.socket_group.
    assert {"adjtimex", "clock_adjtime", "clock_adjtime64", "chown", "fchown", "fchownat"} <= allowed
    assert not {"setuid", "settimeofday", "clock_settime", "setrlimit", "init_module"} & allowed
    assert "AF_UNIX" in single("Service", "RestrictAddressFamilies").split()
    assert values("Service", "PrivateUsers") in ([], ["no"])
