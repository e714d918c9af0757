"""The command line as a technician meets it: completion in a real bash, --json on every query verb, the
exit codes in --help and the README, --version, and the JSON of the verbs that need no daemon."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleetgate import __version__
from fleetgate.cli import EXIT_CODES, _parser
from fleetgate.config.signals import CATALOGUE

ROOT = Path(__file__).resolve().parent.parent
FLEETGATE = str(Path(sys.executable).with_name("fleetgate"))
NO_JSON = {("run",), ("completion",), ("top",)}  # the daemon itself, a shell script, a live screen


def leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {path: parser}
    out = {}
    for name, child in subs[0].choices.items():
        out.update(leaves(child, (*path, name)))
    return out


def test_every_query_verb_takes_json() -> None:
    found = leaves(_parser())
    assert ("status",) in found and ("config", "check") in found and ("sync", "now") in found
    missing = [
        " ".join(p)
        for p, sub in found.items()
        if p not in NO_JSON and "--json" not in sub._option_string_actions
    ]
    assert not missing, f"no --json: {missing}"


def test_the_exit_codes_in_help_are_the_readme_table() -> None:
    done = subprocess.run([FLEETGATE, "--help"], capture_output=True, text=True, check=True)
    assert EXIT_CODES in done.stdout
    codes = re.findall(r"^  (\d+) ", EXIT_CODES, re.M)
    table = re.findall(r"^\| `(\d+)` \|", (ROOT / "README.md").read_text(), re.M)
    assert codes == table


def test_version() -> None:
    done = subprocess.run([FLEETGATE, "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"fleetgate {__version__}"


def test_not_running_points_at_systemd(tmp_path: Path) -> None:
    done = subprocess.run(
        [FLEETGATE, "--socket", str(tmp_path / "none.sock"), "status"], capture_output=True, text=True
    )
    assert done.returncode == 3
    assert "systemctl status fleetgate" in done.stderr and "journalctl -u fleetgate" in done.stderr


def test_signals_json_is_the_catalogue() -> None:
    done = subprocess.run([FLEETGATE, "signals", "--json"], capture_output=True, text=True, check=True)
    signals = json.loads(done.stdout)
    assert [s["name"] for s in signals] == list(CATALOGUE)
    assert next(s for s in signals if s["name"] == "vehicle_speed")["reef"] == "speed"


def test_config_check_json_names_each_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nport = "eighty"\n[nonsense]\nx = 1\n')
    done = subprocess.run([FLEETGATE, "config", "check", str(bad), "--json"], capture_output=True, text=True)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["file"] == str(bad)
    assert {p["key"] for p in report["problems"]} == {"mqtt.port", "nonsense"}
    assert all(p["message"] for p in report["problems"])
    good = subprocess.run(
        [FLEETGATE, "config", "check", str(ROOT / "config" / "vehicle.toml"), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(good.stdout)["ok"] is True


def complete(line: str) -> list[str]:
    """What bash offers after ``line`` with the completion script loaded, as an interactive shell would."""
    script = f"""
eval "$({FLEETGATE} completion bash)"
COMP_LINE={json.dumps(line)}; COMP_POINT=${{#COMP_LINE}}
read -ra COMP_WORDS <<< "$COMP_LINE"
[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
_python_argcomplete fleetgate "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = {**os.environ, "PATH": f"{Path(FLEETGATE).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return sorted(w.strip() for w in done.stdout.splitlines() if w.strip())


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completes_verbs_actions_and_choices() -> None:
    assert complete("fleetgate sta") == ["status"]
    assert "check" in complete("fleetgate config ") and "schema" in complete("fleetgate config ")
    assert complete("fleetgate scooter 861477038719116 unlock --via ") == ["auto", "ble", "cloud"]
    assert {"bash", "zsh"} <= set(complete("fleetgate completion "))


def test_zsh_script_is_offered() -> None:
    done = subprocess.run([FLEETGATE, "completion", "zsh"], capture_output=True, text=True, check=True)
    assert "compdef" in done.stdout and "fleetgate" in done.stdout


def test_offline_no_stale_drain_rate_or_eta_is_shown() -> None:
    from fleetgate.daemon.uplink.feature import uplink_view

    offline = uplink_view({"online": False, "drain_rate_per_s": 1840.3}, 500)
    assert offline["drain_rate_per_s"] is None and offline["eta_s"] is None
    assert uplink_view({"online": True, "drain_rate_per_s": 100.0}, 500)["eta_s"] == 5.0


def test_status_exits_4_while_a_component_fails(tmp_path: Path, start_daemon) -> None:
    from conftest import daemon_config, wait_until

    config = daemon_config(tmp_path, f'[obd]\nenabled = true\nport = "{tmp_path / "no-such-port"}"\n')
    daemon = start_daemon(config)
    daemon.wait_ready()
    wait_until("obd in backoff", lambda: daemon.cli("status").returncode == 4)
    assert "backoff" in daemon.cli("status").stdout
    daemon.terminate()
    healthy = start_daemon(daemon_config(tmp_path))  # the same, without the OBD adapter that is not there
    healthy.wait_ready()
    wait_until("every component running", lambda: healthy.cli("status").returncode == 0)
