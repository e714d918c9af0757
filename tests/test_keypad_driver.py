"""The serial keypad driver against a real socat pty pair: entries, clears, timeouts, bad input, feedback,
unplug and replug, and that a PIN's digits never show up in logs, reprs or errors."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import struct
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import fleetgate.drivers.keypad as keypad_module
from fleetgate.drivers.keypad import (
    BadInput,
    EntryAbandoned,
    Keypad,
    KeypadError,
    KeypadEvent,
    KeypadSettings,
    PinEntered,
)

from conftest import wait_until
from pty_pair import PtyPair, pty_pairs_fixture

pty_pairs = pty_pairs_fixture()
DEADLINE = 10.0  # generous: waiting for a condition, not measuring


async def next_event(keypad: Keypad) -> KeypadEvent | None:
    async with asyncio.timeout(DEADLINE):
        return await keypad.next_event()


def run_with_keypad(pair: PtyPair, scenario: Callable, **settings: object) -> object:
    """Run ``scenario(keypad, pair)`` with an open keypad on ``pair``."""

    async def main() -> object:
        async with Keypad(KeypadSettings(port=pair.device, **settings)) as keypad:  # type: ignore[arg-type]
            return await scenario(keypad, pair)

    return asyncio.run(main())


def test_keys_digits_then_hash_yield_one_entry(pty_pairs: Callable[[str], PtyPair]) -> None:
    pair = pty_pairs("keypad")

    async def scenario(keypad: Keypad, pair: PtyPair) -> None:
        before = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        pair.write(b"12")
        pair.write(b"3 4\r\n")  # whitespace between keys is ignored
        pair.write(b"#")
        event = await next_event(keypad)
        after = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        assert isinstance(event, PinEntered)
        assert event.digits == "1234"
        assert before <= event.at_mono_ns <= after
        pair.write(b"9#")
        second = await next_event(keypad)
        assert isinstance(second, PinEntered) and second.digits == "9"
        assert keypad.counters["entries"] == 2

    run_with_keypad(pair, scenario)


def test_star_clears_the_partial_entry(pty_pairs: Callable[[str], PtyPair]) -> None:
    pair = pty_pairs("keypad")

    async def scenario(keypad: Keypad, pair: PtyPair) -> None:
        pair.write(b"12*")
        event = await next_event(keypad)
        assert isinstance(event, EntryAbandoned) and event.reason == "cleared"
        await pair.aexpect(b"C\n")  # the driver's own "abandoned" feedback
        pair.write(b"*56#")  # a clear with nothing typed is no event
        event = await next_event(keypad)
        assert isinstance(event, PinEntered) and event.digits == "56"
        assert keypad.counters["abandoned_cleared"] == 1

    run_with_keypad(pair, scenario)


def test_inter_key_timeout_abandons_a_partial_entry(pty_pairs: Callable[[str], PtyPair]) -> None:
    pair = pty_pairs("keypad")

    async def scenario(keypad: Keypad, pair: PtyPair) -> None:
        pair.write(b"12")
        event = await next_event(keypad)  # nothing else is typed: only the timer can end it
        assert isinstance(event, EntryAbandoned) and event.reason == "timeout"
        await pair.aexpect(b"C\n")
        pair.write(b"34#")
        event = await next_event(keypad)
        assert isinstance(event, PinEntered)
        assert event.digits == "34"  # not "1234": the timed-out digits are gone
        assert keypad.counters["abandoned_timeout"] == 1

    run_with_keypad(pair, scenario, inter_key_timeout_s=0.2)


def test_keys_keep_a_slow_entry_alive(pty_pairs: Callable[[str], PtyPair]) -> None:
    """Each key restarts the inter-key timer: a renter typing slower than the timeout in total, but not
    between keys, gets the whole entry."""
    pair = pty_pairs("keypad")

    async def scenario(keypad: Keypad, pair: PtyPair) -> None:
        for key in b"1234":
            pair.write(bytes([key]))
            await asyncio.sleep(0.15)  # pacing the typist (0.6 s in all, 0.4 s timeout), not a measurement
        pair.write(b"#")
        event = await next_event(keypad)
        assert isinstance(event, PinEntered) and event.digits == "1234"

    run_with_keypad(pair, scenario, inter_key_timeout_s=0.4)


def test_keys_typed_while_nobody_listened_are_discarded_at_open(pty_pairs: Callable[[str], PtyPair]) -> None:
    """Guards against a stale PIN, typed while the daemon was down, being submitted minutes later."""
    pair = pty_pairs("keypad")
    pair.write(b"1234#")
    # Hold the device side open (its last close would flush the bytes itself) until socat delivered them.
    holder = os.open(pair.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        wait_until("stale bytes at the device", lambda: _bytes_waiting(holder) == 5)

        async def scenario(keypad: Keypad, pair: PtyPair) -> None:
            pair.write(b"56#")
            event = await next_event(keypad)
            assert isinstance(event, PinEntered) and event.digits == "56"

        run_with_keypad(pair, scenario)
    finally:
        os.close(holder)


def _bytes_waiting(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def test_line_mode_one_line_is_one_entry(pty_pairs: Callable[[str], PtyPair]) -> None:
    pair = pty_pairs("keypad")

    async def scenario(keypad: Keypad, pair: PtyPair) -> None:
        pair.write(b"1234\r\n5678\n\r\n\n")
        got = [await next_event(keypad), await next_event(keypad)]
        assert [e.digits for e in got if isinstance(e, PinEntered)] == ["1234", "5678"]
        pair.write(b"9\r")  # the empty lines above made no event: the next one is this
        event = await next_event(keypad)
        assert isinstance(event, PinEntered) and event.digits == "9"
        pair.write(b"12#4\n")  # '#' is not part of the line protocol
        bad, spoiled = await next_event(keypad), await next_event(keypad)
        assert isinstance(bad, BadInput) and bad.byte_count == 1
        assert isinstance(spoiled, EntryAbandoned) and spoiled.reason == "bad-input"

    run_with_keypad(pair, scenario, protocol="line")


def test_garbage_is_counted_and_reported_and_a_following_entry_works(
    pty_pairs: Callable[[str], PtyPair],
) -> None:
    pair = pty_pairs("keypad")

    async def scenario(keypad: Keypad, pair: PtyPair) -> None:
        pair.write(b"\x00\xffAB")
        event = await next_event(keypad)
        assert isinstance(event, BadInput)
        assert event.byte_count == 4
        assert "00 ff 41 42" in event.description
        assert keypad.counters["bad_bytes"] == 4
        pair.write(b"1234#")
        event = await next_event(keypad)
        assert isinstance(event, PinEntered) and event.digits == "1234"
        # A bad byte inside an entry spoils it: refused, never submitted as a shorter PIN.
        pair.write(b"12x4#")
        bad, spoiled = await next_event(keypad), await next_event(keypad)
        assert isinstance(bad, BadInput) and bad.byte_count == 1
        assert isinstance(spoiled, EntryAbandoned) and spoiled.reason == "bad-input"
        await pair.aexpect(b"R\n")
        pair.write(b"5678#")
        event = await next_event(keypad)
        assert isinstance(event, PinEntered) and event.digits == "5678"
        assert keypad.counters["bad_bytes"] == 5
        assert keypad.counters["bad_input_events"] == 2

    run_with_keypad(pair, scenario)


def test_too_long_entry_is_refused_without_its_digits(pty_pairs: Callable[[str], PtyPair]) -> None:
    pair = pty_pairs("keypad")

    async def scenario(keypad: Keypad, pair: PtyPair) -> None:
        pair.write(b"1234567#")
        event = await next_event(keypad)
        assert isinstance(event, EntryAbandoned) and event.reason == "too-long"
        await pair.aexpect(b"R\n")
        pair.write(b"123456#")  # exactly max_digits is fine
        event = await next_event(keypad)
        assert isinstance(event, PinEntered) and event.digits == "123456"
        assert keypad.counters["abandoned_too_long"] == 1

    run_with_keypad(pair, scenario, max_digits=6)


def test_feedback_bytes_go_out_on_the_keypad_port(pty_pairs: Callable[[str], PtyPair]) -> None:
    pair = pty_pairs("keypad")

    async def scenario(keypad: Keypad, pair: PtyPair) -> None:
        await keypad.feedback("accepted")
        assert await pair.aexpect(b"G\n") == b"G\n"
        await keypad.feedback("refused")
        await keypad.feedback("locked-out")
        assert await pair.aexpect(b"L\n") == b"R\nL\n"

    run_with_keypad(pair, scenario)


def test_feedback_commands_and_key_click_are_configurable(pty_pairs: Callable[[str], PtyPair]) -> None:
    pair = pty_pairs("keypad")

    async def scenario(keypad: Keypad, pair: PtyPair) -> None:
        pair.write(b"7")
        assert await pair.aexpect(b"\x07") == b"\x07"  # key click, before any entry is complete
        pair.write(b"#")
        await next_event(keypad)
        await keypad.feedback("accepted")
        assert (await pair.aexpect(b"\x02OK\x03")).endswith(b"\x02OK\x03")

    run_with_keypad(pair, scenario, feedback_accepted=b"\x02OK\x03", feedback_key=b"\x07")


def test_unplug_raises_keypad_error_naming_the_port_and_replug_reads_again(
    pty_pairs: Callable[[str], PtyPair],
) -> None:
    pair = pty_pairs("keypad")

    async def main() -> None:
        keypad = Keypad(KeypadSettings(port=pair.device))
        await keypad.open()
        pair.write(b"11#")
        first = await next_event(keypad)
        assert isinstance(first, PinEntered)

        async def consume() -> list[KeypadEvent]:
            return [event async for event in keypad.entries()]

        consumer = asyncio.create_task(consume())
        await asyncio.to_thread(pair.kill)
        with pytest.raises(KeypadError) as caught:
            async with asyncio.timeout(DEADLINE):
                await consumer
        assert pair.device in str(caught.value)
        assert "disconnected" in str(caught.value)
        assert caught.value.port == pair.device
        assert keypad.state == "failed"
        assert pair.device in keypad.describe()
        with pytest.raises(KeypadError, match="disconnected"):
            await keypad.feedback("accepted")
        with pytest.raises(KeypadError, match=f"keypad port {pair.device} not found"):
            await keypad.open()  # still unplugged

        await asyncio.to_thread(pair.restart)
        await keypad.open()  # the same object reopens after replug (the supervisor's retry)
        pair.write(b"42#")
        event = await next_event(keypad)
        assert isinstance(event, PinEntered) and event.digits == "42"
        await keypad.feedback("accepted")
        await pair.aexpect(b"G\n")
        await keypad.close()
        assert await keypad.next_event() is None  # closed on purpose: the iteration ends, no error

        async with Keypad(KeypadSettings(port=pair.device)) as fresh:  # and so does a new instance
            pair.write(b"43#")
            event = await next_event(fresh)
            assert isinstance(event, PinEntered) and event.digits == "43"

    asyncio.run(main())


def test_missing_or_wrong_port_gives_a_clear_error(
    tmp_path: Path, pty_pairs: Callable[[str], PtyPair]
) -> None:
    missing = str(tmp_path / "ttyUSB9")
    not_a_tty = tmp_path / "plain-file"
    not_a_tty.write_text("")
    pair = pty_pairs("keypad")

    async def main() -> None:
        with pytest.raises(KeypadError) as caught:
            await Keypad(KeypadSettings(port=missing)).open()
        assert str(caught.value) == f"keypad port {missing} not found"
        with pytest.raises(KeypadError, match="is not a serial device"):
            await Keypad(KeypadSettings(port=str(not_a_tty))).open()
        async with Keypad(KeypadSettings(port=pair.device)):
            with pytest.raises(KeypadError, match="in use by another process"):
                await Keypad(KeypadSettings(port=pair.device)).open()
        with pytest.raises(KeypadError, match="keypad port loop:// has no file descriptor to wait on"):
            await Keypad(KeypadSettings(port="loop://")).open()

    asyncio.run(main())


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="protocol"):
        KeypadSettings(port="/dev/null", protocol="morse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_digits"):
        KeypadSettings(port="/dev/null", max_digits=0)


def test_pin_digits_never_appear_in_logs_reprs_or_errors(
    pty_pairs: Callable[[str], PtyPair], caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the rule that a PIN is never logged: every path a PIN's digits travel through is exercised
    with DEBUG logging on, and nothing the driver produces as text may contain them."""
    pin = "918273"
    caplog.set_level(logging.DEBUG)
    pair = pty_pairs("keypad")
    texts: list[str] = []

    async def main() -> None:
        keypad = Keypad(KeypadSettings(port=pair.device, max_digits=8, inter_key_timeout_s=0.2))
        await keypad.open()
        pair.write(pin.encode() + b"#")
        entered = await next_event(keypad)
        assert isinstance(entered, PinEntered) and entered.digits == pin
        pair.write(pin.encode() + b"*")  # cleared
        pair.write(pin.encode() + b"x#")  # spoiled
        pair.write(pin.encode() + pin.encode() + b"#")  # too long
        events = [await next_event(keypad) for _ in range(4)]
        pair.write(pin.encode())  # timed out
        events.append(await next_event(keypad))
        assert [type(e).__name__ for e in events] == [
            "EntryAbandoned",
            "BadInput",
            "EntryAbandoned",
            "EntryAbandoned",
            "EntryAbandoned",
        ]
        pair.write(pin.encode())  # a partial entry when the keypad goes away
        await asyncio.to_thread(pair.kill)
        with pytest.raises(KeypadError) as caught:
            while True:  # the partial entry may time out before the unplug is read
                events.append(await next_event(keypad))
        texts.extend([repr(entered), str(entered), repr(keypad), keypad.describe(), str(caught.value)])
        texts.extend(repr(e) for e in events)
        texts.extend(str(e) for e in events)
        texts.append(repr(keypad.counters))

    asyncio.run(main())
    assert any("entry submitted" in r.getMessage() for r in caplog.records)  # the log was captured
    texts.extend(r.getMessage() for r in caplog.records)
    texts.extend(caplog.text.splitlines())
    leaks = [t for t in texts if pin in t or pin[:4] in t]
    assert not leaks
    assert "digits" not in repr(PinEntered("1234", 0))


def test_a_full_event_queue_is_counted_and_warned_about_without_flooding_the_log(
    pty_pairs: Callable[[str], PtyPair], caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody reads events while a keypad sends entries: every dropped event is counted, the warning comes at
    most once an interval (it flooded the log with one line per dropped event) and tells how many were
    dropped, including those no line was written for; what was queued is still delivered."""
    caplog.set_level(logging.WARNING, logger="fleetgate.drivers.keypad")
    pair = pty_pairs("keypad")
    entries = 1000

    async def scenario(keypad: Keypad, pair: PtyPair) -> None:
        pair.write(b"1#" * entries)
        await asyncio.to_thread(
            wait_until, "every entry parsed", lambda: keypad.counters["entries"] == entries
        )
        dropped = keypad.counters["events_dropped"]
        assert dropped == entries - keypad_module.QUEUE_SIZE
        warnings = [r.getMessage() for r in caplog.records if "event queue full" in r.getMessage()]
        assert 1 <= len(warnings) <= 3, f"{len(warnings)} warnings for {dropped} dropped events"
        # The next warning (the interval shortened here, not waited for) tells what the quiet ones held.
        keypad._queue_full_log.interval_s = 0.0
        pair.write(b"2#")
        await asyncio.to_thread(
            wait_until, "one more dropped", lambda: keypad.counters["events_dropped"] > dropped
        )
        last = [r.getMessage() for r in caplog.records if "event queue full" in r.getMessage()][-1]
        assert f"{dropped + 1} dropped in all" in last, last
        for _ in range(keypad_module.QUEUE_SIZE):
            event = await next_event(keypad)
            assert isinstance(event, PinEntered) and event.digits == "1"

    run_with_keypad(pair, scenario)
