"""Load a TOML configuration file into the typed schema, collecting every problem with its key path."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from fleetgate.config.schema import Config

DEFAULT_CONFIG_PATH = Path("/etc/fleetgate/fleetgate.toml")
MAX_FILE_BYTES = 1024 * 1024  # a configuration is a few KiB; this bounds what `config check /dev/zero` reads
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
MAX_SHOWN_VALUE = 80  # characters of an offending value quoted in a message


@dataclass(frozen=True)
class Problem:
    file: Path
    key: str  # dotted key path, "" for the file as a whole
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else str(self.file)
        return _printable(f"{where}: {self.message}")


class ConfigError(Exception):
    """The configuration file cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + _key(item))
    return "".join(parts)


def _key(name: str) -> str:
    """A key as TOML writes it: bare, or quoted (with escapes)."""
    return name if BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _message(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    msg = error["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    value = error.get("input")
    if error["type"] not in ("missing",) and not isinstance(value, dict | list):
        msg += f" (got {_shown(value)})"
    return msg


def _printable(text: str) -> str:
    """One line, and no control sequence for the technician's terminal: a key, value or path from the file (or
    the command line) may hold any character."""
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_VALUE else text[: MAX_SHOWN_VALUE - 3] + "..."


def _deepest_line(text: str) -> int:
    """The line with the most brackets and braces: where nesting too deep for the parser most likely is."""
    counts = [line.count("[") + line.count("{") for line in text.splitlines()] or [0]
    return counts.index(max(counts)) + 1


def parse_config(data: dict, file: Path) -> Config:
    """Validate already-parsed TOML data; relative paths resolve against ``file``'s folder."""
    try:
        return Config.model_validate(data, context={"base_dir": file.absolute().parent})
    except ValidationError as exc:
        raise ConfigError(
            [Problem(file, _key_path(err["loc"]), _message(err)) for err in exc.errors(include_url=False)]
        ) from None
    except RecursionError:  # pydantic-core limits its own depth; a validator of ours might not
        raise ConfigError([Problem(file, "", "values nested too deeply")]) from None


def load_config(path: Path | None) -> Config:
    """Read and validate ``path``; ``None`` gives the embedded defaults (no file at all)."""
    if path is None:
        return Config()
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError([Problem(path, "", f"cannot read: {exc.strerror}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError([Problem(path, "", f"larger than {MAX_FILE_BYTES} bytes; not a configuration")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(path, "", f"not UTF-8 text (byte {exc.start})")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(path, "", f"not valid TOML: {exc}")]) from None
    except RecursionError:  # tomllib parses arrays and inline tables recursively
        where = f"line {_deepest_line(text)}"
        raise ConfigError(
            [Problem(path, "", f"not valid TOML: arrays or tables nested too deeply ({where})")]
        ) from None
    except ValueError as exc:  # an integer of more than 4300 digits (Python's int_max_str_digits)
        reason = str(exc).split(";")[0]  # not the advice to call sys.set_int_max_str_digits()
        raise ConfigError([Problem(path, "", f"not valid TOML: {reason}")]) from None
    return parse_config(data, path)


def device_warnings(config: Config) -> list[str]:
    """Devices the configuration names that are not there now: a warning, not an error (an adapter plugged in
    later is fine; the component waits in backoff), but most often a typo a technician wants to see."""
    named: list[tuple[str, str]] = []
    if config.obd.enabled:
        named.append(("obd.port", config.obd.port))
    if config.keypad.enabled:
        named.append(("keypad.port", config.keypad.port))
    if config.start_enable.kind == "serial-relay":
        named.append(("start_enable.port", config.start_enable.port))
    elif config.start_enable.kind == "gpio":
        named.append(("start_enable.gpio_chip", str(config.start_enable.gpio_chip)))
    return [
        f"{key}: {device} does not exist now (the component waits for it)"
        for key, device in named
        if "://" not in device and not Path(device).exists()
    ]
