"""A warm runner: loads the model once, then serves predictions it asks for, one at a time.

`whisperx-runner run` with WHISPERX_WORK_URL set (and no input file). Between
predictions the runner waits for work up to WHISPERX_IDLE_SECONDS, then exits; it also
exits after WHISPERX_MAX_PREDICTIONS, when the endpoint answers 410, and at once on
SIGTERM while idle. SIGTERM during a prediction cancels that prediction as a one-shot run
does (the canceled report, then exit: the transcription thread cannot be interrupted).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Literal, TextIO

import aiohttp

from whisperx_api.reports import SIGNATURE_HEADER, sign
from whisperx_api.work import STOP, Assignment, WorkRequest
from whisperx_runner.config import RunnerConfig
from whisperx_runner.errors import EXIT_SUCCEEDED, ConfigError
from whisperx_runner.pipeline import Transcriber
from whisperx_runner.report import HttpReporter
from whisperx_runner.runner import Interrupted, PredictionRun, until_signal

log = logging.getLogger(__name__)

# The first request waits at least this long whatever the idle time: a runner is started
# because a prediction is queued, though another runner may take it first.
FIRST_WAIT_SECONDS = 30.0
# Longest single hold of a request for work (the endpoint's limit is higher).
POLL_SECONDS = 20.0
# How long the endpoint may be unreachable before the runner gives up and exits.
UNREACHABLE_SECONDS = 60.0


class WorkClient:
    def __init__(self, url: str, token: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self._token = token
        self._session = session

    async def claim(self, request: WorkRequest) -> Assignment | Literal["stop"] | None:
        """The next prediction; None when none came within the wait; STOP to exit.
        Retries while the endpoint is unreachable or unavailable, up to a limit."""
        body = request.model_dump_json(exclude_none=True).encode()
        give_up = time.monotonic() + UNREACHABLE_SECONDS
        delay = 0.5
        while True:
            headers = {
                SIGNATURE_HEADER: sign(self._token, body),
                "Content-Type": "application/json",
            }
            limit = aiohttp.ClientTimeout(total=request.wait + 15)
            try:
                async with self._session.post(
                    self.url, data=body, headers=headers, timeout=limit, allow_redirects=False
                ) as response:
                    if response.status == 200:
                        return Assignment.model_validate_json(await response.read())
                    if response.status == 204:
                        return None
                    if response.status == 410:
                        return STOP
                    detail = (await response.text())[:200]
                    if response.status < 500 and response.status != 429:
                        raise ConfigError(f"the work endpoint refused: {response.status} {detail}")
                    log.warning("work request: HTTP %d %s", response.status, detail)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.warning("work request failed: %s %s", type(exc).__name__, exc)
            if time.monotonic() + delay > give_up:
                log.error("the work endpoint stayed unreachable; exiting")
                return STOP
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class WarmRunner:
    def __init__(
        self,
        config: RunnerConfig,
        *,
        transcriber: Transcriber | None = None,
        stream: TextIO = sys.stderr,
    ) -> None:
        if config.work_url is None or config.runner_token is None:
            raise ConfigError("a warm runner needs WHISPERX_WORK_URL and WHISPERX_RUNNER_TOKEN")
        self.config = config
        self.transcriber = transcriber
        self.stream = stream
        self.served = 0
        # Set when a prediction's run was canceled: the process must exit now.
        self.canceled = False

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    async def serve(self) -> int:
        started = time.monotonic()
        transcriber = self.transcriber
        if transcriber is None:
            try:
                transcriber = await until_signal(asyncio.to_thread(self._load))
            except Interrupted:
                return EXIT_SUCCEEDED
        setup = time.monotonic() - started
        self._print(f"Runner ready in {setup:.1f} s (model {self.config.model})")
        assert self.config.work_url is not None and self.config.runner_token is not None
        async with aiohttp.ClientSession() as session:
            client = WorkClient(self.config.work_url, self.config.runner_token, session)
            idle_until = time.monotonic() + max(self.config.idle_seconds, FIRST_WAIT_SECONDS)
            setup_seconds: float | None = setup
            while True:
                remaining = idle_until - time.monotonic()
                if remaining <= 0:
                    self._print(f"Idle for {self.config.idle_seconds:g} s: exiting")
                    return EXIT_SUCCEEDED
                request = WorkRequest(
                    wait=min(remaining, POLL_SECONDS),
                    setup_seconds=setup_seconds,
                    served=self.served,
                )
                try:
                    given = await until_signal(client.claim(request))
                except Interrupted as stop:
                    self._print(f"Stopping while idle ({stop})")
                    return EXIT_SUCCEEDED
                setup_seconds = None
                if given == STOP:
                    self._print("No more work for this runner: exiting")
                    return EXIT_SUCCEEDED
                if given is None:
                    continue
                code = await self._run(given, transcriber)
                if self.canceled:
                    return code
                self.served += 1
                if self.config.max_predictions and self.served >= self.config.max_predictions:
                    self._print(f"Served {self.served} predictions: exiting")
                    return EXIT_SUCCEEDED
                idle_until = time.monotonic() + self.config.idle_seconds

    def _load(self) -> Transcriber:
        transcriber = Transcriber(self.config, keep_loaded=True)
        transcriber.load()
        return transcriber

    async def _run(self, given: Assignment, transcriber: Transcriber) -> int:
        self._print(f"Prediction {given.namespace}/{given.id}")
        reporter = HttpReporter(
            given.report_url,
            given.report_token,
            attempt=given.attempt,
            retry_seconds=self.config.report_retry_seconds,
        )
        run = PredictionRun(
            self.config,
            reporter,
            transcriber=transcriber,
            raw_input=given.input,
            stream=self.stream,
        )
        del given  # the input may hold a token: the run alone keeps it, until it starts
        code = await run.execute()
        self.canceled = run.canceled
        return code
