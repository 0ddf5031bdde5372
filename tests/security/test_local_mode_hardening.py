"""Local mode's own attack surface: its data folder, its private Redis, its secrets.

One local mode per data folder (a second one refuses to start; a Redis orphaned by a
`kill -9` is stopped), the Redis has a password and its folder is private, the token is
not on the command line and runners inherit neither it nor the files key, Redis dying
is recovered from with bounded logging, and a crash leaves no input file behind.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import stat
import struct
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError

from tests.conftest import free_port
from tests.gateway.conftest import STAND_IN_RUNNER, WHISPERX_LOCAL, local_mode
from whisperx_api.store import Store
from whisperx_gateway.local_backend import LocalBackend, LocalSettings
from whisperx_gateway.private_redis import PID_FILE

HANG = {"audio_file": "data:audio/wav;base64,UklGRg==", "initial_prompt": "stand-in:hang"}
ARGS = ("--runner-command", " ".join(STAND_IN_RUNNER))


def alive(pid: int) -> bool:
    try:
        return b"zombie" not in Path(f"/proc/{pid}/status").read_bytes().lower()
    except OSError:
        return False


async def until(predicate: object, seconds: float = 10) -> None:
    assert callable(predicate)
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


def command_line(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def redis_pid(data: Path) -> int:
    return int((data / PID_FILE).read_text())


async def test_a_second_local_mode_on_the_same_data_refuses_to_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with local_mode(tmp_path / "first.log", *ARGS, "--data-dir", str(data)):
        second = await asyncio.create_subprocess_exec(
            WHISPERX_LOCAL, "--port", str(free_port()), "--data-dir", str(data), *ARGS,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode != 0
        assert b"in use by another whisperx-local" in output, output


async def test_an_orphaned_redis_on_the_data_folder_is_stopped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    binary = shutil.which("redis-server")
    assert binary is not None
    orphan = await asyncio.create_subprocess_exec(
        binary, "--port", str(free_port()), "--bind", "127.0.0.1", "--dir", str(data),
        "--pidfile", str(data / PID_FILE), "--appendonly", "yes",
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await until(lambda: (data / PID_FILE).exists())
        async with local_mode(tmp_path / "local.log", *ARGS, "--data-dir", str(data)) as local:
            assert orphan.returncode is not None or not alive(orphan.pid)
            assert "stopping an orphaned redis-server" in local.log()
            assert redis_pid(data) != orphan.pid
    finally:
        if orphan.returncode is None:
            orphan.kill()
        await orphan.wait()


async def test_the_private_redis_dies_with_a_killed_local_mode(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with local_mode(tmp_path / "local.log", *ARGS, "--data-dir", str(data)) as local:
        pid = redis_pid(data)
        local.process.kill()  # no cleanup at all
        await local.process.wait()
        await until(lambda: not alive(pid))


async def test_the_private_redis_has_a_password_and_private_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    async with local_mode(tmp_path / "local.log", *ARGS, "--data-dir", str(data)) as local:
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE((data / "redis.conf").stat().st_mode) == 0o600
        port = re.search(r"redis-server at 127\.0\.0\.1:(\d+)", local.log())
        assert port, local.log()
        client = aioredis.Redis(port=int(port[1]))
        try:
            with pytest.raises((AuthenticationError, ResponseError), match=r"(?i)auth"):
                await client.get("wx:local:files-key")
        finally:
            await client.aclose()
        for pid in (local.process.pid, redis_pid(data)):  # what `ps` shows
            cmdline = command_line(pid)
            assert local.token.encode() not in cmdline and b"requirepass" not in cmdline


async def test_local_mode_recovers_when_its_redis_dies(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with (
        local_mode(tmp_path / "local.log", *ARGS, "--data-dir", str(data)) as local,
        aiohttp.ClientSession() as http,
    ):
        first = redis_pid(data)
        os.kill(first, 9)
        await until(lambda: not alive(first))
        statuses = []
        for _ in range(300):
            async with http.get(local.url + "/v1/predictions", headers=local.auth()) as resp:
                statuses.append(resp.status)
            if resp.status == 200 and redis_pid(data) != first:
                break
            await asyncio.sleep(0.05)
        assert statuses[-1] == 200, statuses
        for _ in range(200):  # the event subscription reconnects with a backoff
            async with http.get(local.url + "/ready") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.05)
        assert resp.status == 200
        log = local.log()
        assert "Traceback" not in log
        assert log.count("unavailable") < 20, log


@pytest.mark.parametrize("runner", ["stand-in", pytest.param("real", marks=pytest.mark.whisperx)])
async def test_a_secret_input_is_never_written_to_disk(tmp_path: Path, runner: str) -> None:
    """It reaches the runner with its work, in memory: even a killed local mode leaves
    it in no file (not in its data folder, not in Redis's, not in the temporary folder,
    where runners fetch and decode the audio and where the input file used to be)."""
    data, temp = tmp_path / "local-data", tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    args = ("--data-dir", str(data), *(ARGS if runner == "stand-in" else ()))
    given = {**HANG, "huggingface_access_token": "hf_x1y2"}
    if runner == "real":  # two seconds of silence: the runner is killed while on it
        given = {"audio_file": silence_data_uri(2.0), "huggingface_access_token": "hf_x1y2"}
    log = tmp_path / "first.log"
    async with local_mode(log, *args, env=env) as local, aiohttp.ClientSession() as http:
        body = {"version": "whisperx", "input": given}
        async with http.post(local.url + "/v1/predictions", json=body, headers=local.auth()) as r:
            created = await r.json()
        url = f"{local.url}/v1/predictions/{created['id']}"

        for _ in range(1200):
            async with http.get(url, headers=local.auth()) as resp:
                if (await resp.json())["status"] == "processing":
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the prediction never started:\n{local.log()}")
        local.process.kill()
        await local.process.wait()
    files = [path for path in data.rglob("*") if path.is_file()]
    assert files  # Redis's own files at least
    files += [path for path in temp.rglob("*") if path.is_file()]
    assert not [path for path in files if b"hf_x1y2" in path.read_bytes()]


def silence_data_uri(seconds: float) -> str:
    rate = 16000
    samples = bytes(2 * int(rate * seconds))
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    wav = b"WAVEfmt " + fmt + b"data" + struct.pack("<I", len(samples)) + samples
    wav = b"RIFF" + struct.pack("<I", len(wav)) + wav
    return "data:audio/wav;base64," + base64.b64encode(wav).decode()


async def test_runners_inherit_neither_the_token_nor_the_files_key(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("WHISPERX_LOCAL_TOKEN", "WHISPERX_FILES_KEY", "WHISPERX_WEBHOOK_SECRET"):
        monkeypatch.setenv(name, "secret-value")
    store = Store.from_url(redis_url)
    backend = LocalBackend(
        store,
        LocalSettings(runner_command=["true"], model="tiny.en"),
        report_key=b"k",
        webhook_secret="whsec_AAAA",
        public_url="http://127.0.0.1:1",
    )
    env = backend._runner_env()
    assert "secret-value" not in env.values()
    await store.close()


async def test_the_token_can_come_from_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token-4567\n")
    args = (*ARGS, "--token-file", str(token_file))
    async with local_mode(tmp_path / "local.log", *args) as local, aiohttp.ClientSession() as http:
        for token, status in (("file-token-4567", 200), (local.token, 401)):
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(local.url + "/v1/predictions", headers=headers) as resp:
                assert resp.status == status
