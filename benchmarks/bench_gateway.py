"""Gateway throughput and latency against a bare aiohttp + Redis ceiling, in one run.

    .venv/bin/python benchmarks/bench_gateway.py [--seconds 5] [--concurrency 32]

Measured on loopback, each server in its own process, one at a time, under the same
load generator in its own process (`wrk` when installed, `apt-get install wrk`; else a
Python aiohttp client, which saturates near the servers' rates and so flatters ratios):

- `GET /v1/predictions/{id}` of a finished prediction (a one-minute transcript with word
  timings) through the real gateway, and a bare aiohttp handler doing the same Redis read
  (one MGET of record, output and logs) and returning the raw values: the ceiling.
- `POST /v1/predictions` through the gateway's Kubernetes backend to a stub API server
  (answers a create at once), and a bare handler forwarding the body to the same stub.

Prints requests/s, p50 and p99 latency, and the gateway/ceiling ratios (target: GET
>= 0.7x). A private redis-server is started unless REDIS_URL is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from whisperx_api.records import PredictionRecord

TOKEN = "bench-token-0123456789"
NAMESPACE = "bench"
PREDICTION_ID = "benchprediction0000000001"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def transcript(seconds: int = 60) -> dict[str, Any]:
    """Output shaped like WhisperX's for a minute of speech: 12 segments, 120 words."""
    spoken = ("the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "again")
    segments = []
    for n in range(seconds // 5):
        start = n * 5.0
        words: list[dict[str, Any]] = [
            {"word": w, "start": start + i * 0.4, "end": start + i * 0.4 + 0.3, "score": 0.91}
            for i, w in enumerate(spoken)
        ]
        segments.append(
            {
                "start": start,
                "end": start + 4.8,
                "text": " ".join(w["word"] for w in words),
                "words": words,
            }
        )
    return {"segments": segments, "detected_language": "en"}


def finished_record(prediction_id: str, input: dict[str, Any]) -> PredictionRecord:
    """A prediction that succeeded just now, on a minute of audio."""
    from whisperx_api import lifecycle as lc
    from whisperx_api.records import PredictionRecord

    at = datetime.now(UTC)
    state = lc.PredictionState()
    for event in (
        lc.Created(at=at),
        lc.Started(at=at),
        lc.Completed(status=lc.Phase.SUCCEEDED, at=at, predict_time=3.2, audio_duration=60.0),
    ):
        state = lc.apply(state, event).state
    return PredictionRecord(
        id=prediction_id, namespace=NAMESPACE, uid=uuid.uuid4().hex, input=input, state=state
    )


async def seed(redis_url: str) -> None:
    from whisperx_api.store import Store

    store = Store.from_url(redis_url)
    record = finished_record(
        PREDICTION_ID, {"audio_file": "https://example.com/minute.wav", "align_output": True}
    )
    await store.put_output(NAMESPACE, PREDICTION_ID, transcript())
    await store.append_logs(NAMESPACE, PREDICTION_ID, "Transcribing\nAligning\n")
    await store.put_record(record)
    await store.close()


# --- servers (each runs in its own process: `bench_gateway.py serve KIND PORT ...`) ---


def serve_gateway(port: int, redis_url: str, kube_url: str, **settings: Any) -> None:
    """The gateway with the Kubernetes backend; `settings` are more GatewayConfig fields."""
    from whisperx_api.kube import KubeClient
    from whisperx_api.store import Store
    from whisperx_gateway.app import create_app
    from whisperx_gateway.auth import TokenMap
    from whisperx_gateway.config import GatewayConfig
    from whisperx_gateway.kube_backend import KubeBackend

    async def build() -> web.Application:
        config = GatewayConfig(
            tokens=TokenMap.from_mapping({TOKEN: NAMESPACE}),
            redis_url=redis_url,
            public_url=f"http://127.0.0.1:{port}",
            **settings,
        )
        backend = KubeBackend(KubeClient(kube_url))
        return create_app(config, Store.from_url(redis_url), backend)

    web.run_app(build(), host="127.0.0.1", port=port, access_log=None, print=None)


def serve_ceiling(port: int, redis_url: str, kube_url: str) -> None:
    """The least a handler can do for the same answers: the read, or the forward."""
    import redis.asyncio as aioredis

    async def build() -> web.Application:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        session = aiohttp.ClientSession(kube_url)
        prefix = f"wx:p:{NAMESPACE}:"

        async def get(request: web.Request) -> web.Response:
            pid = request.match_info["id"]
            # decode_responses=True: str values, which redis-py's types do not know.
            rec, out, logs = cast(
                "list[str | None]",
                await client.mget(
                    prefix + pid + ":rec", prefix + pid + ":out", prefix + pid + ":logs"
                ),
            )
            return web.Response(text=f"[{rec},{out},{json.dumps(logs)}]")

        async def create(request: web.Request) -> web.Response:
            body = await request.read()
            path = f"/apis/whisperx.io/v1alpha1/namespaces/{NAMESPACE}/predictions"
            async with session.post(path, data=body) as resp:
                return web.Response(body=await resp.read(), status=201)

        async def close(app: web.Application) -> None:
            await session.close()
            await client.aclose()

        app = web.Application()
        app.router.add_get("/v1/predictions/{id}", get)
        app.router.add_post("/v1/predictions", create)
        app.on_cleanup.append(close)
        return app

    web.run_app(build(), host="127.0.0.1", port=port, access_log=None, print=None)


def serve_kube_stub(port: int, redis_url: str, kube_url: str) -> None:
    """A Kubernetes API that stores nothing and answers creates at once."""

    async def create(request: web.Request) -> web.Response:
        obj = await request.json()
        obj.setdefault("metadata", {}).update(
            uid=str(uuid.uuid4()),
            namespace=request.match_info["ns"],
            creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            resourceVersion="1",
        )
        return web.json_response(obj, status=201)

    app = web.Application()
    app.router.add_post("/apis/{group}/{version}/namespaces/{ns}/{plural}", create)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


SERVERS = {"gateway": serve_gateway, "ceiling": serve_ceiling, "kube": serve_kube_stub}


class Server:
    """`script serve KIND PORT REDIS_URL KUBE_URL` in a process of its own."""

    def __init__(
        self,
        kind: str,
        redis_url: str,
        kube_url: str = "",
        *,
        script: str = __file__,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, script, "serve", kind, str(self.port), redis_url, kube_url],
            env=env,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


# --- the load generator (its own process) ---


async def load(
    method: str, url: str, body: bytes | None, seconds: float, concurrency: int
) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker(until: float, record: bool) -> None:
            nonlocal errors
            while time.perf_counter() < until:
                started = time.perf_counter()
                async with session.request(method, url, data=body) as resp:
                    await resp.read()
                    if resp.status >= 300:
                        errors += 1
                if record:
                    latencies.append(time.perf_counter() - started)

        warmup = time.perf_counter() + min(1.0, seconds / 4)
        await asyncio.gather(*(worker(warmup, False) for _ in range(concurrency)))
        began = time.perf_counter()
        await asyncio.gather(*(worker(began + seconds, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "errors": errors,
    }


def run_load(
    method: str, url: str, body: bytes | None, seconds: float, concurrency: int
) -> dict[str, float]:
    """The load generator in a child process, so it does not share the servers' CPU:
    `wrk` when installed (C, far lighter than any Python client), else aiohttp."""
    if shutil.which("wrk"):
        return run_wrk(method, url, body, seconds, concurrency)
    spec = json.dumps([method, url, body.decode() if body else None, seconds, concurrency])
    out = subprocess.run(
        [sys.executable, __file__, "load", spec], check=True, capture_output=True, text=True
    )
    return dict(json.loads(out.stdout))


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(
    method: str, url: str, body: bytes | None, seconds: float, concurrency: int
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(
            f"wrk.method = {json.dumps(method)}\n"
            f"wrk.body = {json.dumps((body or b'').decode())}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\n'
        )
        script.flush()
        subprocess.run(  # warm-up
            ["wrk", "-t1", f"-c{concurrency}", "-d1s", "-s", script.name, url],
            check=True, capture_output=True,
        )  # fmt: skip
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:.0f}s", "--latency",
             "-s", script.name, url],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip

    def latency(percentile: str) -> float:
        found = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert found, out
        return float(found[1]) * _UNITS[found[2]]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    assert rps, out
    return {
        "rps": float(rps[1]),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "errors": float(errors[1]) if errors else 0.0,
    }


def redis_server(data_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on loopback (with an AOF, as deployed), and its URL."""
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port),
         "--bind", "127.0.0.1", "--dir", data_dir, "--save", "", "--appendonly", "yes"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    return process, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    redis_url = os.environ.get("REDIS_URL", "")
    redis_process = None
    data_dir = tempfile.mkdtemp(prefix="bench-redis-")
    if not redis_url:
        redis_process, redis_url = redis_server(data_dir)
    kube = Server("kube", redis_url)
    try:
        kube.wait_ready()
        asyncio.run(seed(redis_url))
        create_body = json.dumps(
            {"version": "whisperx", "input": {"audio_file": "https://example.com/a.wav"}}
        ).encode()
        results: dict[str, dict[str, dict[str, float]]] = {}
        for kind in ("ceiling", "gateway"):
            server = Server(kind, redis_url, kube.url)
            try:
                server.wait_ready()
                get_url = f"{server.url}/v1/predictions/{PREDICTION_ID}"
                results[kind] = {
                    "get": run_load("GET", get_url, None, args.seconds, args.concurrency),
                    "create": run_load(
                        "POST",
                        f"{server.url}/v1/predictions",
                        create_body,
                        args.seconds,
                        args.concurrency,
                    ),
                }
            finally:
                server.stop()
    finally:
        kube.stop()
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait()
        shutil.rmtree(data_dir, ignore_errors=True)

    print(f"{'':36} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for op, label in (("get", "GET /v1/predictions/{id}"), ("create", "POST /v1/predictions")):
        for kind in ("ceiling", "gateway"):
            r = results[kind][op]
            print(
                f"{label + ' (' + kind + ')':36} {r['rps']:9.0f} {r['p50_ms']:8.2f} "
                f"{r['p99_ms']:8.2f} {r['errors']:7.0f}"
            )
    for op in ("get", "create"):
        ratio = results["gateway"][op]["rps"] / results["ceiling"][op]["rps"]
        target = " (target >= 0.70)" if op == "get" else ""
        print(f"ratio gateway/ceiling, {op}: {ratio:.2f}x{target}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        kind, port, redis_url, kube_url = sys.argv[2:6]
        SERVERS[kind](int(port), redis_url, kube_url)
    elif len(sys.argv) > 1 and sys.argv[1] == "load":
        method, url, body, seconds, concurrency = json.loads(sys.argv[2])
        encoded = body.encode() if body is not None else None
        print(json.dumps(asyncio.run(load(method, url, encoded, seconds, concurrency))))
    else:
        main()
