"""The work protocol and the runner endpoint that serves it (reports, work, readyz)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import REPO_ROOT, free_port
from whisperx_api.records import PredictionRecord
from whisperx_api.reports import SIGNATURE_HEADER, prediction_token, sign
from whisperx_api.runner_endpoint import runner_app
from whisperx_api.status_writer import StatusWriter
from whisperx_api.store import Store
from whisperx_api.work import STOP, Assignment, FairQueue, WorkRequest, WorkWaiter, runner_token

KEY = b"signing-key"


def test_the_queue_is_oldest_first_within_a_namespace_and_takes_namespaces_in_turn() -> None:
    queue = FairQueue()
    for n in range(4):
        queue.push("busy", f"b{n}")
    queue.push("quiet", "q0")
    queue.push("other", "o0")
    assert len(queue) == 6 and ("quiet", "q0") in queue and ("quiet", "b0") not in queue
    order = [queue.pop() for _ in range(6)]
    assert order == [
        ("busy", "b0"), ("quiet", "q0"), ("other", "o0"), ("busy", "b1"), ("busy", "b2"),
        ("busy", "b3"),
    ]  # fmt: skip
    assert queue.pop() is None and len(queue) == 0


def test_removing_from_the_queue() -> None:
    queue = FairQueue()
    queue.push("a", "1")
    queue.push("b", "2")
    queue.push("a", "3")
    assert queue.remove("a", "1") and not queue.remove("a", "1") and not queue.remove("c", "1")
    assert queue.remove("b", "2")  # its namespace leaves the rotation
    assert queue.pop() == ("a", "3") and queue.pop() is None


def test_a_runner_credential_is_not_a_report_credential() -> None:
    assert runner_token(KEY, "r1") != runner_token(KEY, "r2")
    assert runner_token(KEY, "ns") != prediction_token(KEY, "ns", "", "")


@dataclass
class Source:
    answers: list[Assignment | Literal["stop"] | None] = field(default_factory=list)
    asked: list[tuple[str, WorkRequest]] = field(default_factory=list)

    async def claim(
        self, runner_id: str, request: WorkRequest
    ) -> Assignment | Literal["stop"] | None:
        self.asked.append((runner_id, request))
        return self.answers.pop(0)


@dataclass
class RedisSink:
    store: Store

    async def load(self, namespace: str, prediction_id: str) -> PredictionRecord | None:
        return await self.store.get_record(namespace, prediction_id)

    async def save(self, record: PredictionRecord) -> None:
        return None


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    store = Store.from_url(redis_url)
    yield store
    await store.close()


def writer_for(store: Store) -> StatusWriter:
    return StatusWriter(store=store, sink=RedisSink(store), report_key=KEY, public_url="http://gw")


def signed(runner: str, body: dict[str, object]) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    return raw, {SIGNATURE_HEADER: sign(runner_token(KEY, runner), raw)}


async def test_work_is_handed_to_the_runner_that_signs_for_it(store: Store) -> None:
    given = Assignment(
        namespace="ns",
        id="p",
        input={"audio_file": "data:,"},
        report_url="http://x/reports/ns/p",
        report_token="t",
        attempt="r1",
    )
    source = Source([given, None, STOP])
    async with TestClient(TestServer(runner_app(writer_for(store), store, work=source))) as client:
        body, headers = signed("r1", {"wait": 1, "setup_seconds": 2.5})
        async with client.post("/work/r1", data=body, headers=headers) as resp:
            assert resp.status == 200 and Assignment.model_validate(await resp.json()) == given
        assert source.asked == [("r1", WorkRequest(wait=1, setup_seconds=2.5))]
        async with client.post("/work/r1", data=body, headers=headers) as resp:
            assert resp.status == 204
        async with client.post("/work/r1", data=body, headers=headers) as resp:
            assert resp.status == 410
        # Another runner's signature, or none: refused before the source is asked.
        async with client.post("/work/r2", data=body, headers=headers) as resp:
            assert resp.status == 401
        async with client.post("/work/r1", data=body) as resp:
            assert resp.status == 401
        body, headers = signed("r1", {"wait": 600})
        async with client.post("/work/r1", data=body, headers=headers) as resp:
            assert resp.status == 422 and (await resp.json())["detail"].startswith("wait:")
        body, headers = signed("r1", {"wait": 1, "surprise": True})
        async with client.post("/work/r1", data=body, headers=headers) as resp:
            assert resp.status == 422 and "surprise" in (await resp.json())["detail"]
    assert len(source.asked) == 3


async def test_without_a_work_source_there_is_no_work_route(store: Store) -> None:
    async with TestClient(TestServer(runner_app(writer_for(store), store))) as client:
        body, headers = signed("r1", {})
        async with client.post("/work/r1", data=body, headers=headers) as resp:
            assert resp.status == 404


async def test_a_standby_replica_or_a_redis_outage_answers_503() -> None:
    down = Store.from_url(f"redis://127.0.0.1:{free_port()}/0")
    source = Source()
    app = runner_app(writer_for(down), down, work=source)
    async with (
        TestClient(TestServer(app)) as client,
        client.post("/reports/ns/p", data=b"{}") as resp,
    ):
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    standby = runner_app(writer_for(down), down, work=source, active=lambda: False)
    async with TestClient(TestServer(standby)) as client:
        body, headers = signed("r1", {})
        async with client.post("/work/r1", data=body, headers=headers) as resp:
            assert resp.status == 503
    assert source.asked == []
    await down.close()


async def test_a_poll_canceled_as_work_is_announced_ends() -> None:
    """A cancel that lands as the wait it interrupts is woken is not lost: with
    `asyncio.wait_for` (Python 3.11) the poll went on waiting, and whatever awaited its
    end (a shutdown) hung; the same held for every such wait in the services."""
    waiter = WorkWaiter()
    for n in range(400):
        poll = asyncio.create_task(
            waiter.poll(30, take=lambda: None, alive=lambda: True, idle=lambda waiting: None)
        )
        await asyncio.sleep(0)
        await waiter.announce()
        for _ in range(n % 4):
            await asyncio.sleep(0)
        poll.cancel()
        done, _ = await asyncio.wait({poll}, timeout=1)
        assert done, f"poll {n} went on after its cancel"


def test_no_service_waits_with_asyncio_wait_for() -> None:
    """Each wait in the services is `asyncio.timeout`, for the reason above."""
    sources = [
        p for d in ("api", "operator", "gateway", "runner") for p in (REPO_ROOT / d).rglob("*.py")
    ]
    assert [str(p) for p in sources if "asyncio.wait_for(" in p.read_text()] == []
