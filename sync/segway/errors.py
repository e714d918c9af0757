"""Segway's status codes (the seed's Appendix 1) as typed errors, each saying whether a retry can help.

Every API answer carries ``code`` (0 is success), ``msg``, ``t`` and ``opId``; the error keeps the ``opId`` so
an operator can quote it to Segway. ``retryable`` means the *same* request may succeed later with nothing
changed on our side: the device was offline or busy, the network between Segway and the vehicle failed, the
vehicle was moving. A code this table does not know is an error that is not retryable, with its number kept.

Besides Appendix 1, ``CODES`` holds the four codes only some endpoint tables list (15990, 15996, 15997, 15707).
``SegwayUnavailable`` (no usable answer at all) and ``TokenRefused`` (wrong client credentials) complete the
family; all derive from ``SegwayFailure``.
"""

from __future__ import annotations

from dataclasses import dataclass

SUCCESS = 0


@dataclass(frozen=True)
class StatusCode:
    code: int
    meaning: str  # the seed's wording
    retryable: bool


CODES: dict[int, StatusCode] = {
    c.code: c
    for c in (
        StatusCode(15101, "token verification failed", False),  # the client refreshes its token, once
        StatusCode(15100, "incorrect platform info", False),
        StatusCode(15004, "parameter error", False),
        StatusCode(15001, "server error", True),
        StatusCode(15102, "device not found", False),
        StatusCode(15300, "inactive device", False),
        StatusCode(15301, "offline device", True),
        StatusCode(15302, "device response timeout", True),
        StatusCode(15303, "command send failed", True),
        StatusCode(15400, "latest location not found via device", False),
        StatusCode(15500, "device upgrading: command can not be executed", True),
        StatusCode(15600, "lock failed: vehicle is riding", True),
        StatusCode(15601, "device lock command failed", False),
        StatusCode(15602, "device lock failed: network error", True),
        StatusCode(15611, "device unlock command failed", False),
        StatusCode(15612, "device unlock failed: network error", True),
        StatusCode(15620, "startRental failed", False),
        StatusCode(15621, "startRental failed: network error", True),
        StatusCode(15622, "startRental failed: handlebar failed", False),
        StatusCode(15623, "startRental success, but saddle failed", False),
        StatusCode(15624, "startRental success, but tailbox failed", False),
        StatusCode(15625, "startRental success, but tailbox and saddle failed", False),
        StatusCode(15627, "endRental failed: vehicle is riding", True),
        StatusCode(15628, "endRental failed", False),
        StatusCode(15629, "endRental: network error", True),
        StatusCode(15630, "endRental failed: handlebar lock failed", False),
        StatusCode(15631, "endRental failed: no return helmet", False),
        StatusCode(15632, "endRental failed: saddle lock failed", False),
        StatusCode(15633, "endRental failed: tailbox lock failed", False),
        StatusCode(15634, "endRental failed: tailbox and saddle lock failed", False),
        StatusCode(15603, "handlebar lock failed", False),
        StatusCode(15613, "handlebar unlock failed", False),
        StatusCode(15635, "open failed: please operate when mopeds is unlocking", False),
        StatusCode(15638, "device execute failure", False),
        # Codes some endpoint tables list that Appendix 1 does not (unlock, lock, upload interval).
        StatusCode(15990, "API call is restricted, please contact Segway related personnel", False),
        StatusCode(15996, "device lock failed: denied by geofence strategy", False),
        StatusCode(15997, "device lock failed: unable to lock while riding", True),
        StatusCode(15707, "NOT supported by this vehicle or its firmware", False),
    )
}
# startRental did start the rental, but a part did not open: the rental is on, so this is no plain failure.
PARTIAL_SUCCESS = frozenset({15623, 15624, 15625})


class SegwayFailure(Exception):
    """Any failure of a call to Segway. ``retryable``: the same call may succeed later with nothing changed
    on our side. Callers that only need that decision catch this one class."""

    retryable: bool = False


class SegwayError(SegwayFailure):
    """Segway answered with a non-zero ``code``. ``msg`` is what Segway said; ``op_id`` its operation id."""

    def __init__(self, code: int, msg: str, op_id: str | None) -> None:
        known = CODES.get(code)
        self.code = code
        self.msg = msg
        self.op_id = op_id
        self.retryable = known.retryable if known else False
        self.partial_success = code in PARTIAL_SUCCESS
        meaning = known.meaning if known else "a code this gateway does not know"
        super().__init__(f"Segway code {code} ({meaning}): {msg!r}, opId {op_id or '-'}")


class TokenRejected(SegwayError):
    """15101: the access token was refused; the client refreshes it and retries once."""


def error_for(code: int, msg: str, op_id: str | None) -> SegwayError:
    return TokenRejected(code, msg, op_id) if code == 15101 else SegwayError(code, msg, op_id)


class SegwayUnavailable(SegwayFailure):
    """No usable answer: transport failure, timeout, HTTP 5xx / 429 / another unexpected status, or a body
    that is not the documented envelope. ``kind`` names which; ``retry_after`` is a 429's Retry-After in
    seconds when Segway gave one. The message names what was wrong, never a body, token or secret."""

    def __init__(
        self, kind: str, message: str, *, retryable: bool = True, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after


class TokenRefused(SegwayFailure):
    """The token endpoint refused our client credentials (``invalid_client`` ...): wrong client id or
    secret, which no retry fixes."""

    retryable = False
