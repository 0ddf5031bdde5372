"""The address guard's allow-list, and local mode's default: the gateway's files only.

Before, local mode allow-listed all of 127.0.0.1, so any caller's `audio_file` reached
the private Redis and the report endpoint, and the differing errors mapped which
loopback ports were open.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any

import pytest
from replicate.client import Client

from tests.conftest import free_port
from tests.gateway.conftest import STAND_IN_RUNNER, call, local_mode
from tests.runner.conftest import AudioServer
from whisperx_api.netguard import AddressRefused, HostAllowList, check_address, check_url
from whisperx_gateway.local import gateway_endpoint
from whisperx_runner.config import RunnerConfig
from whisperx_runner.errors import InputError
from whisperx_runner.fetch import fetch_audio

LOOPBACK = ipaddress.ip_address("127.0.0.1")


def test_a_host_port_entry_admits_that_port_only() -> None:
    allow = HostAllowList.parse("127.0.0.1:8000, [::1]:9000 Gateway.Local.:8080")
    check_address("127.0.0.1", LOOPBACK, allow, 8000)
    check_address("::1", ipaddress.ip_address("::1"), allow, 9000)
    check_address("gateway.local", ipaddress.ip_address("10.0.0.7"), allow, 8080)
    check_url("http://127.0.0.1:8000/v1/files/x", allow)
    for host, address, port in [
        ("127.0.0.1", LOOPBACK, 6379),
        ("127.0.0.1", LOOPBACK, None),
        ("::1", ipaddress.ip_address("::1"), 8000),
        ("gateway.local", ipaddress.ip_address("10.0.0.7"), 6379),
    ]:
        with pytest.raises(AddressRefused):
            check_address(host, address, allow, port)
    with pytest.raises(AddressRefused):
        check_url("http://127.0.0.1/", allow)  # port 80


def test_a_host_port_path_entry_admits_that_path_only() -> None:
    allow = HostAllowList.parse("127.0.0.1:8000/v1/files/, 10.0.0.0/8, [::1]:9000/a/")
    check_url("http://127.0.0.1:8000/v1/files/default/f1/download?expires=1", allow)
    check_url("http://[::1]:9000/a/b", allow)
    check_url("http://10.1.2.3:8000/metrics", allow)  # a CIDR, not a path entry
    for url in [
        "http://127.0.0.1:8000/metrics",
        "http://127.0.0.1:8000/v1/files",  # the folder's name, not under it
        "http://127.0.0.1:8000/v1/files/../predictions",  # as the client would send it
        "http://127.0.0.1:8000/v1/files/%2e%2e/predictions",
        "http://127.0.0.1:6379/v1/files/x",
    ]:
        with pytest.raises(AddressRefused):
            check_url(url, allow)


@pytest.mark.parametrize(
    ("public_url", "entry"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000/v1/files/"),
        ("http://[::1]:8001", "[::1]:8001/v1/files/"),
        ("http://localhost", "localhost:80/v1/files/"),
        ("http://localhost:8000/whisperx/", "localhost:8000/whisperx/v1/files/"),
    ],
)
def test_local_mode_allows_the_gateway_files_only(public_url: str, entry: str) -> None:
    assert gateway_endpoint(public_url) == entry


async def test_the_runner_reaches_the_allowed_port_and_path_and_no_other(
    tmp_path: Path, audio_server: AudioServer
) -> None:
    port = int(audio_server.base.rsplit(":", 1)[1])
    config = RunnerConfig(allow_hosts=HostAllowList.parse(f"127.0.0.1:{port}/fox"))
    assert (await fetch_audio(audio_server.url("/fox.wav"), tmp_path, config)).stat().st_size
    for other in (f"http://127.0.0.1:{free_port()}/", f"http://localhost:{port}/fox.wav"):
        with pytest.raises(InputError, match="loopback address; refused") as caught:
            await fetch_audio(other, tmp_path, config)
        assert caught.value.reason == "AddressRefused"
    with pytest.raises(InputError, match="other paths only; refused") as caught:
        await fetch_audio(audio_server.url("/other.wav"), tmp_path, config)
    assert caught.value.reason == "AddressRefused"


async def test_local_mode_by_default_lets_runners_reach_its_files_not_its_redis(
    tmp_path: Path,
) -> None:
    """Without --allow-hosts, a runner fetches an uploaded file from the gateway, but an
    `audio_file` naming the private Redis's port (also loopback) is refused."""
    env = {k: v for k, v in os.environ.items() if k != "WHISPERX_ALLOW_HOSTS"}
    args = ("--runner-command", " ".join(STAND_IN_RUNNER))
    async with local_mode(tmp_path / "local.log", *args, env=env) as local:
        found = re.search(r"private redis-server at 127\.0\.0\.1:(\d+)", local.log())
        assert found, local.log()
        client = Client(api_token=local.token, base_url=local.url)

        async def run(audio_file: Any) -> Any:
            given = {"audio_file": audio_file, "initial_prompt": "stand-in:fetch"}
            return await call(client.predictions.create, version="whisperx", input=given, wait=30)

        audio = tmp_path / "a.wav"
        audio.write_bytes(b"RIFF" + bytes(60))
        with audio.open("rb") as upload:
            fetched = await run(upload)
        assert fetched.status == "succeeded", (fetched.error, local.log())
        assert fetched.output["segments"][0]["text"] == "audio of 64 bytes"
        redis = await run(f"http://127.0.0.1:{found[1]}/")
        metrics = await run(f"{local.url}/metrics")
    assert redis.status == "failed"
    assert "loopback address; refused" in str(redis.error), redis.error
    assert metrics.status == "failed"
    assert "other paths only; refused" in str(metrics.error), metrics.error
