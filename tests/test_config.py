"""Configuration: shipped files load, and every problem names its key and file."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import UnionType
from typing import Annotated, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from fleetgate.config.loader import ConfigError, Problem, load_config
from fleetgate.config.schema import Config, describe

from conftest import FLEETGATE, daemon_config, write_config

SHIPPED = sorted((Path(__file__).parent.parent / "config").glob("*.toml"))


def load_problems(path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for p in info.value.problems:
        assert p.file == path
    return info.value.problems


def problems(path: Path) -> list[tuple[str, str]]:
    return [(p.key, p.message) for p in load_problems(path)]


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


# --- hardening (issue 11): hostile values, deep nesting, huge literals ---------------------------------------


def _numeric_kind(annotation: object) -> str | None:
    """'int' or 'float' for a number field (optional or constrained); 'table' for a table of numbers."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _numeric_kind(args[0])
    if origin in (Union, UnionType):
        kinds = {_numeric_kind(a) for a in args if a is not type(None)} - {None}
        return kinds.pop() if kinds else None
    if origin is dict and _numeric_kind(args[1]) in ("int", "float"):
        return "table"
    if annotation in (int, float):
        return annotation.__name__
    return None


def numeric_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str]]:
    """Every numeric key of the schema as (TOML dotted path, 'int' | 'float'); a table of numbers is named by
    one of its default entries. A key added later is found here without a change to this test."""
    found: list[tuple[str, str]] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += numeric_keys(field.annotation, f"{path}.")
            continue
        kind = _numeric_kind(field.annotation)
        if kind == "table":
            entry = next(iter(field.get_default(call_default_factory=True)))
            value_kind = _numeric_kind(get_args(field.annotation)[1])
            found.append((f"{path}.{entry}", value_kind or "float"))
        elif kind is not None:
            found.append((path, kind))
    return found


HOSTILE_NUMBERS = [
    "inf",
    "-inf",
    "+inf",
    "nan",
    "-nan",
    "1e300",
    "-1e300",
    "1" + "0" * 30,
    "-1" + "0" * 30,
    "true",
]


def test_schema_enumeration_finds_every_numeric_key():
    keys = dict(numeric_keys())
    assert len(keys) >= 45
    assert keys["store.quota_mb.telemetry"] == "float"
    assert keys["obd.schedule.vehicle_speed"] == "float"
    assert keys["sessions.lockout.base_delay_s"] == "float"
    assert keys["obd.baudrate"] == "int"  # optional
    assert keys["start_enable.gpio_line"] == "int"


@pytest.mark.parametrize("key,kind", numeric_keys())
def test_every_numeric_key_refuses_infinity_nan_huge_values_and_booleans(tmp_path, key, kind):
    """inf, nan, out-of-range and true/false are refused by the schema with the key named, so `config check`
    catches what `run` would fail on (an OverflowError at start, or a lockout that fails open)."""
    path = tmp_path / "c.toml"
    for literal in HOSTILE_NUMBERS:
        write_config(path, f"{key} = {literal}\n")
        found = problems(path)
        assert key in [k for k, _ in found], f"{key} = {literal} not refused by key: {found}"


def test_cli_config_check_refuses_an_infinite_quota_and_lockout(tmp_path):
    path = write_config(
        tmp_path / "c.toml",
        "[store]\nquota_mb = { telemetry = inf }\n[sessions.lockout]\nbase_delay_s = inf\n",
    )
    result = run_cli("config", "check", str(path))
    assert result.returncode == 1
    assert f"{path}: store.quota_mb.telemetry:" in result.stderr
    assert f"{path}: sessions.lockout.base_delay_s:" in result.stderr
    assert "Traceback" not in result.stderr


def deep_toml(depth: int, kind: str) -> str:
    if kind == "array":
        return "a = " + "[" * depth + "]" * depth + "\n"
    if kind == "inline-table":
        return "a = " + "{ b = " * depth + "1" + " }" * depth + "\n"
    return "a = " + "[{ b = " * depth + "1" + " }]" * depth + "\n"


@pytest.mark.parametrize("kind", ["array", "inline-table", "mixed"])
def test_deeply_nested_toml_is_a_config_error(tmp_path, kind):
    path = write_config(tmp_path / "c.toml", deep_toml(600, kind))
    [(key, message)] = problems(path)
    assert key == ""
    assert "nested too deeply" in message and "line 1" in message


def test_cli_config_check_on_deeply_nested_toml_prints_a_message_not_a_traceback(tmp_path):
    path = write_config(tmp_path / "c.toml", deep_toml(600, "array"))
    result = run_cli("config", "check", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"error: {path}: not valid TOML: " in result.stderr


def test_integer_literal_too_long_to_convert_is_a_config_error(tmp_path):
    # tomllib raises a bare ValueError for an integer of more than 4300 digits (Python's int conversion limit)
    path = write_config(tmp_path / "c.toml", "[store]\nmax_batch = 1" + "0" * 5000 + "\n")
    [(key, message)] = problems(path)
    assert key == "" and "not valid TOML" in message


def test_a_huge_value_is_shortened_in_the_message(tmp_path):
    path = write_config(tmp_path / "c.toml", f'[device]\nid = "{"x" * 100_000}"\n')
    [(key, message)] = problems(path)
    assert key == "device.id"
    assert len(message) < 300 and "..." in message


def test_an_oversized_file_is_refused(tmp_path):
    # a configuration is a few KiB; reading /dev/zero or a runaway file must not take all the memory
    path = tmp_path / "c.toml"
    path.write_text("# padding\n" * 200_000)  # 2 MB of comments: valid TOML
    [(key, message)] = problems(path)
    assert key == "" and "larger than" in message


@pytest.mark.parametrize(
    "text,key",
    [
        pytest.param("deep = " + "[" * 600 + "]" * 600 + "\n", None, id="600-deep"),
        pytest.param("[store.quota_mb]\ntelemetry = inf\n", "store.quota_mb.telemetry", id="inf-quota"),
    ],
)
def test_daemon_refuses_an_unusable_config_with_exit_78_and_one_line(tmp_path, start_daemon, text, key):
    """A real `fleetgate run`: EX_CONFIG (the unit's RestartPreventExitStatus=78, so no restart loop), one line
    naming the file (and key), no traceback, nothing started."""
    config = daemon_config(tmp_path, extra=text)
    daemon = start_daemon(config)
    assert daemon.proc.wait(30) == 78, daemon.log
    lines = daemon.log.strip().splitlines()
    assert len(lines) == 1, daemon.log
    assert lines[0].startswith(f"error: {config}: ")
    assert key is None or f": {key}: " in lines[0]
    assert "Traceback" not in daemon.log
    assert not (tmp_path / "state").exists() and not (tmp_path / "control.sock").exists()


def test_a_key_with_control_characters_is_quoted_on_one_line(tmp_path):
    path = write_config(
        tmp_path / "c.toml", '[store]\n"bad\\nkey\\u001b[2J" = 1\nquota_mb = { "x y" = -1 }\n'
    )
    found = problems(path)
    assert ('store."bad\\nkey\\u001b[2J"', "unknown key") in found
    assert any(key == 'store.quota_mb."x y"' for key, _ in found)
    assert all("\n" not in str(p) for p in load_problems(path))


def test_a_path_with_control_characters_is_printed_on_one_line(tmp_path):
    path = write_config(
        tmp_path / "c.toml", '[device]\nsecret_file = "/nonexistent/a\\nb\\u001b[2J\\u202e"\n'
    )
    [problem] = load_problems(path)
    assert problem.key == "device.secret_file"
    assert "\n" not in str(problem) and "\x1b" not in str(problem) and "\u202e" not in str(problem)
    assert "a\\u000ab\\u001b[2J\\u202e" in str(problem)


def test_a_live_share_too_small_for_a_live_message_every_n_is_refused(tmp_path):
    # found by the fuzz suite: 5e-324 passed ge=0 and the drain's round(1 / live_share) raised OverflowError
    path = write_config(tmp_path / "c.toml", "[mqtt]\nlive_share = 5e-324\n")
    [(key, message)] = problems(path)
    assert key == "mqtt.live_share" and "0.001" in message
    for fine in ("0", "0.001", "1"):
        write_config(path, f"[mqtt]\nlive_share = {fine}\n")
        assert load_config(path).mqtt.live_share == float(fine)


def _secret(tmp_path: Path, name: str = "segway.secret") -> Path:
    path = tmp_path / name
    path.write_text("e2651be5-12d3-48f3-ba6c-bc2b04a447b6\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ('[segway]\nenabled = true\nclient_secret_file = "{secret}"\n', "", "device.role"),
        (
            '[device]\nrole = "depot"\n[segway]\nenabled = true\nclient_secret_file = "{secret}"\n',
            "",
            "device.secret_file",
        ),
        (
            '[device]\nrole = "depot"\nsecret_file = "{secret}"\n[segway]\nenabled = true\n',
            "segway",
            "client_secret_file",
        ),
        ('[segway]\nplatform_code = "X20081"\n', "segway.platform_code", "pattern"),
        ('[segway]\napi_base = "http://127.0.0.1:1"\n', "segway", "https"),
        (
            '[[segway.scooters]]\niot_code = "861477038719116"\n[[segway.scooters]]\niot_code = "861477038719116"\n',
            "segway",
            "more than once",
        ),
        ('[[segway.scooters]]\niot_code = "86 14"\n', "segway.scooters[0].iot_code", "pattern"),
        ("[segway.push]\nenabled = true\n", "segway.push", "key_file"),
    ],
)
def test_the_depot_section_refuses_what_cannot_run(tmp_path, body, key, words):
    path = write_config(tmp_path / "f.toml", body.format(secret=_secret(tmp_path)))
    found = problems(path)
    assert any(k == key and words in m for k, m in found), found


def test_a_complete_depot_section_loads(tmp_path):
    secret = _secret(tmp_path)
    path = write_config(
        tmp_path / "f.toml",
        f'[device]\nrole = "depot"\nsecret_file = "{secret}"\n'
        f'[segway]\nenabled = true\nplatform_code = "E12345"\nclient_secret_file = "{secret}"\n'
        '[[segway.scooters]]\niot_code = "861477038719116"\nmodel = "E-moped C80"\n',
    )
    config = load_config(path)
    assert config.segway.enabled and config.segway.scooters[0].iot_code == "861477038719116"


def boolean_keys() -> list[str]:
    """Every boolean key of the schema, dotted."""
    from fleetgate.config.schema import Config

    out = []

    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")
            elif ann is bool:
                out.append(prefix + name)

    walk(Config, "")
    return out


@pytest.mark.parametrize("literal", ['"yes"', '"true"', "1", '"on"', "0"])
def test_every_boolean_key_takes_only_true_or_false(tmp_path, literal):
    """`enabled = "yes"` is refused by key, not read as true (or an "off" as true): TOML has booleans."""
    keys = boolean_keys()
    assert "obd.enabled" in keys and "mqtt.tls" in keys and len(keys) >= 12
    path = tmp_path / "c.toml"
    for key in keys:
        write_config(path, f"{key} = {literal}\n")
        found = [(k, m) for k, m in problems(path) if k == key]
        assert found and "boolean" in found[0][1], f"{key} = {literal} was taken"


def test_the_vehicle_template_has_every_section_and_its_examples_name_real_keys(tmp_path):
    """config/vehicle.toml is what an installer copies: every section is there, and each commented example
    (`# key = value`, `# [section]`) names a key the schema knows, with a value of the right type."""
    import re
    import tomllib

    from fleetgate.config.schema import Config

    text = (Path(__file__).resolve().parent.parent / "config" / "vehicle.toml").read_text()
    sections = set(re.findall(r"^\[([a-z_]+)\]", text, re.M))
    assert sections == set(Config.model_fields)
    section = ""
    checked = 0
    for line in text.splitlines():
        header = re.match(r"^#? ?\[([a-z_.]+)\]", line)
        if header:
            section = header.group(1)
            continue
        example = re.match(r"^# ([a-z_]+ = .+?)(\s+#.*)?$", line)
        if not example or "<" in example.group(1):
            continue
        try:
            tomllib.loads(example.group(1))
        except tomllib.TOMLDecodeError:
            continue  # prose, not an example
        path = tmp_path / "example.toml"
        path.write_text(f"[{section}]\n{example.group(1)}\n")
        try:
            load_config(path)
        except ConfigError as exc:
            wrong = [p for p in exc.problems if "unknown key" in p.message or "should be" in p.message]
            assert not wrong, f"[{section}] {example.group(1)}: {wrong}"
        checked += 1
    assert checked >= 20


def test_files_run_needs_are_checked_as_run_would_use_them(tmp_path):
    """A CA that is not PEM, a certificate that is missing, a key file open to others: config check says so
    by key, before a component loops on it."""
    import json

    key = tmp_path / "device.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
    key.chmod(0o600)
    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a binary")
    path = write_config(
        tmp_path / "c.toml",
        f'[mqtt]\nenabled = true\nhost = "h"\ntls = true\n[mqtt.tls_files]\nca_file = "{not_pem}"\n'
        f'cert_file = "{tmp_path / "missing.crt"}"\nkey_file = "{key}"\n',
    )
    done = subprocess.run([FLEETGATE, "config", "check", str(path), "--json"], capture_output=True, text=True)
    assert done.returncode == 1
    messages = " ".join(p["message"] for p in json.loads(done.stdout)["problems"])
    assert f"tls_files.ca_file {not_pem} is not PEM" in messages
    assert "tls_files.cert_file" in messages and "cannot be read" in messages
    key.chmod(0o644)
    done = subprocess.run([FLEETGATE, "config", "check", str(path), "--json"], capture_output=True, text=True)
    assert "chmod 600" in " ".join(p["message"] for p in json.loads(done.stdout)["problems"])


def test_a_serial_port_that_is_not_there_is_a_warning_not_an_error(tmp_path):
    import json

    path = write_config(tmp_path / "c.toml", f'[obd]\nenabled = true\nport = "{tmp_path / "ttyNONE"}"\n')
    done = subprocess.run([FLEETGATE, "config", "check", str(path), "--json"], capture_output=True, text=True)
    assert done.returncode == 0
    assert json.loads(done.stdout)["warnings"] == [
        f"obd.port: {tmp_path / 'ttyNONE'} does not exist now (the component waits for it)"
    ]
    human = subprocess.run([FLEETGATE, "config", "check", str(path)], capture_output=True, text=True)
    assert human.returncode == 0 and "warning:" in human.stderr and "obd.port" in human.stderr
