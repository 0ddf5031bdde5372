"""The report client: `start`, throttled `logs` and `completed` events to the status writer.

Events are numbered and sent strictly in order by one task, because the status writer
ignores a `seq` at or below the last one it applied: a `start` overtaken by a `logs`
event would be lost. Log text from any thread is buffered and sent at most every
`interval` seconds with the latest progress; an event that fails stays at the head and
is retried (same `seq`, so a retry the server already applied is a no-op). The terminal
event carries whatever log text is still unsent and is retried with exponential backoff
(at most 15 s apart) until the status writer accepts or refuses it, however long the
operator is away: the runner alone holds the result (no other store is reachable from
its pod, and the transcript must not go to its logs), and its Job's activeDeadlineSeconds
bounds the wait. A `budget` bounds it where time is short (after SIGTERM). Nothing here
raises into the transcription: failures are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from types import TracebackType
from typing import Any, Literal, Protocol

import aiohttp

from whisperx_api.reports import (
    SIGNATURE_HEADER,
    CompletedReport,
    LogsReport,
    StartReport,
    sign,
)

log = logging.getLogger(__name__)

Status = Literal["succeeded", "failed", "canceled"]
_Outcome = Literal["ok", "retry", "fatal"]
_RETRY_STATUSES = frozenset({408, 425, 429})
_MAX_ERROR_CHARS = 8000  # CompletedReport allows 8192
_MAX_REASON_CHARS = 128


class Reporter(Protocol):
    async def start(self) -> None: ...

    def log(self, text: str) -> None: ...

    def progress(self, fraction: float) -> None: ...

    async def completed(
        self,
        status: Status,
        *,
        output: dict[str, Any] | None = None,
        error: str | None = None,
        reason: str | None = None,
        metrics: dict[str, float] | None = None,
        detected_language: str | None = None,
        budget: float | None = None,
    ) -> bool: ...

    async def aclose(self) -> None: ...


class NullReporter:
    """Standalone runs (no report URL): nothing is sent."""

    async def start(self) -> None:
        return None

    def log(self, text: str) -> None:
        return None

    def progress(self, fraction: float) -> None:
        return None

    async def completed(
        self,
        status: Status,
        *,
        output: dict[str, Any] | None = None,
        error: str | None = None,
        reason: str | None = None,
        metrics: dict[str, float] | None = None,
        detected_language: str | None = None,
        budget: float | None = None,
    ) -> bool:
        return True

    async def aclose(self) -> None:
        return None


class HttpReporter:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        attempt: str = "",
        retry_seconds: float = math.inf,
        interval: float = 0.5,
        request_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self._token = token
        self.attempt = attempt
        self.retry_seconds = retry_seconds
        self.interval = interval
        self.request_timeout = request_timeout
        self._seq = 0
        self._lock = threading.Lock()  # log() and progress() come from worker threads
        self._text: list[str] = []
        self._progress: float | None = None
        self._progress_sent: float | None = None
        self._head: StartReport | LogsReport | None = None
        self._session: aiohttp.ClientSession | None = None
        self._sender: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HttpReporter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def start(self) -> None:
        self._head = StartReport(event="start", seq=self._next_seq(), attempt=self.attempt)
        if await self._post(self._head) != "retry":
            self._head = None
        self._sender = asyncio.create_task(self._send_loop())

    def log(self, text: str) -> None:
        if text:
            with self._lock:
                self._text.append(text if text.endswith("\n") else text + "\n")

    def progress(self, fraction: float) -> None:
        with self._lock:
            self._progress = min(1.0, max(0.0, fraction))

    def _take_logs(self) -> LogsReport | None:
        with self._lock:
            text = "".join(self._text)
            self._text.clear()
            progress = self._progress
        if not text and progress == self._progress_sent:
            return None
        self._progress_sent = progress
        return LogsReport(
            event="logs", seq=self._next_seq(), attempt=self.attempt, logs=text, progress=progress
        )

    async def _send_loop(self) -> None:
        while True:
            # The sleep comes first: consecutive events are at least `interval` apart.
            await asyncio.sleep(self.interval)
            if self._head is None:
                self._head = self._take_logs()
            if self._head is not None and await self._post(self._head) != "retry":
                self._head = None

    async def _post(
        self, report: StartReport | LogsReport | CompletedReport, seconds: float | None = None
    ) -> _Outcome:
        body = report.model_dump_json(exclude_none=True).encode()
        headers = {SIGNATURE_HEADER: sign(self._token, body), "Content-Type": "application/json"}
        limit = aiohttp.ClientTimeout(total=seconds or self.request_timeout)
        try:
            async with self._client().post(
                self.url, data=body, headers=headers, timeout=limit, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return "ok"
                detail = (await response.text())[:200]
                log.warning(
                    "report %s #%d refused: HTTP %d %s",
                    report.event,
                    report.seq,
                    response.status,
                    detail,
                )
                if response.status >= 500 or response.status in _RETRY_STATUSES:
                    return "retry"
                return "fatal"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning(
                "report %s #%d failed: %s %s", report.event, report.seq, type(exc).__name__, exc
            )
            return "retry"

    async def _stop_sender(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None

    async def completed(
        self,
        status: Status,
        *,
        output: dict[str, Any] | None = None,
        error: str | None = None,
        reason: str | None = None,
        metrics: dict[str, float] | None = None,
        detected_language: str | None = None,
        budget: float | None = None,
    ) -> bool:
        """Sends the terminal event; True once the status writer accepted it."""
        await self._stop_sender()
        # A logs event cut off in flight may have been applied: its text is sent again
        # here rather than lost (a duplicated line is the lesser harm).
        unsent = self._head.logs if isinstance(self._head, LogsReport) else ""
        with self._lock:
            text = unsent + "".join(self._text)
            self._text.clear()
        self._head = None
        report = CompletedReport(
            event="completed",
            seq=self._next_seq(),
            attempt=self.attempt,
            status=status,
            output=output,
            error=error[:_MAX_ERROR_CHARS] if error else None,
            reason=reason[:_MAX_REASON_CHARS] if reason else None,
            logs=text,
            metrics=metrics or {},
            detected_language=detected_language,
        )
        deadline = time.monotonic() + (self.retry_seconds if budget is None else budget)
        delay = 0.5
        while True:
            remaining = deadline - time.monotonic()
            outcome = await self._post(report, min(self.request_timeout, max(remaining, 0.5)))
            if outcome == "ok":
                return True
            if outcome == "fatal" or time.monotonic() + delay > deadline:
                log.error("completed report (%s) was not delivered", status)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)

    async def aclose(self) -> None:
        await self._stop_sender()
        if self._session is not None:
            await self._session.close()
            self._session = None
