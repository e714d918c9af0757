"""Segway's pushes decoded: Appendix 2's fault codes, each push's fields typed under the seed's names, bad
values refused by field, and the dedup key a retried push shares."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fleetgate.sync.segway.faults import FAULTS, Fault, decode
from fleetgate.sync.segway.pushes import KINDS, Push, PushInvalid, decode_push, dedup_key, record_body

SEED = Path(__file__).resolve().parent.parent.parent / "shared" / "seeds" / "segway-emoped-api.md"
IOT = "861477038719116"
PLATFORM = "A20081"


def seed_appendix_2() -> dict[str, tuple[str, str]]:
    if not SEED.exists():
        pytest.skip(f"the seed is not beside the checkout ({SEED})")
    text = SEED.read_text()
    table = text[text.index("# Appendix 2") :]
    rows = re.findall(r"^(E[0-9]|[0-9]+) \| (\w+) \| (.+?) \|$", table, re.M)
    return {code: (system, description) for code, system, description in rows}


def test_the_fault_table_is_appendix_2_word_for_word():
    seed = seed_appendix_2()
    assert len(seed) == 48  # E0..E9 and 10..47 (the seed's last row, 47, ends the file)
    assert {c: (f.system, f.description) for c, f in FAULTS.items()} == seed
    assert all(code == fault.code for code, fault in FAULTS.items())


@pytest.mark.parametrize(
    ("code", "expected"),
    [("12", "12"), (" 12 ", "12"), ("012", "12"), ("e1", "E1"), ("E01", "E1"), ("47", "47"), ("18", "18")],
)
def test_a_known_code_decodes_whatever_its_blanks_case_or_leading_zeros(code, expected):
    fault = decode(code)
    assert isinstance(fault, Fault) and fault.code == expected


@pytest.mark.parametrize("code", ["", " ", "9", "48", "E10", "EE1", "1 2", "-12", "١٢", "12.0", "x" * 100])
def test_an_unknown_code_is_none(code):
    assert decode(code) is None


def push(kind_: str, **fields: str) -> Push:
    return decode_push(kind_, {"iotCode": IOT, "platformCode": PLATFORM, "signature": "ab" * 16, **fields})


def test_a_status_push_is_typed_under_the_seeds_names_with_the_name_of_the_range_received():
    p = push(
        "status",
        online="true",
        locked="FALSE",
        lockVoltage="412",
        networkSignal="23",
        charging="false",
        powerPercent="80",
        speedMode="2",
        speed="17.5",
        odometer="1230",
        remainderRange="1230",
        totalRidingSecs="3600",
        statusUtcTime="1591067719",
    )
    assert (p.kind, p.iot_code, p.platform_code, p.at, p.priority) == (
        "status",
        IOT,
        PLATFORM,
        1591067719,
        "telemetry",
    )
    assert p.fields == {
        "online": True,
        "locked": False,
        "lockVoltage": 412,
        "networkSignal": 23,
        "charging": False,
        "powerPercent": 80,
        "speedMode": 2,
        "speed": 17.5,
        "odometer": 1230,
        "remainderRange": 1230,
        "totalRidingSecs": 3600,
        "statusUtcTime": 1591067719,
    }
    assert push("status", remainingRange="5").fields == {"remainingRange": 5}


def test_a_location_push_takes_its_time_from_gps_utc_time():
    p = push(
        "location",
        locationStatus="valid",
        latitude="22.543096",
        longitude="-114.057865",
        satelliteNumber="9",
        hdop="0.9",
        altitude="-12.5",
        gpsUtcTime="1591067719",
    )
    assert p.at == 1591067719 and p.priority == "telemetry"
    assert p.fields["latitude"] == 22.543096 and p.fields["longitude"] == -114.057865
    assert p.fields["locationStatus"] == "valid" and p.fields["satelliteNumber"] == 9
    assert push("location", latitude="1.0E-5").fields["latitude"] == 1.0e-5  # Java's Double.toString
    assert push("location", locationStatus="invalid", latitude="", longitude="").fields == {
        "locationStatus": "invalid",
        "latitude": None,
        "longitude": None,
    }


def test_a_fault_push_carries_appendix_2s_system_and_description():
    p = push("fault", statusUtcTime="1591067719", faultStatus="0", code="e5")
    assert p.priority == "event"
    assert p.fields == {
        "statusUtcTime": 1591067719,
        "faultStatus": 0,
        "code": "E5",
        "fault": {"system": "IoT", "description": "GNSS communication error"},
    }
    unknown = push("fault", faultStatus="1", code="99")
    assert unknown.fields == {"faultStatus": 1, "code": "99"}


def test_alert_and_components_pushes_are_events_with_integer_codes():
    alert = push("alert", statusUtcTime="1591067719", code="3")  # the seed's example: no alertStatus
    assert alert.fields == {"statusUtcTime": 1591067719, "code": 3} and alert.priority == "event"
    assert push("alert", alertStatus="1", code="12").fields == {"alertStatus": 1, "code": 12}
    comp = push("components", type="4", status="2", statusUtcTime="1591067719")
    assert comp.fields == {"type": 4, "status": 2, "statusUtcTime": 1591067719} and comp.priority == "event"


def test_a_timestamp_in_milliseconds_is_read_as_seconds_and_kept_as_received():
    p = push("alert", statusUtcTime="1593333694412", code="1")
    assert p.at == 1593333694 and p.fields["statusUtcTime"] == 1593333694412
    assert push("alert", code="1").at is None


def test_fields_segway_adds_later_are_kept_as_strings():
    p = push("status", online="true", batteryTemp="31", latitude="abc")  # latitude is not a status field
    assert p.fields == {"online": True, "batteryTemp": "31", "latitude": "abc"}


@pytest.mark.parametrize(
    ("kind", "name", "value"),
    [
        ("location", "latitude", "abc"),
        ("location", "latitude", "91"),
        ("location", "longitude", "-180.5"),
        ("location", "latitude", "nan"),
        ("location", "latitude", "1e999"),
        ("location", "latitude", "1_0"),
        ("location", "latitude", " 10"),
        ("location", "hdop", "-1"),
        ("location", "locationStatus", "maybe"),
        ("location", "gpsUtcTime", "2026-12-04 10:00:00"),
        ("status", "online", "maybe"),
        ("status", "charging", "1"),
        ("status", "powerPercent", "101"),
        ("status", "odometer", "12.5"),
        ("status", "odometer", "-1"),
        ("status", "statusUtcTime", "9" * 5000),
        ("status", "networkSignal", "٣"),  # a non-ASCII digit
        ("fault", "faultStatus", "2"),
        ("fault", "code", "E 1"),
        ("alert", "alertStatus", "x"),
        ("components", "type", "saddle"),
    ],
)
def test_a_known_field_with_a_bad_value_is_refused_naming_the_field_not_the_value(kind, name, value):
    with pytest.raises(PushInvalid) as caught:
        push(kind, **{name: value})
    assert caught.value.field == name and str(caught.value).startswith(f"{name}: ")
    assert len(value) < 2 or value not in str(caught.value)


@pytest.mark.parametrize("iot", [None, "", " ", "x" * 65, "86147\n7038"])
def test_iot_code_is_required(iot):
    params = {"platformCode": PLATFORM, "online": "true"}
    if iot is not None:
        params["iotCode"] = iot
    with pytest.raises(PushInvalid, match="iotCode"):
        decode_push("status", params)


def test_an_unknown_kind_is_refused():
    with pytest.raises(PushInvalid, match="kind"):
        decode_push("battery", {"iotCode": IOT})
    assert sorted(KINDS.values()) == ["alert", "components", "fault", "location", "status"]


def test_the_record_body_leads_with_iot_code_kind_and_at_which_no_field_replaces():
    p = push("fault", statusUtcTime="1591067719", code="12", kind="x", at="y")
    body = record_body(p)
    assert list(body)[:3] == ["iot_code", "kind", "at"]
    assert (body["iot_code"], body["kind"], body["at"]) == (IOT, "fault", 1591067719)
    assert body["code"] == "12" and body["fault"]["system"] == "drive"
    assert "signature" not in body and "platformCode" not in body


def test_a_retry_shares_the_dedup_key_and_any_difference_changes_it():
    params = {"iotCode": IOT, "platformCode": PLATFORM, "code": "3", "signature": "a" * 32}
    key = dedup_key("/v2/vehicle/alert", params)
    assert key == dedup_key("/v2/vehicle/alert", dict(reversed(params.items())))  # order does not matter
    assert key != dedup_key("/v2/vehicle/fault", params)
    assert key != dedup_key("/v2/vehicle/alert", {**params, "signature": "b" * 32})
    assert key != dedup_key("/v2/vehicle/alert", {**params, "code": "4"})
    assert dedup_key("/a", {"b": "c&d=e"}) != dedup_key("/a", {"b": "c", "d": "e"})  # no concatenation clash
