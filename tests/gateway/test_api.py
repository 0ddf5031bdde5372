"""The HTTP API over real HTTP on loopback: shapes, status codes, errors, tenancy, waiting,
cancellation and listing (local mode's backend, stand-in runner, real Redis)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.gateway.conftest import OTHER_TOKEN, Gateway, process_holding, serve_local
from whisperx_api import lifecycle as lc
from whisperx_api.records import PredictionRecord
from whisperx_api.webhooks import tenant_secret

AUDIO = "data:audio/wav;base64,UklGRg=="
HANG = {"audio_file": AUDIO, "initial_prompt": "stand-in:hang"}
SLOW = {"audio_file": AUDIO, "initial_prompt": "stand-in:slow"}
PREDICTION_FIELDS = {
    "id",
    "model",
    "version",
    "input",
    "output",
    "logs",
    "error",
    "status",
    "created_at",
    "started_at",
    "completed_at",
    "urls",
    "metrics",
    "data_removed",
    "source",
}


async def create(
    http: aiohttp.ClientSession,
    gw: Gateway,
    input_: dict[str, Any] | None = None,
    *,
    headers: dict[str, str] | None = None,
    path: str = "/v1/predictions",
    **body: Any,
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    payload: dict[str, Any] = {"input": input_ or {"audio_file": AUDIO}, **body}
    if path == "/v1/predictions":
        payload.setdefault("version", "whisperx")
    async with http.post(
        gw.url + path, json=payload, headers={**gw.auth(), **(headers or {})}
    ) as resp:
        return resp.status, await resp.json(content_type=None), resp


async def get(http: aiohttp.ClientSession, gw: Gateway, path: str, token: str | None = None) -> Any:
    async with http.get(gw.url + path, headers=gw.auth(token)) as resp:
        return resp.status, await resp.json(content_type=None)


async def wait_status(
    http: aiohttp.ClientSession, gw: Gateway, prediction_id: str, *statuses: str
) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, body = await get(http, gw, f"/v1/predictions/{prediction_id}")
        assert status == 200
        if body["status"] in statuses:
            return dict(body)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{prediction_id} never reached {statuses}")


async def test_create_answers_201_with_location_then_get_shows_the_result(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    status, body, resp = await create(http, gateway, {"audio_file": AUDIO, "batch_size": 4})
    assert status == 201
    assert resp.headers["Location"] == f"{gateway.url}/v1/predictions/{body['id']}"
    assert set(body) == PREDICTION_FIELDS
    assert body["status"] == "starting" and body["output"] is None
    assert body["model"] == "whisperx/whisperx" and len(body["version"]) == 64
    assert body["input"] == {"audio_file": AUDIO, "batch_size": 4}
    assert body["urls"]["get"] == resp.headers["Location"]
    assert body["urls"]["cancel"] == resp.headers["Location"] + "/cancel"
    assert body["source"] == "api" and body["data_removed"] is False

    done = await wait_status(http, gateway, body["id"], "succeeded")
    assert done["output"]["segments"][0]["text"] == f"audio of {len(AUDIO)} characters"
    assert "stand-in runner: model tiny.en" in done["logs"]
    assert done["started_at"] and done["completed_at"]
    assert done["metrics"]["predict_time"] == 0.01 and done["metrics"]["total_time"] > 0
    assert done["error"] is None


async def test_secret_inputs_reach_the_runner_but_are_never_stored_or_echoed(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    secret = "hf_do_not_store_this_0123456789"
    status, body, _ = await create(
        http,
        gateway,
        {"audio_file": AUDIO, "diarization": True, "huggingface_access_token": secret},
        headers={"Prefer": "wait=20"},
    )
    assert status == 201 and body["status"] == "succeeded"
    assert "huggingface_access_token" not in body["input"]
    assert "token given: yes" in body["logs"]  # the runner had it
    redis = gateway.store.redis
    for key in await redis.keys("*"):
        kind = await redis.type(key)
        if kind == "string":
            assert secret not in str(await redis.get(key)), key
        elif kind == "hash":
            assert secret not in json.dumps(await redis.hgetall(key)), key


async def test_model_routes_select_hardware_and_describe_the_schema(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    status, body, _ = await create(
        http, gateway, path="/v1/models/acme/whisperx-a100-80gb/predictions"
    )
    assert status == 201 and body["model"] == "acme/whisperx-a100-80gb"
    record = await gateway.store.get_record("alpha", body["id"])
    assert record is not None and record.hardware == "whisperx-a100-80gb"

    status, model = await get(http, gateway, "/v1/models/acme/whisperx-a100-80gb")
    assert status == 200 and model["owner"] == "acme" and model["name"] == "whisperx-a100-80gb"
    version = model["latest_version"]
    assert version["id"] == body["version"]
    assert version["openapi_schema"]["components"]["schemas"]["Input"]["required"] == ["audio_file"]
    path = f"/v1/models/acme/whisperx-a100-80gb/versions/{version['id']}"
    assert await get(http, gateway, path) == (200, version)
    status, versions = await get(http, gateway, "/v1/models/acme/whisperx-a100-80gb/versions")
    assert status == 200 and versions["results"] == [version]
    status, models = await get(http, gateway, "/v1/models")
    assert {m["name"] for m in models["results"]} == {
        "whisperx",
        "whisperx-a40-large",
        "whisperx-a100-80gb",
    }

    # A version id alone selects the same model.
    status, by_version, _ = await create(http, gateway, version=version["id"])
    assert status == 201 and by_version["model"] == "whisperx/whisperx-a100-80gb"


async def problem(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    assert resp.content_type == "application/problem+json"
    body = await resp.json(content_type=None)
    assert set(body) == {"title", "status", "detail"} and body["status"] == resp.status
    return dict(body)


VALID = {"version": "whisperx", "input": {"audio_file": AUDIO}}
BAD_REQUESTS: list[tuple[str, str, dict[str, str], Any, int, str]] = [
    # (method, path, extra headers, body (bytes or JSON), status, text in detail)
    ("POST", "/v1/predictions", {}, b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/predictions", {}, b"", 400, "empty"),
    ("POST", "/v1/predictions", {}, [1, 2], 422, "JSON object"),
    (
        "POST",
        "/v1/predictions",
        {},
        {"version": "whisperx", "input": {}},
        422,
        "input.audio_file: Field required",
    ),
    (
        "POST",
        "/v1/predictions",
        {},
        {"version": "whisperx", "input": {"audio_file": AUDIO, "colour": "red"}},
        422,
        "input.colour",
    ),
    (
        "POST",
        "/v1/predictions",
        {},
        {"version": "whisperx", "input": {"audio_file": AUDIO, "batch_size": "big"}},
        422,
        "input.batch_size",
    ),
    (
        "POST",
        "/v1/predictions",
        {},
        {"version": "whisperx", "input": {"audio_file": AUDIO, "max_speakers": 0}},
        422,
        "input.max_speakers",
    ),
    ("POST", "/v1/predictions", {}, {**VALID, "webhook": "ftp://x"}, 422, "webhook"),
    ("POST", "/v1/predictions", {}, {**VALID, "surprise": True}, 422, "surprise"),
    ("POST", "/v1/predictions", {}, {"input": {"audio_file": AUDIO}}, 422, "version"),
    ("POST", "/v1/predictions", {}, {**VALID, "version": "nope"}, 404, "version 'nope'"),
    ("POST", "/v1/models/acme/unknown/predictions", {}, VALID, 404, "model acme/unknown"),
    ("POST", "/v1/models/acme/whisperx/predictions", {}, VALID, 422, "version: not allowed"),
    ("GET", "/v1/models/acme/unknown", {}, None, 404, "model acme/unknown"),
    ("GET", "/v1/models/acme/whisperx/versions/abc", {}, None, 404, "version 'abc'"),
    ("POST", "/v1/predictions", {"Prefer": "wait=soon"}, VALID, 400, "Prefer"),
    ("POST", "/v1/predictions", {"Cancel-After": "tomorrow"}, VALID, 400, "Cancel-After"),
    (
        "POST",
        "/v1/predictions",
        {"Content-Type": "application/json"},
        b'{"version": "whisperx", "input": {"audio_file": "data:,' + b"a" * 1_300_000 + b'"}}',
        413,
        "limit is",
    ),
    ("GET", "/v1/predictions/doesnotexist", {}, None, 404, "'doesnotexist' not found"),
    ("GET", "/v1/predictions/Bad:Id", {}, None, 404, "not found"),
    ("POST", "/v1/predictions/doesnotexist/cancel", {}, None, 404, "not found"),
    ("GET", "/v1/predictions?cursor=garbage", {}, None, 400, "cursor"),
    ("DELETE", "/v1/predictions", {}, None, 405, "not allowed"),
    ("GET", "/v2/anything", {}, None, 404, "no such endpoint"),
    ("GET", "/v1/predictions", {"Authorization": "Bearer wrong-token-123"}, None, 401, "token"),
    ("GET", "/v1/predictions", {"Authorization": "Basic dXNlcjpwYXNz"}, None, 401, "token"),
    ("POST", "/v1/predictions", {"Authorization": ""}, VALID, 401, "token"),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "detail"),
    BAD_REQUESTS,
    ids=[f"{m} {p} {s} {d}"[:60] for m, p, _, _, s, d in BAD_REQUESTS],
)
async def test_bad_requests_get_the_right_status_and_a_detail(
    http: aiohttp.ClientSession,
    gateway: Gateway,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Any,
    status: int,
    detail: str,
) -> None:
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with http.request(
        method, gateway.url + path, headers={**gateway.auth(), **headers}, **kwargs
    ) as resp:
        error = await problem(resp)
        assert resp.status == status, error
        assert detail in error["detail"], error
        if status == 401:
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert await gateway.store.redis.keys("wx:p:*") == []  # nothing was created


async def test_a_token_sees_and_touches_only_its_own_namespace(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    _, mine, _ = await create(http, gateway, HANG)
    path = f"/v1/predictions/{mine['id']}"
    assert (await get(http, gateway, path))[0] == 200
    status, error = await get(http, gateway, path, token=OTHER_TOKEN)
    assert status == 404 and mine["id"] in error["detail"]
    async with http.post(gateway.url + path + "/cancel", headers=gateway.auth(OTHER_TOKEN)) as resp:
        assert resp.status == 404
    status, page = await get(http, gateway, "/v1/predictions", token=OTHER_TOKEN)
    assert status == 200 and page["results"] == []
    assert (await get(http, gateway, path))[1]["status"] in ("starting", "processing")


async def test_cancel_stops_the_runner_and_a_second_cancel_conflicts(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    _, body, _ = await create(http, gateway, HANG)
    await wait_status(http, gateway, body["id"], "processing")
    process = process_holding(gateway, body["id"])
    async with http.post(
        gateway.url + f"/v1/predictions/{body['id']}/cancel", headers=gateway.auth()
    ) as resp:
        assert resp.status == 200
        canceled = await resp.json()
    assert canceled["status"] == "canceled" and canceled["completed_at"]
    assert await asyncio.wait_for(process.wait(), 10) == 143  # SIGTERM reached it
    async with http.post(
        gateway.url + f"/v1/predictions/{body['id']}/cancel", headers=gateway.auth()
    ) as resp:
        error = await problem(resp)
    assert resp.status == 409 and "already ended (canceled)" in error["detail"]


async def test_prefer_wait_holds_until_the_end(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    started = time.monotonic()
    status, body, resp = await create(
        http,
        gateway,
        SLOW,
        headers={"Prefer": "wait=20"},
    )
    assert status == 201 and body["status"] == "succeeded"
    assert resp.headers["Preference-Applied"] == "wait=20"
    assert 1.5 <= time.monotonic() - started < 15


async def test_prefer_wait_timeout_answers_starting_like_replicate(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    started = time.monotonic()
    status, body, _ = await create(
        http,
        gateway,
        HANG,
        headers={"Prefer": "wait=2"},
    )
    elapsed = time.monotonic() - started
    assert status == 201 and 2 <= elapsed < 6
    # The runner is processing, but any status other than `starting` would be taken
    # as final by the official clients.
    assert body["status"] == "starting"
    assert (await get(http, gateway, f"/v1/predictions/{body['id']}"))[1]["status"] == "processing"


async def _command_calls(gateway: Gateway, command: str) -> int:
    stats = await gateway.store.redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_waiting_is_woken_by_events_not_by_polling(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    before = await _command_calls(gateway, "mget")
    status, body, _ = await create(
        http,
        gateway,
        SLOW,
        headers={"Prefer": "wait=20"},
    )
    assert status == 201 and body["status"] == "succeeded"
    # A read when the wait begins and one after the terminal event (the status writer's
    # own reads for webhooks add at most one): a poll would read every few ms for 1.5 s.
    assert await _command_calls(gateway, "mget") - before <= 4


async def test_cancel_after_ends_the_run_at_its_deadline(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    status, body, _ = await create(
        http,
        gateway,
        HANG,
        headers={"Cancel-After": "2s", "Prefer": "wait=30"},
    )
    assert status == 201 and body["status"] == "failed"
    assert body["error"] == "the run took longer than 2 s"
    record = await gateway.store.get_record("alpha", body["id"])
    assert record is not None and record.state.reason == "DeadlineExceeded"


async def test_listing_is_newest_first_with_next_and_previous_links(
    http: aiohttp.ClientSession, redis_url: str
) -> None:
    async with serve_local(redis_url, page_size=3) as gw:
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        # Three share one instant: paging must neither skip nor repeat them.
        offsets = [0, 1, 2, 2, 2, 3, 4, 5]
        ids = []
        for n, offset in enumerate(offsets):
            at = t0 + timedelta(seconds=offset)
            record = PredictionRecord(
                id=f"p{n}",
                namespace="alpha",
                input={"audio_file": AUDIO},
                state=lc.apply(lc.PredictionState(), lc.Created(at=at)).state,
            )
            await gw.store.put_record(record)
            ids.append(record.id)
        expected = sorted(ids, key=lambda i: (offsets[ids.index(i)], i), reverse=True)

        seen: list[str] = []
        pages = []
        url: str | None = gw.url + "/v1/predictions"
        while url:
            async with http.get(url, headers=gw.auth()) as resp:
                page = await resp.json()
            pages.append(page)
            seen += [p["id"] for p in page["results"]]
            url = page["next"]
        assert seen == expected
        assert [len(p["results"]) for p in pages] == [3, 3, 2]
        assert pages[0]["previous"] is None and pages[-1]["next"] is None

        back: list[str] = []
        url = pages[-1]["previous"]
        while url:
            async with http.get(url, headers=gw.auth()) as resp:
                page = await resp.json()
            back = [p["id"] for p in page["results"]] + back
            url = page["previous"]
        assert back == expected[:6]


async def test_overload_answers_503_with_retry_after(redis_url: str) -> None:
    async with (
        serve_local(redis_url, max_in_flight=1) as gw,
        aiohttp.ClientSession() as http,
    ):
        held = asyncio.create_task(
            create(
                http,
                gw,
                HANG,
                headers={"Prefer": "wait=3"},
            )
        )
        await asyncio.sleep(0.5)
        async with http.get(gw.url + "/v1/predictions", headers=gw.auth()) as resp:
            error = await problem(resp)
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert "concurrency limit" in error["detail"]
        async with http.get(gw.url + "/health") as resp:
            assert resp.status == 200  # operations endpoints stay open
        assert (await held)[0] == 201
        async with http.get(gw.url + "/metrics") as resp:
            assert "whisperx_gateway_overload_rejections_total 1.0" in await resp.text()


async def test_operations_endpoints(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    async with http.get(gateway.url + "/health") as resp:
        assert resp.status == 200
    async with http.get(gateway.url + "/ready") as resp:
        assert resp.status == 200
    async with http.get(gateway.url + "/openapi.json") as resp:
        doc = await resp.json()
        assert doc["openapi"].startswith("3.1")
    await create(http, gateway)
    async with http.get(gateway.url + "/metrics") as resp:
        text = await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
    assert (
        'whisperx_gateway_requests_total{route="/v1/predictions",method="POST",status="201"}'
        in text
    )
    assert 'whisperx_gateway_predictions_created_total{model="whisperx"} 1.0' in text
    status, secret = await get(http, gateway, "/v1/webhooks/default/secret")
    assert gateway.config.webhook_secret is not None
    master = gateway.config.webhook_secret
    assert status == 200 and secret["key"] == tenant_secret(master, "alpha") != master
    async with http.get(gateway.url + "/v1/webhooks/default/secret") as resp:
        assert resp.status == 401


async def test_metrics_can_be_turned_off(redis_url: str) -> None:
    async with (
        serve_local(redis_url, metrics=False) as gw,
        aiohttp.ClientSession() as http,
        http.get(gw.url + "/metrics") as resp,
    ):
        assert resp.status == 404


async def test_redis_outage_answers_503_and_recovers(
    http: aiohttp.ClientSession, redis_server: Any, redis_url: str
) -> None:
    async with serve_local(redis_url) as gw:
        _, body, _ = await create(http, gw, headers={"Prefer": "wait=20"})
        redis_server.stop()
        try:
            status, error = await get(http, gw, f"/v1/predictions/{body['id']}")
            assert status == 503 and "Redis" in error["detail"]
            async with http.get(gw.url + "/ready") as resp:
                assert resp.status == 503
        finally:
            redis_server.start()
        deadline = time.monotonic() + 15
        while (await get(http, gw, f"/v1/predictions/{body['id']}"))[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        # The restarted Redis replayed its AOF: the finished prediction is still there.
        status, again = await get(http, gw, f"/v1/predictions/{body['id']}")
        assert again["status"] == "succeeded"


async def test_bad_uploads_get_the_right_status_and_a_detail(redis_url: str) -> None:
    async with serve_local(redis_url, max_file_bytes=1000) as gw, aiohttp.ClientSession() as http:
        url = gw.url + "/v1/files"
        cases: list[tuple[Any, int, str]] = [
            ({"json": {"content": "x"}}, 415, "multipart/form-data"),
            ({"data": _form(metadata="{}")}, 422, "content: Field required"),
            ({"data": _form(content=b"x", metadata="[1]")}, 422, "metadata: must be a JSON object"),
            ({"data": _form(content=b"x", colour="red")}, 422, "colour: unknown form field"),
            ({"data": _form(content=b"x" * 1001)}, 413, "larger than 1000 bytes"),
        ]
        for kwargs, status, detail in cases:
            async with http.post(url, headers=gw.auth(), **kwargs) as resp:
                error = await problem(resp)
                assert resp.status == status and detail in error["detail"], error
        for content_type, body in (
            ("multipart/form-data", b""),
            ("multipart/form-data; boundary=xyz", b"no boundary here"),
            (
                "multipart/form-data; boundary=xyz",
                b'--xyz\r\nContent-Disposition: form-data; name="content"\r\n\r\ncut',
            ),
        ):
            headers = {**gw.auth(), "Content-Type": content_type}
            async with http.post(url, headers=headers, data=body) as resp:
                error = await problem(resp)
                assert resp.status == 400 and "malformed multipart" in error["detail"], error
        async with http.post(url, data=_form(content=b"x")) as resp:
            assert resp.status == 401
        async with http.post(url, headers=gw.auth(), data=_form(content=b"ok")) as resp:
            assert resp.status == 201
            uploaded = await resp.json()
        assert uploaded["size"] == 2 and uploaded["metadata"] == {}
        link = uploaded["urls"]["get"]
        expired = re.sub(r"expires=\d+", "expires=1", link)
        async with http.get(expired) as resp:
            assert resp.status == 403


async def test_a_large_upload_comes_back_byte_for_byte_and_leaves_nothing_staged(
    redis_url: str,
) -> None:
    # Several of the pieces a file travels to and from Redis in, and not a multiple of 3.
    content = os.urandom(2 * 1024 * 1024 + 1001)
    redis = aioredis.Redis.from_url(redis_url)
    async with (
        serve_local(redis_url, max_file_bytes=len(content)) as gw,
        aiohttp.ClientSession() as http,
    ):
        url = gw.url + "/v1/files"
        async with http.post(url, headers=gw.auth(), data=_form(content=content)) as resp:
            assert resp.status == 201, await resp.text()
            uploaded = await resp.json()
        assert uploaded["size"] == len(content)
        assert uploaded["checksums"]["sha256"] == hashlib.sha256(content).hexdigest()
        async with http.get(uploaded["urls"]["get"]) as resp:
            assert resp.status == 200
            assert resp.content_length == len(content)
            assert await resp.read() == content
        # One byte more than allowed: refused once that byte arrives, and what was staged
        # before it is dropped.
        too_large = _form(content=content + b"!")
        async with http.post(url, headers=gw.auth(), data=too_large) as resp:
            assert resp.status == 413
        assert [key async for key in redis.scan_iter("wx:file:*:upload")] == []
        async with http.delete(f"{url}/{uploaded['id']}", headers=gw.auth()) as resp:
            assert resp.status == 204
        assert [key async for key in redis.scan_iter(f"wx:file:*:{uploaded['id']}*")] == []
        async with http.get(uploaded["urls"]["get"]) as resp:
            assert resp.status == 404
    await redis.aclose()


def _form(**fields: str | bytes) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        if isinstance(value, bytes):
            form.add_field(name, value, filename="a.wav", content_type="audio/wav")
        else:
            form.add_field(name, value)
    return form
