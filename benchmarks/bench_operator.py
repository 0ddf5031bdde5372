"""Operator benchmark against the emulated API server (not a timed test).

Measures, in one run and on the same machine:

1. created -> Job created latency: from the moment a client starts creating a Prediction
   until its Job exists in the API server, for predictions created one at a time. The
   baseline is a bare kopf operator (benchmarks/baseline_operator.py) doing only that, on
   the same emulator: the floor any kopf operator pays.
2. The operator's resident memory with N live Predictions (their Jobs created, never
   run: the worst case, every prediction waiting for its start deadline). The baseline is
   the same operator idle, right after startup.

Run: `.venv/bin/python benchmarks/bench_operator.py [--count 5000] [--samples 200]`.
Targets (absolute): p50 <= 50 ms, RSS <= 300 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.conftest import RedisServer, free_port  # noqa: E402
from tests.kube_fixtures import (  # noqa: E402
    JOBS,
    PREDICTIONS,
    Emulator,
    OperatorProcess,
    emulator_url,
    operator_environment,
    prediction_body,
    running_emulator,
    wait_for,
)
from whisperx_api.kube import KubeClient, resource_path  # noqa: E402

NS = "default"


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class JobClock:
    """When each Job appeared, seen from inside the API server."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.seen: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Event] = {}
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        async for event in self.emulator.subscribe(JOBS):
            if event["type"] == "ADDED":
                name = event["object"]["metadata"]["name"]
                self.seen[name] = time.perf_counter()
                if name in self.waiters:
                    self.waiters[name].set()

    async def wait(self, name: str, within: float = 30.0) -> float:
        if name not in self.seen:
            event = self.waiters.setdefault(name, asyncio.Event())
            await asyncio.wait_for(event.wait(), within)
        return self.seen[name]


async def sample_latencies(
    client: KubeClient, clock: JobClock, prefix: str, samples: int
) -> list[float]:
    latencies = []
    for i in range(samples):
        name = f"{prefix}-{i:05d}"
        start = time.perf_counter()
        await client.create(resource_path(NS), prediction_body(name, "https://bench.test/a.wav"))
        latencies.append((await clock.wait(name)) - start)
        await asyncio.sleep(0.02)  # one at a time: latency, not throughput
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spawn_baseline(workdir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "kopf"), "run", "--standalone",
            "--all-namespaces", "--quiet", str(REPO_ROOT / "benchmarks" / "baseline_operator.py"),
        ],
        env={"KUBECONFIG": str(workdir / "kubeconfig"), "PATH": "/usr/bin:/bin"},
        stdout=(workdir / "baseline.log").open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip


async def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    await wait_for(lambda: process.poll() is not None, within=20)


async def bulk_create(client: KubeClient, prefix: str, count: int, concurrency: int) -> None:
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            body = prediction_body(f"{prefix}-{i:05d}", "https://bench.test/a.wav")
            await client.create(resource_path(NS), body)

    await asyncio.gather(*(one(i) for i in range(count)))


def report(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    redis = RedisServer(port=free_port(), data_dir=workdir)
    redis.start()
    try:
        async with running_emulator() as emulator:
            client = KubeClient(emulator_url(emulator), timeout=120)
            clock = JobClock(emulator)
            clock.task = asyncio.create_task(clock.run())
            env = operator_environment(
                emulator, redis.url, workdir,
                WHISPERX_LOG_LEVEL="WARNING",
                # Nothing runs these Jobs; keep every prediction live for the measurement.
                WHISPERX_DEFAULT_START_DEADLINE_SECONDS="86400",
            )  # fmt: skip

            print(f"baseline: bare kopf operator, {args.samples} predictions one at a time")
            baseline = spawn_baseline(workdir)
            await wait_for(lambda: emulator.watches.open[PREDICTIONS] > 0, within=30)
            base_lat = await sample_latencies(client, clock, "base", args.samples)
            await stop(baseline)
            for resource in (PREDICTIONS, JOBS):
                for obj in emulator.list(resource):
                    await emulator.delete_object(resource, NS, obj["metadata"]["name"])

            operator = OperatorProcess(env=env, log_path=workdir / "operator.log")
            operator.start()
            await operator.wait_ready(emulator)
            assert operator.process is not None
            pid = operator.process.pid
            await asyncio.sleep(2)
            idle_rss, _ = rss_mb(pid)

            print(f"whisperx-operator: {args.samples} predictions one at a time")
            lat = await sample_latencies(client, clock, "lat", args.samples)

            bulk = args.count - args.samples
            print(f"whisperx-operator: {bulk} more predictions, {args.concurrency} in flight")
            started = time.perf_counter()
            await bulk_create(client, "bulk", bulk, args.concurrency)
            await wait_for(
                lambda: len(emulator.list(JOBS)) >= args.count,
                within=args.within,
                interval=0.5,
            )
            elapsed = time.perf_counter() - started
            burst_rss, peak_rss = rss_mb(pid)
            await asyncio.sleep(args.settle)
            settled_rss, peak_rss = rss_mb(pid)
            live = len(emulator.list(PREDICTIONS))

            await operator.stop()
            await client.close()
            clock.task.cancel()
    finally:
        redis.stop()

    p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
    b50, b99 = percentile(base_lat, 0.5), percentile(base_lat, 0.99)
    print()
    print(
        f"machine: {os.cpu_count()} cores; {args.samples} latency samples; "
        f"{live} live predictions of this operator"
    )
    report(
        [
            ("measure", "whisperx-operator", "baseline", "ratio"),
            ("created->Job p50", f"{p50 * 1000:.1f} ms", f"{b50 * 1000:.1f} ms (bare kopf)",
             f"{p50 / b50:.2f}x"),
            ("created->Job p99", f"{p99 * 1000:.1f} ms", f"{b99 * 1000:.1f} ms (bare kopf)",
             f"{p99 / b99:.2f}x"),
            (f"RSS, {live} live", f"{settled_rss:.0f} MB", f"{idle_rss:.0f} MB (idle)",
             f"{settled_rss / idle_rss:.2f}x"),
            ("RSS peak", f"{peak_rss:.0f} MB", "", ""),
            ("bulk throughput", f"{bulk / elapsed:.0f} predictions/s", "", ""),
        ]
    )  # fmt: skip
    print(f"targets: p50 <= 50 ms ({'met' if p50 <= 0.05 else 'MISSED'}), "
          f"RSS <= 300 MB ({'met' if settled_rss <= 300 else 'MISSED'}); "
          f"mean latency {statistics.mean(lat) * 1000:.1f} ms; RSS right after the burst "
          f"{burst_rss:.0f} MB")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="live predictions for RSS")
    parser.add_argument("--samples", type=int, default=200, help="latency samples")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds before RSS")
    parser.add_argument("--within", type=float, default=1200.0, help="time limit, seconds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
