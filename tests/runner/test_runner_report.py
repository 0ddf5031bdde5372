"""The report client against a real loopback server that verifies every signature."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import TYPE_CHECKING

import pytest

from tests.conftest import free_port
from whisperx_runner.report import HttpReporter

if TYPE_CHECKING:
    from tests.runner.conftest import ReportServer

REPORT_TOKEN = "0f" * 32  # the report_server fixture's token


async def test_events_are_signed_numbered_and_logs_throttled(
    report_server: ReportServer,
) -> None:
    reporter = HttpReporter(report_server.url, REPORT_TOKEN, interval=0.5)
    await reporter.start()
    lines = [f"line {i}" for i in range(40)]

    def produce() -> None:  # the transcription thread logging as it goes
        for i, line in enumerate(lines):
            reporter.log(line)
            reporter.progress((i + 1) / len(lines))
            time.sleep(0.04)

    await asyncio.to_thread(produce)
    await asyncio.sleep(0.6)
    assert await reporter.completed("succeeded", output={"segments": [], "detected_language": "en"})
    await reporter.aclose()

    assert report_server.refused == 0
    events = report_server.events()
    assert events[0] == "start" and events[-1] == "completed"
    assert set(events[1:-1]) == {"logs"}
    seqs = [r["seq"] for r in report_server.reports]
    assert seqs == list(range(1, len(seqs) + 1))
    # 1.6 s of logging at most every 500 ms: a handful of events, not 40.
    assert 2 <= events.count("logs") <= 5
    logs_times = [
        t
        for t, r in zip(report_server.arrivals, report_server.reports, strict=True)
        if r["event"] == "logs"
    ]
    assert all(b - a >= 0.45 for a, b in itertools.pairwise(logs_times))
    # Every line arrives exactly once, in order, and progress rises to 1.
    assert report_server.logs_text() == "".join(f"{line}\n" for line in lines)
    progress = [r["progress"] for r in report_server.reports if "progress" in r]
    assert progress == sorted(progress) and progress[-1] == 1.0


async def test_terminal_report_is_retried_with_backoff(report_server: ReportServer) -> None:
    reporter = HttpReporter(report_server.url, REPORT_TOKEN, retry_seconds=10)
    report_server.failures = [503, 502, 500]
    started = time.monotonic()
    assert await reporter.completed("failed", error="boom", reason="RunnerFailed")
    elapsed = time.monotonic() - started
    await reporter.aclose()
    assert report_server.completed()["status"] == "failed"
    assert 0.5 + 1 + 2 <= elapsed < 6  # three waits, doubling


async def test_a_failed_start_is_retried_before_any_logs(report_server: ReportServer) -> None:
    reporter = HttpReporter(report_server.url, REPORT_TOKEN, interval=0.2)
    report_server.failures = [503]
    await reporter.start()
    reporter.log("hello")
    await report_server.wait_for(lambda: "logs" in report_server.events(), seconds=5)
    await reporter.completed("succeeded", output={"segments": [], "detected_language": "en"})
    await reporter.aclose()
    # The status writer ignores a seq at or below the last applied one: order matters.
    assert report_server.events() == ["start", "logs", "completed"]
    assert [r["seq"] for r in report_server.reports] == [1, 2, 3]


async def test_unreachable_endpoint_never_raises_and_gives_up_in_budget() -> None:
    url = f"http://127.0.0.1:{free_port()}/reports/default/p1"
    reporter = HttpReporter(url, REPORT_TOKEN, retry_seconds=1.5, interval=0.1)
    started = time.monotonic()
    await reporter.start()
    reporter.log("lost")
    await asyncio.sleep(0.3)
    delivered = await reporter.completed("succeeded", output={"segments": []})
    await reporter.aclose()
    assert delivered is False
    assert time.monotonic() - started < 4


async def test_a_refused_signature_is_not_retried(report_server: ReportServer) -> None:
    reporter = HttpReporter(report_server.url, "another-prediction-token", retry_seconds=30)
    started = time.monotonic()
    assert await reporter.completed("failed", error="x") is False
    await reporter.aclose()
    assert report_server.refused == 1 and time.monotonic() - started < 2


async def test_log_is_thread_safe_under_contention(report_server: ReportServer) -> None:
    reporter = HttpReporter(report_server.url, REPORT_TOKEN, interval=0.05)
    await reporter.start()

    def burst(tag: str) -> None:
        for i in range(200):
            reporter.log(f"{tag}{i}")

    threads = [threading.Thread(target=burst, args=(t,)) for t in "ab"]
    for thread in threads:
        thread.start()

    def join_all() -> None:
        for thread in threads:
            thread.join()

    await asyncio.to_thread(join_all)
    await reporter.completed("succeeded", output={"segments": []})
    await reporter.aclose()
    received = report_server.logs_text().split()
    assert sorted(received) == sorted([f"{t}{i}" for t in "ab" for i in range(200)])


@pytest.mark.parametrize("status", ["failed", "canceled"])
async def test_error_fields_respect_the_protocol_limits(
    report_server: ReportServer, status: str
) -> None:
    reporter = HttpReporter(report_server.url, REPORT_TOKEN)
    assert await reporter.completed(
        status,  # type: ignore[arg-type]
        error="e" * 20_000,
        reason="R" * 500,
    )
    await reporter.aclose()
    done = report_server.completed()
    assert len(done["error"]) <= 8192 and len(done["reason"]) <= 128
