"""The report protocol between a runner and the status writer (see docs/architecture.md).

Each prediction has its own credential, derived from the operator's signing key and the
prediction's identity (namespace, id, uid), so a runner's token is worthless for any other
prediction, including a later one that reuses the name. The token itself never travels:
each request carries an HMAC of its timestamp and body, and stale timestamps are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SIGNATURE_HEADER = "X-WhisperX-Signature"
MAX_CLOCK_SKEW_SECONDS = 300
MAX_REPORT_BYTES = 64 * 1024 * 1024


class ReportAuthError(Exception):
    """The request is not signed by this prediction's credential (answer 401)."""


def prediction_token(signing_key: bytes, namespace: str, prediction_id: str, uid: str) -> str:
    message = f"{namespace}/{prediction_id}/{uid}".encode()
    return hmac.new(signing_key, message, hashlib.sha256).hexdigest()


def _mac(token: str, timestamp: int, body: bytes) -> str:
    return hmac.new(token.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(token: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value for a report body."""
    ts = int(time.time()) if timestamp is None else timestamp
    return f"t={ts},v1={_mac(token, ts, body)}"


def verify(token: str, body: bytes, header: str | None, now: float | None = None) -> None:
    if not header:
        raise ReportAuthError(f"missing {SIGNATURE_HEADER} header")
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError) as exc:
        raise ReportAuthError(f"malformed {SIGNATURE_HEADER} header") from exc
    current = time.time() if now is None else now
    if abs(current - timestamp) > MAX_CLOCK_SKEW_SECONDS:
        raise ReportAuthError("signature timestamp outside the accepted window (replay?)")
    if not hmac.compare_digest(given, _mac(token, timestamp, body)):
        raise ReportAuthError("invalid signature")


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq: Annotated[int, Field(ge=1)]
    # Which runner attempt (the pod's uid) sent it: a replacement pod of the same Job
    # numbers its reports from 1 again. Empty where a prediction has one attempt only.
    attempt: Annotated[str, Field(max_length=128)] = ""


class StartReport(_Report):
    event: Literal["start"]


class LogsReport(_Report):
    event: Literal["logs"]
    logs: str = ""
    progress: Annotated[float | None, Field(ge=0, le=1)] = None


class OutputReport(_Report):
    event: Literal["output"]
    output: dict[str, Any]


class CompletedReport(_Report):
    event: Literal["completed"]
    status: Literal["succeeded", "failed", "canceled"]
    output: dict[str, Any] | None = None
    error: Annotated[str | None, Field(max_length=8192)] = None
    reason: Annotated[str | None, Field(max_length=128)] = None
    logs: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    detected_language: str | None = None


Report = Annotated[
    StartReport | LogsReport | OutputReport | CompletedReport, Field(discriminator="event")
]
_report_adapter: TypeAdapter[Report] = TypeAdapter(Report)


def parse_report(body: bytes) -> Report:
    """Parses a report body (raises pydantic.ValidationError)."""
    return _report_adapter.validate_json(body)
