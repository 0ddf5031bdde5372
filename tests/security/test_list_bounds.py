"""A list page is bounded: inputs held as data URIs are not repeated in it, and a page
ends early at a byte budget, long transcripts included. Before, one `GET /v1/predictions`
carried 100 full inputs (99.9 MB) and 20 at once took the gateway to 2.3 GB."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import free_port
from tests.flow.conftest import GatewayProcess
from tests.gateway.conftest import TOKEN, Gateway, serve_local
from whisperx_api import lifecycle as lc
from whisperx_api.records import PredictionRecord
from whisperx_api.store import Store
from whisperx_gateway.config import GatewayConfig
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


# --- long transcripts (outputs) ---

SPOKEN = ("the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "again")


def transcript(words: int) -> dict[str, Any]:
    """WhisperX's output for long speech: segments of ten words with word timings, and the
    words again in `word_segments`; about 140 bytes of JSON a word (7,000 words: 1 MB)."""
    segments, flat = [], []
    for n in range(words // len(SPOKEN)):
        start = n * 5.0
        timed = [
            {"word": w, "start": start + i * 0.4, "end": start + i * 0.4 + 0.3, "score": 0.912}
            for i, w in enumerate(SPOKEN)
        ]
        segments.append(
            {"start": start, "end": start + 4.8, "text": " ".join(SPOKEN), "words": timed}
        )
        flat += timed
    return {"segments": segments, "word_segments": flat, "detected_language": "en"}


async def store_finished(
    store: Store, namespace: str, outputs: list[dict[str, Any]], logs: dict[int, str]
) -> list[str]:
    """Finished predictions as the status writer leaves them (output, logs, then the
    record), created a second apart in this order; their ids."""
    ids = []
    first = datetime.now(UTC) - timedelta(hours=1)
    for n, output in enumerate(outputs):
        at = first + timedelta(seconds=n)
        state = lc.PredictionState()
        for event in (
            lc.Created(at=at),
            lc.Started(at=at),
            lc.Completed(status=lc.Phase.SUCCEEDED, at=at, predict_time=60.0),
        ):
            state = lc.apply(state, event).state
        prediction_id = f"longtranscript{n:04d}x"
        await store.put_output(namespace, prediction_id, output)
        await store.append_logs(namespace, prediction_id, logs.get(n, "Transcribing\n"))
        audio = {"audio_file": f"https://example.com/{n}.wav"}
        await store.put_record(PredictionRecord(prediction_id, namespace, audio, state))
        ids.append(prediction_id)
    return ids


# What a list answer carries besides its results array: the two links.
LINKS_BYTES = 1000


async def test_pages_of_long_transcripts_stay_within_the_budget_and_reach_all(
    redis_url: str,
) -> None:
    budget = 2_500_000
    # Outputs of 1, 2 and 3 MB (this one larger than the budget alone), smaller ones, and
    # logs whose JSON is three times what Redis holds ("\u00fc" for each "ü").
    words = [7000, 14000, 21000, 700, 3500, 14000, 70, 7000, 10500]
    outputs = [transcript(n) for n in words]
    async with serve_local(redis_url, concurrency=1, page_bytes=budget) as gw:
        ids = await store_finished(gw.store, "alpha", outputs, {4: "ü" * 150_000})
        async with aiohttp.ClientSession() as http:
            pages: list[list[str]] = []
            url: Any = gw.url + "/v1/predictions"
            while url:
                async with http.get(url, headers=gw.auth()) as resp:
                    raw = await resp.read()
                page = json.loads(raw)
                results = page["results"]
                assert len(raw) <= budget + LINKS_BYTES or len(results) == 1, (
                    len(raw),
                    len(results),
                )
                for item in results:  # whole: the transcript and logs as stored
                    n = ids.index(item["id"])
                    assert item["output"] == outputs[n]
                    assert item["logs"] == ("ü" * 150_000 if n == 4 else "Transcribing\n")
                pages.append([item["id"] for item in results])
                url = page["next"]
            back: list[str] = []
            url = page["previous"]
            while url:
                async with http.get(url, headers=gw.auth()) as resp:
                    raw = await resp.read()
                page = json.loads(raw)
                assert len(raw) <= budget + LINKS_BYTES or len(page["results"]) == 1
                back = [item["id"] for item in page["results"]] + back
                url = page["previous"]
    assert [i for p in pages for i in p] == ids[::-1]  # each once, newest first
    assert back == [i for p in pages[:-1] for i in p]
    assert [ids[2]] in pages  # 3 MB: alone on its page
    assert any(len(p) > 1 for p in pages)  # the budget is a bound, not one per page


def memory_mib(pid: int) -> tuple[float, float]:
    """A process's resident memory now and its peak (VmRSS, VmHWM), in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def test_twenty_lists_of_long_transcripts_at_once_keep_the_gateway_small(
    redis_url: str, tmp_path: Path
) -> None:
    """The `whisperx-gateway` process, default budget (4 MiB): eight finished predictions
    of 3 MB transcripts (about three hours of speech each), 20 lists at once, each page
    one transcript. Its peak resident memory grows by less than three budgets a request
    (240 MiB; measured: about 115 MiB). Without the budget (pages of all 24 MB) it grew by
    650 MiB and requests failed with 503: Redis replies timed out while the event loop
    rendered pages. So they did before this test, when records were read and parsed ten
    at a time and a page went past its budget by one prediction."""
    store = Store.from_url(redis_url)
    try:
        await store_finished(store, "alpha", [transcript(21000)] * 8, {})
    finally:
        await store.close()
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "REDIS_URL": redis_url,
        "WHISPERX_TOKENS": f"{TOKEN}=alpha", "WHISPERX_GATEWAY_HOST": "127.0.0.1",
        "WHISPERX_GATEWAY_PORT": str(port),
        # Listing reads Redis only; nothing listens here.
        "WHISPERX_KUBE_SERVER": f"http://127.0.0.1:{free_port()}",
    }  # fmt: skip
    gateway = GatewayProcess(env=env, log_path=tmp_path / "gateway.log")
    url = f"http://127.0.0.1:{port}/v1/predictions"
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def list_once(http: aiohttp.ClientSession) -> tuple[int, int]:
        size = 0
        async with http.get(url, headers=headers) as resp:
            async for chunk in resp.content.iter_chunked(1 << 16):
                size += len(chunk)
        return resp.status, size

    try:
        await gateway.start()
        assert gateway.process is not None
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await list_once(http)  # imports and first-use allocations out of the way
            before, _ = memory_mib(gateway.process.pid)
            answers = await asyncio.gather(*(list_once(http) for _ in range(20)))
        _, peak = memory_mib(gateway.process.pid)
    finally:
        await gateway.stop()
    budget_mib = GatewayConfig.page_bytes / (1 << 20)
    assert all(status == 200 for status, _ in answers), answers
    assert all(size <= 3_500_000 for _, size in answers), answers  # one transcript a page
    assert peak - before < 20 * 3 * budget_mib, (before, peak)
