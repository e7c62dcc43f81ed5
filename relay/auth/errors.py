"""Access-control refusals; relay/http/errors.py maps them to 401 and 403."""

from __future__ import annotations

from typing import Literal, get_args

from protocol.errors import ProtocolError
from protocol.errors import Unauthorized as _Unauthorized

Reason = Literal[
    "missing",
    "malformed",
    "bad_signature",
    "expired",
    "revoked",
    "wrong_audience",
    "wrong_issuer",
    "forbidden",
    "unknown_key",
]
REASONS: tuple[Reason, ...] = get_args(Reason)
"""Every value of ``relay_auth_failures_total{reason}``: a fixed set, never client text."""

_MESSAGES: dict[Reason, str] = {
    "missing": "a bearer credential is required",
    "malformed": "the credential is malformed",
    "bad_signature": "the credential's signature does not verify",
    "expired": "the credential is expired or not yet valid",
    "revoked": "the credential is revoked",
    "wrong_audience": "the credential is for another audience",
    "wrong_issuer": "the credential is from another issuer",
    "unknown_key": "the credential is not known",
}


class Unauthorized(_Unauthorized):
    """No usable credential (401). ``given`` says whether one was presented at all, which
    decides the ``error="invalid_token"`` part of ``WWW-Authenticate`` (RFC 6750 3.1)."""

    def __init__(self, reason: Reason) -> None:
        super().__init__("unauthorized", _MESSAGES.get(reason, "unauthorized"))
        self.reason: Reason = reason
        self.given = reason != "missing"


class Forbidden(ProtocolError):
    """A valid credential whose grants do not cover the request (403). The message is the
    same whatever the stream's state, so a refusal never tells whether a stream exists."""

    reason: Reason = "forbidden"

    def __init__(self) -> None:
        super().__init__("forbidden", "the credential does not grant this action on this path")
