"""The control socket server: a Unix socket (mode 0660) answering the technician CLI.

Commands are registered by name with an async handler taking the request's ``args`` and returning a JSON-
able result. A malformed or unknown request gets an error reply naming what was wrong and is counted; it
never affects the daemon. The socket only reads state: the CLI never reaches hardware through it.

Hostile or broken clients cannot lock technicians out (issue 11):

- Each connection holds one of ``max_clients`` slots. The daemon waits on a client at most ``client_timeout_s``
  (5 s): for a complete request line (from connecting, or from its previous reply) and for it to take a reply.
  A client over that (idle, sending half a line, not reading) is closed, with a ``timeout`` error line
  unless it is the one not reading; its slot is free again.
- When every slot is taken and another client connects, the connection that has waited longest on its client
  is dropped at once with an ``evicted`` error line, so ``fleetgate status`` never waits behind idle
  connections. A connection the daemon is busy answering is never dropped.
- A request is one line of at most ``MAX_LINE_BYTES`` (a line that never ends is refused as soon as it passes
  the bound), UTF-8 JSON: an object whose ``"v"`` is the integer 1 (not ``true``, not ``1.0``), ``"cmd"`` a
  known command, ``"args"`` an object. Nesting deeper than the parser goes (``too-deep``) and numbers of more
  digits than Python converts (``too-many-digits``) are bad requests like any other; error messages show
  at most a short excerpt of what was sent.

Counters (``counters()``), shown by ``fleetgate status --json`` as its ``control`` section (a status view the
core adds): ``clients`` (slots held now), ``max_clients``, ``requests`` (lines received),
``bad_requests`` (refused, each with its code), ``internal_errors`` (a command failed), ``timeouts`` and
``evicted`` (connections dropped as above).
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
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetgate.daemon.runtime.control_protocol import MAX_LINE_BYTES, PROTOCOL_VERSION, encode

log = logging.getLogger(__name__)

# A handler answers from state in memory (plain function) or asks the store (coroutine function).
Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]

CLIENT_TIMEOUT_S = 5.0  # the CLI sends its request as it connects and reads the reply at once


def _show(value: Any) -> str:
    """A value a client sent, for an error message and the log: a short JSON excerpt, never a 60 kB echo."""
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "an array"
    text = json.dumps(value)  # a scalar json.loads made: always renders
    return text if len(text) <= 40 else text[:37] + "..."


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class ControlSocketError(Exception):
    """The control socket cannot be created: another daemon owns it, or its group does not exist."""


@dataclass(eq=False)
class _Client:
    """A connection holding a slot."""

    writer: asyncio.StreamWriter
    # Since when the daemon waits on this client (for a request, or for it to take a reply); None while the
    # daemon works on its answer. The connection waiting longest is the one dropped for a newcomer.
    waiting_since: float | None = None
    evicted: bool = False


class ControlServer:
    name = "control"

    def __init__(
        self,
        path: Path,
        group: str | None = None,
        max_clients: int = 8,
        client_timeout_s: float = CLIENT_TIMEOUT_S,
    ) -> None:
        self.path = path
        self._group = group
        self._handlers: dict[str, Handler] = {}
        self._max_clients = max_clients
        self._slots = asyncio.Semaphore(max_clients)
        self._holders: set[_Client] = set()
        self._timeout_s = client_timeout_s
        self._server: asyncio.Server | None = None
        self.requests = 0
        self.bad_requests = 0
        self.internal_errors = 0
        self.timeouts = 0
        self.evicted = 0

    def register(self, cmd: str, handler: Handler) -> None:
        self._handlers[cmd] = handler

    @property
    def commands(self) -> list[str]:
        return sorted(self._handlers)

    def counters(self) -> dict[str, int]:
        return {
            "clients": len(self._holders),
            "max_clients": self._max_clients,
            "requests": self.requests,
            "bad_requests": self.bad_requests,
            "internal_errors": self.internal_errors,
            "timeouts": self.timeouts,
            "evicted": self.evicted,
        }

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
        client = _Client(writer)
        try:
            if self._slots.locked():
                self._evict_longest_waiting()
            async with self._slots:
                self._holders.add(client)
                try:
                    await self._converse(client, reader)
                finally:
                    self._holders.discard(client)
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            await self._close(writer)

    async def _converse(self, client: _Client, reader: asyncio.StreamReader) -> None:
        """Answer request lines until the client closes, breaks a rule or runs out of time."""
        writer = client.writer
        while True:
            client.waiting_since = time.monotonic()
            try:
                async with asyncio.timeout(self._timeout_s):
                    line = await reader.readline()
            except TimeoutError:
                self.timeouts += 1
                log.warning(
                    "control client dropped: no complete request in time", extra={"after_s": self._timeout_s}
                )
                writer.write(
                    self._error("timeout", f"no complete request within {self._timeout_s:g} s; closing")
                )
                return
            except (ValueError, asyncio.LimitOverrunError):  # the line passed MAX_LINE_BYTES, newline or not
                self.requests += 1
                self.bad_requests += 1
                log.warning("bad control request", extra={"code": "too-long"})
                writer.write(self._error("too-long", f"request longer than {MAX_LINE_BYTES} bytes"))
                return
            if client.evicted or not line:
                return
            client.waiting_since = None
            writer.write(await self._answer(line))
            client.waiting_since = time.monotonic()
            try:
                async with asyncio.timeout(self._timeout_s):
                    await writer.drain()
            except TimeoutError:
                self.timeouts += 1
                log.warning(
                    "control client dropped: it does not read its replies", extra={"after_s": self._timeout_s}
                )
                writer.transport.abort()
                return

    def _evict_longest_waiting(self) -> None:
        """Every slot is taken: drop the connection that has waited longest on its client, if one waits."""
        waiting = [c for c in self._holders if c.waiting_since is not None and not c.evicted]
        if not waiting:
            return  # every slot is busy with an answer: the newcomer waits for the first to finish
        victim = min(waiting, key=lambda c: c.waiting_since or 0.0)
        victim.evicted = True
        self.evicted += 1
        idle_s = time.monotonic() - (victim.waiting_since or 0.0)
        log.warning("control client dropped to free a slot", extra={"waited_s": round(idle_s, 1)})
        victim.writer.write(
            self._error(
                "evicted",
                f"every one of the {self._max_clients} control slots was taken and this connection had been "
                f"waiting longest for its client ({idle_s:.1f} s); closing it for a new client",
            )
        )
        victim.writer.transport.abort()  # its read ends at once; what was written is already in the socket

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            async with asyncio.timeout(self._timeout_s):  # close waits for unsent replies to go out
                await writer.wait_closed()
        except TimeoutError:
            writer.transport.abort()
        except (ConnectionError, BrokenPipeError):
            pass

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
            return encode({"v": PROTOCOL_VERSION, "ok": True, "result": result})
        except RequestError as exc:
            self.bad_requests += 1
            log.warning("bad control request", extra={"code": exc.code, "error": str(exc)})
            return self._error(exc.code, str(exc))
        except Exception as exc:
            self.internal_errors += 1
            log.error("control command failed", exc_info=True)
            return self._error("internal", f"{type(exc).__name__}: {str(exc)[:200]}")

    def _parse(self, line: bytes) -> tuple[str, dict[str, Any]]:
        try:
            # Decoded here: json.loads would also take UTF-16 and UTF-32 bytes.
            msg = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise RequestError("bad-json", f"request is not UTF-8 (byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise RequestError("bad-json", f"request is not JSON: {exc}") from None
        except RecursionError:
            raise RequestError(
                "too-deep", "request nests arrays or objects deeper than the daemon parses"
            ) from None
        except ValueError:  # the only other ValueError json raises: an int longer than Python converts
            raise RequestError(
                "too-many-digits",
                f"a number in the request has more than {sys.get_int_max_str_digits()} digits",
            ) from None
        if not isinstance(msg, dict):
            raise RequestError("bad-request", "request must be a JSON object")
        version = msg.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:  # True == 1 == 1.0 in Python
            raise RequestError(
                "bad-version",
                f"protocol version {_show(version)} not supported (this daemon speaks {PROTOCOL_VERSION}, "
                "an integer)",
            )
        cmd, args = msg.get("cmd"), msg.get("args", {})
        if not isinstance(cmd, str) or cmd not in self._handlers:
            raise RequestError(
                "unknown-command", f"unknown command {_show(cmd)}; known: {', '.join(self.commands)}"
            )
        if not isinstance(args, dict):
            raise RequestError("bad-args", "args must be a JSON object")
        return cmd, args
