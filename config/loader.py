"""Load a TOML configuration file into the typed schema, collecting every problem with its key path."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from fleetgate.config.schema import Config

DEFAULT_CONFIG_PATH = Path("/etc/fleetgate/fleetgate.toml")


@dataclass(frozen=True)
class Problem:
    file: Path
    key: str  # dotted key path, "" for the file as a whole
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else str(self.file)
        return f"{where}: {self.message}"


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
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def _message(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    msg = error["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    value = error.get("input")
    if error["type"] not in ("missing",) and not isinstance(value, dict | list):
        msg += f" (got {value!r})"
    return msg


def parse_config(data: dict, file: Path) -> Config:
    """Validate already-parsed TOML data; relative paths resolve against ``file``'s folder."""
    try:
        return Config.model_validate(data, context={"base_dir": file.absolute().parent})
    except ValidationError as exc:
        raise ConfigError(
            [Problem(file, _key_path(err["loc"]), _message(err)) for err in exc.errors(include_url=False)]
        ) from None


def load_config(path: Path | None) -> Config:
    """Read and validate ``path``; ``None`` gives the embedded defaults (no file at all)."""
    if path is None:
        return Config()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem(path, "", f"cannot read: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(path, "", f"not UTF-8 text (byte {exc.start})")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(path, "", f"not valid TOML: {exc}")]) from None
    return parse_config(data, path)
