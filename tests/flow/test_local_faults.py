"""Faults in local mode (`whisperx-local`, predictions in Redis, runners as local
processes), as on the cluster path where they apply: a killed runner, Redis restarts,
and local mode itself killed during `Prefer: wait`.

Local mode's deliberate outcome for a crash of its own: its runners die with it, so
the work is lost; the next start ends every prediction the crashed process accepted and
never finished as failed (`Interrupted`, "submit it again"), and sends its terminal
webhook. Finished predictions keep their output.

The runner kill uses the real runner; the Redis restart and the local-mode kill use the
cluster's stand-in (tests/operator/fake_runner.py), for a run of known length.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from replicate.client import Client

from tests.conftest import RedisServer
from tests.flow.conftest import (
    NS,
    STAND_IN_COMMAND,
    AudioSource,
    HookReceiver,
    alive,
    call,
    kill_process_group,
    local_runner_pid,
    pending_deliveries,
    stored_record,
    wait_for_status,
    waiting_requests,
)
from tests.gateway.conftest import LocalMode, local_mode
from tests.kube_fixtures import wait_for
from whisperx_api.store import Store
from whisperx_gateway.local_backend import ACTIVE_KEY

INTERRUPTED = "local mode stopped before the prediction finished; submit it again"


async def reason_of(redis_url: str, prediction_id: str) -> str | None:
    record = await stored_record(redis_url, prediction_id)
    assert record is not None
    return record.state.reason


def client_of(local: LocalMode) -> Client:
    return Client(api_token=local.token, base_url=local.url)


async def kill(local: LocalMode) -> None:
    """SIGKILL: a crash, no cleanup."""
    local.process.kill()
    await asyncio.wait_for(local.process.wait(), 10)


@pytest.mark.whisperx
async def test_a_killed_runner_fails_the_prediction_with_the_reason(
    tmp_path: Path, redis_url: str, model_dir: Path, fox_url: AudioSource, hooks: HookReceiver
) -> None:
    args = (
        "--redis-url",
        redis_url,
        "--model-dir",
        str(model_dir),
        "--allow-hosts",
        urlsplit(fox_url.url).netloc,
    )
    async with local_mode(tmp_path / "local.log", *args) as local:
        client = client_of(local)
        prediction = await call(
            client.predictions.create,
            version="whisperx",
            input={"audio_file": fox_url.url},
            webhook=hooks.url,
            webhook_events_filter=["completed"],
        )
        pid = await local_runner_pid(local.log, prediction.id)
        await wait_for_status(client, prediction.id, {"processing"})
        kill_process_group(pid)
        ended = await wait_for_status(client, prediction.id, {"succeeded", "failed", "canceled"})
        secret = await call(client.webhooks.default.secret)
    assert ended.status == "failed"
    assert ended.error.startswith("the runner was killed by SIGKILL"), ended.error
    assert await reason_of(redis_url, prediction.id) == "RunnerExited"
    delivery = await hooks.terminal_once(prediction.id, "failed")
    assert delivery.data["error"] == ended.error
    hooks.validate_all(secret)


async def test_redis_restarts_mid_prediction_and_after_it_lose_nothing(
    tmp_path: Path, redis_server: RedisServer, redis_url: str, hooks: HookReceiver
) -> None:
    args = ("--redis-url", redis_url, "--runner-command", STAND_IN_COMMAND)
    async with local_mode(tmp_path / "local.log", *args) as local:
        client = client_of(local)
        hooks.refusing = True  # the terminal webhook stays pending in the outbox
        prediction = await call(
            client.predictions.create,
            version="whisperx",
            input={"audio_file": "https://fake.test/succeed?seconds=4"},
            webhook=hooks.url,
            webhook_events_filter=["completed"],
        )
        pid = await local_runner_pid(local.log, prediction.id)
        await wait_for_status(client, prediction.id, {"processing"})
        await asyncio.to_thread(redis_server.restart)  # AOF on
        assert alive(pid)  # mid-prediction: its end is still to be reported

        ended = await wait_for_status(client, prediction.id, {"succeeded", "failed"})
        assert ended.status == "succeeded", ended.error

        async def retry_scheduled() -> bool:
            pending = await pending_deliveries(redis_url, prediction.id)
            return len(pending) == 1 and pending[0]["attempts"] == "1"

        # The first attempt was refused and its retry written back (not merely leased).
        await wait_for(retry_scheduled, within=20)
        await asyncio.to_thread(redis_server.restart)
        (pending,) = await pending_deliveries(redis_url, prediction.id)
        assert pending["event"] == "completed"

        record = await stored_record(redis_url, prediction.id)
        assert record is not None and record.state.phase.value == "succeeded"
        got = await call(client.predictions.get, prediction.id)
        assert got.status == "succeeded"
        assert got.output["segments"][0]["text"] == " the quick brown fox"
        assert "loading model" in got.logs and "transcribed" in got.logs
        hooks.refusing = False
        delivery = await hooks.terminal_once(prediction.id, "succeeded")
        assert delivery.webhook_id == pending["key"].removeprefix("wx:wh:d:")
        assert delivery.data["output"] == got.output
        hooks.validate_all(await call(client.webhooks.default.secret))


async def test_local_mode_killed_during_prefer_wait_ends_the_prediction_on_restart(
    tmp_path: Path, redis_url: str, hooks: HookReceiver
) -> None:
    args = ("--redis-url", redis_url, "--runner-command", STAND_IN_COMMAND)
    async with local_mode(tmp_path / "first.log", *args) as first:
        client = client_of(first)
        done = await call(
            client.run, "whisperx/whisperx", input={"audio_file": "https://fake.test/succeed"}
        )
        held = asyncio.create_task(
            call(
                client.run,
                "whisperx/whisperx",
                input={"audio_file": "https://fake.test/hang"},
                webhook=hooks.url,
                webhook_events_filter=["completed"],
            )
        )
        created = re.compile(rf"prediction {NS}/(\w+) created")

        def two_created() -> list[str] | None:
            ids = created.findall(first.log())
            return ids if len(ids) == 2 else None

        ids = await wait_for(two_created, within=20)
        held_id = ids[1]
        pid = await local_runner_pid(first.log, held_id)

        async def held_open() -> bool:
            return await waiting_requests(first.url) == 1

        await wait_for(held_open, within=20)
        await kill(first)
        with pytest.raises(httpx.TransportError):
            await held
        try:  # the runner dies with it (a parent-death signal), not transcribing on
            await wait_for(lambda: not alive(pid), within=5)
        finally:
            kill_process_group(pid)

    async with local_mode(tmp_path / "second.log", *args) as second:
        client = client_of(second)
        page = await call(client.predictions.list)
        by_id = {p.id: p for p in page.results}
        assert len(by_id) == 2
        interrupted = by_id[held_id]
        assert interrupted.status == "failed" and interrupted.error == INTERRUPTED
        assert await reason_of(redis_url, held_id) == "Interrupted"
        finished = next(p for p in page.results if p.id != held_id)
        assert finished.status == "succeeded" and finished.output == done
        delivery = await hooks.terminal_once(held_id, "failed")
        hooks.validate_all(await call(client.webhooks.default.secret))
        assert delivery.data["error"] == INTERRUPTED
        assert await active_marks(redis_url) == set()  # nothing left to end


async def active_marks(redis_url: str) -> set[str]:
    """Predictions local mode has marked as accepted and not finished."""
    store = Store.from_url(redis_url)
    try:
        return {str(m) for m in await store.redis.smembers(ACTIVE_KEY)}
    finally:
        await store.close()


async def test_local_mode_stopped_during_prefer_wait_answers_and_stops_at_once(
    tmp_path: Path, redis_url: str
) -> None:
    """Ctrl-C (SIGTERM) while a client holds `Prefer: wait`: the held request is answered
    (`starting`), local mode stops promptly and ends what it ran as Interrupted."""
    args = ("--redis-url", redis_url, "--runner-command", STAND_IN_COMMAND)
    async with local_mode(tmp_path / "first.log", *args) as first:
        client = client_of(first)
        held = asyncio.create_task(
            call(
                client.predictions.create,
                version="whisperx",
                input={"audio_file": "https://fake.test/hang"},
                wait=True,
            )
        )

        async def held_open() -> bool:
            return await waiting_requests(first.url) == 1

        await wait_for(held_open, within=20)
        first.process.terminate()
        try:
            await asyncio.wait_for(first.process.wait(), 10)
        except TimeoutError:
            first.process.kill()
            raise AssertionError("whisperx-local did not stop within 10 s") from None
        assert first.process.returncode == 0
        prediction = await held
        assert prediction.status == "starting"
    assert await reason_of(redis_url, prediction.id) == "Interrupted"
