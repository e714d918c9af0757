"""fleetgate.drivers.obd against a real ELM327-emulator on a pty (tests/elm_emulator.py), plus decoder units.

What the emulator's `car` scenario (a Toyota Auris Hybrid, CAN 11/500) gives the catalogue:
vehicle_speed, rpm, engine_load, throttle_position, coolant_temp, fuel_level, control_module_voltage decode;
bms_pack_soc (015B) is claimed in its PID bitmap but answered NO DATA; odometer (01A6) is answered from 7EA
with service byte 61 instead of 41, which the driver rejects as undecodable (`set_odometer` fixes it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import obd
import pytest
from obd.codes import DTC as OBD_DTC_TABLE
from obd.protocols import SAE_J1850_PWM, ISO_15765_4_11bit_500k

from fleetgate.drivers.obd import SIGNALS, Dtc, ObdAdapter, ObdError, Sample, decode_vin, odometer_km
from fleetgate.drivers.obd.commands import PINT_UNITS

from elm_emulator import ElmEmulator, frame

CAN_11_500 = ISO_15765_4_11bit_500k.ELM_NAME  # "ISO 15765-4 (CAN 11/500)"

# Plausible ranges per catalogue unit, for values the emulator cycles through.
PLAUSIBLE = {
    "km/h": (0, 255),
    "rpm": (0, 16384),
    "%": (0, 100),
    "degC": (-40, 215),
    "V": (0, 66),
    "km": (0, 4.3e8),
}


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[ElmEmulator]:
    with ElmEmulator(link=tmp_path / "ttyOBD") as emu:
        yield emu


def adapter_for(emu: ElmEmulator) -> ObdAdapter:
    return ObdAdapter(emu.port, protocol="6")


@pytest.mark.timeout(60)
def test_connect_identifies_adapter_and_full_vin(emulator: ElmEmulator) -> None:
    # The emulator serves the VINs of its table in turn, one per request; each ends in characters
    # (0, 1, 2) that python-obd's own decoder strips.
    expected = emulator.configured_vins()
    assert len(expected) >= 2 and all(len(v) == 17 and v != v.strip("012") for v in expected)

    version = emulator.elm_version()

    async def main() -> list[str | None]:
        adapter = adapter_for(emulator)
        vins = []
        for _ in expected:
            info = await adapter.connect()
            assert info.port == emulator.port
            assert info.protocol == CAN_11_500
            assert info.elm_version == version
            assert adapter.connected and adapter.info == info
            vins.append(info.vin)
            await adapter.close()  # reconnecting right after close() exercises the ATE0 retry
            assert not adapter.connected
        assert adapter.counters["connects"] == len(expected)
        assert adapter.counters["connect_failures"] == 0
        return vins

    assert asyncio.run(main()) == expected


@pytest.mark.timeout(60)
def test_protocol_autodetect(emulator: ElmEmulator) -> None:
    async def main() -> str:
        adapter = ObdAdapter(emulator.port)  # protocol=None: ATSP0 and search, as with the default config
        try:
            return (await adapter.connect()).protocol
        finally:
            await adapter.close()

    assert asyncio.run(main()) == CAN_11_500


@pytest.mark.timeout(60)
def test_every_signal_is_a_sample_or_a_counted_none(emulator: ElmEmulator, caplog) -> None:
    Result = tuple[Sample | None, dict[str, int]]  # the sample, and which counters it moved
    caplog.set_level(logging.WARNING, logger="fleetgate.drivers.obd.adapter")

    async def main() -> tuple[dict[str, Result], list[Sample | None]]:
        adapter = adapter_for(emulator)
        await adapter.connect()
        results = {}
        for name in SIGNALS:
            before = dict(adapter.counters)
            sample = await adapter.sample(name)
            results[name] = (
                sample,
                {k: v - before[k] for k, v in adapter.counters.items() if v != before[k]},
            )
        emulator.set_speed(77)
        emulator.set_rpm(1234.5)
        emulator.set_odometer(123456.7)
        injected = [await adapter.sample(name) for name in ("vehicle_speed", "rpm", "odometer")]
        await adapter.close()
        return results, injected

    results, injected = asyncio.run(main())
    not_from_emulator = {"bms_pack_soc": "no_data", "odometer": "decode_errors"}  # see the module docstring
    # The refusal says why, not just the bytes: the emulator's service byte 61 answers no mode 01 request.
    refused = [r for r in caplog.records if r.getMessage() == "OBD answer undecodable"]
    assert any("not an answer to 01A6: service byte 61, expected 41" in r.detail for r in refused), refused
    for name, (_, unit) in SIGNALS.items():
        sample, moved = results[name]
        if name in not_from_emulator:
            assert sample is None, name
            assert moved == {"queries": 1, not_from_emulator[name]: 1}, name
            continue
        assert sample is not None and (sample.signal, sample.unit) == (name, unit), sample
        low, high = PLAUSIBLE[unit]
        assert low <= sample.value <= high, sample
        assert moved == {"queries": 1}, name
    # the first entries of the emulator's SPEED and RPM tables
    assert results["vehicle_speed"][0] == Sample("vehicle_speed", 10.0, "km/h")
    assert results["rpm"][0] == Sample("rpm", 1303.75, "rpm")
    assert injected == [
        Sample("vehicle_speed", 77.0, "km/h"),
        Sample("rpm", 1234.5, "rpm"),
        Sample("odometer", 123456.7, "km"),
    ]


@pytest.mark.timeout(60)
def test_pid_missing_from_vehicle_bitmap_is_not_asked(emulator: ElmEmulator) -> None:
    emulator.override("ELM_PIDS_F", frame("41 A0 00 00 00 00"))  # PIDs A1..C0: none, so no odometer

    async def main() -> tuple[Sample | None, dict[str, int], dict[str, int]]:
        adapter = adapter_for(emulator)
        await adapter.connect()
        before = dict(adapter.counters)
        sample = await adapter.sample("odometer")
        after = dict(adapter.counters)
        await adapter.close()
        return sample, before, after

    sample, before, after = asyncio.run(main())
    assert sample is None
    assert after["unsupported"] == before["unsupported"] + 1
    assert after["queries"] == before["queries"]


@pytest.mark.timeout(60)
def test_engine_off_gives_counted_none_then_values_return(emulator: ElmEmulator) -> None:
    emulator.set_rpm(2500)

    async def main() -> None:
        adapter = adapter_for(emulator)
        await adapter.connect()
        assert await adapter.sample("rpm") == Sample("rpm", 2500.0, "rpm")

        emulator.set_scenario("engineoff")
        no_data = adapter.counters["no_data"]
        assert await adapter.sample("rpm") is None
        assert await adapter.sample("vehicle_speed") is None
        assert adapter.counters["no_data"] == no_data + 2
        assert await adapter.read_dtcs() == (None, [])  # no verdict while the ECU is silent
        assert isinstance(await adapter.adapter_voltage(), float)  # the adapter itself still answers
        assert adapter.connected

        emulator.set_scenario("car")
        assert await adapter.sample("rpm") == Sample("rpm", 2500.0, "rpm")
        await adapter.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_dtcs_and_mil(emulator: ElmEmulator) -> None:
    codes = ["P0104", "U0100", "C0300"]  # three codes: a multi-frame ISO-TP answer

    async def main() -> list[tuple[bool | None, list[Dtc]]]:
        adapter = adapter_for(emulator)
        await adapter.connect()
        reads = [await adapter.read_dtcs()]
        emulator.set_dtcs(codes)
        reads.append(await adapter.read_dtcs())
        emulator.clear_dtcs()
        reads.append(await adapter.read_dtcs())
        emulator.set_dtcs(["P0420"], mil=False)  # stored, but not lighting the MIL
        reads.append(await adapter.read_dtcs())
        await adapter.close()
        return reads

    clean, faulty, cleared, quiet = asyncio.run(main())
    assert clean == (False, [])
    assert faulty == (True, [Dtc(code, OBD_DTC_TABLE.get(code, "")) for code in codes])
    assert faulty[1][0].description  # P0104 is in python-obd's table
    assert cleared == (False, [])
    assert quiet == (False, [Dtc("P0420", OBD_DTC_TABLE["P0420"])])


@pytest.mark.timeout(60)
def test_adapter_voltage(emulator: ElmEmulator) -> None:
    async def main() -> tuple[float | None, float | None, float | None, int]:
        adapter = adapter_for(emulator)
        await adapter.connect()
        stock = await adapter.adapter_voltage()
        emulator.override("AT_R_VOLT", "<writeln>12.6V</writeln>")
        exact = await adapter.adapter_voltage()
        emulator.override("AT_R_VOLT", "<writeln>XX.YV</writeln>")
        garbage = await adapter.adapter_voltage()
        errors = adapter.counters["decode_errors"]
        await adapter.close()
        return stock, exact, garbage, errors

    stock, exact, garbage, errors = asyncio.run(main())
    assert isinstance(stock, float) and 6 < stock < 20
    assert exact == 12.6
    assert garbage is None and errors == 1


@pytest.mark.timeout(60)
def test_bad_bytes_are_counted_not_raised(emulator: ElmEmulator) -> None:
    answers = {  # what the emulator answers to 010C -> the counter that must move
        frame("41 0D 00 00"): "decode_errors",  # another PID
        frame("61 0C 10 00"): "decode_errors",  # another service
        frame("41"): "decode_errors",  # truncated
        "<writeln>$%GARBAGE</writeln>": "decode_errors",  # adapter text that is no ELM message
        frame("7F 01 12"): "no_data",  # negative response: the ECU declines
    }

    async def main() -> list[tuple[Sample | None, dict[str, int]]]:
        adapter = adapter_for(emulator)
        await adapter.connect()
        out = []
        for answer in answers:
            emulator.override("RPM", answer)
            before = dict(adapter.counters)
            sample = await adapter.sample("rpm")
            out.append((sample, {k: v - before[k] for k, v in adapter.counters.items() if v != before[k]}))
        assert adapter.connected
        await adapter.close()
        return out

    results = asyncio.run(main())
    assert results == [(None, {"queries": 1, counter: 1}) for counter in answers.values()]


@pytest.mark.timeout(60)
def test_truncated_answers_are_decode_errors_not_zeros(emulator: ElmEmulator) -> None:
    """Guards against python-obd padding a short answer with zero bytes (found by tests/test_fuzz_obd.py):
    `41 0D` without its data byte read as 0 km/h (stop evidence for ignition and trips), `41 0C 81` as
    8256 rpm, and a status `41 01` without its bytes as "MIL off"."""
    cases = [  # (emulator entry, truncated answer, what to ask)
        ("SPEED", frame("41 0D"), "vehicle_speed"),
        ("RPM", frame("41 0C 81"), "rpm"),
        ("STATUS", frame("41 01 80"), "dtcs"),
    ]

    async def main() -> list[tuple[object, dict[str, int]]]:
        adapter = adapter_for(emulator)
        await adapter.connect()
        out = []
        for entry, answer, asked in cases:
            emulator.override(entry, answer)
            before = dict(adapter.counters)
            got = await (adapter.read_dtcs() if asked == "dtcs" else adapter.sample(asked))
            out.append((got, {k: v - before[k] for k, v in adapter.counters.items() if v != before[k]}))
            emulator.reset(entry)
        # complete answers still decode
        emulator.set_speed(0)
        out.append((await adapter.sample("vehicle_speed"), {}))
        assert adapter.connected
        await adapter.close()
        return out

    speed, rpm, status, complete = asyncio.run(main())
    assert speed == (None, {"queries": 1, "decode_errors": 1})
    assert rpm == (None, {"queries": 1, "decode_errors": 1})
    assert status == ((None, []), {"queries": 1, "decode_errors": 1})
    assert complete[0] == Sample("vehicle_speed", 0.0, "km/h")


@pytest.mark.timeout(60)
def test_an_empty_answer_is_a_decode_error_not_a_wedged_adapter(emulator: ElmEmulator) -> None:
    """Guards against an answer with no line ("\\r\\r>", found by tests/test_fuzz_obd.py): python-obd took it
    for silence and read again ten times, waiting out the port timeout each time, past the query deadline,
    so a working adapter was dropped as wedged (and, in the daemon, reconnected over and over)."""
    emulator.override("SPEED", "<writeln></writeln>")

    async def main() -> tuple[object, dict[str, int], object, bool]:
        adapter = adapter_for(emulator)
        await adapter.connect()
        before = dict(adapter.counters)
        empty = await adapter.sample("vehicle_speed")
        moved = {k: v - before[k] for k, v in adapter.counters.items() if v != before[k]}
        rpm = await adapter.sample("rpm")
        connected = adapter.connected
        await adapter.close()
        return empty, moved, rpm, connected

    empty, moved, rpm, connected = asyncio.run(main())
    assert empty is None and moved == {"queries": 1, "decode_errors": 1}
    assert isinstance(rpm, Sample) and connected


@pytest.mark.timeout(60)
def test_unplug_raises_then_reconnects_to_new_and_same_path(tmp_path: Path) -> None:
    link = tmp_path / "ttyUSB0"  # like a udev name: the path disappears on unplug and comes back on replug
    first = ElmEmulator(link=link).start()
    second: ElmEmulator | None = None
    try:

        async def main() -> None:
            nonlocal second
            adapter = ObdAdapter(str(link), protocol="6")
            await adapter.connect()
            assert await adapter.sample("rpm") is not None

            first.kill()
            with pytest.raises(ObdError, match=str(link)):
                await adapter.sample("rpm")
            assert not adapter.connected
            assert adapter.counters["disconnects"] == 1
            with pytest.raises(ObdError):  # stays failed, no stream of Nones
                await adapter.read_dtcs()
            with pytest.raises(ObdError):
                await adapter.adapter_voltage()
            await adapter.close()
            with pytest.raises(ObdError, match="no such device"):  # still unplugged
                await adapter.connect()
            assert adapter.counters["connect_failures"] == 1

            second = ElmEmulator(link=link).start()
            # A new adapter on the new pty path...
            other = ObdAdapter(second.pty or "", protocol="6")
            assert (await other.connect()).port == second.pty
            assert await other.sample("vehicle_speed") is not None
            await other.close()
            # ...and the original adapter reconnecting to its configured path.
            info = await adapter.connect()
            assert info.port == str(link)
            assert adapter.connected
            assert await adapter.sample("rpm") is not None
            assert adapter.counters["connects"] == 2
            await adapter.close()

        asyncio.run(main())
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert not link.exists()


@pytest.mark.timeout(60)
def test_wedged_adapter_raises_within_deadline_then_reconnects(emulator: ElmEmulator) -> None:
    async def main() -> None:
        adapter = ObdAdapter(emulator.port, protocol="6", timeout_s=0.3)
        await adapter.connect()
        assert await adapter.sample("rpm") is not None
        emulator.pause()
        # no timing assertion: the deadline is the adapter's (3 * timeout_s + 2 s), and pytest-timeout
        # fails the test if it is not honoured
        with pytest.raises(ObdError, match="did not answer"):
            await adapter.sample("rpm")
        assert adapter.counters["timeouts"] == 1 and not adapter.connected
        emulator.resume()
        await adapter.close()  # waits for the stuck call to end, then closes the port on the same thread
        await adapter.connect()
        assert await adapter.sample("rpm") is not None
        await adapter.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_connect_failures_name_the_port_and_cause(tmp_path: Path) -> None:
    async def main() -> list[str]:
        messages = []
        for port in (str(tmp_path / "absent"), "/dev/null"):
            adapter = ObdAdapter(port, protocol="6")
            with pytest.raises(ObdError) as info:
                await adapter.connect()
            assert adapter.counters["connect_failures"] == 1 and not adapter.connected
            messages.append(str(info.value))
        return messages

    absent, devnull = asyncio.run(main())
    assert absent.startswith(str(tmp_path / "absent")) and "no such device" in absent
    assert devnull.startswith("/dev/null: adapter did not initialise")


@pytest.mark.timeout(60)
def test_ignition_off_at_connect(emulator: ElmEmulator) -> None:
    emulator.set_scenario("engineoff")

    async def main() -> str:
        adapter = adapter_for(emulator)
        with pytest.raises(ObdError) as info:
            await adapter.connect()
        assert adapter.counters["connect_failures"] == 1
        return str(info.value)

    message = asyncio.run(main())
    assert message.startswith(emulator.port) and "ignition off" in message


# -- decoders, no emulator --

VIN_CAN_FRAMES = [  # ELM327 with headers on, ISO-TP first frame + two consecutive frames
    "7E8 10 14 49 02 01 57 50 30",
    "7E8 21 5A 5A 5A 39 39 5A 54",
    "7E8 22 53 33 39 30 30 30 30",
]


def test_vin_from_raw_can_multiframe() -> None:
    messages = ISO_15765_4_11bit_500k([])(VIN_CAN_FRAMES)
    assert decode_vin(messages[0].data) == "WP0ZZZ99ZTS390000"
    # the same frames with the consecutive frames out of order and without spaces
    shuffled = ISO_15765_4_11bit_500k([])([s.replace(" ", "") for s in reversed(VIN_CAN_FRAMES)])
    assert decode_vin(shuffled[0].data) == "WP0ZZZ99ZTS390000"


@pytest.mark.parametrize("vin", ["WP0ZZZ99ZTS390000", "SB1ZS3JE60E282102", "1FTEW1EP5MFA00001"])
def test_vin_payload_with_and_without_prefix(vin: str) -> None:
    body = vin.encode()
    assert vin != vin.strip("012")  # the tail python-obd would cut off
    assert decode_vin(b"\x49\x02\x01" + body) == vin
    assert decode_vin(b"\x01" + body) == vin
    assert decode_vin(body) == vin
    assert decode_vin(b"\x49\x02\x01" + body + b"\x00\x00") == vin  # ISO-TP padding


def test_vin_from_raw_legacy_frames() -> None:
    lines = [  # SAE J1850 PWM: five numbered frames, the first padded with NULs
        "48 6B 10 49 02 01 00 00 00 31 00",
        "48 6B 10 49 02 02 44 34 47 50 00",
        "48 6B 10 49 02 03 30 30 52 35 00",
        "48 6B 10 49 02 04 35 42 31 32 00",
        "48 6B 10 49 02 05 33 34 35 30 00",
    ]
    messages = SAE_J1850_PWM([])(lines)
    assert decode_vin(messages[0].data) == "1D4GP00R55B123450"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x49\x02\x01",
        b"\x49\x02\x01WP0ZZZ99ZTS39000",
        b"\x49\x02\x01" + b"\xff" * 17,
        b"WP0ZZZ99ZTS39000!",
    ],
)
def test_vin_rejects_garbage(payload: bytes) -> None:
    assert decode_vin(payload) is None


def test_odometer_decoder() -> None:
    assert odometer_km(bytes.fromhex("0000EA5C")) == 5999.6
    assert odometer_km(bytes.fromhex("0001E240")) == 12345.6
    assert odometer_km(bytes.fromhex("FFFFFFFF")) == 429496729.5
    assert odometer_km(bytes.fromhex("00EA5C")) is None
    # through the catalogue's command, from a raw CAN answer, as the adapter decodes it
    command, unit = SIGNALS["odometer"]
    messages = ISO_15765_4_11bit_500k([])(["7E8 06 41 A6 00 01 E2 40"])
    assert command(messages).value.to(PINT_UNITS[unit]).magnitude == 12345.6


def test_catalogue_commands() -> None:
    pids = {name: command.command.decode() for name, (command, _) in SIGNALS.items()}
    assert pids == {
        "vehicle_speed": "010D",
        "rpm": "010C",
        "engine_load": "0104",
        "throttle_position": "0111",
        "coolant_temp": "0105",
        "fuel_level": "012F",
        "control_module_voltage": "0142",
        "bms_pack_soc": "015B",
        "odometer": "01A6",
    }
    assert SIGNALS["bms_pack_soc"][0] is obd.commands.HYBRID_BATTERY_REMAINING
