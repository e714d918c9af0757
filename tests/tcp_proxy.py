"""A TCP forwarder on 127.0.0.1 that a test can cut: what a flaky cellular link looks like to the daemon.

    proxy = TcpProxy("127.0.0.1", broker.port).start()
    ... connect the client to proxy.port ...
    proxy.cut("reset")       # RST every connection now; new connections are refused (listener closed)
    proxy.cut("blackhole")   # connections stay open, bytes vanish both ways; new ones are accepted, go nowhere
    proxy.restore()          # forward again (blackholed connections are reset: their streams lost bytes)
    proxy.stop()

One thread runs a selector loop over every socket; control calls (`cut`, `restore`, `stop`) are handed to
that thread and return once applied, so the test knows the state is in force. No polling: the loop sleeps
in `select()` until a socket or a control call wakes it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

MODES = ("normal", "reset", "blackhole")
CHUNK = 65536
HIGH_WATER = 1 << 20  # stop reading a side while more than this waits to be written to the other side
CONTROL_TIMEOUT = 5.0


def _rst_close(sock: socket.socket) -> None:
    """Close so the peer gets a RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _End:
    """One socket of a forwarded connection; `out` holds bytes waiting to be written to it."""

    __slots__ = ("connecting", "eof", "mask", "name", "out", "shut_wr", "sock")

    def __init__(self, sock: socket.socket, name: str, *, connecting: bool = False) -> None:
        self.sock = sock
        self.name = name  # "client" or "upstream"
        self.out = bytearray()
        self.eof = False  # the peer sent FIN
        self.shut_wr = False  # we sent FIN
        self.connecting = connecting
        self.mask = 0  # events currently registered


class _Pair:
    def __init__(self, client: socket.socket, peer: tuple[Any, ...]) -> None:
        self.client = _End(client, "client")
        self.upstream: _End | None = None
        self.peer = peer
        self.blackhole = False
        self.closed = False

    def other(self, end: _End) -> _End | None:
        return self.upstream if end is self.client else self.client

    def ends(self) -> list[_End]:
        return [e for e in (self.client, self.upstream) if e is not None]


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`, with cut/restore for failure tests.

    Counters (read any time): `bytes_up` (client to target, forwarded), `bytes_down` (target to client,
    forwarded), `discarded_up`, `discarded_down` (swallowed by a blackhole), `connections` (accepted in
    total), `active` (open client connections), `resets` (connections closed with RST by a cut/restore),
    `refused_upstream` (target refused or unreachable). `stats()` returns them as a dict.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = port
        self.mode = "normal"
        self.bytes_up = 0
        self.bytes_down = 0
        self.discarded_up = 0
        self.discarded_down = 0
        self.connections = 0
        self.resets = 0
        self.refused_upstream = 0
        self._pairs: set[_Pair] = set()
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._calls: collections.deque[tuple[Callable[[], object], list[Any], threading.Event]] = (
            collections.deque()
        )
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._changed = threading.Condition()

    # -- public API (any thread) ---------------------------------------------------------------------

    def start(self) -> TcpProxy:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._open_listener()
        self._thread = threading.Thread(target=self._run, name=f"TcpProxy:{self.port}", daemon=True)
        self._thread.start()
        return self

    @property
    def active(self) -> int:
        return len(self._pairs)

    def stats(self) -> dict[str, int | str]:
        return {
            "mode": self.mode,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "discarded_up": self.discarded_up,
            "discarded_down": self.discarded_down,
            "connections": self.connections,
            "active": self.active,
            "resets": self.resets,
            "refused_upstream": self.refused_upstream,
        }

    def cut(self, mode: str = "reset") -> None:
        """ "reset": RST all connections, refuse new ones. "blackhole": keep them, discard all bytes."""
        if mode not in ("reset", "blackhole"):
            raise ValueError(f"cut mode must be 'reset' or 'blackhole', not {mode!r}")
        self._call(lambda: self._set_mode(mode))

    def restore(self) -> None:
        """Forward again. Connections that were blackholed are reset (bytes were lost from their streams)."""
        self._call(lambda: self._set_mode("normal"))

    def wait_for(self, predicate: Callable[[TcpProxy], bool], timeout: float = 10.0) -> None:
        """Wait (bounded) until `predicate(self)` is true; re-checked whenever a counter changes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"proxy condition not met within {timeout} s: {self.stats()}")
                self._changed.wait(min(remaining, 0.5))

    def stop(self) -> None:
        """Close everything and join the thread. Safe to call twice."""
        thread = self._thread
        if thread is None or self._stopping:
            return
        if thread.is_alive():
            self._call(self._shutdown)
            thread.join(CONTROL_TIMEOUT)
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._sel is not None:
            self._sel.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<TcpProxy 127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]} {self.stats()}>"

    def _call(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the proxy thread and wait until it has run."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("proxy is not running")
        done = threading.Event()
        result: list[Any] = []
        self._calls.append((fn, result, done))
        assert self._wake_w is not None
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"x")
        if not done.wait(CONTROL_TIMEOUT):
            raise TimeoutError("proxy thread did not answer")
        if result and isinstance(result[0], BaseException):
            raise result[0]

    # -- proxy thread --------------------------------------------------------------------------------

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _open_listener(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.listen_host, self.port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._listener = sock
        assert self._sel is not None
        self._sel.register(sock, selectors.EVENT_READ, "listen")

    def _close_listener(self) -> None:
        if self._listener is not None:
            assert self._sel is not None
            self._sel.unregister(self._listener)
            self._listener.close()  # pending, not yet accepted connections get a RST
            self._listener = None

    def _run(self) -> None:
        assert self._sel is not None
        while not self._stopping:
            for key, mask in self._sel.select():
                if self._stopping:
                    break
                if key.data == "wake":
                    self._run_calls()
                elif key.data == "listen":
                    self._accept()
                else:
                    pair, end = key.data
                    if pair.closed:
                        continue
                    if mask & selectors.EVENT_WRITE:
                        self._on_writable(pair, end)
                    if mask & selectors.EVENT_READ and not pair.closed:
                        self._on_readable(pair, end)
                    if not pair.closed:
                        self._update(pair)
            self._notify()
        self._run_calls()  # answer anything queued after the stop

    def _run_calls(self) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass
        while self._calls:
            fn, result, done = self._calls.popleft()
            try:
                fn()
            except BaseException as exc:
                result.append(exc)
            done.set()
        self._notify()

    def _set_mode(self, mode: str) -> None:
        if mode == self.mode:
            return
        previous, self.mode = self.mode, mode
        if mode == "reset":
            for pair in list(self._pairs):
                self._close_pair(pair, rst=True)
            self._close_listener()
        elif mode == "blackhole":
            for pair in list(self._pairs):
                self._blackhole(pair)
        else:  # normal
            if previous == "blackhole":
                for pair in list(self._pairs):
                    if pair.blackhole:
                        self._close_pair(pair, rst=True)
        if mode != "reset" and self._listener is None:
            self._open_listener()  # same port: SO_REUSEADDR, and nothing else binds it meanwhile

    def _shutdown(self) -> None:
        self._stopping = True
        for pair in list(self._pairs):
            self._close_pair(pair, rst=False)
        self._close_listener()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. ECONNABORTED: the client gave up before we got to it
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += 1
            pair = _Pair(sock, peer)
            self._pairs.add(pair)
            if self.mode == "blackhole":
                pair.blackhole = True
            else:
                up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                up.setblocking(False)
                up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = up.connect_ex(self.target)
                pair.upstream = _End(up, "upstream", connecting=True)
                if err not in (0, errno.EINPROGRESS):
                    self.refused_upstream += 1
                    self._close_pair(pair, rst=True)
                    continue
            self._update(pair)

    def _blackhole(self, pair: _Pair) -> None:
        pair.blackhole = True
        for end in pair.ends():
            if end is pair.client:
                self.discarded_down += len(end.out)
            else:
                self.discarded_up += len(end.out)
            end.out.clear()

    def _on_writable(self, pair: _Pair, end: _End) -> None:
        if end.connecting:
            err = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.refused_upstream += 1
                self._close_pair(pair, rst=True)
                return
            end.connecting = False
        self._flush(pair, end)

    def _flush(self, pair: _Pair, end: _End) -> None:
        if end.connecting:
            return  # flushed once the connect completes
        while end.out:
            try:
                n = end.sock.send(end.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close_pair(pair, rst=True)
                return
            del end.out[:n]
        other = pair.other(end)
        if other is not None and other.eof and not end.shut_wr:
            with contextlib.suppress(OSError):
                end.sock.shutdown(socket.SHUT_WR)  # pass the FIN on once everything before it is out
            end.shut_wr = True
        if all(e.eof and e.shut_wr for e in pair.ends()) and pair.upstream is not None:
            self._close_pair(pair, rst=False)

    def _on_readable(self, pair: _Pair, end: _End) -> None:
        try:
            data = end.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = None  # reset by the peer: pass the reset on
        if pair.blackhole:
            if not data:
                if end is pair.client:
                    self._close_pair(pair, rst=data is None)  # the client gave up
                else:
                    self._drop_upstream(pair)  # target gave up; the client cannot learn of it
                return
            if end is pair.client:
                self.discarded_up += len(data)
            else:
                self.discarded_down += len(data)
            return
        if data is None:
            self._close_pair(pair, rst=True)
            return
        other = pair.other(end)
        assert other is not None
        if not data:
            end.eof = True
            self._flush(pair, other)
            return
        if end is pair.client:
            self.bytes_up += len(data)
        else:
            self.bytes_down += len(data)
        other.out += data
        self._flush(pair, other)

    def _drop_upstream(self, pair: _Pair) -> None:
        up = pair.upstream
        if up is None:
            return
        if up.mask:
            assert self._sel is not None
            self._sel.unregister(up.sock)
        up.sock.close()
        pair.upstream = None

    def _update(self, pair: _Pair) -> None:
        """Register each socket for the events it needs now (nothing registered means nothing wanted)."""
        assert self._sel is not None
        for end in pair.ends():
            other = pair.other(end)
            mask = 0
            if end.connecting:
                mask |= selectors.EVENT_WRITE
            elif pair.blackhole:
                mask |= selectors.EVENT_READ  # swallow everything
            else:
                if not end.eof and other is not None and len(other.out) < HIGH_WATER:
                    mask |= selectors.EVENT_READ
                if end.out:
                    mask |= selectors.EVENT_WRITE
            if mask != end.mask:
                if end.mask == 0:
                    self._sel.register(end.sock, mask, (pair, end))
                elif mask == 0:
                    self._sel.unregister(end.sock)
                else:
                    self._sel.modify(end.sock, mask, (pair, end))
                end.mask = mask

    def _close_pair(self, pair: _Pair, *, rst: bool) -> None:
        if pair.closed:
            return
        pair.closed = True
        assert self._sel is not None
        for end in pair.ends():
            if end.mask:
                self._sel.unregister(end.sock)
                end.mask = 0
            if rst:
                _rst_close(end.sock)
            else:
                end.sock.close()
        if rst:
            self.resets += 1
        self._pairs.discard(pair)
