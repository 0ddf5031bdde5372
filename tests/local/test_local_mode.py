"""`whisperx-local`, the one command: its own Redis, the real runner on real speech, and
progress visible in its log and in the prediction's `logs`."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from replicate.client import Client
from replicate.exceptions import ReplicateError

from tests.gateway.conftest import STAND_IN_RUNNER, WHISPERX_LOCAL, call, local_mode

AUDIO = "data:audio/wav;base64,UklGRg=="


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_it_starts_a_private_redis_stops_it_and_keeps_the_data(tmp_path: Path) -> None:
    args = ("--data-dir", str(tmp_path / "data"), "--runner-command", " ".join(STAND_IN_RUNNER))
    async with local_mode(tmp_path / "first.log", *args) as local:
        client = Client(api_token=local.token, base_url=local.url)
        prediction = await call(
            client.predictions.create, version="whisperx", input={"audio_file": AUDIO}, wait=30
        )
        assert prediction.status == "succeeded"
        found = re.search(r"private redis-server at 127\.0\.0\.1:(\d+)", local.log())
        assert found, local.log()
        redis_port = int(found[1])
        assert _port_open(redis_port)
        log = local.log()
        assert f"prediction default/{prediction.id} created" in log
        assert f"prediction default/{prediction.id}: on runner" in log
    assert local.process.returncode == 0
    assert not await asyncio.to_thread(_port_open, redis_port)  # stopped with local mode
    assert f"prediction default/{prediction.id} succeeded" in local.log()

    async with local_mode(tmp_path / "second.log", *args) as again:
        client = Client(api_token=again.token, base_url=again.url)
        kept = await call(client.predictions.get, prediction.id)
        assert kept.status == "succeeded" and kept.output == prediction.output


@pytest.mark.whisperx
async def test_the_real_runner_transcribes_speech_with_word_timings(
    tmp_path: Path, redis_url: str, fox_wav: Path, model_dir: Path
) -> None:
    """The whole flow on one machine: the official client, the gateway, the lifecycle,
    `whisperx-runner run` with tiny.en on CPU, espeak-ng speech.

    Word timings come from alignment; no registry package ships real English alignment
    weights, so `model_dir` holds the runner tests' tiny random-weight aligner: the words
    are the real model's, their timings are checked for consistency, not accuracy.
    """
    async with local_mode(
        tmp_path / "local.log", "--redis-url", redis_url, "--model-dir", str(model_dir)
    ) as local:
        client = Client(api_token=local.token, base_url=local.url)
        with fox_wav.open("rb") as audio:  # uploaded; the runner downloads it by URL
            prediction = await call(
                client.models.predictions.create,
                model="whisperx/whisperx",
                input={"audio_file": audio, "align_output": True},
            )
        assert prediction.input is not None
        assert prediction.input["audio_file"].startswith(f"{local.url}/v1/files/")
        await asyncio.wait_for(call(prediction.wait), 240)
    assert prediction.status == "succeeded", (prediction.error, prediction.logs, local.log())
    output = prediction.output
    assert output is not None
    assert output["detected_language"] == "en"
    text = " ".join(s["text"].strip() for s in output["segments"]).lower()
    assert "quick brown fox" in text and "lazy dog" in text
    words = [w for s in output["segments"] for w in s["words"]]
    spoken = [re.sub(r"\W", "", w["word"].lower()) for w in words]
    assert spoken[:4] == ["the", "quick", "brown", "fox"] and spoken[-2:] == ["lazy", "dog"]
    assert prediction.metrics is not None
    duration = prediction.metrics["audio_duration"]
    starts = [w["start"] for w in words]
    assert starts == sorted(starts)
    for word in words:
        assert 0 <= word["start"] <= word["end"] <= duration + 0.1, word
    # Progress is visible: the runner's in `logs`, start and end in local mode's log.
    assert prediction.logs is not None
    assert "Transcribing" in prediction.logs and "Aligning" in prediction.logs
    assert f"prediction default/{prediction.id}: on runner" in local.log()
    assert f"prediction default/{prediction.id} succeeded" in local.log()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_runners_die_with_a_killed_local_mode(tmp_path: Path, redis_url: str) -> None:
    args = ("--redis-url", redis_url, "--runner-command", " ".join(STAND_IN_RUNNER))
    async with local_mode(tmp_path / "local.log", *args) as local:
        client = Client(api_token=local.token, base_url=local.url)
        hang = {"audio_file": AUDIO, "initial_prompt": "stand-in:hang"}
        prediction = await call(client.predictions.create, version="whisperx", input=hang)
        pattern = rf"prediction default/{prediction.id}: on runner \w+ \(pid (\d+)"
        for _ in range(200):
            found = re.search(pattern, local.log())
            if found:
                break
            await asyncio.sleep(0.05)
        assert found, local.log()
        runner = int(found[1])
        local.process.kill()  # no cleanup at all
        await local.process.wait()
        for _ in range(100):
            if not _alive(runner):
                break
            await asyncio.sleep(0.05)
        assert not _alive(runner), "the runner outlived local mode"


async def test_the_gateways_settings_apply_in_local_mode(tmp_path: Path, redis_url: str) -> None:
    args = ("--redis-url", redis_url, "--runner-command", " ".join(STAND_IN_RUNNER))
    env = {**os.environ, "WHISPERX_PAGE_SIZE": "1", "WHISPERX_MAX_BODY_BYTES": "2048"}
    async with local_mode(tmp_path / "local.log", *args, env=env) as local:
        client = Client(api_token=local.token, base_url=local.url)
        for _ in range(2):
            created = await call(
                client.predictions.create, version="whisperx", input={"audio_file": AUDIO}
            )
            await asyncio.wait_for(call(created.wait), 30)
        page = await call(client.predictions.list)
        assert len(page.results) == 1 and page.next is not None
        big = {"audio_file": AUDIO, "initial_prompt": "x" * 4096}
        with pytest.raises(ReplicateError) as refused:
            await call(client.predictions.create, version="whisperx", input=big)
        assert refused.value.status == 413


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("WHISPERX_PAGE_SIZE", "ten", "WHISPERX_PAGE_SIZE must be an integer"),
        ("WHISPERX_MAX_IN_FLIGHT", "0", "WHISPERX_MAX_IN_FLIGHT must be at least 1"),
        ("WHISPERX_GATEWAY_PORT", "http", "argument --port: invalid int value: 'http'"),
        ("WHISPERX_LOCAL_IDLE_SECONDS", "soon", "argument --idle-seconds"),
    ],
)
def test_a_bad_setting_stops_local_mode_naming_it(
    tmp_path: Path, name: str, value: str, named: str
) -> None:
    env = {**os.environ, name: value, "XDG_STATE_HOME": str(tmp_path)}
    ended = subprocess.run(
        [WHISPERX_LOCAL], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert ended.returncode == 2 and named in ended.stderr, ended.stderr
    assert not (tmp_path / "whisperx-local").exists()  # refused before anything started
