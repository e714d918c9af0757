"""Fuzz suite, configuration edge: generated TOML fed to the real loader, the real CLI and the daemon's core.

Cases covered (hypothesis, derandomized: CI sees the same examples every run; about 15 s in all):

- documents of random shape: known sections and keys (dotted, as the schema names them) mixed with unknown and
  unicode keys, values of every TOML type (integers past int64, floats including inf/nan/1e300/5e-324, booleans,
  unicode and control-character strings, dates and times, arrays and inline tables nested a few deep);
- one or two known keys given hostile values (any type; a number no key should take; a number at, just inside
  or just past one of its bounds) over a configuration that enables every feature, so whatever the schema
  accepts reaches every builder;
- arrays, inline tables, arrays of tables, dotted keys and table headers nested 1 to 3000 deep;
- integer literals of up to 6000 digits; raw unicode text and raw bytes; the shipped files with lines dropped,
  repeated, truncated or replaced.

Asserted: the loader raises only ``ConfigError`` (every problem naming the file); every number it accepts is
finite and fits an int64 count of nanoseconds; a configuration it accepts builds ``Core.open`` and every feature
in ``FEATURES`` without an exception (nothing is started); ``fleetgate config check`` on a handful of documents
(the issue's three always among them) exits 0 or 1, prints a message and never a traceback, and agrees with
the loader.

What it found against the code before issue 11 (all fixed in config/): a 600-deep array or inline table raised
RecursionError out of tomllib; an integer literal of more than 4300 digits raised a bare ValueError (Python's
int conversion limit); inf passed the schema for numeric keys without an upper bound
(``obd.adapter_voltage_interval_s = inf``); and, with those fixed, ``mqtt.live_share = 5e-324`` passed ``ge=0``
and made the uplink's build raise OverflowError (the drain's ``round(1 / live_share)``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import subprocess
import tempfile
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fleetgate.config.loader import ConfigError, load_config
from fleetgate.config.schema import Config
from fleetgate.daemon.app import FEATURES
from fleetgate.daemon.runtime.core import Core
from fleetgate.sync.crypto.device_keys import generate_secret_file
from fleetgate.sync.store import Database

from conftest import FLEETGATE

SHIPPED = sorted((Path(__file__).parent.parent / "config").glob("*.toml"))


def _leaves(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, FieldInfo]:
    """Every leaf key of the schema, dotted, with its field."""
    found: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found.update(_leaves(field.annotation, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = field
    return found


def _limits(annotation: object, metadata: Iterable[object] = ()) -> list[float]:
    """Every bound (gt, ge, lt, le) on a field, wherever in its annotation it is declared."""
    found: list[float] = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            found += _limits(None, item.metadata)
        for attr in ("gt", "ge", "lt", "le"):
            if (bound := getattr(item, attr, None)) is not None:  # annotated_types.Gt and its kin
                found.append(float(bound))
    for arg in get_args(annotation):
        found += _limits(arg, getattr(arg, "__metadata__", ()))
    return found


def _numeric(annotation: object) -> bool:
    if annotation in (int, float):
        return True
    args = get_args(annotation)
    if get_origin(annotation) is dict:
        return _numeric(args[1])
    return any(_numeric(a) for a in args)


LEAVES = _leaves()
KEYS = sorted(LEAVES)
SECTIONS = sorted({key.split(".")[0] for key in KEYS})
TABLE_KEYS = [key for key, field in LEAVES.items() if get_origin(field.annotation) is dict]
# each bounded key with its bounds; a table of numbers by its first default entry (store.quota_mb.telemetry)
BOUNDED = {
    key
    + ("." + next(iter(field.get_default(call_default_factory=True))) if key in TABLE_KEYS else ""): limits
    for key, field in LEAVES.items()
    if (limits := _limits(field.annotation, field.metadata))
}
NUMERIC = sorted(
    key + ("." + next(iter(field.get_default(call_default_factory=True))) if key in TABLE_KEYS else "")
    for key, field in LEAVES.items()
    if _numeric(field.annotation)
)


def _near(bounds: list[float]) -> list[float | int]:
    """Values at, just inside and just outside each bound, as floats and (where whole) as integers."""
    near: list[float | int] = []
    for bound in bounds:
        near += [
            bound,
            math.nextafter(bound, math.inf),
            math.nextafter(bound, -math.inf),
            bound * 2,
            bound / 2,
        ]
        if bound == int(bound):
            near += [int(bound), int(bound) + 1, int(bound) - 1]
    return near


def fuzz(examples: int) -> settings:
    """Reproducible in CI (derandomized, no example database written into the checkout), bounded in time."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


# --- TOML writing (our own, so that it can write what a TOML library would refuse to) ---------------------------


def toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_key(part: str) -> str:
    return part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else toml_string(part)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def toml_document(entries: list[tuple[tuple[str, ...], Any]]) -> str:
    """Each entry as a dotted key at the top level: ``store.quota_mb.telemetry = inf``."""
    return "".join(f"{'.'.join(toml_key(p) for p in path)} = {toml_value(v)}\n" for path, v in entries)


# --- strategies --------------------------------------------------------------------------------------------------

HOSTILE_INTS = [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30), 10**300]
HOSTILE_FLOATS = [math.inf, -math.inf, math.nan, 1e300, -1e300, 5e-324, -0.0, 1e-300, 1.7976931348623157e308]
HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "\x7f",
    "../../../../etc/passwd",
    "/dev/zero",
    "/proc/self/mem",
    "rfc2217://127.0.0.1:1",
    "\u202egnp.exe",
    "😀" * 40,
    "a" * 5000,
    "inf",
    "nan",
    "1e999",
    "-1",
    "0x10",
    "true",
    "https://reef.example",
    "http://reef.example",
    "file:///etc/shadow",
    "A0 01 01 A2 ZZ",
    "%s%n",
]

scalars = st.one_of(
    st.integers(),
    st.sampled_from(HOSTILE_INTS),
    st.floats(),
    st.sampled_from(HOSTILE_FLOATS),
    st.booleans(),
    st.text(max_size=30),
    st.sampled_from(HOSTILE_STRINGS),
    st.dates(),
    st.times(),
    st.datetimes(timezones=st.one_of(st.none(), st.just(UTC), st.just(timezone(timedelta(hours=-7))))),
)
# key names: the schema's, the entries its tables know (streams, OBD signals), and any text
TABLE_ENTRIES = sorted({e for k in TABLE_KEYS for e in LEAVES[k].get_default(call_default_factory=True)})
keys = st.one_of(
    st.sampled_from(sorted({k.split(".")[-1] for k in KEYS})),
    st.sampled_from(TABLE_ENTRIES),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


def _key_path(key: str) -> tuple[str, ...]:
    return tuple(key.split("."))


# a numeric key given a number no key should take, or true/false
hostile_number_entries = st.tuples(
    st.sampled_from(NUMERIC).map(_key_path), st.sampled_from([*HOSTILE_FLOATS, *HOSTILE_INTS, True, False])
)
# a numeric key at (or just past) one of its bounds: most of these are accepted and reach the builders
boundary_entries = st.sampled_from(sorted(BOUNDED)).flatmap(
    lambda key: st.tuples(st.just(_key_path(key)), st.sampled_from(_near(BOUNDED[key])))
)


paths = st.one_of(
    st.sampled_from(KEYS).map(_key_path),  # a known key
    st.sampled_from(SECTIONS).map(lambda s: (s,)),  # a whole section, given a value of any type
    st.tuples(st.sampled_from(SECTIONS), keys),  # a known section, a key that may be unknown
    st.sampled_from(TABLE_KEYS).flatmap(lambda k: keys.map(lambda e: (*_key_path(k), e))),  # a table entry
    st.lists(st.text(min_size=0, max_size=8), min_size=1, max_size=4).map(tuple),  # anything at all
)
documents = st.lists(st.tuples(paths, values), max_size=8).map(toml_document)


@st.composite
def deep_documents(draw: st.DrawFn) -> str:
    depth = draw(st.one_of(st.integers(1, 50), st.integers(200, 700), st.integers(701, 3000)))
    shape = draw(st.sampled_from(["array", "inline-table", "array-of-tables", "dotted-key", "table-header"]))
    where = draw(
        st.sampled_from(["store.quota_mb", "obd.schedule", "sessions.signing_keys", "junk", "store"])
    )
    if shape == "array":
        return f"{where} = " + "[" * depth + "1" + "]" * depth + "\n"
    if shape == "inline-table":
        return f"{where} = " + "{ a = " * depth + "1" + " }" * depth + "\n"
    if shape == "array-of-tables":
        return f"{where} = " + "[{ a = " * depth + "1" + " }]" * depth + "\n"
    if shape == "dotted-key":
        return where + ".a" * depth + " = 1\n"
    return "[" + where + ".a" * depth + "]\nb = 1\n"


huge_integer_documents = st.builds(
    lambda key, digits: f"{key} = 1{'0' * digits}\n",
    st.sampled_from(KEYS),
    st.one_of(st.integers(0, 40), st.integers(4290, 4310), st.integers(4311, 6000)),
)


@st.composite
def mutated_shipped(draw: st.DrawFn) -> str:
    lines = draw(st.sampled_from(SHIPPED)).read_text().splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        action = draw(st.sampled_from(["drop", "repeat", "truncate", "replace"]))
        if not lines:
            break
        if action == "drop":
            del lines[i]
        elif action == "repeat":
            lines.insert(i, lines[i])
        elif action == "truncate":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        else:
            lines[i] = draw(st.text(max_size=40))
    return "\n".join(lines) + "\n"


# --- the checks --------------------------------------------------------------------------------------------------


def load_or_config_error(path: Path) -> Config | None:
    """The loader's verdict; any exception other than ConfigError fails the test."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        event("refused")
        assert exc.problems, "a ConfigError without a problem"
        for problem in exc.problems:
            assert problem.file == path and problem.message
        return None
    event("accepted")
    assert_numbers_fit(config.model_dump())
    return config


# The finest unit the daemon converts a configured number to is nanoseconds in an int64 (lockouts, clock spread,
# GPS sampling); any accepted number must survive that, and be finite.
MAX_NUMBER = (2**63 - 1) / 1e9


def assert_numbers_fit(value: object, where: str = "") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            assert_numbers_fit(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_numbers_fit(item, f"{where}[{i}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        assert math.isfinite(value) and abs(value) <= MAX_NUMBER, f"{where} = {value!r} was accepted"


async def _compose(config: Config) -> None:
    database = await Database.open(config.store.db_path, config.store.synchronous)
    try:
        core = Core.open(config, database, 0.0)
        for build in FEATURES:
            core.add(await build(core))
        await core.status.snapshot()
    finally:
        await database.close()


def assert_composes(config: Config, state_root: Path) -> None:
    """What `run` does with an accepted configuration up to starting: store, core, every feature's build."""
    state = Path(tempfile.mkdtemp(dir=state_root))
    config = config.model_copy(
        update={
            "store": config.store.model_copy(update={"state_dir": state}),
            "control": config.control.model_copy(update={"socket_path": state / "control.sock"}),
        }
    )
    asyncio.run(_compose(config))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config")


@pytest.fixture(scope="module")
def complete_base(work: Path) -> str:
    """A configuration enabling every feature, that the loader accepts and the core builds."""
    secret = work / "device.secret"
    generate_secret_file(secret)
    key = json.dumps(base64.b64encode(bytes(SigningKey(b"\x01" * 32).verify_key)).decode())
    text = f"""
device.id = "fuzz-0001"
device.secret_file = "{secret}"
obd.enabled = true
obd.port = "{work / "obd-tty"}"
gps.enabled = true
mqtt.enabled = true
mqtt.host = "127.0.0.1"
mqtt.tls = false
sessions.enabled = true
sessions.vin = "1FUZZ000000000001"
sessions.signing_keys = [{key}]
keypad.enabled = true
keypad.port = "{work / "keypad-tty"}"
start_enable.kind = "log"
"""
    assert_composes(load_config(write(work, text)), work)  # the base itself is good
    return text


def write(work: Path, text: str | bytes) -> Path:
    path = work / "fuzz.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@fuzz(250)
@given(documents)
def test_generated_documents_give_a_config_or_a_config_error(work, text):
    config = load_or_config_error(write(work, text))
    if config is not None:
        assert_composes(config, work)


@fuzz(400)
@given(
    st.lists(
        st.one_of(
            boundary_entries,
            boundary_entries,
            hostile_number_entries,
            st.tuples(st.sampled_from(KEYS).map(_key_path), values),
        ),
        min_size=1,
        max_size=2,
    )
)
def test_hostile_values_for_known_keys_are_refused_or_compose(work, complete_base, entries):
    replaced = {".".join(path) + " " for path, _ in entries}
    kept = [line for line in complete_base.splitlines() if not line.startswith(tuple(replaced))]
    config = load_or_config_error(write(work, "\n".join(kept) + "\n" + toml_document(entries)))
    if config is not None:
        assert_composes(config, work)


@fuzz(80)
@given(deep_documents())
def test_deep_nesting_of_every_shape_is_a_config_error_or_loads(work, text):
    load_or_config_error(write(work, text))


@fuzz(40)
@given(huge_integer_documents)
def test_huge_integer_literals_are_a_config_error(work, text):
    assert load_or_config_error(write(work, text)) is None or len(text) < 100


@fuzz(200)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300), mutated_shipped()))
def test_raw_text_bytes_and_damaged_shipped_files(work, text):
    config = load_or_config_error(write(work, text))
    if config is not None:
        assert_composes(config, work)


@fuzz(8)
@example("a = " + "[" * 600 + "]" * 600 + "\n")  # the cases, whatever the generator draws
@example("[store]\nquota_mb = { telemetry = inf }\n")
@example("[store]\nmax_batch = 1" + "0" * 5000 + "\n")
@given(
    st.one_of(documents, deep_documents(), huge_integer_documents, mutated_shipped(), st.binary(max_size=100))
)
def test_cli_config_check_prints_a_message_never_a_traceback(work, text):
    path = write(work, text)
    accepted = load_or_config_error(path) is not None
    result = subprocess.run(
        [FLEETGATE, "config", "check", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1), result.stderr
    if accepted:
        assert result.returncode == 0 and result.stdout.strip() == f"{path}: OK", result
    else:
        assert result.returncode == 1
        lines = result.stderr.splitlines()
        assert lines and all(line.startswith(f"error: {path}: ") for line in lines[:-1]), result.stderr
        assert lines[-1].startswith(f"{path}: ") and "problem(s)" in lines[-1]
