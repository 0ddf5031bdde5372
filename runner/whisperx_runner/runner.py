"""One prediction from input to terminal report, and prompt exit on SIGTERM.

The transcription runs in a worker thread while the event loop keeps the reports and
the signal handlers alive. A signal (cancel, preemption) ends the run at once: the
canceled report goes out within a short budget and the caller exits the process with
`os._exit`, because a thread inside CTranslate2 or torch cannot be interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO, TypeVar, cast

from pydantic import ValidationError

from whisperx_api.schema import PredictionInput, describe_errors
from whisperx_runner.audio import DecodedAudio, decode_audio
from whisperx_runner.config import RunnerConfig
from whisperx_runner.errors import (
    EXIT_FAILED,
    EXIT_SUCCEEDED,
    ConfigError,
    InputError,
    RunnerError,
)
from whisperx_runner.fetch import describe_source, fetch_audio
from whisperx_runner.pipeline import RunResult, Transcriber
from whisperx_runner.report import HttpReporter, NullReporter, Reporter, Status

T = TypeVar("T")

# Kubernetes allows 30 s between SIGTERM and SIGKILL by default.
CANCEL_REPORT_SECONDS = 10.0


def read_input(path: Path | None) -> PredictionInput:
    """The prediction input from WHISPERX_INPUT_FILE, validated against the schema."""
    if path is None:
        raise ConfigError("WHISPERX_INPUT_FILE is not set")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the input file {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"input is not valid JSON: {exc}") from None
    return validate(raw)


def validate(raw: Any) -> PredictionInput:
    if not isinstance(raw, dict):
        raise InputError("input must be a JSON object")
    try:
        return PredictionInput.model_validate(raw)
    except ValidationError as exc:
        errors = cast(list[dict[str, Any]], exc.errors())
        raise InputError(describe_errors(errors)) from None


def make_reporter(config: RunnerConfig) -> Reporter:
    if config.report_url is None:
        return NullReporter()
    if config.report_token is None:
        raise ConfigError("WHISPERX_REPORT_URL is set but WHISPERX_REPORT_TOKEN is not")
    return HttpReporter(
        config.report_url,
        config.report_token,
        attempt=config.report_attempt,
        retry_seconds=config.report_retry_seconds,
    )


class _ForwardWarnings(logging.Handler):
    """whisperx's own warnings (unalignable segment, no speech) go to the prediction's
    logs too."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self._sink(f"{record.levelname}: {record.getMessage()}")


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def until_signal(work: Awaitable[T]) -> T:
    """Awaits `work`, or raises Interrupted (work cancelled) on SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[int] = loop.create_future()

    def on_signal(signum: int) -> None:
        if not received.done():
            received.set_result(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    task = asyncio.ensure_future(work)
    waiters: set[asyncio.Future[Any]] = {task, received}
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
        raise Interrupted(received.result())
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


class PredictionRun:
    """`whisperx-runner run`: one prediction, reported to the status writer."""

    def __init__(
        self,
        config: RunnerConfig,
        reporter: Reporter,
        *,
        transcriber: Transcriber | None = None,
        raw_input: dict[str, Any] | None = None,
        stream: TextIO = sys.stderr,
    ) -> None:
        self.config = config
        self.reporter = reporter
        self.transcriber = transcriber
        # A warm runner's assignment carries the input; otherwise WHISPERX_INPUT_FILE.
        self.raw_input = raw_input
        self.stream = stream
        self.canceled = False
        # Not the loop's default executor: asyncio.run would wait for a thread that a
        # cancellation leaves running.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transcribe")
        self._started = time.monotonic()
        # The terminal report once the run has ended, and the exit code it ended with.
        self._ending: tuple[asyncio.Future[bool], int] | None = None

    def log(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        self.reporter.log(text)

    async def execute(self) -> int:
        """Runs to the terminal report; returns the exit code."""
        handler = _ForwardWarnings(self.reporter.log)
        logging.getLogger("whisperx").addHandler(handler)
        try:
            return await until_signal(self._work())
        except Interrupted as stop:
            self.canceled = True
            return await self._canceled(stop.signum)
        finally:
            logging.getLogger("whisperx").removeHandler(handler)
            await self.reporter.aclose()
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _canceled(self, signum: int) -> int:
        if self._ending is not None:
            # The run had already ended and was reporting it: that report stands.
            report, code = self._ending
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CANCEL_REPORT_SECONDS):
                    await asyncio.shield(report)
            return code
        self.log(f"Canceled ({signal.Signals(signum).name})")
        await self.reporter.completed(
            "canceled",
            reason="Canceled",
            metrics={"predict_time": time.monotonic() - self._started},
            budget=min(self.config.report_retry_seconds, CANCEL_REPORT_SECONDS),
        )
        return 128 + signum

    async def _work(self) -> int:
        await self.reporter.start()
        try:
            if self.raw_input is None:
                inp = read_input(self.config.input_file)
            else:
                inp = validate(self.raw_input)
                self.raw_input = None  # the input may hold a token: no longer than needed
            result = await self._predict(inp)
        except RunnerError as exc:
            return await self._failed(exc.reason, str(exc), exc.exit_code)
        except Exception as exc:
            print(traceback.format_exc(), file=self.stream, flush=True)
            return await self._failed("RunnerFailed", f"{type(exc).__name__}: {exc}", EXIT_FAILED)
        # The prediction's own time: a model load (a cold start) is set-up, reported apart.
        elapsed = time.monotonic() - self._started
        metrics = {
            "predict_time": elapsed - result.timings.get("load_time", 0.0),
            "audio_duration": result.audio_duration,
            **result.timings,
        }
        delivered = await self._end(
            EXIT_SUCCEEDED,
            "succeeded",
            output=result.output,
            metrics=metrics,
            detected_language=result.detected_language,
        )
        # An undelivered success would leave the prediction unfinished: fail the Job so
        # the operator sees it (and retries it within the Job's backoff limit).
        return EXIT_SUCCEEDED if delivered else EXIT_FAILED

    async def _failed(self, reason: str, error: str, code: int) -> int:
        self.log(f"Error: {error}")
        await self._end(code, "failed", error=error, reason=reason)
        return code

    async def _end(self, code: int, status: Status, **fields: Any) -> bool:
        # Shielded: a SIGTERM now must not cut the terminal report short (see _canceled).
        report = asyncio.ensure_future(self.reporter.completed(status, **fields))
        self._ending = (report, code)
        return await asyncio.shield(report)

    async def _predict(self, inp: PredictionInput) -> RunResult:
        audio = await load_audio_source(inp.audio_file, self.config, self.log, inp.debug)
        transcriber = self.transcriber or Transcriber(self.config, keep_loaded=False)
        samples = audio.samples()
        del audio
        hf_token = inp.huggingface_access_token or self.config.hf_token
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor,
            lambda: transcriber.run(
                inp, samples, hf_token=hf_token, progress=self.reporter.progress, log=self.log
            ),
        )


def _local_file(source: str) -> Path | None:
    if source.startswith(("http://", "https://", "data:")):
        return None
    path = Path(source)
    return path if path.is_file() else None


async def load_audio_source(
    source: str, config: RunnerConfig, log: Callable[[str], None], debug: bool = False
) -> DecodedAudio:
    """Fetches (URL, data URI) or opens (a local path, standalone only) and decodes."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=config.work_dir, prefix="whisperx-") as tmp:
        path = _local_file(source)
        if path is None:
            log(f"Fetching {describe_source(source)}")
            path = await fetch_audio(source, Path(tmp), config)
        audio = await decode_audio(path, config.decode)
    log(f"Audio: {audio.duration:.1f} s")
    if debug:
        log(f"Duration to load audio: {(time.perf_counter() - started) * 1000:.2f} ms")
    return audio


def exit_now(code: int) -> None:
    """Ends the process without waiting for a transcription thread."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
