"""Structured log lines on stderr (journald keeps each line as an entry, with its priority), secrets masked.

Fields come from ``extra={...}``. A field whose name says it holds a secret is never printed, whatever
its value: a second line of defence behind never passing secrets to the logger in the first place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable

SECRET_FIELD = re.compile(r"pin|secret|password|passwd|token|private|credential|key$", re.IGNORECASE)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in vars(record).items():
        if name in _STANDARD or name.startswith("_"):
            continue
        out[name] = "***" if SECRET_FIELD.search(name) else value
    return out


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\\\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_logfmt_value(record.getMessage())}",
        ]
        parts += [f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items()]
        if record.exc_info:
            parts.append(f"exc={_logfmt_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "ts": _utc_ms(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str, ensure_ascii=False)


# sd-daemon(3): a "<N>" prefix gives the line its syslog priority in the journal, so that
# `journalctl -p warning -u fleetgate` shows warnings and failures, not every line as "info".
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def priority(levelno: int) -> int:
    return next((p for level, p in _BY_LEVEL if levelno >= level), 7)


_BY_LEVEL = sorted(PRIORITY.items(), reverse=True)


def under_journald(stream: object = None) -> bool:
    """Whether ``stream`` (stderr) is connected to the journal: systemd says so in ``JOURNAL_STREAM``
    ("device:inode" of the stream it set up), which a child inheriting the variable but not the fd fails."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat((stream or sys.stderr).fileno())  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        return False
    return bool(expected) and expected == f"{st.st_dev}:{st.st_ino}"


class Prefixed(logging.Formatter):
    """Another formatter's line behind a prefix made of the record."""

    def __init__(self, inner: logging.Formatter, prefix: Callable[[logging.LogRecord], str]) -> None:
        super().__init__()
        self._inner = inner
        self._prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        return self._prefix(record) + self._inner.format(record)


def journal_prefix(record: logging.LogRecord) -> str:
    """``<N>``: the journal stamps the time itself."""
    return f"<{priority(record.levelno)}>"


def time_prefix(record: logging.LogRecord) -> str:
    """``ts=<UTC, ms> ``, for a terminal or a file, where nothing else stamps the line."""
    return f"ts={_utc_ms(record)} "


def _utc_ms(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def setup_logging(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    inner: logging.Formatter = JsonFormatter() if fmt == "json" else LogfmtFormatter()
    if under_journald(sys.stderr):
        inner = Prefixed(inner, journal_prefix)
    elif fmt != "json":  # a JSON line has its own "ts"
        inner = Prefixed(inner, time_prefix)
    handler.setFormatter(inner)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # python-obd redefines a few units in pint at import; pint warns about each, every start. Noise, not news.
    logging.getLogger("pint").setLevel(logging.ERROR)
