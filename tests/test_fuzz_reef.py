"""Fuzzing the REEF client (hypothesis): whatever REEF answers, the client returns sessions that keep every
documented rule or raises one of its own ``ReefError`` family, never anything else, and no message shows a PIN.

Cases, fed to ``parse_sessions`` directly (the code the client runs on every 2xx body it has read): random
bytes; random JSON values; session-list documents, for one vehicle or all, in which one entry in four has one
field wrong (a near miss: an id out of range or ``true``, non-ASCII digits for a PIN, an impossible or
zoned timestamp, text with a lone surrogate; or any value at all) or missing, other vehicles' sessions,
duplicate ids, a completion before its initialization, members added later; timestamps in every accepted
form; written with and without ASCII escapes, as bytes or text; hostile bodies (nesting 2,000-200,000 deep,
numbers of 4,301-50,000 digits, duplicate members, NaN). A document whose fields were all drawn valid must
parse to exactly those sessions; a refusal must name a field and show no PIN.

Through the real mTLS REEF test server (``reef_server.py``) and ``ReefClient``, the part parse_sessions does
not see: random statuses (2xx, 3xx, 4xx, 5xx) with the bodies above, gzip-encoded or not, bodies over the size
limit and gzip bombs. A non-2xx answer must be ``ReefHttpError`` with its status; a 2xx one must give what
``parse_sessions`` gives for the decoded body.

What the suite found against the client before issue 11 was fixed: nesting past Python's recursion limit
raised ``RecursionError``, and a number of more than 4,300 digits ``ValueError``, out of the client (in the
daemon the REEF poller's component restarted, nothing counted); a ``verification_id`` (or, listing all
vehicles, a ``vin``) holding a lone surrogate (JSON ``"\\ud800"``) was accepted, though no record carrying it
can be written (``NewRecord.json`` raises ``UnicodeEncodeError`` on the acknowledgement and audit records).
None of these since.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fleetgate.sync.reef.client import (
    MAX_BODY_BYTES,
    MAX_INT,
    ManagedSession,
    ReefClient,
    ReefError,
    ReefHttpError,
    ReefResponseError,
    parse_sessions,
)

from mosquitto_fixture import TlsFiles, make_tls
from reef_server import ReefServer

pytestmark = pytest.mark.timeout(120)

HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
VIN = "1D4PT4GKXBW600841"
OTHER_VIN = "7F7ATR312KER0400"  # listing all vehicles it passes; asking for VIN's sessions it is refused
PIN_CHARS = frozenset("0123456789")

# -- strategies ----------------------------------------------------------------------------------------------

any_char = st.one_of(st.characters(), st.characters(categories=["Cs"]))  # Cs: lone surrogates
text = st.text(any_char, max_size=30)
# Text that is right but for one lone surrogate (JSON "\udc00"): where a string of any content is allowed.
not_quite_text = st.builds(lambda a, b: a + "\udc00" + b, st.text(max_size=10), st.text(max_size=10))
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1))
NEAR_TIMES = st.sampled_from(
    ["2021-02-30 10:00:00", "2021-06-09 24:00:00", "2021-06-09 22:06", "2021-06-09 22:06:56+02:00",
     "2021-06-09 22:06:56.", " 2021-06-09 22:06:56", "\uff12\uff10\uff12\uff11-06-09 22:06:56", "active "]
)  # fmt: skip


@st.composite
def reef_time(draw: st.DrawFn, moment: datetime) -> str:
    """``moment`` (naive UTC) in one of the forms REEF's timestamps may take."""
    sep = draw(st.sampled_from([" ", "T"]))
    text = f"{moment:%Y-%m-%d}{sep}{moment:%H:%M:%S}"
    digits = draw(st.sampled_from([0, 1, 3, 6, 9]))
    if digits:
        text += "." + f"{moment.microsecond:06d}{draw(st.integers(0, 999)):03d}"[:digits]
    return text + draw(st.sampled_from(["", "Z", "+00:00"]))


def truncated(moment: datetime, text: str) -> datetime:
    """What the client makes of ``text``: the fraction as written, cut to microseconds."""
    fraction = text.partition(".")[2].rstrip("Z").split("+")[0]
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    return moment.replace(microsecond=micro, tzinfo=UTC)


FIELDS = ["id", "vin", "pin", "initialization", "completion", "verification_id"]


@st.composite
def session(draw: st.DrawFn) -> tuple[dict[str, Any], ManagedSession | None]:
    """A session entry and, if every field was drawn valid, the session it must parse to. One entry in four
    has one field wrong (a near miss or anything at all) or missing, so that documents are often valid but
    for one field."""
    broken = draw(st.sampled_from(FIELDS)) if draw(st.integers(0, 3)) == 0 else None
    missing = broken is not None and draw(st.integers(0, 4)) == 0

    def pick(name: str, good: st.SearchStrategy[Any], near: st.SearchStrategy[Any]) -> Any:
        return draw(good) if name != broken or missing else draw(near | values | good)

    ident = pick("id", st.integers(0, MAX_INT), st.sampled_from([-1, MAX_INT + 1, 2**64, True, 1.0, "1"]))
    vin = pick(
        "vin", st.sampled_from([VIN, VIN, VIN, OTHER_VIN]), st.text(any_char, max_size=20) | not_quite_text
    )
    pin = pick(
        "pin",
        st.from_regex(r"[0-9]{4,12}", fullmatch=True),
        st.text(st.characters(categories=["Nd"]), max_size=13),
    )
    start = draw(moments)
    initialization = pick("initialization", reef_time(start), NEAR_TIMES)
    ended = draw(st.booleans())
    end = start + draw(st.timedeltas(timedelta(0), timedelta(days=30)))
    completion = pick(
        "completion", reef_time(end) if ended else st.just("active"), NEAR_TIMES | st.just("ended")
    )
    verification_id = pick(
        "verification_id",
        st.text(st.characters(), min_size=1, max_size=256),
        st.text(any_char, max_size=300) | not_quite_text,
    )
    entry = {
        "id": ident,
        "vin": vin,
        "pin": pin,
        "initialization": initialization,
        "completion": completion,
        "verification_id": verification_id,
    }
    if missing:
        del entry[broken]
    if draw(st.booleans()):
        entry[draw(st.sampled_from(["note", "page", "x"]))] = draw(values)  # members REEF may add later
    if broken is not None:
        return entry, None  # (a wrong draw may happen to be valid: then only the rules are checked)
    began = truncated(start, initialization)
    finished = None if completion == "active" else truncated(end, completion)
    if finished is not None and finished < began:
        return entry, None  # same second, fraction cut: ordered only to the microsecond
    return entry, ManagedSession(ident, vin, pin, began, finished, verification_id)


@st.composite
def documents(draw: st.DrawFn) -> tuple[Any, list[ManagedSession] | None]:
    """A whole answer and, if it is valid throughout, the sessions it must parse to."""
    kind = draw(st.sampled_from(["sessions", "sessions", "sessions", "wrong-list", "anything"]))
    if kind == "anything":
        return draw(values), None
    if kind == "wrong-list":
        return {"managed_sessions": draw(values)}, None
    drawn = draw(st.lists(session(), max_size=4))
    doc: dict[str, Any] = {"managed_sessions": [entry for entry, _ in drawn]}
    if draw(st.booleans()):
        doc["page"] = draw(values)
    expected = [s for _, s in drawn]
    if any(s is None for s in expected) or len({s.id for s in expected if s}) < len(expected):
        return doc, None
    return doc, [s for s in expected if s is not None]


@st.composite
def encoded(draw: st.DrawFn, doc: Any) -> bytes:
    # Without ASCII escapes a lone surrogate is written as such: not UTF-8, which the client must refuse.
    return json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@st.composite
def hostile(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["deep", "deep-in-session", "digits", "duplicate", "constant", "bytes"]))
    if kind == "deep":
        n = draw(st.integers(2_000, 200_000))
        return draw(st.sampled_from([b"[", b'{"a":'])) * n + b"]" * draw(st.integers(0, 3))
    if kind == "deep-in-session":
        n = draw(st.integers(2_000, 100_000))
        return b'{"managed_sessions": [{"id": 1, "pin": ' + b"[" * n + b"]" * n + b"}]}"
    if kind == "digits":
        digits = b"7" * draw(st.integers(sys.get_int_max_str_digits() + 1, 50_000))
        return b'{"managed_sessions": [{"id": ' + digits + b"}]}"
    if kind == "duplicate":
        return b'{"managed_sessions": [], "managed_sessions": [{"id": 1}]}'
    if kind == "constant":
        return (
            b'{"managed_sessions": [{"id": '
            + draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]))
            + b"}]}"
        )
    return draw(st.binary(max_size=300))


documents_encoded = documents().flatmap(lambda d: st.tuples(encoded(d[0]), st.just(d[1])))
bodies = st.one_of(documents_encoded, documents_encoded, st.tuples(hostile(), st.none()))

# -- properties ----------------------------------------------------------------------------------------------


def pins_in(doc: Any) -> set[str]:
    """PINs of the document worth looking for in messages: not also written elsewhere in it."""
    if not isinstance(doc, dict) or not isinstance(doc.get("managed_sessions"), list):
        return set()
    entries = [e for e in doc["managed_sessions"] if isinstance(e, dict)]
    pins = {e["pin"] for e in entries if isinstance(e.get("pin"), str) and len(e["pin"]) >= 6}
    rest = json.dumps([{k: v for k, v in e.items() if k != "pin"} for e in entries] + [doc.get("page")])
    return {p for p in pins if p not in rest}


def check_sessions(sessions: list[ManagedSession], vin: str | None) -> None:
    """The rules of parse_sessions' docstring, on what it returned."""
    assert isinstance(sessions, list)
    assert len({s.id for s in sessions}) == len(sessions)
    for s in sessions:
        assert isinstance(s, ManagedSession)
        assert type(s.id) is int and 0 <= s.id <= MAX_INT
        assert isinstance(s.vin, str) and s.vin and (vin is None or s.vin == vin)
        s.vin.encode("utf-8")
        assert isinstance(s.pin, str) and 4 <= len(s.pin) <= 12 and set(s.pin) <= PIN_CHARS
        assert s.initialization.tzinfo is UTC
        assert s.completion is None or (s.completion.tzinfo is UTC and s.completion >= s.initialization)
        assert isinstance(s.verification_id, str) and 1 <= len(s.verification_id) <= 256
        s.verification_id.encode("utf-8")  # writable into records and messages


def outcome(body: bytes | str, vin: str | None = VIN) -> list[ManagedSession] | ReefResponseError:
    """parse_sessions' answer: sessions or its typed error. Anything else fails the test."""
    try:
        sessions = parse_sessions(body, vin=vin)
    except ReefResponseError as exc:
        assert isinstance(exc.where, str) and str(exc).startswith(exc.where + ": "), str(exc)
        assert len(str(exc)) < 500, str(exc)
        event(f"refused at {exc.where.split('[')[0].split('.')[0]}")
        return exc
    check_sessions(sessions, vin)
    event(f"parsed {min(len(sessions), 2)}+ sessions" if sessions else "parsed, no sessions")
    return sessions


@settings(max_examples=1000, deadline=None, derandomize=True, database=None, suppress_health_check=HEALTH)
@given(doc=documents(), ascii_only=st.booleans(), as_text=st.booleans(), all_vehicles=st.booleans())
def test_documents_parse_to_their_sessions_or_a_response_error(
    doc: tuple[Any, list[ManagedSession] | None], ascii_only: bool, as_text: bool, all_vehicles: bool
):
    document, expected = doc
    body = json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    vin = None if all_vehicles else VIN
    got = outcome(body.decode("utf-8", "surrogatepass") if as_text else body, vin)
    if expected is not None and vin is not None and any(s.vin != vin for s in expected):
        expected = None  # another vehicle's session in the answer for this one: refused
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:  # a lone surrogate written raw: the bytes are not UTF-8, so refused
        expected = expected if as_text else None
    if expected is not None:
        assert got == expected, got
    if isinstance(got, ReefResponseError):
        assert not any(p in str(got) for p in pins_in(document)), str(got)


@settings(max_examples=500, deadline=None, derandomize=True, database=None, suppress_health_check=HEALTH)
@given(body=st.one_of(hostile(), st.binary(max_size=400), values.flatmap(encoded)))
def test_hostile_and_random_bodies_are_a_response_error_or_valid_sessions(body: bytes):
    outcome(body)


# -- through the real mTLS server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def reef(tls: TlsFiles) -> Iterator[ReefServer]:
    with ReefServer(tls) as server:
        yield server


def fetch(reef: ReefServer, tls: TlsFiles) -> list[ManagedSession] | ReefError:
    async def main() -> list[ManagedSession]:
        async with ReefClient(
            reef.base_url, ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.client_key, timeout_s=20
        ) as client:
            return await client.get_vehicle_sessions(VIN)

    try:
        return asyncio.run(main())
    except ReefError as exc:  # anything else fails the test
        return exc


statuses = st.one_of(
    st.just(200),
    st.sampled_from([201, 206, 301, 400, 401, 403, 404, 429, 500, 502, 503]),
    st.integers(200, 599).filter(lambda s: s not in (204, 205, 304)),  # no body allowed with those
)


@st.composite
def oversized(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return b" " * draw(st.integers(MAX_BODY_BYTES + 1, MAX_BODY_BYTES + 4096))
    return gzip.compress(b" " * draw(st.integers(MAX_BODY_BYTES + 1, 16 * MAX_BODY_BYTES)), 1)  # a bomb


@settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=HEALTH)
@given(status=statuses, body=bodies, compress=st.booleans(), big=st.none() | oversized())
def test_any_answer_from_the_server_is_sessions_or_a_reef_error(
    reef: ReefServer, tls: TlsFiles, status: int, body: tuple[bytes, Any], compress: bool, big: bytes | None
):
    raw, expected = big or body[0], body[1]
    if compress or (big is not None and big[:2] == b"\x1f\x8b"):
        raw = raw if big is not None else gzip.compress(raw)
        reef.fail_next(status, body=raw, headers={"Content-Encoding": "gzip"})
    else:
        reef.fail_next(status, body=raw)
    got = fetch(reef, tls)
    event(type(got).__name__)
    if not 200 <= status < 300:
        assert isinstance(got, ReefHttpError) and got.status == status, repr(got)
        return
    if big is not None:
        assert isinstance(got, ReefResponseError) and "larger than the limit" in str(got), repr(got)
        return
    direct = outcome(body[0])
    if isinstance(direct, ReefResponseError):
        assert isinstance(got, ReefResponseError) and str(got) == str(direct), (repr(got), repr(direct))
    else:
        assert got == direct
        if expected is not None:
            assert got == expected
