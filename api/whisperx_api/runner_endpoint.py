"""The internal endpoint runners talk to: reports, and requests for work.

One app, served by the operator (`:8081` in a cluster) and by local mode (loopback):
`POST /reports/{namespace}/{id}` (the report protocol), `POST /work/{runner}` (warm
runners, where a `WorkSource` hands out predictions), `GET /readyz`, and in the operator
`GET /metrics` (its warm runners, for Prometheus). A standby operator
replica answers 503 to all three, and so does a Redis outage: the runner retries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, Protocol

from aiohttp import web
from pydantic import ValidationError
from redis.exceptions import RedisError

from whisperx_api.reports import (
    MAX_REPORT_BYTES,
    SIGNATURE_HEADER,
    ReportAuthError,
    verify,
)
from whisperx_api.status_writer import StatusWriter
from whisperx_api.store import Store
from whisperx_api.work import (
    REPORT_ROUTE,
    STOP,
    WORK_ROUTE,
    Assignment,
    WorkRequest,
    runner_token,
)

log = logging.getLogger(__name__)


class WorkSource(Protocol):
    async def claim(
        self, runner_id: str, request: WorkRequest
    ) -> Assignment | Literal["stop"] | None:
        """The next prediction for this runner, None when none came within the wait, or
        STOP when the runner should exit."""
        ...


def _unavailable(detail: str) -> web.Response:
    return web.json_response({"detail": detail}, status=503, headers={"Retry-After": "1"})


def runner_app(
    writer: StatusWriter,
    store: Store,
    *,
    work: WorkSource | None = None,
    active: Callable[[], bool] = lambda: True,
    metrics: Callable[[], list[str]] | None = None,
) -> web.Application:
    async def report(request: web.Request) -> web.Response:
        if not active():
            # A standby replica must not write status; the runner retries.
            return _unavailable("standby replica")
        body = await request.read()
        try:
            result = await writer.handle_report(
                request.match_info["namespace"],
                request.match_info["id"],
                body,
                request.headers.get(SIGNATURE_HEADER),
            )
        except (RedisError, OSError) as exc:
            # Not lost: the runner retries a 503.
            log.warning("report for %s: Redis unavailable: %s", request.path, exc)
            return _unavailable("Redis is unavailable; retry shortly")
        return web.json_response(result.body, status=result.http_status)

    async def claim(request: web.Request) -> web.Response:
        if work is None:
            raise web.HTTPNotFound(text="this endpoint hands out no work")
        if not active():
            return _unavailable("standby replica")
        runner_id = request.match_info["runner"]
        body = await request.read()
        try:
            verify(
                runner_token(writer.report_key, runner_id),
                body,
                request.headers.get(SIGNATURE_HEADER),
            )
        except ReportAuthError as exc:
            return web.json_response({"detail": str(exc)}, status=401)
        try:
            asked = WorkRequest.model_validate_json(body or b"{}")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            return web.json_response({"detail": f"{where}: {first['msg']}"}, status=422)
        try:
            given = await work.claim(runner_id, asked)
        except (RedisError, OSError) as exc:
            log.warning("work for runner %s: Redis unavailable: %s", runner_id, exc)
            return _unavailable("Redis is unavailable; retry shortly")
        if given is None:
            return web.Response(status=204)
        if given == STOP:
            return web.json_response({"detail": "no more work for this runner"}, status=410)
        return web.Response(body=given.model_dump_json(), content_type="application/json")

    async def readyz(request: web.Request) -> web.Response:
        if not active():
            return web.json_response({"ready": False, "detail": "standby replica"}, status=503)
        try:
            await store.redis.ping()
        except Exception as exc:  # any Redis client failure means not ready
            return web.json_response({"ready": False, "detail": f"redis: {exc}"}, status=503)
        return web.json_response({"ready": True})

    async def prometheus(request: web.Request) -> web.Response:
        assert metrics is not None
        return web.Response(text="\n".join(metrics()) + "\n", content_type="text/plain")

    app = web.Application(client_max_size=MAX_REPORT_BYTES)
    if metrics is not None:
        app.router.add_get("/metrics", prometheus)
    app.router.add_post(REPORT_ROUTE, report)
    app.router.add_post(WORK_ROUTE, claim)
    app.router.add_get("/readyz", readyz)
    return app
