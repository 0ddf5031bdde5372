"""Operator benchmark against the real control plane (not a timed test).

Starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler
(tests/cluster/controlplane.py), deploys the stack as the tests do (CRDs and the kind
overlay), and measures in one run:

1. created -> Job created latency: from just before a Prediction's create request until
   its Job is seen by a watch, for predictions created one at a time in the tenant
   namespace. The baseline is a bare kopf operator (benchmarks/baseline_operator.py)
   doing only that, on the same API server: the floor any kopf operator pays.
2. The operator's resident memory with N live Predictions, for each N of `--counts`
   (bulk-created through the admin client, their Jobs and Secrets created, never run:
   the worst case, every prediction waiting to start). The baseline is the same operator
   idle, right after startup. By default the creation is a burst, as fast as the API
   server takes it (the operator works off a backlog); `--ahead N` paces it so that at
   most N Predictions are without a Job (the memory of the live Predictions themselves).

No pods run: the operator is given a Kueue queue name (no Kueue is installed), so its
Jobs are created suspended, as the baseline's are; the Job controller only records them.
The operator authenticates as its own ServiceAccount, the baseline as the admin.

Run from the repository root:
`.venv/bin/python benchmarks/bench_operator.py [--counts 5000 50000] [--samples 200]`.
Targets (absolute): p50 <= 50 ms, RSS with 50,000 live Predictions <= 600 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.stats import percentile  # noqa: E402
from tests.cluster.client import ApiError, path_of  # noqa: E402
from tests.cluster.controlplane import ControlPlane, build_binaries  # noqa: E402
from tests.cluster.fixtures import (  # noqa: E402
    JOBS,
    PREDICTIONS,
    SECRETS,
    TENANT,
    RealKube,
    deploy_stack,
    reset_namespace,
)
from tests.conftest import RedisServer, free_port  # noqa: E402
from tests.kube_fixtures import OperatorProcess, operator_environment, prediction_body  # noqa: E402

NS = TENANT  # restricted Pod Security: both operators' pod templates must pass it
AUDIO = "https://bench.test/a.wav"
WARMUP = 3  # predictions before the samples: connections opened, watches started
RSS_TARGET_COUNT, RSS_TARGET_MB, P50_TARGET_S = 50_000, 600.0, 0.050
RETRIED = {429, 500, 502, 503, 504}


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process, in MB."""
    fields = proc_status(pid)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


class JobClock:
    """When each Job was first seen by a watch of the namespace, from this process."""

    def __init__(self, kube: RealKube) -> None:
        self.kube = kube
        self.seen: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Event] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        path = path_of(JOBS, NS)
        listed = await self.kube.request("GET", path, params={"limit": "1"})
        self.task = asyncio.create_task(self._run(path, listed["metadata"]["resourceVersion"]))

    async def _run(self, path: str, version: str) -> None:
        while True:  # a watch the server ends is resumed from the last event seen
            async for event in self.kube.watch(path, version):
                meta = event["object"]["metadata"]
                version = meta["resourceVersion"]
                if event["type"] == "ADDED" and meta["name"] not in self.seen:
                    self.seen[meta["name"]] = time.perf_counter()
                    if meta["name"] in self.waiters:
                        self.waiters[meta["name"]].set()

    async def wait(self, name: str, within: float = 60.0) -> float:
        if name not in self.seen:
            event = self.waiters.setdefault(name, asyncio.Event())
            await asyncio.wait_for(event.wait(), within)
        return self.seen[name]

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def create_prediction(kube: RealKube, name: str) -> None:
    """Creates a Prediction, retrying what an overloaded API server answers."""
    for attempt in range(20):
        try:
            await kube.create_object(PREDICTIONS, NS, prediction_body(name, AUDIO))
            return
        except ApiError as exc:
            if exc.status == 409 and attempt:  # an earlier attempt got through
                return
            if exc.status not in RETRIED:
                raise
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.5 * (attempt + 1))
    raise RuntimeError(f"creating {name}: the API server kept refusing")


async def sample_latencies(kube: RealKube, prefix: str, samples: int, gap: float) -> list[float]:
    clock = JobClock(kube)
    await clock.start()
    try:
        latencies = []
        for i in range(-WARMUP, samples):
            name = f"{prefix}-{i + WARMUP:05d}"
            start = time.perf_counter()
            await create_prediction(kube, name)
            latency = (await clock.wait(name)) - start
            if i >= 0:
                latencies.append(latency)
            # One at a time: latency, not throughput. A short gap measures each one behind
            # the previous one's follow-up work (status, Events); a long one, the path alone.
            await asyncio.sleep(gap)
        return latencies
    finally:
        await clock.stop()


async def count(kube: RealKube, resource: Any) -> int:
    """How many objects the namespace holds, from a one-item page."""
    listed = await kube.request("GET", path_of(resource, NS), params={"limit": "1"})
    return len(listed.get("items") or ()) + int(listed["metadata"].get("remainingItemCount", 0))


@dataclass
class Step:
    """The operator with `target` live Predictions."""

    target: int
    live: int = 0
    jobs: int = 0
    secrets: int = 0
    seconds: float = 0.0
    rss: float = 0.0
    peak: float = 0.0
    settled_in: float = 0.0
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.jobs >= self.target


async def bulk_create(
    kube: RealKube, first: int, last: int, args: argparse.Namespace, started: float
) -> None:
    slots = asyncio.Semaphore(args.concurrency)
    done = 0
    jobs = await count(kube, JOBS) if args.ahead else 0
    counted = asyncio.Condition()

    async def count_jobs() -> None:
        """Every second when pacing (a burst: only for the progress line, every 30 s)."""
        nonlocal jobs
        every = 1 if args.ahead else 30
        for tick in itertools.count(1):
            await asyncio.sleep(every)
            jobs = await count(kube, JOBS)
            async with counted:
                counted.notify_all()
            if tick * every % 30 == 0:
                elapsed = time.perf_counter() - started
                print(f"  {elapsed:6.0f} s: {done} created, {jobs} Jobs", flush=True)

    async def one(i: int) -> None:
        nonlocal done
        async with slots:
            # --ahead: no more Predictions without a Job than that (0: a burst).
            if args.ahead:
                async with counted:
                    await counted.wait_for(lambda: first + done - jobs < args.ahead)
            if time.perf_counter() - started > args.within:
                return
            await create_prediction(kube, f"bulk-{i:06d}")
            done += 1

    counter = asyncio.create_task(count_jobs())
    try:
        await asyncio.gather(*(one(i) for i in range(first, last)))
    finally:
        counter.cancel()


async def settle(pid: int, least: float, most: float) -> tuple[float, bool]:
    """Waits `least` seconds, then until the process is idle (under 2% of a core over
    5 s) or `most` seconds have passed; returns the seconds waited and whether it was
    idle by then (if not, RSS is read while it still works off a backlog)."""
    began = time.perf_counter()
    await asyncio.sleep(least)
    while time.perf_counter() - began < most:
        before = cpu_seconds(pid)
        await asyncio.sleep(5)
        if cpu_seconds(pid) - before < 0.1:
            return time.perf_counter() - began, True
    return time.perf_counter() - began, False


async def phase_sample(kube: RealKube, size: int = 500) -> dict[str, int]:
    """status.phase of the first `size` Predictions (a check that they are live)."""
    listed = await kube.request("GET", path_of(PREDICTIONS, NS), params={"limit": str(size)})
    phases: dict[str, int] = {}
    for item in listed.get("items") or ():
        phase = (item.get("status") or {}).get("phase") or "none"
        phases[phase] = phases.get(phase, 0) + 1
    return phases


async def fill(
    kube: RealKube, pid: int, created: int, step: Step, args: argparse.Namespace
) -> Step:
    paced = f", at most {args.ahead} without a Job" if args.ahead else " (a burst)"
    print(f"whisperx-operator: up to {step.target} live predictions, "
          f"{args.concurrency} in flight{paced}", flush=True)  # fmt: skip
    started = time.perf_counter()
    await bulk_create(kube, created, step.target, args, started)
    while time.perf_counter() - started < args.within:
        step.jobs = await count(kube, JOBS)
        if step.jobs >= step.target:
            break
        await asyncio.sleep(2)
    step.seconds = time.perf_counter() - started
    step.settled_in, idle = await settle(pid, args.settle, args.settle_max)
    step.rss, step.peak = rss_mb(pid)
    step.live = await count(kube, PREDICTIONS)
    step.jobs = await count(kube, JOBS)
    step.secrets = await count(kube, SECRETS)
    step.phases = await phase_sample(kube)
    print(f"  {step.live} Predictions, {step.jobs} Jobs, {step.secrets} Secrets in "
          f"{step.seconds:.0f} s; {'idle after' if idle else 'still busy (settle limit) after'} "
          f"{step.settled_in:.0f} s; RSS {step.rss:.0f} MB "
          f"(peak {step.peak:.0f}); phases of the first 500: {step.phases}",
          flush=True)  # fmt: skip
    return step


def spawn_baseline(plane: ControlPlane, workdir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "kopf"), "run", "--standalone",
            "--all-namespaces", "--quiet", str(REPO_ROOT / "benchmarks" / "baseline_operator.py"),
        ],
        env={"KUBECONFIG": str(plane.admin_kubeconfig), "PATH": "/usr/bin:/bin",
             "HOME": str(workdir), "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        stdout=(workdir / "baseline.log").open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def etcd_db_mb(plane: ControlPlane) -> float:
    db = plane.workdir / "etcd" / "member" / "snap" / "db"
    return db.stat().st_size / 2**20 if db.exists() else 0.0


def report(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    models = workdir / "models"
    models.mkdir()
    redis = RedisServer(port=free_port(), data_dir=workdir)
    redis.start()
    began = time.perf_counter()
    try:
        with ControlPlane(workdir / "plane", bin_dir=build_binaries()) as plane:
            deploy_stack(plane, models)
            print(f"control plane up and stack deployed in {time.perf_counter() - began:.0f} s",
                  flush=True)  # fmt: skip
            async with RealKube(plane) as kube:
                print(f"baseline: bare kopf operator, {args.samples} predictions one at a time",
                      flush=True)  # fmt: skip
                baseline = spawn_baseline(plane, workdir)
                try:
                    base_lat = await sample_latencies(kube, "base", args.samples, args.gap)
                finally:
                    stop(baseline)
                await asyncio.to_thread(reset_namespace, plane, NS)

                env = operator_environment(
                    kube, redis.url, workdir,
                    WHISPERX_LOG_LEVEL="WARNING",
                    # No Kueue runs: the Jobs are created suspended and stay so (no pods).
                    WHISPERX_KUEUE_QUEUE="bench-queue",
                    # Keep every prediction live for the measurement.
                    WHISPERX_DEFAULT_START_DEADLINE_SECONDS="86400",
                )  # fmt: skip
                operator = OperatorProcess(env=env, log_path=workdir / "operator.log")
                operator.start()
                try:
                    assert operator.process is not None
                    pid = operator.process.pid
                    await wait_ready(operator)
                    await asyncio.sleep(3)
                    idle_rss, _ = rss_mb(pid)
                    print(f"whisperx-operator: {args.samples} predictions one at a time",
                          flush=True)  # fmt: skip
                    lat = await sample_latencies(kube, "lat", args.samples, args.gap)
                    created = args.samples + WARMUP
                    steps = []
                    for target in sorted(args.counts):
                        step = await fill(kube, pid, created, Step(target), args)
                        steps.append(step)
                        created = max(created, target)
                        if not step.complete:
                            print(f"  stopped: {target} not reached within {args.within} s")
                            break
                    errors = sum(
                        " ERROR " in line
                        for line in operator.log_path.read_text(errors="replace").splitlines()
                    )
                finally:
                    await operator.stop()
                db_mb = etcd_db_mb(plane)
    finally:
        redis.stop()

    p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
    b50, b99 = percentile(base_lat, 0.5), percentile(base_lat, 0.99)
    print()
    print(f"machine: {os.cpu_count()} cores; {args.samples} latency samples each, "
          f"{args.gap} s apart; etcd db "
          f"{db_mb:.0f} MB at the end; {errors} ERROR lines in the operator's log; "
          f"whole run {time.perf_counter() - began:.0f} s")  # fmt: skip
    rows = [
        ("measure", "whisperx-operator", "baseline", "ratio"),
        ("created->Job p50", f"{p50 * 1000:.1f} ms", f"{b50 * 1000:.1f} ms (bare kopf)",
         f"{p50 / b50:.2f}x"),
        ("created->Job p99", f"{p99 * 1000:.1f} ms", f"{b99 * 1000:.1f} ms (bare kopf)",
         f"{p99 / b99:.2f}x"),
        ("created->Job mean", f"{statistics.mean(lat) * 1000:.1f} ms",
         f"{statistics.mean(base_lat) * 1000:.1f} ms (bare kopf)",
         f"{statistics.mean(lat) / statistics.mean(base_lat):.2f}x"),
    ]  # fmt: skip
    for step in steps:
        rows += [
            (f"RSS, {step.live} live", f"{step.rss:.0f} MB (peak {step.peak:.0f})",
             f"{idle_rss:.0f} MB (idle)", f"{step.rss / idle_rss:.2f}x"),
            (f"  bulk to {step.jobs} Jobs", f"{step.seconds:.0f} s", "", ""),
        ]  # fmt: skip
    report(rows)
    at_target = next((s for s in steps if s.target >= RSS_TARGET_COUNT and s.complete), None)
    rss_verdict = (
        "not measured"
        if at_target is None
        else "met"
        if at_target.rss <= RSS_TARGET_MB
        else "MISSED"
    )
    print(f"targets: p50 <= 50 ms ({'met' if p50 <= P50_TARGET_S else 'MISSED'}), "
          f"RSS at {RSS_TARGET_COUNT} <= {RSS_TARGET_MB:.0f} MB ({rss_verdict})")  # fmt: skip


async def wait_ready(operator: OperatorProcess, within: float = 60.0) -> None:
    """Until its report endpoint answers ready (its watches are warmed up by the first
    predictions, which are not sampled)."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if operator.process is None or operator.process.poll() is not None:
                raise RuntimeError(f"the operator exited:\n{operator.log_tail()}")
            try:
                async with session.get(f"{operator.report_url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"operator not ready in {within} s:\n{operator.log_tail()}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[5000, 50000],
                        help="live predictions for RSS, each measured in turn")  # fmt: skip
    parser.add_argument("--samples", type=int, default=200, help="latency samples")
    parser.add_argument("--gap", type=float, default=0.02,
                        help="seconds between latency samples")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--ahead", type=int, default=0,
                        help="bulk creation waits while this many Predictions have no Job "
                             "(0: a burst, as fast as the API server takes them)")  # fmt: skip
    parser.add_argument("--settle", type=float, default=10.0, help="seconds before RSS, least")
    parser.add_argument(
        "--settle-max",
        type=float,
        default=300.0,
        help="seconds before RSS at most, waiting for the operator to idle",
    )
    parser.add_argument("--within", type=float, default=3600.0,
                        help="time limit of each count, seconds")  # fmt: skip
    args = parser.parse_args(argv)
    if any(c <= args.samples + WARMUP for c in args.counts):
        parser.error(f"--counts: each must exceed --samples + {WARMUP}")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
