"""Configuration: shipped files load, and every problem names its key and file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fleetgate.config.loader import ConfigError, load_config
from fleetgate.config.schema import Config, describe

from conftest import FLEETGATE, write_config

SHIPPED = sorted((Path(__file__).parent.parent / "config").glob("*.toml"))


def problems(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for p in info.value.problems:
        assert p.file == path
    return [(p.key, p.message) for p in info.value.problems]


def test_shipped_files_are_valid():
    assert {p.name for p in SHIPPED} >= {"vehicle.toml", "depot.toml", "demo.toml"}
    for path in SHIPPED:
        load_config(path)


def test_no_file_gives_embedded_defaults():
    config = load_config(None)
    assert config == Config()
    assert config.store.synchronous == "full"


def test_unknown_key_is_an_error_naming_its_path(tmp_path):
    path = write_config(
        tmp_path / "c.toml", '[store]\nstate_dir = "/x"\nsynchronus = "full"\n[nonsense]\na = 1\n'
    )
    found = problems(path)
    assert ("store.synchronus", "unknown key") in found
    assert ("nonsense", "unknown key") in found


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    path = write_config(
        tmp_path / "c.toml",
        '[device]\nid = "has spaces"\nrole = "boat"\n[supervisor]\nbackoff_initial_s = -1\n'
        '[heartbeat]\ninterval_s = "often"\n',
    )
    keys = [key for key, _ in problems(path)]
    assert keys == ["device.id", "device.role", "supervisor.backoff_initial_s", "heartbeat.interval_s"]


def test_cross_field_rule_names_its_section(tmp_path):
    path = write_config(tmp_path / "c.toml", "[supervisor]\nbackoff_initial_s = 10\nbackoff_max_s = 5\n")
    [(key, message)] = problems(path)
    assert key == "supervisor"
    assert "backoff_max_s" in message


def test_bad_toml_names_file_and_line(tmp_path):
    path = write_config(tmp_path / "c.toml", '[device]\nid = "ok"\nrole = \n')
    [(key, message)] = problems(path)
    assert key == ""
    assert "line 3" in message


def test_missing_file_is_a_clear_error(tmp_path):
    [(_key, message)] = problems(tmp_path / "absent.toml")
    assert "cannot read" in message


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "etc").mkdir()
    path = write_config(tmp_path / "etc" / "c.toml", '[store]\nstate_dir = "../state"\n')
    assert load_config(path).store.state_dir == tmp_path / "state"


def test_secret_file_readable_by_group_or_others_is_refused(tmp_path):
    secret = tmp_path / "device.secret"
    secret.write_bytes(b"\x01" * 32)
    path = write_config(tmp_path / "c.toml", f'[device]\nsecret_file = "{secret}"\n')
    for mode in (0o644, 0o640, 0o604):
        secret.chmod(mode)
        [(key, message)] = problems(path)
        assert key == "device.secret_file"
        assert f"{mode:04o}" in message and "group or others" in message
    secret.chmod(0o600)
    assert load_config(path).device.secret_file == secret


def test_missing_secret_file_is_refused(tmp_path):
    path = write_config(tmp_path / "c.toml", f'[device]\nsecret_file = "{tmp_path / "nope"}"\n')
    [(key, message)] = problems(path)
    assert key == "device.secret_file" and "cannot be read" in message


def test_every_key_has_a_description():
    rows = describe()
    assert len(rows) > 10
    for key, _type, _default, description in rows:
        assert description, f"{key} has no description"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEETGATE, *args], capture_output=True, text=True, timeout=30, check=False)


def test_cli_config_check_prints_each_problem_and_fails(tmp_path):
    path = write_config(tmp_path / "bad.toml", '[device]\nid = ""\ncolour = "red"\n')
    result = run_cli("config", "check", str(path))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2
    assert any(f"{path}: device.id:" in line for line in lines)
    assert any(f"{path}: device.colour: unknown key" in line for line in lines)


def test_cli_config_check_accepts_a_good_file():
    result = run_cli("config", "check", str(SHIPPED[0]))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_run_with_bad_config_exits_78_without_starting(tmp_path):
    path = write_config(tmp_path / "bad.toml", "[store]\nsynchronous = 3\n")
    result = run_cli("--config", str(path), "run")
    assert result.returncode == 78
    assert "store.synchronous" in result.stderr


def test_configuration_reference_is_current():
    """Guards against a schema change that the operator docs do not show."""
    from fleetgate.config.schema import schema_markdown

    docs = Path(__file__).parent.parent / "docs" / "configuration.md"
    assert docs.read_text() == schema_markdown(), "run: fleetgate config schema > docs/configuration.md"


def test_signal_catalogue_docs_are_current():
    from fleetgate.config.signals import signals_markdown

    docs = Path(__file__).parent.parent / "docs" / "signals.md"
    assert docs.read_text() == signals_markdown(), "run: fleetgate signals > docs/signals.md"


def test_obd_schedule_names_must_be_catalogue_signals(tmp_path):
    path = write_config(tmp_path / "c.toml", "[obd]\nschedule = { vehicle_speed = 1, warp_drive = 2 }\n")
    [(key, message)] = problems(path)
    assert key == "obd"
    assert "warp_drive" in message and "vehicle_speed" in message  # names the culprit and what is known
