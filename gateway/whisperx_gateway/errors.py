"""Errors as RFC 7807 problem documents, the shape Replicate answers with.

The official clients read `detail` (and `title`, `status`) from every error body, so each
failure, including the ones aiohttp raises itself (404 route, 405, 413), ends up here.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from aiohttp import web

PROBLEM_CONTENT_TYPE = "application/problem+json"


class ApiError(Exception):
    """An error answered to the client as a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title
        self.headers = headers or {}


def problem_response(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def from_api_error(error: ApiError) -> web.Response:
    return problem_response(error.status, error.detail, title=error.title, headers=error.headers)


def unavailable(detail: str, retry_after: int = 1) -> ApiError:
    return ApiError(503, detail, headers={"Retry-After": str(retry_after)})


# Details for the errors aiohttp raises before a handler runs.
_HTTP_DETAILS = {
    404: "no such endpoint",
    405: "method not allowed on this endpoint",
    413: "request body too large",
}


def from_http_exception(exc: web.HTTPException, max_body: int) -> web.Response:
    detail = _HTTP_DETAILS.get(exc.status, exc.reason)
    if exc.status == 413:
        detail = f"request body too large: the limit is {max_body} bytes"
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return problem_response(exc.status, detail, headers=headers)
