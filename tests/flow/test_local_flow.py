"""Local mode, what tests/local leaves out: tests/local/test_local_mode.py already runs
the official client against `whisperx-local` with the real runner on espeak-ng speech
(the right words, with word timings). Here: canceling a long prediction stops the real
runner's process, and the client webhooks of that run are signed as Replicate signs them.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from replicate.client import Client

from tests.flow.conftest import (
    AudioSource,
    HookReceiver,
    alive,
    call,
    local_runner_pid,
)
from tests.gateway.conftest import local_mode
from tests.kube_fixtures import wait_for


@pytest.mark.whisperx
async def test_cancel_stops_the_real_runner_and_its_webhooks_are_signed(
    tmp_path: Path, redis_url: str, model_dir: Path, fox_url: AudioSource, hooks: HookReceiver
) -> None:
    # fox_url is another loopback server: allowed explicitly (by default runners reach
    # only the gateway's own port).
    args = (
        "--redis-url",
        redis_url,
        "--model-dir",
        str(model_dir),
        "--allow-hosts",
        urlsplit(fox_url.url).netloc,
    )
    async with local_mode(tmp_path / "local.log", *args) as local:
        client = Client(api_token=local.token, base_url=local.url)
        prediction = await call(
            client.predictions.create,
            version="whisperx",
            input={"audio_file": fox_url.url, "align_output": True},
            webhook=hooks.url,  # every event
        )
        pid = await local_runner_pid(local.log, prediction.id)
        # The `start` webhook: the runner is up; transcribing takes it seconds more.
        await hooks.wait_for(lambda: bool(hooks.accepted(prediction.id)))
        assert hooks.accepted(prediction.id)[0].data["status"] == "processing"
        assert alive(pid)
        await call(prediction.cancel)
        assert prediction.status == "canceled"
        await wait_for(lambda: not alive(pid), within=15)
        exited = re.compile(r"runner \w+ exited with code 143 after 1 prediction")
        await wait_for(lambda: exited.search(local.log()), within=5)  # by SIGTERM, not killed

        terminal = await hooks.terminal_once(prediction.id, "canceled")
        hooks.validate_all(await call(client.webhooks.default.secret))
        async with (
            aiohttp.ClientSession() as http,
            http.get(prediction.urls["get"], headers=local.auth()) as resp,
        ):
            assert terminal.data == await resp.json()
        assert terminal.data["output"] is None and terminal.data["completed_at"]
