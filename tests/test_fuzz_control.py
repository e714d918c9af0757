"""Fuzzing the control socket of a real daemon (hypothesis): every request line gets a well-formed reply (or,
past the size bound, a ``too-long`` reply and a clean close), with the code the protocol says, and is counted.

Cases: random bytes (newlines anywhere, so several requests per connection and a last line cut short); random
JSON values (nested arrays and objects, floats with NaN and infinities, unicode text with lone surrogates,
written with and without ASCII escapes); request-shaped objects whose ``v``, ``cmd`` and ``args`` are right or
anything else (``true``, ``1.0``, long strings, nested values); huge and deep values (nesting 5,000-30,000
deep, numbers of 4,301-60,000 digits, strings and lines around the 64 KiB bound, a line that never ends).

Each example is sent on its own connection, which the test half-closes; the replies are read to EOF. An
oracle written from the protocol (``control_protocol`` and ``control``'s docstrings) gives the code each line
must get; the ``control`` counters of ``status`` must grow by exactly the lines sent and the ones refused,
``internal_errors`` must stay 0; after each test ``fleetgate status`` answers and the daemon's log has no
traceback and no error line.

What the suite found against the code before issue 11 was fixed (run with the counter checks left out, since
the counters did not exist): ``{"v": true, "cmd": "gps"}`` was served as version 1; a line that is not UTF-8
(``{"\\xed\\xa0\\x80": null}``, an encoded lone surrogate) was parsed, as ``json.loads`` decodes bytes with
``surrogatepass``; a request line of ~64 kB was echoed whole in its error reply, and a client still sending
while that reply waited to be read held its slot for good (no write deadline): after a few, ``fleetgate
status`` timed out. Deep nesting and numbers over 4,300 digits (internal errors with a traceback, not counted)
were hidden in that run behind those hangs; ``test_control_hostile.py`` shows them. None of these since.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fleetgate.daemon.runtime.control_protocol import MAX_LINE_BYTES

from conftest import Daemon, daemon_config

pytestmark = pytest.mark.timeout(120)

# Reproducible in CI (derandomize), no example database left behind; a real daemon answers each example.
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
# The commands of a daemon on daemon_config(): none of them reads its args (pin-test is not registered).
COMMANDS = ["gps", "obd", "ping", "queue", "rules", "scooters", "sessions", "status", "store"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("fuzz-control")
    d = Daemon(tmp, daemon_config(tmp))
    try:
        d.wait_ready()
        unknown = ask(d, {"v": 1, "cmd": "?"})["error"]["message"]
        assert unknown.endswith("known: " + ", ".join(COMMANDS)), f"update COMMANDS (the oracle's): {unknown}"
        yield d
    finally:
        d.cleanup()


@pytest.fixture(autouse=True)
def still_serving(daemon: Daemon) -> Iterator[None]:
    yield
    result = daemon.cli("status", "--json")
    assert result.returncode in (0, 4), result.stderr
    assert json.loads(result.stdout)["control"]["internal_errors"] == 0
    assert "Traceback" not in daemon.log
    assert "level=error" not in daemon.log


def socket_path(daemon: Daemon) -> Path:
    return daemon.tmp / "control.sock"


def exchange(daemon: Daemon, data: bytes) -> bytes:
    """Send ``data``, half-close, read until the daemon closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(socket_path(daemon)))
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed after a too-long line: what it sent is still to be read
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass  # closed with our bytes unread: after everything it sent
        return b"".join(chunks)


def ask(daemon: Daemon, request: dict[str, Any]) -> dict[str, Any]:
    return json.loads(exchange(daemon, json.dumps(request).encode() + b"\n"))


def counters(daemon: Daemon) -> dict[str, int]:
    return ask(daemon, {"v": 1, "cmd": "status"})["result"]["control"]


# -- the oracle --------------------------------------------------------------------------------------------


def expected_code(line: bytes) -> str | None:
    """The error code the protocol gives this request line (without its newline), None for an answer."""
    if len(line) > MAX_LINE_BYTES:
        return "too-long"
    try:
        msg = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "bad-json"
    except json.JSONDecodeError:
        return "bad-json"
    except RecursionError:
        return "too-deep"
    except ValueError:
        return "too-many-digits"
    if not isinstance(msg, dict):
        return "bad-request"
    if type(msg.get("v")) is not int or msg["v"] != 1:
        return "bad-version"
    if not isinstance(msg.get("cmd"), str) or msg["cmd"] not in COMMANDS:
        return "unknown-command"
    if not isinstance(msg.get("args", {}), dict):
        return "bad-args"
    return None


def lines_of(data: bytes) -> list[bytes]:
    """The request lines the daemon reads from ``data`` followed by EOF (a last line without newline too)."""
    parts = data.split(b"\n")
    lines = parts[:-1] + ([parts[-1]] if parts[-1] else [])
    for i, line in enumerate(lines):
        if len(line) > MAX_LINE_BYTES:
            return lines[: i + 1]  # the daemon closes after refusing it
    return lines


def check(daemon: Daemon, data: bytes) -> None:
    before = counters(daemon)
    raw = exchange(daemon, data)
    lines = lines_of(data)
    if lines and len(lines[-1]) > MAX_LINE_BYTES:
        # Refused as soon as the bound is passed: replies to earlier lines may race the refusal's close.
        assert raw.endswith(b"\n"), raw[-200:]
    replies = [json.loads(r) for r in raw.splitlines()]
    assert len(replies) == len(lines), (len(replies), len(lines))
    refused = 0
    for line, reply in zip(lines, replies, strict=True):
        assert set(reply) in ({"v", "ok", "result"}, {"v", "ok", "error"}), reply
        assert reply["v"] == 1 and isinstance(reply["ok"], bool)
        code = expected_code(line)
        event(f"reply: {code or 'ok'}")
        if code is None:
            assert reply["ok"] is True, (line[:200], reply)
            continue
        refused += 1
        assert reply["ok"] is False, (line[:200], reply)
        error = reply["error"]
        assert error["code"] == code, (line[:200], error)
        assert isinstance(error["message"], str) and 0 < len(error["message"]) < 1_000
    after = counters(daemon)
    assert after["requests"] - before["requests"] == len(lines) + 1  # + the status that read `after`
    assert after["bad_requests"] - before["bad_requests"] == refused
    assert after["internal_errors"] == before["internal_errors"] == 0


# -- strategies ----------------------------------------------------------------------------------------------

any_char = st.one_of(st.characters(), st.characters(categories=["Cs"]))  # Cs: lone surrogates
text = st.text(any_char, max_size=30)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**40), 10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | text
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def encoded(draw: st.DrawFn, value: Any) -> bytes:
    ascii_only = draw(st.booleans())
    # Without ASCII escapes a lone surrogate is written as such: not UTF-8, which the daemon must refuse.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


versions = st.just(1) | st.one_of(st.sampled_from([True, 1.0, 0, 2, "1", None]), values)
commands = st.sampled_from(COMMANDS) | st.one_of(text, values)
arguments = st.dictionaries(text, values, max_size=3) | values
requests = st.fixed_dictionaries(
    {"v": versions, "cmd": commands}, optional={"args": arguments, "extra": values}
) | st.fixed_dictionaries({}, optional={"v": versions, "cmd": commands, "args": arguments, "extra": values})


@st.composite
def huge(draw: st.DrawFn) -> bytes:
    kind = draw(
        st.sampled_from(["deep-array", "deep-object", "deep-args", "digits", "digits-v", "long", "endless"])
    )
    if kind == "deep-array":
        n = draw(st.integers(5_000, 30_000))
        return b"[" * n + b"]" * draw(st.integers(0, n)) + b"\n"
    if kind == "deep-object":
        return b'{"a":' * draw(st.integers(5_000, 12_000)) + b"\n"
    if kind == "deep-args":
        n = draw(st.integers(5_000, 20_000))
        return b'{"v": 1, "cmd": "ping", "args": {"x": ' + b"[" * n + b"]" * n + b"}}\n"
    if kind in ("digits", "digits-v"):
        digits = b"9" * draw(st.integers(sys.get_int_max_str_digits() + 1, 60_000))
        return (digits if kind == "digits" else b'{"v": ' + digits + b', "cmd": "ping"}') + b"\n"
    if kind == "long":  # a string value around the bound: answered below it, too-long above
        n = draw(st.integers(MAX_LINE_BYTES - 100, MAX_LINE_BYTES + 100))
        return b'{"v": 1, "cmd": "' + b"z" * (n - 18) + b'"}\n'
    return b'{"v": 1, "cmd": "' + b"w" * draw(
        st.integers(MAX_LINE_BYTES + 1, 3 * MAX_LINE_BYTES)
    )  # no newline


# -- the suite -----------------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=HEALTH)
@given(data=st.binary(max_size=400))
def test_random_bytes(daemon: Daemon, data: bytes):
    check(daemon, data)


@settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=HEALTH)
@given(body=values.flatmap(encoded), newline=st.booleans())
def test_random_json_values(daemon: Daemon, body: bytes, newline: bool):
    check(daemon, body + (b"\n" if newline else b""))


@settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=HEALTH)
@given(batch=st.lists(requests.flatmap(encoded), min_size=1, max_size=4))
def test_request_shaped_objects(daemon: Daemon, batch: list[bytes]):
    check(daemon, b"".join(line + b"\n" for line in batch))


@settings(max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=HEALTH)
@given(line=huge(), before=st.lists(requests.flatmap(encoded), max_size=2))
def test_huge_and_deep_values(daemon: Daemon, line: bytes, before: list[bytes]):
    check(daemon, b"".join(b + b"\n" for b in before) + line)
