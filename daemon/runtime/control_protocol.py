"""The control socket's wire format, shared by the daemon and the CLI.

One JSON object per line, UTF-8. Request: ``{"v": 1, "cmd": "status", "args": {}}``.
Reply: ``{"v": 1, "ok": true, "result": {...}}`` or
``{"v": 1, "ok": false, "error": {"code": "unknown-command", "message": "..."}}``.
A connection may carry several requests; replies come back in order.

A request line is at most ``MAX_LINE_BYTES``; ``"v"`` is the integer 1 (``true`` and ``1.0`` are refused). The
daemon closes a connection that sends no complete request, or does not read its reply, within a few seconds
(error ``timeout``), and drops the connection waiting longest on its client when every slot is taken and
another client connects (error ``evicted``): send the request as soon as you connect.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 64 * 1024


class ControlError(Exception):
    """The daemon could not be asked, or answered with an error."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class DaemonNotRunning(ControlError):
    pass


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def request(path: Path, cmd: str, args: dict[str, Any] | None = None, timeout_s: float = 10.0) -> Any:
    """Ask the daemon over its control socket; returns ``result`` or raises ControlError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise DaemonNotRunning(
                "not-running", f"fleetgate daemon is not running (no socket at {path})"
            ) from None
        except ConnectionRefusedError:
            raise DaemonNotRunning(
                "not-running", f"fleetgate daemon is not running (nothing listens on {path})"
            ) from None
        except PermissionError:
            raise ControlError(
                "permission-denied", f"no permission to use {path}: run as root or a member of its group"
            ) from None
        sock.sendall(encode({"v": PROTOCOL_VERSION, "cmd": cmd, "args": args or {}}))
        with sock.makefile("rb") as stream:
            line = stream.readline(MAX_LINE_BYTES * 64)
    except TimeoutError:
        raise ControlError("timeout", f"the daemon did not answer within {timeout_s:g} s") from None
    finally:
        sock.close()
    if not line:
        raise ControlError("no-reply", "the daemon closed the connection without answering")
    reply = json.loads(line)
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise ControlError(str(error.get("code", "error")), str(error.get("message", "request failed")))
    return reply.get("result")
