"""A list page is bounded: inputs held as data URIs are not repeated in it, and a page
ends early at a byte budget. Before, one `GET /v1/predictions` carried 100 full inputs
(99.9 MB) and 20 at once took the gateway to 2.3 GB."""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp

from tests.gateway.conftest import Gateway, serve_local
from whisperx_gateway.parsing import LIST_INPUT_CHARS, list_input

BIG_AUDIO = "data:audio/wav;base64," + base64.b64encode(b"\0" * 600_000).decode()
HANG = {"initial_prompt": "stand-in:hang"}


def test_long_input_values_are_summarized_in_lists() -> None:
    summary = list_input({"audio_file": BIG_AUDIO, "language": "en", "batch_size": 8})
    assert summary["language"] == "en" and summary["batch_size"] == 8
    assert summary["audio_file"].startswith("data:audio/wav;base64... (800022 characters")
    url = "https://example.com/" + "a" * LIST_INPUT_CHARS
    assert len(list_input({"audio_file": url})["audio_file"]) < 200
    short = "https://example.com/a.wav"
    assert list_input({"audio_file": short}) == {"audio_file": short}


async def create_big(http: aiohttp.ClientSession, gw: Gateway) -> str:
    body = {"version": "whisperx", "input": {"audio_file": BIG_AUDIO, **HANG}}
    async with http.post(gw.url + "/v1/predictions", json=body, headers=gw.auth()) as resp:
        assert resp.status == 201
        return str((await resp.json())["id"])


async def test_a_page_of_big_inputs_stays_small(redis_url: str) -> None:
    async with serve_local(redis_url, concurrency=1) as gw, aiohttp.ClientSession() as http:
        ids = [await create_big(http, gw) for _ in range(4)]
        async with http.get(gw.url + "/v1/predictions", headers=gw.auth()) as resp:
            raw = await resp.read()
        page = json.loads(raw)
        assert [p["id"] for p in page["results"]] == ids[::-1]
        assert len(raw) < 20_000, len(raw)  # four inputs of 800 KB each
        async with http.get(f"{gw.url}/v1/predictions/{ids[0]}", headers=gw.auth()) as resp:
            assert (await resp.json())["input"]["audio_file"] == BIG_AUDIO  # whole here


async def test_a_page_ends_at_its_byte_budget_and_goes_on(redis_url: str) -> None:
    async with serve_local(redis_url, concurrency=1, page_bytes=2500) as gw:
        async with aiohttp.ClientSession() as http:
            ids = []
            for _ in range(5):
                body = {"version": "whisperx", "input": {"audio_file": "https://e.com/a", **HANG}}
                async with http.post(
                    gw.url + "/v1/predictions", json=body, headers=gw.auth()
                ) as resp:
                    ids.append((await resp.json())["id"])
            pages: list[list[str]] = []
            url: Any = gw.url + "/v1/predictions"
            while url:
                async with http.get(url, headers=gw.auth()) as resp:
                    page = await resp.json()
                pages.append([p["id"] for p in page["results"]])
                assert len(json.dumps(page["results"])) < 2500 + 1500  # budget + one item
                url = page["next"]
            back: list[str] = []
            url = page["previous"]
            while url:
                async with http.get(url, headers=gw.auth()) as resp:
                    page = await resp.json()
                back = [p["id"] for p in page["results"]] + back
                url = page["previous"]
        assert len(pages) > 1 and all(pages)
        assert [i for p in pages for i in p] == ids[::-1]
        assert back == [i for p in pages[:-1] for i in p]
