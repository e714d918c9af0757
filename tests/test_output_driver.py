"""The start-enable output: the serial relay against a real socat pty pair (commands, unplug, reconnect with
re-assert), the log-only backend, and the GPIO backend's errors (no GPIO chip can exist on this machine)."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleetgate.drivers.output import (
    LCUS1_OFF,
    LCUS1_ON,
    GpioLine,
    GpioLineSettings,
    LogOnly,
    LogOnlySettings,
    OutputError,
    SerialRelay,
    SerialRelaySettings,
    StartEnable,
    open_output,
)

from pty_pair import PtyPair, pty_pairs_fixture

pty_pairs = pty_pairs_fixture()
DEADLINE = 10.0


async def until(what: str, check: Callable[[], Any]) -> None:
    async with asyncio.timeout(DEADLINE):
        while not check():
            await asyncio.sleep(0.01)
    assert check(), what


def test_default_commands_are_the_lcus1_board() -> None:
    assert bytes([0xA0, 0x01, 0x01, 0xA2]) == LCUS1_ON
    assert bytes([0xA0, 0x01, 0x00, 0xA1]) == LCUS1_OFF


def test_relay_on_and_off_commands_arrive_on_the_port(pty_pairs: Callable[[str], PtyPair]) -> None:
    pair = pty_pairs("relay")

    async def main() -> None:
        relay = await open_output(SerialRelaySettings(port=pair.device))
        assert isinstance(relay, SerialRelay) and isinstance(relay, StartEnable)
        assert await pair.aexpect(LCUS1_OFF) == LCUS1_OFF  # opened in a known state: off
        assert relay.enabled is False
        await relay.set(True)
        assert await pair.aexpect(LCUS1_ON) == LCUS1_ON
        assert relay.enabled is True
        assert relay.describe() == f"serial relay {pair.device}: on"
        await relay.set(False)
        assert await pair.aexpect(LCUS1_OFF) == LCUS1_OFF
        assert relay.enabled is False
        await relay.set(True)
        await relay.close()  # switches off on the way down
        assert await pair.aexpect(LCUS1_OFF) == LCUS1_ON + LCUS1_OFF
        assert relay.enabled is False

    asyncio.run(main())


def test_relay_commands_are_configurable_and_board_replies_are_ignored(
    pty_pairs: Callable[[str], PtyPair],
) -> None:
    pair = pty_pairs("relay")

    async def main() -> None:
        settings = SerialRelaySettings(port=pair.device, on_command=b"ON\r", off_command=b"OFF\r")
        relay = await open_output(settings)
        assert isinstance(relay, SerialRelay)
        await pair.aexpect(b"OFF\r")
        pair.write(b"OK\r\n")  # some boards answer; the answer must not look like an unplug
        await until("reply read", lambda: relay.counters["bytes_ignored"] == 4)
        await relay.set(True)
        assert await pair.aexpect(b"ON\r") == b"ON\r"
        assert relay.connected
        await relay.close()

    asyncio.run(main())


def test_relay_reasserts_the_commanded_state_after_replug(pty_pairs: Callable[[str], PtyPair]) -> None:
    """Guards against a relay board that lost power (unplugged) staying off while the daemon believes
    start-enable is on: the unplug is noticed with no set() call, and the replugged board is switched on."""
    pair = pty_pairs("relay")

    async def main() -> None:
        relay = await open_output(SerialRelaySettings(port=pair.device, reconnect_interval_s=0.05))
        assert isinstance(relay, SerialRelay)
        await relay.set(True)
        await pair.aexpect(LCUS1_OFF + LCUS1_ON)
        await asyncio.to_thread(pair.kill)
        await until("unplug noticed", lambda: not relay.connected)
        assert "NOT CONNECTED" in relay.describe() and pair.device in relay.describe()
        assert relay.enabled is True  # still what the daemon asked for
        await asyncio.to_thread(pair.restart)
        assert await pair.aexpect(LCUS1_ON) == LCUS1_ON  # nobody called set(): the driver re-asserted
        await until("reconnected", lambda: relay.connected)
        assert relay.counters["reconnects"] == 1
        await relay.set(False)
        assert await pair.aexpect(LCUS1_OFF) == LCUS1_OFF
        await relay.close()

    asyncio.run(main())


def test_set_while_unplugged_fails_clearly_and_leaves_the_relay_commanded_off(
    pty_pairs: Callable[[str], PtyPair],
) -> None:
    pair = pty_pairs("relay")

    async def main() -> None:
        relay = await open_output(SerialRelaySettings(port=pair.device, reconnect_interval_s=0.05))
        assert isinstance(relay, SerialRelay)
        await relay.set(True)
        await pair.aexpect(LCUS1_OFF + LCUS1_ON)
        await asyncio.to_thread(pair.kill)
        with pytest.raises(OutputError) as caught:
            await relay.set(True)
        assert pair.device in str(caught.value)
        assert relay.enabled is False  # fail safe: never switched on later behind the caller's back
        await asyncio.to_thread(pair.restart)
        assert await pair.aexpect(LCUS1_OFF) == LCUS1_OFF  # re-asserted: off
        await until("reconnected", lambda: relay.connected)
        await relay.close()

    asyncio.run(main())


def test_next_set_after_replug_reopens_the_port(pty_pairs: Callable[[str], PtyPair]) -> None:
    pair = pty_pairs("relay")

    async def main() -> None:
        # A reconnect interval far beyond the test: only set() can reopen the port here.
        relay = await open_output(SerialRelaySettings(port=pair.device, reconnect_interval_s=3600))
        assert isinstance(relay, SerialRelay)
        await pair.aexpect(LCUS1_OFF)
        await asyncio.to_thread(pair.kill)
        with pytest.raises(OutputError, match=f"start-enable relay port {pair.device} not found"):
            await relay.set(True)
        await asyncio.to_thread(pair.restart)
        await relay.set(True)
        assert await pair.aexpect(LCUS1_ON) == LCUS1_ON
        assert relay.connected and relay.enabled
        await relay.close()

    asyncio.run(main())


def test_relay_on_a_network_url_is_written_from_a_thread() -> None:
    """pyserial URLs without a file descriptor (socket://, e.g. a network relay board) still work."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(DEADLINE)
        port = server.getsockname()[1]

        async def main() -> bytes:
            relay = await open_output(SerialRelaySettings(port=f"socket://127.0.0.1:{port}"))
            conn, _ = await asyncio.to_thread(server.accept)
            with conn:
                conn.settimeout(DEADLINE)
                await relay.set(True)
                await relay.close()
                got = b""
                while len(got) < 12 and (chunk := await asyncio.to_thread(conn.recv, 100)):
                    got += chunk
                return got

        assert asyncio.run(main()) == LCUS1_OFF + LCUS1_ON + LCUS1_OFF


def test_missing_relay_port_is_a_clear_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "ttyUSB7")

    async def main() -> None:
        with pytest.raises(OutputError) as caught:
            await open_output(SerialRelaySettings(port=missing))
        assert str(caught.value) == f"start-enable relay port {missing} not found"

    asyncio.run(main())


def test_log_only_logs_each_switch_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fleetgate.drivers.output")

    async def main() -> None:
        output = await open_output(LogOnlySettings())
        assert isinstance(output, LogOnly) and isinstance(output, StartEnable)
        await output.set(True)
        assert output.enabled and output.describe() == "log only: on"
        await output.set(False)
        assert not output.enabled
        await output.set(True)
        await output.close()
        assert not output.enabled

    asyncio.run(main())
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "fleetgate.drivers.output"]
    on, off = (logging.INFO, "start-enable on"), (logging.INFO, "start-enable off")
    assert messages == [on, off, on, off]


def test_gpio_missing_chip_is_a_clear_error(tmp_path: Path) -> None:
    chip = str(tmp_path / "gpiochip0")

    async def main() -> None:
        with pytest.raises(OutputError) as caught:
            await open_output(GpioLineSettings(chip=chip, line=17))
        assert str(caught.value) == f"GPIO chip {chip} not found"

    asyncio.run(main())


def test_gpio_without_package_or_on_a_non_chip_is_a_clear_error(tmp_path: Path) -> None:
    """A device file that is not a GPIO chip: with the gpiod package (not a fleetgate dependency) the
    kernel refuses it; without the package the error names the package to install."""
    not_a_chip = tmp_path / "gpiochip9"
    not_a_chip.write_text("")
    output = GpioLine(GpioLineSettings(chip=str(not_a_chip), line=4))

    async def main() -> None:
        with pytest.raises(OutputError) as caught:
            await output.open()
        if importlib.util.find_spec("gpiod") is None:
            assert (
                str(caught.value)
                == "GPIO output needs the gpiod package (libgpiod v2 bindings: pip install gpiod)"
            )
        else:
            assert str(caught.value).startswith(f"{not_a_chip} is not a GPIO chip")
        assert "not open" in output.describe()
        with pytest.raises(OutputError) as again:
            await output.set(True)  # set() opens a line that is not open: the same clear error
        assert str(again.value) == str(caught.value)
        assert output.enabled is False

    asyncio.run(main())


def test_open_output_refuses_unknown_settings() -> None:
    with pytest.raises(TypeError, match="not start-enable output settings"):
        asyncio.run(open_output(object()))  # type: ignore[arg-type]
