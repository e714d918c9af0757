"""The Segway room's foundations: Appendix 1's status codes as typed errors, and the push signature."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import urlencode

import pytest

from fleetgate.sync.segway.errors import CODES, SegwayError, TokenRejected, error_for
from fleetgate.sync.segway.push import PushRejected, parse_form, signature, verify
from fleetgate.sync.segway.regions import api_base

SEED = Path(__file__).resolve().parent.parent.parent / "shared" / "seeds" / "segway-emoped-api.md"
SECRET = "e2651be5-12d3-48f3-ba6c-bc2b04a447b6"  # the seed's example client_secret


def seed_codes(start: str | None, end: str) -> dict[int, str]:
    """The ``sn | code | error`` rows of the seed between the headings ``start`` (None: the top) and ``end``."""
    if not SEED.exists():
        pytest.skip(f"the seed is not beside the checkout ({SEED})")
    text = SEED.read_text()
    table = text[text.index(start) if start else 0 : text.index(end)]
    return {int(code): meaning for code, meaning in re.findall(r"^\d+ \| (\d+) \| (.+?) \|$", table, re.M)}


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)  # the seed is not consistent about spaces


def test_every_code_of_appendix_1_is_known_with_its_meaning():
    seed = seed_codes("# Appendix 1", "# Appendix 2")
    assert len(seed) == 34
    assert {c: squash(m) for c, m in seed.items()} == {
        c: squash(CODES[c].meaning) for c in seed if c in CODES
    }


def test_the_codes_only_endpoint_tables_list_are_known_too_and_nothing_else_is():
    appendix = seed_codes("# Appendix 1", "# Appendix 2")
    endpoints = seed_codes(None, "# Push")
    extra = {c: m for c, m in endpoints.items() if c not in appendix}
    assert set(extra) == {15990, 15996, 15997, 15707}
    assert set(CODES) == set(appendix) | set(extra)
    assert {c: squash(m) for c, m in extra.items()} == {c: squash(CODES[c].meaning) for c in extra}
    assert [c for c in sorted(extra) if CODES[c].retryable] == [15997]  # the vehicle may stop riding


def test_a_retry_helps_where_the_device_or_the_network_failed_not_where_the_request_is_wrong():
    assert all(error_for(code, "", None).retryable for code in (15301, 15302, 15303, 15001, 15600, 15629))
    assert not any(error_for(code, "", None).retryable for code in (15004, 15100, 15102, 15631, 99999))
    assert error_for(15623, "", None).partial_success and not error_for(15620, "", None).partial_success


def test_an_error_keeps_segways_operation_id_and_says_what_the_code_means():
    error = error_for(15302, "device response timeout", "3de041d2-7f1e-4cb2-a7be-483378727c56")
    assert isinstance(error, SegwayError) and not isinstance(error, TokenRejected)
    assert error.op_id == "3de041d2-7f1e-4cb2-a7be-483378727c56"
    assert "15302" in str(error) and "3de041d2" in str(error)
    assert isinstance(error_for(15101, "token verification failed", None), TokenRejected)
    assert "does not know" in str(error_for(12345, "?", None))


def test_the_signature_is_md5_over_the_sorted_parameters_and_the_secret():
    params = {
        "platformCode": "A20081",
        "iotCode": "861477038719116",
        "online": "true",
        "signature": "ignored",
    }
    by_hand = f"iotCode=861477038719116&online=true&platformCode=A20081&client_secret={SECRET}"
    assert signature(params, SECRET) == hashlib.md5(by_hand.encode(), usedforsecurity=False).hexdigest()


def signed_body(params: dict[str, str], secret: str = SECRET) -> bytes:
    return urlencode({**params, "signature": signature(params, secret)}).encode()


PUSH = {
    "iotCode": "861477038719116",
    "platformCode": "A20081",
    "statusUtcTime": "2026-12-04 10:00:00",
    "code": "3",
}


def test_a_push_signed_by_segway_verifies_whatever_fields_it_carries():
    verify(parse_form(signed_body(PUSH)), SECRET)
    verify(parse_form(signed_body({**PUSH, "aFieldAddedNextYear": "x"})), SECRET)  # every field counts


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (signed_body(PUSH).replace(b"code=3", b"code=4"), "does not match"),
        (signed_body(PUSH) + b"&extra=1", "does not match"),
        (signed_body(PUSH, "another-secret"), "does not match"),
        (urlencode(PUSH).encode(), "no signature"),
        (signed_body(PUSH) + b"&code=3", "sent twice"),
        (b"\xff\xfe not a form", "not form-encoded"),
        (b"no equals sign", "not form-encoded"),
    ],
)
def test_a_push_that_is_not_segways_is_rejected_with_the_reason(body, why):
    with pytest.raises(PushRejected, match=why):
        verify(parse_form(body), SECRET)


def test_the_platform_codes_first_letter_picks_the_region_and_an_override_wins():
    assert api_base("A20081") == "https://apac-api.segwaydiscovery.com"
    assert api_base("E10001") == "https://eu-api.segwaydiscovery.com"
    assert api_base("U10001") == "https://us-api.segwaydiscovery.com"
    assert api_base("C10001") == "https://cn-api.segwaydiscovery.com"
    assert api_base("A20081", "https://127.0.0.1:8443/") == "https://127.0.0.1:8443"
    for code in ("a20081", "X1", ""):
        with pytest.raises(ValueError, match="no Segway region"):
            api_base(code)
