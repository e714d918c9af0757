"""The control socket of a real daemon under hostile clients (issue 11, finding 5).

Idle connections in every slot, a client that sends nothing or half a line, one that never reads its replies,
requests nested 60,000 deep, numbers of 5,000 digits, ``"v": true``, a line that never ends: each is answered
with an error or closed, counted in status's ``control`` section, and ``fleetgate status`` keeps answering
with no traceback in the daemon's log.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetgate.daemon.runtime.control_protocol import MAX_LINE_BYTES

from conftest import daemon_config, wait_until

pytestmark = pytest.mark.timeout(120)

MAX_CLIENTS = 8  # control.max_clients' default


def status(daemon) -> dict:
    result = daemon.cli("status", "--json")
    assert result.returncode in (0, 4), result.stderr
    return json.loads(result.stdout)


def control(daemon) -> dict:
    return status(daemon)["control"]


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    """What the daemon sent until it closed. A close with our request bytes still unread shows as a reset,
    after everything it sent."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def replies(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in raw.splitlines()]


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


@pytest.fixture
def daemon(tmp_path, start_daemon) -> Iterator:
    d = start_daemon(daemon_config(tmp_path))
    d.wait_ready()
    yield d
    assert "Traceback" not in d.log
    assert "level=error" not in d.log


def test_idle_connections_in_every_slot_do_not_lock_technicians_out(daemon, tmp_path):
    """Before: 8 idle connections held every slot and `fleetgate status` timed out until they closed."""
    idle = [connect(tmp_path / "control.sock") for _ in range(MAX_CLIENTS)]
    try:
        # The daemon accepts in connect order: the CLI's connection comes after the 8 that hold every slot.
        counters = control(daemon)
        assert counters["evicted"] == 1
        assert counters["clients"] == MAX_CLIENTS  # 7 idle ones and the CLI
        wait_until("the longest-waiting connection dropped", lambda: readable(idle[0]))
        [reply] = replies(read_to_eof(idle[0]))
        assert reply["ok"] is False and reply["error"]["code"] == "evicted"
        assert "waiting" in reply["error"]["message"]
        assert counters["bad_requests"] == 0 and counters["internal_errors"] == 0
    finally:
        for sock in idle:
            sock.close()


def test_an_idle_and_a_slow_client_are_dropped_at_the_deadline(daemon, tmp_path):
    idle = connect(tmp_path / "control.sock")
    slow = connect(tmp_path / "control.sock")
    slow.sendall(b'{"v": 1, "cmd": "sta')  # half a request, then nothing
    try:
        for sock in (idle, slow):
            [reply] = replies(read_to_eof(sock))  # the daemon closes it
            assert reply["error"]["code"] == "timeout"
            assert "no complete request within" in reply["error"]["message"]
        counters = control(daemon)
        assert counters["timeouts"] == 2
        assert counters["clients"] == 1  # only the CLI asking: both slots were freed
    finally:
        idle.close()
        slow.close()


def test_a_client_that_never_reads_its_replies_is_dropped_and_frees_its_slot(daemon, tmp_path):
    """Replies pile up in the socket until the daemon's write waits; the deadline ends that wait."""
    greedy = connect(tmp_path / "control.sock")
    try:
        greedy.sendall(b'{"v": 1, "cmd": "status"}\n' * 2000)  # ~2 kB each answer: far beyond the buffers
        wait_until("the greedy client dropped", lambda: control(daemon)["timeouts"] == 1)
        got = read_to_eof(greedy)
        assert 0 < got.count(b"\n") < 2000
        assert control(daemon)["clients"] == 1
    finally:
        greedy.close()


HOSTILE: list[tuple[str, bytes, str]] = [
    ("deep-array", b"[" * 60_000 + b"\n", "too-deep"),
    ("deep-object", b'{"a":' * 12_000 + b"\n", "too-deep"),
    ("deep-args", b'{"v": 1, "cmd": "ping", "args": {"x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}}\n", "too-deep"),
    ("huge-int", b"9" * 5_000 + b"\n", "too-many-digits"),
    ("huge-int-arg", b'{"v": 1, "cmd": "ping", "args": {"n": ' + b"7" * 5_000 + b"}}\n", "too-many-digits"),
    ("v-true", b'{"v": true, "cmd": "ping"}\n', "bad-version"),
    ("v-float", b'{"v": 1.0, "cmd": "ping"}\n', "bad-version"),
    ("v-string", b'{"v": "1", "cmd": "ping"}\n', "bad-version"),
    ("v-deep", b'{"v": ' + b"[" * 900 + b"]" * 900 + b', "cmd": "ping"}\n', "bad-version"),
    ("v-long-int", b'{"v": ' + b"1" * 4_000 + b', "cmd": "ping"}\n', "bad-version"),
    ("cmd-deep", b'{"v": 1, "cmd": ' + b"{" + b'"a":{' * 900 + b"}" * 901 + b"}\n", "unknown-command"),
    ("cmd-long", b'{"v": 1, "cmd": "' + b"x" * 60_000 + b'"}\n', "unknown-command"),
    ("not-utf8", b'{"v": 1, "cmd": "\xff\xfe"}\n', "bad-json"),
    ("utf16", '{"v": 1, "cmd": "ping"}'.encode("utf-16") + b"\n", "bad-json"),
    ("nan-version", b'{"v": NaN, "cmd": "ping"}\n', "bad-version"),
]  # fmt: skip


def test_hostile_requests_are_bad_requests_named_and_counted(daemon, tmp_path):
    """Before: deep nesting and long numbers were internal errors with a traceback; {"v": true} was version 1."""
    sock = connect(tmp_path / "control.sock")
    try:
        stream = sock.makefile("rb")
        for name, raw, code in HOSTILE:
            sock.sendall(raw)
            reply = json.loads(stream.readline())
            assert reply["ok"] is False, name
            assert reply["error"]["code"] == code, (name, reply)
            assert len(reply["error"]["message"]) < 1_000, name  # no echo of a huge request
        sock.sendall(b'{"v": 1, "cmd": "ping"}\n')  # the same connection still serves
        assert json.loads(stream.readline())["ok"] is True
    finally:
        sock.close()
    counters = control(daemon)
    assert counters["bad_requests"] == len(HOSTILE)
    assert counters["internal_errors"] == 0


def test_a_line_that_never_ends_is_refused_at_the_size_bound(daemon, tmp_path):
    sock = connect(tmp_path / "control.sock")
    try:
        sock.sendall(b'{"v": 1, "cmd": "' + b"y" * (MAX_LINE_BYTES + 10))  # no newline, connection kept open
        [reply] = replies(read_to_eof(sock))
        assert reply["error"]["code"] == "too-long"
        assert str(MAX_LINE_BYTES) in reply["error"]["message"]
    finally:
        sock.close()
    counters = control(daemon)
    assert counters["bad_requests"] == 1
    assert counters["requests"] >= 2  # the refused line counts as a request too
