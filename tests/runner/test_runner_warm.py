"""A warm runner (WHISPERX_WORK_URL): one model load, then the predictions it asks for.

The runner runs in-process against loopback servers (a work endpoint that checks the
runner's signature, the report endpoint of conftest) with the real tiny.en model, and
as a real `whisperx-runner run` process where signals matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web

from whisperx_api.reports import SIGNATURE_HEADER, ReportAuthError, verify
from whisperx_api.work import Assignment, runner_token, work_url
from whisperx_runner.config import HostAllowList, RunnerConfig
from whisperx_runner.warm import WarmRunner

if TYPE_CHECKING:
    from tests.runner.conftest import AudioServer, ReportServer

KEY = b"test-signing-key"
RUNNER = "runner-1"


@dataclass
class WorkServer:
    """Hands out `queue` to the runner that signs as RUNNER, then answers 204 (after
    the wait) or `then` once the queue is empty."""

    base: str = ""
    queue: list[Assignment] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    then: int = 204
    asked: asyncio.Event = field(default_factory=asyncio.Event)
    # Set at teardown: a held request answers at once (the server waits for handlers).
    closing: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify(runner_token(KEY, request.match_info["runner"]), body,
                   request.headers.get(SIGNATURE_HEADER))  # fmt: skip
        except ReportAuthError as exc:
            return web.json_response({"detail": str(exc)}, status=401)
        asked = json.loads(body)
        self.requests.append(asked)
        self.asked.set()
        if self.queue:
            return web.Response(body=self.queue.pop(0).model_dump_json())
        if self.then == 204:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), asked["wait"])
        return web.Response(status=self.then)


@pytest.fixture
async def work_server() -> AsyncIterator[WorkServer]:
    server = WorkServer()
    app = web.Application()
    app.router.add_post("/work/{runner}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.base = f"http://{host}:{port}"
    yield server
    server.closing.set()
    await runner.cleanup()


def assignment(report_server: ReportServer, n: int, inp: dict[str, Any]) -> Assignment:
    return Assignment(
        namespace="default",
        id=f"p{n}",
        input=inp,
        report_url=report_server.url,
        report_token=report_server.token,
        attempt=RUNNER,
    )


def warm_config(work: WorkServer, model_dir: Path, **changes: Any) -> RunnerConfig:
    config = RunnerConfig(
        model="tiny.en",
        device="cpu",
        model_dir=model_dir,
        allow_hosts=HostAllowList.parse("127.0.0.1"),
        work_url=work_url(work.base, RUNNER),
        runner_token=runner_token(KEY, RUNNER),
        idle_seconds=0.3,
    )
    return dataclasses.replace(config, **changes)


def completed(report_server: ReportServer) -> list[dict[str, Any]]:
    return [r for r in report_server.reports if r["event"] == "completed"]


async def test_one_model_serves_predictions_until_idle(
    work_server: WorkServer,
    report_server: ReportServer,
    audio_server: AudioServer,
    model_dir: Path,
    transcriber: Any,
) -> None:
    fox = {"audio_file": audio_server.url("/fox.wav"), "language": "en"}
    work_server.queue = [
        assignment(report_server, 1, fox),
        # A bad input fails its own prediction only; the runner goes on.
        assignment(report_server, 2, {"audio_file": "ftp://example.com/a.wav"}),
        assignment(report_server, 3, fox),
    ]
    stream = io.StringIO()
    runner = WarmRunner(warm_config(work_server, model_dir), transcriber=transcriber,
                        stream=stream)  # fmt: skip
    started = time.monotonic()
    code = await asyncio.wait_for(runner.serve(), 120)
    assert code == 0 and runner.served == 3, stream.getvalue()
    ends = completed(report_server)
    assert [e["status"] for e in ends] == ["succeeded", "failed", "succeeded"]
    for end in (ends[0], ends[2]):
        text = " ".join(s["text"] for s in end["output"]["segments"]).lower()
        assert "quick brown fox" in text
        assert 0 < end["metrics"]["predict_time"] < time.monotonic() - started
    assert "audio_file" in ends[1]["error"] and ends[1]["reason"] == "InvalidInput"
    # Each prediction's reports are numbered from 1, under this runner's attempt.
    starts = [r for r in report_server.reports if r["event"] == "start"]
    assert [r["seq"] for r in starts] == [1, 1, 1] and {r["attempt"] for r in starts} == {RUNNER}
    # The set-up time goes with the first request only; then the count served.
    asked = work_server.requests
    assert "setup_seconds" in asked[0] and all("setup_seconds" not in a for a in asked[1:])
    assert [a["served"] for a in asked[:4]] == [0, 1, 2, 3]
    # After the last prediction, it waited its idle time for more, then exited.
    assert asked[-1]["wait"] <= 0.3 and "Idle for 0.3 s: exiting" in stream.getvalue()


async def test_it_exits_after_its_most_predictions_and_on_410(
    work_server: WorkServer, report_server: ReportServer, model_dir: Path, transcriber: Any
) -> None:
    bad = {"audio_file": "ftp://example.com/a.wav"}  # fast: fails at validation
    work_server.queue = [assignment(report_server, n, bad) for n in (1, 2, 3)]
    config = warm_config(work_server, model_dir, max_predictions=2, idle_seconds=60)
    runner = WarmRunner(config, transcriber=transcriber, stream=io.StringIO())
    assert await asyncio.wait_for(runner.serve(), 30) == 0
    assert runner.served == 2 and len(work_server.queue) == 1

    work_server.queue, work_server.then = [], 410
    runner = WarmRunner(config, transcriber=transcriber, stream=io.StringIO())
    started = time.monotonic()
    assert await asyncio.wait_for(runner.serve(), 30) == 0
    assert runner.served == 0 and time.monotonic() - started < 5


async def test_sigterm_ends_an_idle_runner_at_once(
    work_server: WorkServer, runner_env: dict[str, str], model_dir: Path
) -> None:
    env = {
        **runner_env,
        "WHISPERX_WORK_URL": work_url(work_server.base, RUNNER),
        "WHISPERX_RUNNER_TOKEN": runner_token(KEY, RUNNER),
        "WHISPERX_IDLE_SECONDS": "600",
    }
    env.pop("WHISPERX_INPUT_FILE", None)
    script = shutil.which("whisperx-runner", path=str(Path(sys.executable).parent))
    assert script is not None, "whisperx-runner is not installed in this environment"
    process = await asyncio.create_subprocess_exec(
        script, "run",
        env=env, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        await asyncio.wait_for(work_server.asked.wait(), 120)  # model loaded, asking for work
        assert "setup_seconds" in work_server.requests[0]
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        assert time.monotonic() - started < 1.5
        assert b"Stopping while idle (SIGTERM)" in await process.stderr.read()
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
