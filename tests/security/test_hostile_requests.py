"""Hostile request shapes get clear 4xx answers, never a 500, and uploads are served in
a way no browser renders: deep JSON, bad download links, uploads with a charset or an
HTML type, and a tenant over its upload quota."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.gateway.conftest import Gateway, serve_local
from whisperx_gateway.parsing import MAX_JSON_DEPTH, load_json

DEEP = "[" * 1000 + "]" * 1000


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def test_json_nesting_is_bounded() -> None:
    assert load_json(json.dumps(nested(MAX_JSON_DEPTH - 1)))
    for text in (json.dumps(nested(MAX_JSON_DEPTH + 1)), DEEP):
        with pytest.raises(ValueError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
            load_json(text)


async def upload(
    http: aiohttp.ClientSession,
    gw: Gateway,
    content: bytes,
    content_type: str,
    metadata: str | None = None,
    filename: str = "a.wav",
) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("content", content, filename=filename, content_type=content_type)
    if metadata is not None:
        form.add_field("metadata", metadata, content_type="application/json")
    async with http.post(gw.url + "/v1/files", data=form, headers=gw.auth()) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_deeply_nested_json_is_a_client_error_everywhere(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    body = '{"version": "whisperx", "input": {"audio_file": "https://e.com/a", "x": ' + DEEP + "}}"
    async with http.post(
        gateway.url + "/v1/predictions", data=body, headers=gateway.auth()
    ) as resp:
        assert resp.status == 400 and "nested deeper" in (await resp.json())["detail"]
    cursor = base64.urlsafe_b64encode(DEEP.encode()).decode()
    async with http.get(
        f"{gateway.url}/v1/predictions?cursor={cursor}", headers=gateway.auth()
    ) as resp:
        assert resp.status == 400 and "cursor" in (await resp.json())["detail"]
    status, problem = await upload(http, gateway, b"RIFF", "audio/wav", metadata=DEEP)
    assert status == 422 and problem["detail"].startswith("metadata: "), problem
    status, problem = await upload(http, gateway, b"RIFF", "audio/wav", metadata="x" * 70_000)
    assert status == 413 and problem["detail"].startswith("metadata: "), problem


@pytest.mark.parametrize("expires", ["²", "9" * 5000, "\uff11\uff12\uff13", "-1", "1e9"])
async def test_malformed_download_expiries_are_refused(
    gateway: Gateway, http: aiohttp.ClientSession, expires: str
) -> None:
    status, stored = await upload(http, gateway, b"RIFF", "audio/wav")
    assert status == 201
    url = urlsplit(stored["urls"]["get"])
    async with http.get(
        f"{gateway.url}{url.path}", params={"expires": expires, "signature": "0" * 64}
    ) as resp:
        assert resp.status == 403


@pytest.mark.parametrize(
    ("sent", "served"),
    [
        ("audio/wav; charset=utf-8", "audio/wav"),
        ("text/html", "application/octet-stream"),
        ("image/svg+xml", "application/octet-stream"),
        ("Audio/MPEG", "audio/mpeg"),
        ("audio/wav;x=<script>", "audio/wav"),
    ],
)
async def test_downloads_are_served_inert(
    gateway: Gateway, http: aiohttp.ClientSession, sent: str, served: str
) -> None:
    content = b"<html><script>alert(document.cookie)</script></html>"
    status, stored = await upload(http, gateway, content, sent, filename='x".html')
    assert status == 201, stored
    async with http.get(stored["urls"]["get"]) as resp:
        assert resp.status == 200 and await resp.read() == content
        assert resp.headers["Content-Type"] == served
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Content-Disposition"].startswith("attachment;")
        assert "sandbox" in resp.headers["Content-Security-Policy"]


async def test_uploads_beyond_the_tenant_quota_are_refused(redis_url: str) -> None:
    async with (
        serve_local(redis_url, files_quota_bytes=2500) as gw,
        aiohttp.ClientSession() as http,
    ):
        status, first = await upload(http, gw, b"x" * 1000, "audio/wav")
        assert status == 201
        assert (await upload(http, gw, b"x" * 1000, "audio/wav"))[0] == 201
        status, problem = await upload(http, gw, b"x" * 1000, "audio/wav")
        assert status == 413 and "WHISPERX_FILES_QUOTA_BYTES" in problem["detail"], problem
        assert problem["detail"].startswith("content: this token's files take 2000 bytes")
        # Another tenant has its own quota; a deleted file frees its share.
        other = {"Authorization": "Bearer token-beta-00002"}
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("content", b"x" * 2000, filename="b.wav", content_type="audio/wav")
        async with http.post(gw.url + "/v1/files", data=form, headers=other) as resp:
            assert resp.status == 201
        async with http.delete(f"{gw.url}/v1/files/{first['id']}", headers=gw.auth()) as resp:
            assert resp.status == 204
        assert (await upload(http, gw, b"x" * 1000, "audio/wav"))[0] == 201
