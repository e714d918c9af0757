"""Building blocks of the configuration schema: the section base and the path and number types every section
uses."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return Path(os.path.normpath(path.absolute()))


def _secret_file(path: Path, info: ValidationInfo) -> Path:
    """A file holding a secret: it must exist and be readable by its owner only (mode 0600 or 0400)."""
    path = _resolve(path, info)
    try:
        st = path.stat()
    except OSError as exc:
        raise ValueError(f"secret file {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"secret file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ValueError(
            f"secret file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be readable by group or "
            f"others (chmod 600 {path})"
        )
    return path


def pem_problems(what: str, path: Path | None, kind: str) -> list[str]:
    """Why ``path`` cannot be the PEM file ``what`` names (``kind``: "CERTIFICATE" or "PRIVATE KEY"), if it
    cannot: what the daemon would otherwise find only at start, in a component looping on it."""
    if path is None:
        return []
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [f"{what} {path} cannot be read: {exc.strerror}"]
    if b"-----BEGIN " not in data:
        return [f"{what} {path} is not PEM (no -----BEGIN line)"]
    if kind.encode() not in data:
        return [f"{what} {path} holds no {kind} (PEM)"]
    return []


def resolve_device(port: str, info: ValidationInfo) -> str:
    return port if "://" in port else str(_resolve(Path(port), info))


def _not_a_boolean(value: object) -> object:
    # pydantic's lax mode would take TOML's true and false as 1 and 0
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


ResolvedPath = Annotated[Path, AfterValidator(_resolve)]
SecretFile = Annotated[Path, AfterValidator(_secret_file)]

# Every number in the schema is one of these, with lower and upper bounds on its Field: a value the daemon
# would overflow on later (a timedelta, an int64 in SQLite, bytes from MiB, a sleep) is refused here, by key.
# Infinity and NaN are refused for every float by Section's allow_inf_nan=False.
Float = Annotated[float, BeforeValidator(_not_a_boolean)]
Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Baudrate = Annotated[Int, Field(ge=1200, le=4_000_000)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are immutable once loaded, floats are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)
