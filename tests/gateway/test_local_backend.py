"""Local mode's backend: what differs from a Job (a local process) behaves as the operator
makes a Job behave: the same env contract, crashes end as failed with the exit code,
a queue when runner slots are busy, cancellation by SIGTERM, and nothing left running
or stuck after a stop."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.gateway.conftest import (
    OTHER_TOKEN,
    TOKEN,
    Gateway,
    process_holding,
    runner_processes,
    serve_local,
)
from whisperx_api import lifecycle as lc
from whisperx_api.records import PredictionRecord
from whisperx_api.reports import prediction_token
from whisperx_api.store import Store
from whisperx_api.work import runner_token
from whisperx_gateway.local_backend import ACTIVE_KEY

AUDIO = "data:audio/wav;base64,UklGRg=="


async def create(
    http: aiohttp.ClientSession, gw: Gateway, token: str | None = None, **input_: Any
) -> dict[str, Any]:
    body = {"version": "whisperx", "input": {"audio_file": AUDIO, **input_}}
    headers = gw.auth(token)
    async with http.post(gw.url + "/v1/predictions", json=body, headers=headers) as resp:
        assert resp.status == 201
        return dict(await resp.json())


async def until(
    gw: Gateway, prediction_id: str, check: Any, seconds: float = 20, namespace: str = "alpha"
) -> PredictionRecord:
    deadline = time.monotonic() + seconds
    while True:
        record = await gw.store.get_record(namespace, prediction_id)
        if record is not None and check(record):
            return record
        assert time.monotonic() < deadline, record
        await asyncio.sleep(0.05)


def ended(record: PredictionRecord) -> bool:
    return record.state.terminal


async def test_the_runner_gets_the_environment_contract_and_its_work_over_http(
    redis_url: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A runner that records its environment and the work it is given, then exits."""
    script = tmp_path / "record_env.py"
    script.write_text(
        "import json, os, urllib.request\n"
        "from whisperx_api.reports import SIGNATURE_HEADER, sign\n"
        "body = json.dumps({'wait': 10}).encode()\n"
        "signature = sign(os.environ['WHISPERX_RUNNER_TOKEN'], body)\n"
        "request = urllib.request.Request(os.environ['WHISPERX_WORK_URL'], data=body,\n"
        "                                 headers={SIGNATURE_HEADER: signature})\n"
        "given = json.load(urllib.request.urlopen(request, timeout=20))\n"
        "info = {'env': dict(os.environ), 'given': given}\n"
        f"json.dump(info, open({str(tmp_path / 'seen.json')!r}, 'w'))\n"
    )
    os.environ["WHISPERX_TOKENS"] = f"{TOKEN}=alpha"  # must not reach the runner
    try:
        async with serve_local(redis_url, runner=[sys.executable, str(script)]) as gw:
            body = await create(http, gw, huggingface_access_token="hf_secret_123")
            record = await until(gw, body["id"], ended)
    finally:
        del os.environ["WHISPERX_TOKENS"]
    seen = json.loads((tmp_path / "seen.json").read_text())
    env, given = seen["env"], seen["given"]
    # The input, its secret included, comes with the work, never through a file.
    assert given["input"] == {"audio_file": AUDIO, "huggingface_access_token": "hf_secret_123"}
    assert not any(name.endswith("INPUT_FILE") for name in env)
    assert given["report_url"].startswith("http://127.0.0.1:")
    assert given["report_url"].endswith(f"/reports/alpha/{body['id']}")
    assert given["report_token"] == prediction_token(
        b"test-report-key", "alpha", body["id"], record.uid or ""
    )
    runner_id = env["WHISPERX_WORK_URL"].rsplit("/", 1)[1]
    assert (
        env["WHISPERX_WORK_URL"] == given["report_url"].split("/reports/")[0] + f"/work/{runner_id}"
    )
    assert env["WHISPERX_RUNNER_TOKEN"] == runner_token(b"test-report-key", runner_id)
    assert given["attempt"] == runner_id
    assert (env["WHISPERX_IDLE_SECONDS"], env["WHISPERX_MAX_PREDICTIONS"]) == ("300", "0")
    assert (env["WHISPERX_MODEL"], env["WHISPERX_DEVICE"], env["WHISPERX_COMPUTE_TYPE"]) == (
        "tiny.en",
        "cpu",
        "int8",
    )
    assert env["WHISPERX_ALLOW_HOSTS"] == "127.0.0.1"
    assert "WHISPERX_TOKENS" not in env
    # It exited holding the prediction, without a report.
    assert record.state.reason == "RunnerExited"
    # It exited 0 without reporting: that is a failure, and says so.
    assert record.state.phase is lc.Phase.FAILED
    assert record.state.reason == "RunnerExited"
    assert record.state.error == "the runner exited without reporting a result"


async def test_a_crash_without_a_report_fails_with_the_exit_code_its_output_in_the_log(
    gateway: Gateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    body = await create(http, gateway, initial_prompt="stand-in:crash")
    record = await until(gateway, body["id"], ended)
    assert record.state.phase is lc.Phase.FAILED and record.state.reason == "RunnerExited"
    # The runner's output (internal paths, tracebacks) is for the operator, not the caller.
    assert record.state.error == "the runner exited with code 3"
    for _ in range(100):  # logged right after the prediction ends
        if "its last output: stand-in: simulated crash" in caplog.text:
            break
        await asyncio.sleep(0.05)
    assert "its last output: stand-in: simulated crash" in caplog.text
    async with http.get(body["urls"]["get"], headers=gateway.auth()) as resp:
        shown = await resp.json()
    assert shown["status"] == "failed" and shown["error"] == "the runner exited with code 3"
    assert shown["started_at"] is not None  # it had reported `start`


async def test_a_reported_failure_keeps_the_runners_error(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    body = await create(http, gateway, initial_prompt="stand-in:fail")
    record = await until(gateway, body["id"], ended)
    assert record.state.error == "stand-in: simulated failure"
    assert record.state.reason == "RunnerFailed"


async def test_runner_slots_queue_predictions_and_cancel_reaches_the_queue(
    redis_url: str, http: aiohttp.ClientSession
) -> None:
    async with serve_local(redis_url, concurrency=1) as gw:
        first = await create(http, gw, initial_prompt="stand-in:hang")
        await until(gw, first["id"], lambda r: r.state.phase is lc.Phase.PROCESSING)
        second = await create(http, gw)
        third = await create(http, gw)
        queued = await until(gw, second["id"], lambda r: r.state.queued)
        condition = queued.state.condition("Queued")
        assert condition is not None and condition.reason == "WaitingForRunnerSlot"
        assert len(runner_processes(gw)) == 1  # one slot, one process

        # Canceled while queued: it never runs.
        async with http.post(third["urls"]["cancel"], headers=gw.auth()) as resp:
            assert (await resp.json())["status"] == "canceled"
        async with http.post(first["urls"]["cancel"], headers=gw.auth()) as resp:
            assert resp.status == 200
        done = await until(gw, second["id"], ended)
        assert done.state.phase is lc.Phase.SUCCEEDED
        third_record = await until(gw, third["id"], ended)
        assert third_record.state.phase is lc.Phase.CANCELED
        assert third_record.state.started_at is None
        deadline = time.monotonic() + 10
        while await gw.store.redis.smembers(ACTIVE_KEY):  # the supervisors finish up
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


async def test_stopping_local_mode_ends_what_is_running(
    redis_url: str, http: aiohttp.ClientSession
) -> None:
    async with serve_local(redis_url, concurrency=1) as gw:
        running = await create(http, gw, initial_prompt="stand-in:hang")
        await until(gw, running["id"], lambda r: r.state.phase is lc.Phase.PROCESSING)
        queued = await create(http, gw)
        (process,) = runner_processes(gw)
    assert process.returncode is not None  # the runner was stopped with local mode
    store = Store.from_url(redis_url)
    try:
        for prediction_id in (running["id"], queued["id"]):
            record = await store.get_record("alpha", prediction_id)
            assert record is not None and record.state.phase is lc.Phase.FAILED
            assert record.state.reason == "Interrupted"
        assert await store.redis.smembers(ACTIVE_KEY) == set()
    finally:
        await store.close()


async def test_a_restart_after_a_crash_ends_what_the_crashed_process_accepted(
    redis_url: str,
) -> None:
    store = Store.from_url(redis_url)
    try:
        # What a SIGKILLed local mode leaves: a record marked active, never finished.
        orphan = PredictionRecord(
            id="orphan",
            namespace="alpha",
            input={"audio_file": AUDIO},
            state=lc.apply(lc.PredictionState(), lc.Created(at=lc.now_utc())).state,
        )
        await store.redis.sadd(ACTIVE_KEY, "alpha/orphan")
        await store.put_record(orphan)
        async with serve_local(redis_url):
            record = await store.get_record("alpha", "orphan")
            assert record is not None and record.state.phase is lc.Phase.FAILED
            assert record.state.reason == "Interrupted"
            assert await store.redis.smembers(ACTIVE_KEY) == set()
    finally:
        await store.close()


def _ignores_sigterm(pid: int) -> bool:
    """Whether the process has set SIGTERM to ignored (Linux: /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:"))[7:], 16)
    return bool(ignored & (1 << (signal.SIGTERM - 1)))


async def test_a_runner_that_ignores_sigterm_is_killed_without_holding_the_cancel(
    redis_url: str, http: aiohttp.ClientSession
) -> None:
    async with serve_local(redis_url, stop_grace=1.0) as gw:
        body = await create(http, gw, initial_prompt="stand-in:stubborn")
        await until(gw, body["id"], lambda r: r.state.phase is lc.Phase.PROCESSING)
        process = process_holding(gw, body["id"])
        deadline = time.monotonic() + 10
        while not _ignores_sigterm(process.pid):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        started = time.monotonic()
        async with http.post(body["urls"]["cancel"], headers=gw.auth()) as resp:
            assert (await resp.json())["status"] == "canceled"
        assert time.monotonic() - started < 0.9  # answered before the grace period ends
        assert await asyncio.wait_for(process.wait(), 10) == -9  # then SIGKILL


# --- warm runners ---


async def runner_pid(gw: Gateway, prediction_id: str, namespace: str = "alpha") -> int:
    """The pid of the runner that served a prediction (the stand-in logs it)."""
    logs = await gw.store.redis.get(f"wx:p:{namespace}:{prediction_id}:logs")
    found = re.search(r"pid (\d+)", str(logs))
    assert found, logs
    return int(found[1])


async def served_by(http: aiohttp.ClientSession, gw: Gateway) -> int:
    """Runs one prediction to success; the pid of the runner that served it."""
    body = await create(http, gw)
    record = await until(gw, body["id"], ended)
    assert record.state.phase is lc.Phase.SUCCEEDED
    return await runner_pid(gw, body["id"])


async def metrics(http: aiohttp.ClientSession, gw: Gateway) -> str:
    async with http.get(gw.url + "/metrics") as resp:
        return await resp.text()


async def test_a_warm_runner_serves_predictions_back_to_back(
    redis_url: str, http: aiohttp.ClientSession
) -> None:
    async with serve_local(redis_url, concurrency=1) as gw:
        pids = [await served_by(http, gw) for _ in range(3)]
        assert len(set(pids)) == 1 and len(runner_processes(gw)) == 1
        text = await metrics(http, gw)
        assert 'whisperx_local_prediction_starts_total{start="cold"} 1.0' in text
        assert 'whisperx_local_prediction_starts_total{start="warm"} 2.0' in text
        assert "whisperx_local_runners_idle 1" in text and "whisperx_local_runners_busy 0" in text
        assert "whisperx_local_queued_seconds_count 3" in text


async def test_idle_time_zero_gives_each_prediction_a_runner_of_its_own(
    redis_url: str, http: aiohttp.ClientSession
) -> None:
    async with serve_local(redis_url, concurrency=1, idle_seconds=0) as gw:
        pids = []
        for _ in range(2):
            body = await create(http, gw)
            await until(gw, body["id"], ended)
            pids.append(await runner_pid(gw, body["id"]))
            deadline = time.monotonic() + 10
            while runner_processes(gw):  # it exits once its prediction is done
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert pids[0] != pids[1]


async def test_a_runner_exits_after_its_most_predictions(
    redis_url: str, http: aiohttp.ClientSession
) -> None:
    async with serve_local(redis_url, concurrency=1, max_predictions=2) as gw:
        pids = [await served_by(http, gw) for _ in range(3)]
        assert pids[0] == pids[1] != pids[2]


async def test_cancel_on_a_warm_runner_stops_it_within_3_s_and_another_takes_the_next(
    redis_url: str, http: aiohttp.ClientSession
) -> None:
    async with serve_local(redis_url, concurrency=1) as gw:
        first = await create(http, gw)
        await until(gw, first["id"], ended)
        warm = await runner_pid(gw, first["id"])
        hang = await create(http, gw, initial_prompt="stand-in:hang")
        await until(gw, hang["id"], lambda r: r.state.phase is lc.Phase.PROCESSING)
        process = process_holding(gw, hang["id"])
        assert process.pid == warm
        started = time.monotonic()
        async with http.post(hang["urls"]["cancel"], headers=gw.auth()) as resp:
            assert (await resp.json())["status"] == "canceled"
        assert await asyncio.wait_for(process.wait(), 3) == 143
        assert time.monotonic() - started < 3
        after = await create(http, gw)
        record = await until(gw, after["id"], ended)
        assert record.state.phase is lc.Phase.SUCCEEDED
        assert await runner_pid(gw, after["id"]) != warm


async def test_a_crashed_warm_runner_fails_only_what_it_held(
    redis_url: str, http: aiohttp.ClientSession
) -> None:
    async with serve_local(redis_url, concurrency=1) as gw:
        warm_up = await create(http, gw)
        await until(gw, warm_up["id"], ended)
        crash = await create(http, gw, initial_prompt="stand-in:crash")
        queued = await create(http, gw)
        crashed = await until(gw, crash["id"], ended)
        assert crashed.state.reason == "RunnerExited"
        assert crashed.state.error == "the runner exited with code 3"
        record = await until(gw, queued["id"], ended)
        assert record.state.phase is lc.Phase.SUCCEEDED


async def test_queued_predictions_are_handed_out_to_namespaces_in_turn(
    redis_url: str, http: aiohttp.ClientSession
) -> None:
    async with serve_local(redis_url, concurrency=1) as gw:
        blocker = await create(http, gw, initial_prompt="stand-in:hang")
        await until(gw, blocker["id"], lambda r: r.state.phase is lc.Phase.PROCESSING)
        alpha = [(await create(http, gw))["id"] for _ in range(3)]
        beta = (await create(http, gw, token=OTHER_TOKEN))["id"]
        async with http.post(blocker["urls"]["cancel"], headers=gw.auth()) as resp:
            assert resp.status == 200
        started = {}
        for namespace, prediction_id in [*(("alpha", a) for a in alpha), ("beta", beta)]:
            record = await until(gw, prediction_id, ended, namespace=namespace)
            assert record.state.phase is lc.Phase.SUCCEEDED and record.state.started_at
            started[prediction_id] = record.state.started_at
        order = sorted(started, key=started.__getitem__)
        assert order == [alpha[0], beta, alpha[1], alpha[2]]


async def test_a_runner_that_cannot_start_fails_what_waits_for_it(
    redis_url: str, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-such-runner")
    async with serve_local(redis_url, runner=[missing], concurrency=1) as gw:
        body = await create(http, gw)
        record = await until(gw, body["id"], ended)
        assert record.state.reason == "RunnerNotStarted"
        assert record.state.error is not None
        assert (
            record.state.error.startswith("cannot start the runner")
            and missing in record.state.error
        )
        assert runner_processes(gw) == []


async def test_a_cancel_while_a_runner_is_being_given_the_prediction_stops_that_runner(
    redis_url: str, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_local(redis_url, concurrency=1) as gw:
        runners = gw.backend.runners
        reading, go_on = asyncio.Event(), asyncio.Event()
        real = runners.store.get_record

        async def slow_read(namespace: str, prediction_id: str) -> PredictionRecord | None:
            record: PredictionRecord | None = await real(namespace, prediction_id)  # pre-cancel
            reading.set()
            await go_on.wait()
            return record

        monkeypatch.setattr(runners.store, "get_record", slow_read)
        body = await create(http, gw)
        await asyncio.wait_for(reading.wait(), 30)  # a runner is being given it
        (process,) = runner_processes(gw)
        monkeypatch.setattr(runners.store, "get_record", real)
        async with http.post(body["urls"]["cancel"], headers=gw.auth()) as resp:
            assert (await resp.json())["status"] == "canceled"
        go_on.set()
        await asyncio.wait_for(process.wait(), 10)  # stopped, not left to transcribe
        record = await until(gw, body["id"], ended)
        assert record.state.phase is lc.Phase.CANCELED and record.state.started_at is None
