"""The control socket server: a Unix socket (mode 0660) answering the technician CLI.

Commands are registered by name with an async handler taking the request's ``args`` and returning a JSON-
able result. A malformed or unknown request gets an error reply naming what was wrong and is counted; it
never affects the daemon. The socket only reads state: the CLI never reaches hardware through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import inspect
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fleetgate.daemon.runtime.control_protocol import MAX_LINE_BYTES, PROTOCOL_VERSION, encode

log = logging.getLogger(__name__)

# A handler answers from state in memory (plain function) or asks the store (coroutine function).
Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class ControlSocketError(Exception):
    """The control socket cannot be created: another daemon owns it, or its group does not exist."""


class ControlServer:
    name = "control"

    def __init__(self, path: Path, group: str | None = None, max_clients: int = 8) -> None:
        self.path = path
        self._group = group
        self._handlers: dict[str, Handler] = {}
        self._clients = asyncio.Semaphore(max_clients)
        self._server: asyncio.Server | None = None
        self.requests = 0
        self.bad_requests = 0

    def register(self, cmd: str, handler: Handler) -> None:
        self._handlers[cmd] = handler

    @property
    def commands(self) -> list[str]:
        return sorted(self._handlers)

    def _clear_stale_socket(self) -> None:
        if not self.path.exists() and not self.path.is_symlink():
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()  # left by a daemon that died: nobody listens
        else:
            raise ControlSocketError(f"another fleetgate daemon is serving {self.path}")
        finally:
            probe.close()

    async def bind(self) -> None:
        """Create the socket; raises ControlSocketError if a live daemon already owns it."""
        if self._server is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clear_stale_socket()
        try:
            gid = grp.getgrnam(self._group).gr_gid if self._group else -1
        except KeyError:
            raise ControlSocketError(
                f"control.socket_group: no group named {self._group!r} on this system"
            ) from None
        server = await asyncio.start_unix_server(
            self._serve_client, path=str(self.path), limit=MAX_LINE_BYTES
        )
        os.chmod(self.path, 0o660)
        if gid != -1:
            os.chown(self.path, -1, gid)
        self._server = server
        log.info("control socket listening", extra={"path": str(self.path)})

    async def run(self) -> None:
        await self.bind()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._clients:
            try:
                while True:
                    try:
                        line = await reader.readline()
                    except (ValueError, asyncio.LimitOverrunError):
                        self.bad_requests += 1
                        writer.write(self._error("too-long", f"request longer than {MAX_LINE_BYTES} bytes"))
                        break
                    if not line:
                        break
                    writer.write(await self._answer(line))
                    await writer.drain()
            except (ConnectionError, BrokenPipeError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, BrokenPipeError):
                    await writer.wait_closed()

    @staticmethod
    def _error(code: str, message: str) -> bytes:
        return encode({"v": PROTOCOL_VERSION, "ok": False, "error": {"code": code, "message": message}})

    async def _answer(self, line: bytes) -> bytes:
        self.requests += 1
        try:
            cmd, args = self._parse(line)
            result = self._handlers[cmd](args)
            if inspect.isawaitable(result):
                result = await result
        except RequestError as exc:
            self.bad_requests += 1
            log.warning("bad control request", extra={"code": exc.code, "error": str(exc)})
            return self._error(exc.code, str(exc))
        except Exception as exc:
            log.error("control command failed", exc_info=True)
            return self._error("internal", f"{type(exc).__name__}: {exc}")
        return encode({"v": PROTOCOL_VERSION, "ok": True, "result": result})

    def _parse(self, line: bytes) -> tuple[str, dict[str, Any]]:
        try:
            msg = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError("bad-json", f"request is not JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise RequestError("bad-request", "request must be a JSON object")
        if msg.get("v") != PROTOCOL_VERSION:
            raise RequestError(
                "bad-version",
                f"protocol version {msg.get('v')!r} not supported (this daemon speaks {PROTOCOL_VERSION})",
            )
        cmd, args = msg.get("cmd"), msg.get("args", {})
        if not isinstance(cmd, str) or cmd not in self._handlers:
            raise RequestError(
                "unknown-command", f"unknown command {cmd!r}; known: {', '.join(self.commands)}"
            )
        if not isinstance(args, dict):
            raise RequestError("bad-args", "args must be a JSON object")
        return cmd, args
