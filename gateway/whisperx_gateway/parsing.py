"""Pure parsing of what clients send: create bodies, `Prefer`, `Cancel-After`, ids.

Every function raises `ApiError` with a detail that names the offending field or header,
so the views stay thin and all of this is testable without a network.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any

import yarl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from whisperx_api.netguard import AddressRefused, HostAllowList, check_literal
from whisperx_api.schema import (
    SECRET_INPUT_FIELDS,
    WEBHOOK_EVENTS,
    WebhookEvent,
    describe_errors,
    validate_input,
)
from whisperx_api.webhooks import ALLOW_HOSTS_ENV
from whisperx_gateway.errors import ApiError
from whisperx_gateway.files import FILES_PATH

# Kubernetes object names (kubectl users pick their own; the gateway makes 26-char ids).
_PREDICTION_ID = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def new_prediction_id(now: float | None = None) -> str:
    """A Replicate-like id: 26 lowercase base32 characters, ordered by creation time.

    48 bits of milliseconds then 80 random bits, in base32hex (whose digit order is ASCII
    order): ids sort as they were made, so predictions created within the same second
    (Kubernetes' creationTimestamp resolution) still list newest first.
    """
    millis = int((time.time() if now is None else now) * 1000)
    raw = millis.to_bytes(6, "big") + secrets.token_bytes(10)
    return base64.b32hexencode(raw).decode().rstrip("=").lower()


def route_uploaded_files(
    input_: dict[str, Any], public_url: str, internal_url: str | None
) -> dict[str, Any]:
    """The input with links to this gateway's uploaded files pointed at `internal_url`.

    Clients get file links at the public URL; a runner inside the cluster may not reach
    that address (an ingress on the outside), so it gets the same signed path on the
    gateway's internal address instead.
    """
    audio = input_.get("audio_file")
    prefix = f"{public_url.rstrip('/')}{FILES_PATH}"
    if internal_url is None or not isinstance(audio, str) or not audio.startswith(prefix):
        return input_
    internal = f"{internal_url.rstrip('/')}{FILES_PATH}"
    return {**input_, "audio_file": internal + audio[len(prefix) :]}


# Input strings longer than this (data URIs of up to 1 MB) are not repeated in lists.
LIST_INPUT_CHARS = 1000


def list_input(input_: dict[str, Any]) -> dict[str, Any]:
    """A prediction's input as a list page shows it: a long value (a data URI) becomes a
    note of its kind and size; `GET /v1/predictions/{id}` has it whole."""
    summary: dict[str, Any] = {}
    for name, value in input_.items():
        if isinstance(value, str) and len(value) > LIST_INPUT_CHARS:
            kind = value.split(",", 1)[0] if value.startswith("data:") else value[:100]
            value = f"{kind}... ({len(value)} characters; GET the prediction for all)"
        summary[name] = value
    return summary


def valid_prediction_id(value: str) -> bool:
    return bool(_PREDICTION_ID.match(value))


class CreateBody(BaseModel):
    """The body of POST /v1/predictions (Replicate's field names)."""

    model_config = ConfigDict(extra="forbid")

    version: Annotated[str | None, Field(min_length=1, max_length=300)] = None
    input: dict[str, Any]
    webhook: Annotated[str | None, Field(max_length=2048, pattern=r"^https?://[^/\s]+")] = None
    # Replicate's older name for a webhook that only receives `completed`.
    webhook_completed: Annotated[
        str | None, Field(max_length=2048, pattern=r"^https?://[^/\s]+")
    ] = None
    webhook_events_filter: Annotated[list[WebhookEvent] | None, Field(max_length=4)] = None
    # Accepted for compatibility; this model does not stream (no `urls.stream`).
    stream: bool | None = None


_HOSTNAME = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*\.?$")


_NO_INTERNAL_HOSTS = HostAllowList()


def webhook_url_problem(url: str, allow: HostAllowList = _NO_INTERNAL_HOSTS) -> str | None:
    """Why a webhook URL could not be delivered to, or None when it can.

    Visibly internal hosts (loopback, private and link-local literals, `localhost`) are
    refused here for a clear error; the sender's connect-time check is the real guard.
    """
    if not url.isascii() or any(c.isspace() for c in url):
        return "must be an ASCII URL without spaces (write international hosts in punycode)"
    try:
        parsed = yarl.URL(url)
        host = parsed.host
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if parsed.scheme not in ("http", "https") or not host:
        return "must be an http(s) URL with a host"
    if re.fullmatch(r"[0-9.]+", host) or ":" in host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return f"{host!r} is not a valid IP address"
    elif not _HOSTNAME.match(host):
        return f"{host!r} is not a valid host name"
    try:
        check_literal(host, allow)
    except AddressRefused as exc:
        return f"{exc}: webhooks go to public addresses (allow-list: {ALLOW_HOSTS_ENV})"
    return None


@dataclass(frozen=True)
class CreateRequest:
    version: str | None
    input: dict[str, Any]
    secrets: dict[str, str]
    webhook: str | None
    webhook_events_filter: tuple[str, ...]


# Deeper JSON is refused: nothing this API takes nests beyond a few levels, and Python's
# parser (and everything after it) recurses once per level.
MAX_JSON_DEPTH = 64


def load_json(raw: bytes | str) -> Any:
    """json.loads, with nesting beyond MAX_JSON_DEPTH a ValueError (not a RecursionError)."""
    too_deep = ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise too_deep from None
    level: list[Any] = [data]
    for _ in range(MAX_JSON_DEPTH + 1):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return data
    raise too_deep


def parse_json_body(raw: bytes) -> Any:
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        return load_json(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def parse_create_body(
    data: Any, *, version_required: bool, webhook_allow: HostAllowList = _NO_INTERNAL_HOSTS
) -> CreateRequest:
    """Validates a create body and its input against the one schema."""
    if not isinstance(data, dict):
        raise ApiError(422, "the request body must be a JSON object")
    try:
        body = CreateBody.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, describe_errors(exc.errors(), prefix="")) from None
    if version_required and body.version is None:
        raise ApiError(422, "version: Field required (a version id or a model name)")
    try:
        validated = validate_input(body.input)
    except ValidationError as exc:
        raise ApiError(422, describe_errors(exc.errors(), prefix="input")) from None
    given = validated.model_dump(mode="json", exclude_unset=True)
    # Secrets leave the input here: they go to the runner only, never to storage.
    secret_values: dict[str, str] = {}
    for name in SECRET_INPUT_FIELDS:
        value = given.pop(name, None)
        if value is not None:
            secret_values[name] = str(value)
    for name in ("webhook", "webhook_completed"):
        url = getattr(body, name)
        problem = webhook_url_problem(url, webhook_allow) if url is not None else None
        if problem:
            raise ApiError(422, f"{name}: {problem}")
    webhook = body.webhook
    events = tuple(dict.fromkeys(body.webhook_events_filter or WEBHOOK_EVENTS))
    if webhook is None and body.webhook_completed is not None:
        webhook, events = body.webhook_completed, ("completed",)
    return CreateRequest(
        version=body.version,
        input=given,
        secrets=secret_values,
        webhook=webhook,
        webhook_events_filter=events,
    )


# --- headers ---

DEFAULT_WAIT_SECONDS = 60


def parse_prefer_wait(header: str | None, max_wait: int = DEFAULT_WAIT_SECONDS) -> int | None:
    """Seconds to hold a create answer (`Prefer: wait` or `wait=N`), or None.

    Other preferences are ignored, as RFC 7240 asks; a wait longer than the gateway's
    limit is shortened to it (the answer's `Preference-Applied` says by how much).
    """
    if not header:
        return None
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        if not sep:
            return max_wait
        value = value.strip().strip('"')
        if not value.isdigit() or int(value) < 1:
            raise ApiError(
                400, f"Prefer header: wait must be a whole number of seconds >= 1, not {value!r}"
            )
        return min(int(value), max_wait)
    return None


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
MAX_CANCEL_AFTER_SECONDS = 7 * 24 * 3600


def parse_cancel_after(header: str | None) -> int | None:
    """Seconds from `Cancel-After` (`300`, `90s`, `5m`, `1h30m`), rounded up."""
    if header is None:
        return None
    text = header.strip()
    if text.replace(".", "", 1).isdigit():
        seconds = float(text)
    else:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ApiError(
                400,
                f"Cancel-After header: {header!r} is not a duration such as 300, 90s, 5m or 1h30m",
            )
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not 1 <= seconds <= MAX_CANCEL_AFTER_SECONDS:
        raise ApiError(
            400, f"Cancel-After header: must be between 1 s and {MAX_CANCEL_AFTER_SECONDS} s"
        )
    return math.ceil(seconds)


# --- list cursors ---


@dataclass(frozen=True)
class Cursor:
    """A position in a namespace's newest-first listing.

    `older` pages continue after (score, id); `newer` pages go back before it. Listing
    order is (created score, id) descending, the order of a Redis ZREVRANGEBYSCORE, so
    predictions created in the same instant are neither skipped nor repeated.
    """

    older: bool
    score: float
    id: str

    def encode(self) -> str:
        raw = json.dumps({"d": "o" if self.older else "n", "s": self.score, "i": self.id})
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            padded = text + "=" * (-len(text) % 4)
            data = load_json(base64.urlsafe_b64decode(padded.encode()))
            cursor = cls(older=data["d"] == "o", score=float(data["s"]), id=str(data["i"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(400, "cursor: not a cursor this API returned") from exc
        if not math.isfinite(cursor.score) or not valid_prediction_id(cursor.id):
            raise ApiError(400, "cursor: not a cursor this API returned")
        return cursor

    def admits(self, score: float, prediction_id: str) -> bool:
        """Whether a listing row lies strictly beyond this cursor in its direction."""
        if self.older:
            return (score, prediction_id) < (self.score, self.id)
        return (score, prediction_id) > (self.score, self.id)


@dataclass(frozen=True)
class PageLinks:
    next: Cursor | None
    previous: Cursor | None


def page_links(
    rows: list[tuple[str, float]], cursor: Cursor | None, *, has_more: bool
) -> PageLinks:
    """Links of a page of rows (newest first), given how it was reached.

    `has_more`: more rows exist beyond the page in the direction it was read.
    """
    if not rows:
        return PageLinks(None, None)
    first_id, first_score = rows[0]
    last_id, last_score = rows[-1]
    older = Cursor(True, last_score, last_id)
    newer = Cursor(False, first_score, first_id)
    if cursor is None:
        return PageLinks(older if has_more else None, None)
    if cursor.older:
        return PageLinks(older if has_more else None, newer)
    return PageLinks(older, newer if has_more else None)
