"""The official `replicate` Python client pointed at the gateway, and client webhooks
verified with the client's own validation helper.

The client is synchronous (httpx): its calls run in a worker thread while the gateway
serves on this test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from replicate.client import Client
from replicate.exceptions import ModelError, ReplicateError
from replicate.helpers import base64_encode_file
from replicate.webhook import InvalidSignatureError, Webhooks, WebhookSigningSecret

from tests.gateway.conftest import (
    OTHER_TOKEN,
    TOKEN,
    Gateway,
    Receiver,
    call,
    completed,
    serve_local,
)

AUDIO = "data:audio/wav;base64,UklGRg=="


@pytest.fixture
def client(gateway: Gateway) -> Client:
    # Only the base URL and the token differ from code written for Replicate.
    return Client(api_token=TOKEN, base_url=gateway.url)


async def test_run_returns_the_output(client: Client) -> None:
    output = cast(
        "dict[str, Any]", await call(client.run, "acme/whisperx", input={"audio_file": AUDIO})
    )
    assert output["detected_language"] == "en"
    assert output["segments"][0]["text"] == f"audio of {len(AUDIO)} characters"


async def test_run_with_a_short_wait_falls_back_to_polling(client: Client) -> None:
    # The 1 s wait runs out while the runner works: the answer must say `starting`, or
    # the client would return a prediction that has no output yet.
    slow = {"audio_file": AUDIO, "initial_prompt": "stand-in:slow"}
    output = cast("dict[str, Any]", await call(client.run, "acme/whisperx", input=slow, wait=1))
    assert output["segments"][0]["text"].startswith("audio of")


async def test_run_with_a_version_and_a_local_file(client: Client, fox_wav: Path) -> None:
    model = await call(client.models.get, "acme/whisperx-a40-large")
    assert model.latest_version is not None
    schema = model.latest_version.openapi_schema["components"]["schemas"]
    assert "audio_file" in schema["Input"]["properties"]
    with fox_wav.open("rb") as audio:
        output = cast(
            "dict[str, Any]",
            await call(
                client.run,
                f"acme/whisperx-a40-large:{model.latest_version.id}",
                input={"audio_file": audio},
                file_encoding_strategy="base64",
            ),
        )
    with fox_wav.open("rb") as audio:
        data_uri = base64_encode_file(audio)
    assert output["segments"][0]["text"] == f"audio of {len(data_uri)} characters"


async def test_predictions_create_get_list_cancel_wait(client: Client) -> None:
    hang = {"audio_file": AUDIO, "initial_prompt": "stand-in:hang"}
    running = await call(client.models.predictions.create, model="acme/whisperx", input=hang)
    assert running.status == "starting"
    done = await call(client.predictions.create, version="whisperx", input={"audio_file": AUDIO})
    await call(done.wait)
    assert done.status == "succeeded" and done.output is not None
    assert done.output["detected_language"] == "en"
    assert done.metrics is not None and done.metrics["predict_time"] == 0.01

    fetched = await call(client.predictions.get, done.id)
    assert fetched.dict() == done.dict()

    page = await call(client.predictions.list)
    assert [p.id for p in page.results] == [done.id, running.id]

    await call(running.cancel)
    status: str = running.status  # cancel() changed it: not the "starting" narrowed above
    assert status == "canceled"
    with pytest.raises(ReplicateError) as info:
        await call(client.predictions.cancel, done.id)
    assert info.value.status == 409 and "already ended" in str(info.value.detail)


async def test_client_pages_through_a_long_list(redis_url: str) -> None:
    async with serve_local(redis_url, page_size=2) as gw:
        client = Client(api_token=TOKEN, base_url=gw.url)
        created = [
            (
                await call(
                    client.predictions.create, version="whisperx", input={"audio_file": AUDIO}
                )
            ).id
            for _ in range(5)
        ]
        seen: list[str] = []
        page = await call(client.predictions.list)
        while True:
            seen += [p.id for p in page.results]
            if page.next is None:
                break
            page = await call(client.predictions.list, page.next)
        assert seen == created[::-1]


async def test_client_errors_carry_status_and_detail(client: Client) -> None:
    with pytest.raises(ReplicateError) as info:
        await call(client.run, "acme/whisperx", input={"audio_file": AUDIO, "batch_size": 0})
    assert info.value.status == 422 and "input.batch_size" in str(info.value.detail)
    with pytest.raises(ReplicateError) as info:
        await call(client.run, "acme/unknown", input={"audio_file": AUDIO})
    assert info.value.status == 404
    with pytest.raises(ModelError) as failed:
        await call(
            client.run,
            "acme/whisperx",
            input={"audio_file": AUDIO, "initial_prompt": "stand-in:fail"},
        )
    assert failed.value.prediction.error == "stand-in: simulated failure"
    stranger = Client(api_token="not-a-valid-token", base_url=client._base_url)
    with pytest.raises(ReplicateError) as info:
        await call(stranger.predictions.list)
    assert info.value.status == 401


# --- webhooks ---


async def test_webhooks_are_signed_as_replicate_signs_them(
    client: Client, gateway: Gateway, receiver: Receiver
) -> None:
    slow = {"audio_file": AUDIO, "initial_prompt": "stand-in:slow"}
    prediction = await call(
        client.predictions.create, version="whisperx", input=slow, webhook=receiver.url
    )
    await receiver.wait_for(completed)
    secret = await call(client.webhooks.default.secret)
    assert secret.key.startswith("whsec_")
    for headers, body in receiver.deliveries:
        Webhooks.validate(headers=headers, body=body, secret=secret, tolerance=60)
    events = [b["status"] for b in receiver.bodies()]
    assert events[0] == "processing" and events[-1] == "succeeded"  # start ... completed
    assert prediction.urls is not None
    # The completed webhook carries the body of GET /v1/predictions/{id}.
    async with (
        aiohttp.ClientSession() as http,
        http.get(prediction.urls["get"], headers=gateway.auth()) as resp,
    ):
        assert receiver.bodies()[-1] == await resp.json()

    headers, body = receiver.deliveries[-1]
    with pytest.raises(InvalidSignatureError):
        Webhooks.validate(headers=headers, body=body.replace("succeeded", "failed"), secret=secret)
    other = WebhookSigningSecret(key="whsec_" + base64.b64encode(b"k" * 32).decode())
    with pytest.raises(InvalidSignatureError):
        Webhooks.validate(headers=headers, body=body, secret=other)


async def test_webhook_events_filter_and_retried_terminal_delivery(
    client: Client, receiver: Receiver
) -> None:
    receiver.failures = [500]  # the first attempt fails; the retry must come
    await call(
        client.predictions.create,
        version="whisperx",
        input={"audio_file": AUDIO},
        webhook=receiver.url,
        webhook_events_filter=["completed"],
    )
    await receiver.wait_for(completed)
    assert [b["status"] for b in receiver.bodies()] == ["succeeded"]
    assert receiver.failures == []


async def _retry_scheduled(gw: Gateway) -> bool:
    keys = await gw.store.redis.keys("wx:wh:d:*")
    return len(keys) == 1 and await gw.store.redis.hget(keys[0], "attempts") == "1"


async def test_a_pending_terminal_webhook_survives_a_restart(
    redis_url: str, receiver: Receiver
) -> None:
    receiver.failures = [503]
    async with serve_local(redis_url) as gw:
        client = Client(api_token=TOKEN, base_url=gw.url)
        prediction = await call(
            client.predictions.create,
            version="whisperx",
            input={"audio_file": AUDIO},
            webhook=receiver.url,
            webhook_events_filter=["completed"],
        )
        deadline = time.monotonic() + 20
        while not await _retry_scheduled(gw):  # the first attempt was refused
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert receiver.deliveries == []
    async with serve_local(redis_url):  # a new process delivers it
        await receiver.wait_for(completed)
    assert [(b["id"], b["status"]) for b in receiver.bodies()] == [(prediction.id, "succeeded")]


# --- files ---


async def test_a_local_file_is_uploaded_and_the_runner_fetches_it(
    client: Client, gateway: Gateway, fox_wav: Path
) -> None:
    # The client's default for a file input: upload it, pass its URL.
    with fox_wav.open("rb") as audio:
        output = cast(
            "dict[str, Any]", await call(client.run, "acme/whisperx", input={"audio_file": audio})
        )
    content = await asyncio.to_thread(fox_wav.read_bytes)
    size = len(content)
    assert output["segments"][0]["text"] == f"audio of {size} bytes"

    (uploaded,) = await call(client.files.list)
    assert (uploaded.name, uploaded.size, uploaded.content_type) == ("fox.wav", size, "audio/x-wav")
    assert (await call(client.files.get, uploaded.id)).checksums == uploaded.checksums
    link = uploaded.urls["get"]
    async with aiohttp.ClientSession() as http:
        async with http.get(link) as resp:  # no token: the link is signed
            assert resp.status == 200 and await resp.read() == content
        async with http.get(link.replace("signature=", "signature=0")) as resp:
            assert resp.status == 403
        other = {"Authorization": f"Bearer {OTHER_TOKEN}"}
        async with http.get(f"{gateway.url}/v1/files/{uploaded.id}", headers=other) as resp:
            assert resp.status == 404
    assert await call(client.files.delete, uploaded.id)
    async with aiohttp.ClientSession() as http, http.get(link) as resp:
        assert resp.status == 404
