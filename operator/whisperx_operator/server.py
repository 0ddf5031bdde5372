"""The internal report endpoint runners post to, inside the operator process."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from whisperx_api.reports import MAX_REPORT_BYTES, SIGNATURE_HEADER
from whisperx_api.status_writer import StatusWriter
from whisperx_api.store import Store


def report_app(
    writer: StatusWriter, store: Store, *, active: Callable[[], bool] = lambda: True
) -> web.Application:
    async def report(request: web.Request) -> web.Response:
        if not active():
            # A standby replica must not write status; the runner retries.
            return web.json_response({"detail": "standby replica"}, status=503)
        body = await request.read()
        result = await writer.handle_report(
            request.match_info["namespace"],
            request.match_info["id"],
            body,
            request.headers.get(SIGNATURE_HEADER),
        )
        return web.json_response(result.body, status=result.http_status)

    async def readyz(request: web.Request) -> web.Response:
        if not active():
            return web.json_response({"ready": False, "detail": "standby replica"}, status=503)
        try:
            await store.redis.ping()
        except Exception as exc:  # any Redis client failure means not ready
            return web.json_response({"ready": False, "detail": f"redis: {exc}"}, status=503)
        return web.json_response({"ready": True})

    app = web.Application(client_max_size=MAX_REPORT_BYTES)
    app.router.add_post("/reports/{namespace}/{id}", report)
    app.router.add_get("/readyz", readyz)
    return app
