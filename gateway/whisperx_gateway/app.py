"""The Replicate-compatible HTTP API: thin aiohttp views over the parsing, the shared
reader and a `Backend` (Kubernetes or local)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from redis.exceptions import RedisError

from whisperx_api.store import RawPredictionView, Store
from whisperx_api.webhooks import tenant_secret
from whisperx_gateway.auth import parse_authorization
from whisperx_gateway.backend import Backend, BackendError, NewPrediction, PredictionReader
from whisperx_gateway.config import GatewayConfig
from whisperx_gateway.errors import (
    ApiError,
    from_api_error,
    from_http_exception,
    problem_response,
    unavailable,
)
from whisperx_gateway.files import (
    FileStore,
    FileTooLarge,
    QuotaExceeded,
    StoredFile,
    Upload,
    download_headers,
    valid_download,
)
from whisperx_gateway.limits import InFlight
from whisperx_gateway.metrics import GatewayMetrics
from whisperx_gateway.models import ModelRef, model_json, version_json
from whisperx_gateway.openapi import gateway_openapi, model_openapi
from whisperx_gateway.parsing import (
    Cursor,
    load_json,
    new_prediction_id,
    parse_cancel_after,
    parse_create_body,
    parse_json_body,
    parse_prefer_wait,
    route_uploaded_files,
    valid_prediction_id,
)
from whisperx_gateway.rendering import Renderer, list_item
from whisperx_gateway.waiting import EventHub, wait_for_end

log = logging.getLogger(__name__)

# Endpoints that need no token and are not subject to the overload limit.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})


@dataclass
class Gateway:
    config: GatewayConfig
    store: Store
    backend: Backend
    hub: EventHub
    reader: PredictionReader
    metrics: GatewayMetrics
    openapi: bytes
    files: FileStore
    in_flight: InFlight
    renderer: Renderer = field(default_factory=Renderer)
    model_schemas: dict[str, dict[str, Any]] = field(default_factory=dict)

    def base_url(self, request: web.Request) -> str:
        return self.config.public_url or f"{request.scheme}://{request.host}"

    def caller(self, request: web.Request) -> str | None:
        """The caller's namespace, None without a valid token."""
        token = parse_authorization(request.headers.get("Authorization"))
        return self.config.tokens.namespace_for(token) if token else None

    def authenticate(self, request: web.Request) -> str:
        """The caller's namespace."""
        namespace = self.caller(request)
        if namespace is None:
            raise ApiError(
                401,
                "missing or invalid token: send `Authorization: Bearer <token>`",
                title="Unauthenticated",
                headers={"WWW-Authenticate": 'Bearer realm="whisperx"'},
            )
        return namespace

    def model(self, request: web.Request) -> ModelRef:
        owner, name = request.match_info["owner"], request.match_info["name"]
        model = self.config.models.get(owner, name)
        if model is None:
            raise ApiError(404, f"model {owner}/{name} not found")
        return model

    def model_schema(self, model: ModelRef) -> dict[str, Any]:
        # Keyed by name: any owner is accepted, so owners must not grow this.
        schema = self.model_schemas.get(model.name)
        if schema is None:
            schema = self.model_schemas[model.name] = model_openapi(model.name)
        return schema


GATEWAY = web.AppKey("gateway", Gateway)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(body), status=status, content_type="application/json", headers=headers
    )


def _prediction(
    gw: Gateway,
    request: web.Request,
    view: RawPredictionView,
    *,
    code: int = 200,
    status: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    text = gw.renderer.render(view, gw.base_url(request), status)
    return web.Response(text=text, status=code, content_type="application/json", headers=headers)


def _prediction_id(request: web.Request) -> str:
    prediction_id = request.match_info["id"]
    if not valid_prediction_id(prediction_id):
        raise ApiError(404, f"prediction {prediction_id!r} not found")
    return prediction_id


async def _body(request: web.Request, seconds: int) -> bytes:
    """The request body, if it arrives in time: a half-sent body must not hold a slot."""
    try:
        async with asyncio.timeout(seconds):
            return await request.read()
    except TimeoutError:
        raise _body_timeout(seconds) from None


def _body_timeout(seconds: int) -> ApiError:
    return ApiError(
        408,
        f"the request body did not arrive within {seconds} s (WHISPERX_BODY_TIMEOUT_SECONDS)",
        headers={"Connection": "close"},
    )


# --- predictions ---


async def create_prediction(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    namespace = gw.authenticate(request)
    model_route = "owner" in request.match_info
    model = gw.model(request) if model_route else None
    wait = parse_prefer_wait(request.headers.get("Prefer"), gw.config.max_wait_seconds)
    deadline = parse_cancel_after(request.headers.get("Cancel-After"))
    parsed = parse_create_body(
        parse_json_body(await _body(request, gw.config.body_timeout)),
        version_required=not model_route,
        webhook_allow=gw.config.webhook_allow_hosts,
    )
    if model is None:
        version = parsed.version or ""
        model = gw.config.models.by_version(version)
        if model is None:
            raise ApiError(404, f"version {version!r} not found: use a model name or version id")
    elif parsed.version is not None:
        raise ApiError(422, "version: not allowed here; the model in the URL selects it")
    new = NewPrediction(
        id=new_prediction_id(),
        namespace=namespace,
        input=route_uploaded_files(parsed.input, gw.base_url(request), gw.config.internal_url),
        secrets=parsed.secrets,
        model=model,
        webhook=parsed.webhook,
        webhook_events_filter=parsed.webhook_events_filter,
        run_deadline_seconds=deadline,
    )
    record = await gw.backend.create(new)
    gw.metrics.created.inc(model.name)  # not the owner: any owner is accepted
    view = RawPredictionView.of(record, None, "")
    headers = {"Location": f"{gw.base_url(request)}/v1/predictions/{record.id}"}
    ended = False
    if wait is not None:
        headers["Preference-Applied"] = f"wait={wait}"
        found, ended = await wait_for_end(
            gw.hub, namespace, record.id, lambda: gw.reader.view(namespace, record.id), wait
        )
        view = found or view
    # When the wait runs out, Replicate answers `starting`: the official clients take
    # any other status as final and would stop polling.
    status = "starting" if wait is not None and not ended else None
    return _prediction(gw, request, view, code=201, status=status, headers=headers)


async def get_prediction(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    namespace = gw.authenticate(request)
    prediction_id = _prediction_id(request)
    view = await gw.reader.view(namespace, prediction_id)
    if view is None:
        raise ApiError(404, f"prediction {prediction_id!r} not found")
    return _prediction(gw, request, view)


async def list_predictions(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    namespace = gw.authenticate(request)
    raw_cursor = request.query.get("cursor")
    cursor = Cursor.decode(raw_cursor) if raw_cursor else None
    base_url = gw.base_url(request)
    results, links = await gw.reader.page(namespace, cursor, lambda view: list_item(view, base_url))
    base = f"{base_url}/v1/predictions?cursor="
    head = {
        "previous": base + links.previous.encode() if links.previous else None,
        "next": base + links.next.encode() if links.next else None,
    }
    # The results are JSON already, measured by the reader against the page's budget,
    # and are copied once, into the body.
    parts = [json.dumps(head)[:-1].encode(), b', "results": [']
    for n, item in enumerate(results):
        parts += [b", ", item] if n else [item]
    parts.append(b"]}")
    return web.Response(body=b"".join(parts), content_type="application/json")


async def cancel_prediction(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    namespace = gw.authenticate(request)
    prediction_id = _prediction_id(request)
    view = await gw.reader.view(namespace, prediction_id)
    if view is None:
        raise ApiError(404, f"prediction {prediction_id!r} not found")
    state = view.record.state
    if state.terminal:
        raise ApiError(409, f"prediction {prediction_id!r} has already ended ({state.phase.value})")
    record = await gw.backend.cancel(view.record)
    return _prediction(gw, request, RawPredictionView.of(record, view.output_json, view.logs))


# --- models ---


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    gw.authenticate(request)
    base = gw.base_url(request)
    models = [model_json(m, base, gw.model_schema(m)) for m in gw.config.models.all()]
    return _json({"previous": None, "next": None, "results": models})


async def get_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    gw.authenticate(request)
    model = gw.model(request)
    return _json(model_json(model, gw.base_url(request), gw.model_schema(model)))


async def list_versions(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    gw.authenticate(request)
    model = gw.model(request)
    version = version_json(model, gw.model_schema(model))
    return _json({"previous": None, "next": None, "results": [version]})


async def get_version(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    gw.authenticate(request)
    model = gw.model(request)
    if request.match_info["version"] != model.version:
        version = request.match_info["version"]
        raise ApiError(404, f"version {version!r} of {model.full_name} not found")
    return _json(version_json(model, gw.model_schema(model)))


async def webhook_secret(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    namespace = gw.authenticate(request)
    if gw.config.webhook_secret is None:
        raise ApiError(404, "no webhook signing secret is configured (WHISPERX_WEBHOOK_SECRET)")
    return _json({"key": tenant_secret(gw.config.webhook_secret, namespace)})


# --- files ---


def _files_key(gw: Gateway) -> bytes:
    if gw.config.files_key is None:
        raise ApiError(404, "file uploads are not configured (WHISPERX_FILES_KEY)")
    return gw.config.files_key


# A file's metadata is a small JSON object (Replicate's clients send names and tags).
MAX_METADATA_BYTES = 64 * 1024


async def _read_part(part: BodyPartReader, limit: int, name: str = "content") -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{name}: larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def upload_file(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    namespace = gw.authenticate(request)
    key = _files_key(gw)
    if request.content_type != "multipart/form-data":
        raise ApiError(415, "send multipart/form-data with the file in a `content` part")
    try:
        async with asyncio.timeout(gw.config.body_timeout):
            return await _upload(gw, request, namespace, key)
    except TimeoutError:
        raise _body_timeout(gw.config.body_timeout) from None
    except (ValueError, HttpProcessingError) as exc:  # aiohttp's multipart parser
        reason = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
        raise ApiError(400, f"malformed multipart/form-data body: {reason}") from None


async def _upload(gw: Gateway, request: web.Request, namespace: str, key: bytes) -> web.Response:
    upload = gw.files.upload(namespace, new_prediction_id(), gw.config.max_file_bytes)
    try:
        stored = await _read_upload(request, upload)
    except BaseException:
        await upload.abort()
        raise
    return _json(stored.to_replicate(gw.base_url(request), key), status=201)


async def _read_upload(request: web.Request, upload: Upload) -> StoredFile:
    """The form's parts: `content` goes to the file store as it arrives."""
    content = False
    name, content_type = "file", "application/octet-stream"
    metadata: Any = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise ApiError(422, "nested multipart bodies are not supported")
        if part.name == "content":
            if content:
                raise ApiError(422, "content: sent twice; send one file per upload")
            content = True
            name = part.filename or name
            content_type = part.headers.get("Content-Type", content_type)
            try:
                while chunk := await part.read_chunk():
                    await upload.write(chunk)
            except FileTooLarge as exc:
                raise ApiError(413, f"content: larger than {exc.limit} bytes") from None
            except QuotaExceeded as exc:
                raise _over_quota(exc, upload.size) from None
        elif part.name == "metadata":
            raw = await _read_part(part, MAX_METADATA_BYTES, "metadata")
            try:
                metadata = load_json(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiError(422, f"metadata: not valid JSON: {exc}") from None
            if not isinstance(metadata, dict):
                raise ApiError(422, "metadata: must be a JSON object")
        else:
            field_name = part.name or "(a part without a name)"
            raise ApiError(422, f"{field_name}: unknown form field; send `content`, `metadata`")
    if not content:
        raise ApiError(422, "content: Field required (the file)")
    try:
        return await upload.finish(
            name=name[:255], content_type=content_type[:255], metadata=metadata
        )
    except QuotaExceeded as exc:
        raise _over_quota(exc, upload.size) from None


def _over_quota(exc: QuotaExceeded, size: int) -> ApiError:
    return ApiError(
        413,
        f"content: this token's files take {exc.used} bytes and this one {size} or more; "
        f"the quota is {exc.quota} (WHISPERX_FILES_QUOTA_BYTES): delete files or wait "
        "for them to expire",
    )


async def list_files(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    namespace = gw.authenticate(request)
    key, base = _files_key(gw), gw.base_url(request)
    files = await gw.files.list(namespace)
    return _json(
        {"previous": None, "next": None, "results": [f.to_replicate(base, key) for f in files]}
    )


async def _own_file(request: web.Request) -> tuple[Gateway, str, str]:
    gw = request.app[GATEWAY]
    namespace = gw.authenticate(request)
    _files_key(gw)
    file_id = request.match_info["file"]
    if not valid_prediction_id(file_id):
        raise ApiError(404, f"file {file_id!r} not found")
    return gw, namespace, file_id


async def get_file(request: web.Request) -> web.Response:
    gw, namespace, file_id = await _own_file(request)
    stored = await gw.files.get(namespace, file_id)
    if stored is None:
        raise ApiError(404, f"file {file_id!r} not found")
    return _json(stored.to_replicate(gw.base_url(request), _files_key(gw)))


async def delete_file(request: web.Request) -> web.Response:
    gw, namespace, file_id = await _own_file(request)
    if not await gw.files.delete(namespace, file_id):
        raise ApiError(404, f"file {file_id!r} not found")
    return web.Response(status=204)


async def download_file(request: web.Request) -> web.StreamResponse:
    """The signed URL a prediction's input points at: no token, the signature instead."""
    gw = request.app[GATEWAY]
    key = _files_key(gw)
    namespace, file_id = request.match_info["ns"], request.match_info["file"]
    signed = valid_download(
        key,
        namespace,
        file_id,
        request.query.get("expires", ""),
        request.query.get("signature", ""),
        time.time(),
    )
    if not signed:
        raise ApiError(403, "this download link is invalid or has expired")
    stored = await gw.files.get(namespace, file_id)
    if stored is None:
        raise ApiError(404, f"file {file_id!r} not found (expired or deleted)")
    response = web.StreamResponse(headers=download_headers(stored))
    response.content_length = stored.size
    await response.prepare(request)
    # A piece at a time, each taken by the client within the body time-out: a file
    # never sits whole in the gateway's memory, nor does a stalled download stay.
    idle = gw.config.body_timeout
    try:
        async with asyncio.timeout(idle) as deadline:
            async for piece in gw.files.pieces(namespace, file_id):
                await response.write(piece)
                deadline.reschedule(asyncio.get_running_loop().time() + idle)
    except TimeoutError:
        log.info("download of %s/%s: the client took nothing for %g s; disconnected",
                 namespace, file_id, idle)  # fmt: skip
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


# --- operations ---


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    try:
        await gw.store.redis.ping()
    except (RedisError, OSError) as exc:
        # Unauthenticated: the answer does not say where Redis is; the log does.
        log.warning("not ready: Redis unavailable: %s", exc)
        raise unavailable("Redis is unavailable") from None
    if not gw.hub.subscribed.is_set():
        raise unavailable("not yet subscribed to prediction events")
    return _json({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    return web.Response(
        body=gw.metrics.render().encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[GATEWAY].openapi, content_type="application/json")


# --- errors, limits, metrics ---


async def _answer(gw: Gateway, request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except ApiError as exc:
        response = from_api_error(exc)
    except web.HTTPException as exc:
        response = from_http_exception(exc, gw.config.max_body_bytes)
    except BackendError as exc:
        response = from_api_error(unavailable(str(exc), exc.retry_after))
    except (RedisError, OSError) as exc:
        log.warning("%s %s: Redis unavailable: %s", request.method, request.path, exc)
        response = from_api_error(unavailable("Redis is unavailable; retry shortly"))
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = problem_response(500, "internal error; the gateway log has the details")
    return response


# asyncio's write buffer takes this much at once (its high-water mark): a smaller answer
# is handed to the socket without waiting, and aiohttp sends it after the handler as usual.
_SENT_AT_ONCE_BYTES = 64 * 1024


def _may_wait_for_its_client(response: web.StreamResponse) -> bool:
    if response.prepared:  # streamed by its handler (server-sent events): sent already
        return False
    size = response.content_length
    return size is None or size > _SENT_AT_ONCE_BYTES


async def _send(request: web.Request, response: web.StreamResponse, idle: float) -> None:
    """Sends the response while its request still counts in flight: a body its client
    does not take (a list page, a long transcript) is held against that client's share
    instead of piling up in the gateway's memory once the handler has returned. A client
    that took none of it between two checks `idle` seconds apart is disconnected."""
    loop = asyncio.get_running_loop()
    transport = request.transport
    unsent: int | None = None
    timer: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal unsent, timer
        if transport is None or transport.is_closing():
            return
        now_unsent = transport.get_write_buffer_size()
        if now_unsent == unsent:
            log.info("%s %s: the client took nothing for %g s; disconnected",
                     request.method, request.path, idle)  # fmt: skip
            transport.abort()
            return
        unsent = now_unsent
        timer = loop.call_later(idle, check)

    timer = loop.call_later(idle, check)
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # the client left (or was disconnected); aiohttp ends the exchange
    finally:
        if timer is not None:
            timer.cancel()


@web.middleware
async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    started = time.perf_counter()
    limited = request.path not in OPEN_PATHS
    tenant = gw.caller(request) if limited else None
    response: web.StreamResponse
    try:
        if limited:
            gw.in_flight.admit(tenant)
    except ApiError as exc:
        gw.metrics.rejected.inc()
        response = from_api_error(exc)
    else:
        try:
            response = await _answer(gw, request, handler)
            if limited and _may_wait_for_its_client(response):
                await _send(request, response, gw.config.body_timeout)
        finally:
            if limited:
                gw.in_flight.release(tenant)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    gw.metrics.requests.inc(route, request.method, str(response.status))
    gw.metrics.latency.observe(time.perf_counter() - started, route, request.method)
    return response


def create_app(config: GatewayConfig, store: Store, backend: Backend) -> web.Application:
    """The gateway; it owns `store` and `backend` and closes them on cleanup."""
    hub = EventHub(store.redis)
    gw = Gateway(
        config=config,
        store=store,
        backend=backend,
        hub=hub,
        reader=PredictionReader(store, backend, config.page_size, config.page_bytes),
        metrics=GatewayMetrics(lambda: hub.waiting, backend.metric_lines),
        openapi=json.dumps(gateway_openapi(metrics=config.metrics)).encode(),
        files=FileStore(store.redis, quota_bytes=config.files_quota_bytes),
        in_flight=InFlight(config.max_in_flight, config.tenant_in_flight),
    )
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[middleware])
    app[GATEWAY] = gw

    async def lifecycle(app: web.Application) -> Any:
        await hub.start()
        await backend.start()
        yield
        await backend.close()
        await hub.close()
        await store.close()

    app.cleanup_ctx.append(lifecycle)

    async def release_waits(app: web.Application) -> None:
        # Before the server waits for in-flight requests (up to its shutdown timeout):
        # a held `Prefer: wait` answers `starting`, as when its wait runs out.
        hub.release()

    app.on_shutdown.append(release_waits)
    prediction = r"/v1/predictions/{id}"
    model = r"/v1/models/{owner}/{name}"
    app.router.add_post("/v1/predictions", create_prediction)
    app.router.add_get("/v1/predictions", list_predictions, allow_head=False)
    app.router.add_get(prediction, get_prediction, allow_head=False)
    app.router.add_post(prediction + "/cancel", cancel_prediction)
    app.router.add_get("/v1/models", list_models, allow_head=False)
    app.router.add_get(model, get_model, allow_head=False)
    app.router.add_post(model + "/predictions", create_prediction)
    app.router.add_get(model + "/versions", list_versions, allow_head=False)
    app.router.add_get(model + "/versions/{version}", get_version, allow_head=False)
    app.router.add_get("/v1/webhooks/default/secret", webhook_secret, allow_head=False)
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files", list_files, allow_head=False)
    app.router.add_get("/v1/files/{file}", get_file, allow_head=False)
    app.router.add_delete("/v1/files/{file}", delete_file)
    app.router.add_get("/v1/files/{ns}/{file}/download", download_file, allow_head=False)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/openapi.json", openapi)
    if config.metrics:
        app.router.add_get("/metrics", metrics)
    return app
