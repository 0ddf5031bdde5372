"""Bad inputs end with a clear failed report and the right exit code, and none hang.

Each case runs the real `run` flow in-process (PredictionRun with the HTTP reporter)
against loopback servers: the audio source and a report endpoint that verifies
signatures. Loopback is a refused address by default; the positive cases allow-list it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web

from tests.conftest import free_port
from whisperx_runner.config import HostAllowList, RunnerConfig
from whisperx_runner.runner import PredictionRun, make_reporter

if TYPE_CHECKING:
    from tests.runner.conftest import AudioServer, ReportServer

LOOPBACK = HostAllowList.parse("127.0.0.1")


async def run_prediction(
    tmp_path: Path,
    report_server: ReportServer,
    inp: dict[str, Any] | str,
    transcriber: Any = None,
    **changes: Any,
) -> tuple[int, float, str]:
    path = tmp_path / "input.json"
    path.write_text(inp if isinstance(inp, str) else json.dumps(inp))
    config = RunnerConfig(
        model="tiny.en",
        device="cpu",
        model_dir=tmp_path,
        input_file=path,
        report_url=report_server.url,
        report_token=report_server.token,
        allow_hosts=LOOPBACK,
        work_dir=tmp_path,
    )
    config = dataclasses.replace(config, **changes)
    stream = io.StringIO()
    run = PredictionRun(config, make_reporter(config), transcriber=transcriber, stream=stream)
    started = time.monotonic()
    code = await asyncio.wait_for(run.execute(), 30)
    return code, time.monotonic() - started, stream.getvalue()


def add_routes(server: AudioServer) -> None:
    async def text(_: web.Request) -> web.Response:
        return web.Response(text="this is certainly not audio\n" * 20)

    async def empty(_: web.Request) -> web.Response:
        return web.Response(body=b"", content_type="audio/wav")

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=b"\0" * 20_000, content_type="audio/wav")

    async def big_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(20):
            await response.write(b"\0" * 1000)
        await response.write_eof()
        return response

    async def slow(_: web.Request) -> web.Response:
        await server.closing.wait()
        return web.Response(body=b"late")

    async def loop(_: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def to_fox(_: web.Request) -> web.Response:
        raise web.HTTPFound("/fox.wav")

    async def to_other_loopback(request: web.Request) -> web.Response:
        port = request.url.port
        raise web.HTTPFound(f"http://[::1]:{port}/fox.wav")

    async def error(_: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    server.routes.update(
        {
            "/text": text,
            "/empty": empty,
            "/big": big,
            "/big-chunked": big_chunked,
            "/slow": slow,
            "/loop": loop,
            "/redirect-fox": to_fox,
            "/to-ipv6-loopback": to_other_loopback,
            "/error": error,
        }
    )


CASES = [
    # id, audio_file (path on the audio server, or full), config changes, code, reason, error
    ("404", "/missing.wav", {}, 2, "AudioFetchFailed", r"HTTP 404 Not Found"),
    ("5xx", "/error", {}, 1, "AudioFetchFailed", r"HTTP 503"),
    ("not-audio", "/text", {}, 2, "InvalidAudio", r"not decodable audio"),
    ("empty", "/empty", {}, 2, "InvalidAudio", r"empty"),
    ("oversize", "/big", {"max_audio_bytes": 10_000}, 2, "AudioTooLarge", r"too large: 20000"),
    (
        "oversize-undeclared",
        "/big-chunked",
        {"max_audio_bytes": 10_000},
        2,
        "AudioTooLarge",
        r"more than 10000 bytes",
    ),
    ("timeout", "/slow", {"fetch_timeout": 1.0}, 1, "AudioFetchFailed", r"timed out after 1 s"),
    ("redirect-loop", "/loop", {}, 2, "AudioFetchFailed", r"more than 5 redirects"),
    (
        "loopback-refused",
        "/fox.wav",
        {"allow_hosts": HostAllowList()},
        2,
        "AddressRefused",
        r"'127\.0\.0\.1' is a loopback address; refused",
    ),
    (
        "redirect-to-private-refused",
        "/to-ipv6-loopback",
        {},
        2,
        "AddressRefused",
        r"'::1' is a loopback address",
    ),
]


@pytest.mark.parametrize(
    ("source", "changes", "code", "reason", "error"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_bad_audio_sources(
    tmp_path: Path,
    report_server: ReportServer,
    audio_server: AudioServer,
    source: str,
    changes: dict[str, Any],
    code: int,
    reason: str,
    error: str,
) -> None:
    add_routes(audio_server)
    url = audio_server.url(source)
    got, elapsed, _ = await run_prediction(tmp_path, report_server, {"audio_file": url}, **changes)
    done = report_server.completed()
    assert (got, done["status"], done["reason"]) == (code, "failed", reason), done
    assert re.search(error, done["error"]), done["error"]
    assert report_server.events()[0] == "start"
    assert elapsed < 10
    assert "?" not in done["error"]  # no query strings (presigned credentials) in errors


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://localhost:{port}/fox.wav", r"'localhost' is a loopback address; refused"),
        ("http://169.254.169.254/latest/meta-data/", r"link-local \(cloud metadata\)"),
        ("http://[::ffff:10.0.0.1]/a.wav", r"private address"),
    ],
)
async def test_private_addresses_are_refused_before_any_request(
    tmp_path: Path, report_server: ReportServer, url: str, error: str
) -> None:
    url = url.format(port=free_port())
    code, elapsed, _ = await run_prediction(
        tmp_path, report_server, {"audio_file": url}, allow_hosts=HostAllowList()
    )
    done = report_server.completed()
    assert (code, done["reason"]) == (2, "AddressRefused")
    assert re.search(error, done["error"]) and elapsed < 5


async def test_unreachable_url(tmp_path: Path, report_server: ReportServer) -> None:
    url = f"http://127.0.0.1:{free_port()}/a.wav?X-Amz-Signature=secret"
    code, elapsed, _ = await run_prediction(tmp_path, report_server, {"audio_file": url})
    done = report_server.completed()
    assert (code, done["reason"]) == (1, "AudioFetchFailed")
    assert "cannot connect to 127.0.0.1" in done["error"] and "secret" not in done["error"]
    assert elapsed < 5


@pytest.mark.parametrize(
    ("inp", "error"),
    [
        ({"audio_file": "data:audio/wav,RIFF"}, r"data URI must be base64"),
        ({"audio_file": "data:audio/wav;base64,!!!!"}, r"not valid base64"),
        ({"audio_file": "https://example.org/a.wav", "language": "xx"}, r"input\.language:.*xx"),
        (
            {"audio_file": "https://example.org/a.wav", "min_speakers": 3, "max_speakers": 2},
            r"min_speakers must not be greater than max_speakers",
        ),
        ({"audio_file": "ftp://example.org/a.wav"}, r"input\.audio_file"),
        ({"audio_file": "https://example.org/a.wav", "color": "red"}, r"input\.color"),
        ("[1, 2]", r"must be a JSON object"),
        ("{broken", r"not valid JSON"),
    ],
    ids=[
        "data-not-base64",
        "data-bad-base64",
        "language",
        "speakers",
        "scheme",
        "extra",
        "array",
        "json",
    ],
)
async def test_invalid_input_fails_fast_naming_the_field(
    tmp_path: Path, report_server: ReportServer, inp: dict[str, Any] | str, error: str
) -> None:
    code, elapsed, logs = await run_prediction(tmp_path, report_server, inp)
    done = report_server.completed()
    assert (code, done["status"], done["reason"]) == (2, "failed", "InvalidInput")
    assert re.search(error, done["error"]), done["error"]
    assert elapsed < 5 and "Error:" in logs


@pytest.mark.whisperx
async def test_data_uri_and_redirect_reach_the_transcription(
    tmp_path: Path,
    report_server: ReportServer,
    audio_server: AudioServer,
    fox_bytes: bytes,
    transcriber: Any,
) -> None:
    data_uri = "data:audio/wav;base64," + base64.b64encode(fox_bytes).decode()
    code, _, _ = await run_prediction(
        tmp_path, report_server, {"audio_file": data_uri}, transcriber=transcriber
    )
    assert code == 0
    assert "fox" in report_server.completed()["output"]["segments"][0]["text"].lower()

    add_routes(audio_server)
    report_server.reports.clear()
    url = audio_server.url("/redirect-fox")
    code, _, _ = await run_prediction(
        tmp_path, report_server, {"audio_file": url}, transcriber=transcriber
    )
    assert code == 0 and report_server.completed()["status"] == "succeeded"
