"""The stack as pods on the real node: a one-shot prediction's cold start part by part,
and warm predictions, beside the kubelet stand-in's cold start measured in the same run.

On the real node (tests/cluster/node.py, the stack from tests/cluster/pod_stack.py, the
project's images under runc), each of `--cold` one-shot Predictions is created once the
previous one ended and timed by a watch: created -> pod Running (scheduling, sandbox,
container start) -> `processing` (the runner's process up and reporting: imports) ->
result; the transcription's own time comes from the prediction's metrics, the rest of
the run (fetching the audio, loading the model) is what remains.
Then the profiles keep runners warm and `--clips` predictions run one after another on
one runner pod. The baseline: the same one-shot predictions on the loopback control
plane with the kubelet stand-in (the runner as a local process, bench_warm.py's path).

    .venv/bin/python benchmarks/bench_pods.py [--cold 3] [--clips 10]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_warm import cluster_profiles, cluster_run, make_clips  # noqa: E402
from benchmarks.stats import percentile  # noqa: E402
from tests.cluster.client import Cluster, ResourceRef  # noqa: E402
from tests.cluster.controlplane import ControlPlane, build_binaries  # noqa: E402
from tests.cluster.fixtures import deploy_stack  # noqa: E402
from tests.cluster.node import running_node  # noqa: E402
from tests.cluster.pod_stack import TENANT, PodStack, deploy  # noqa: E402
from tests.cluster.test_pods import kind_profiles  # noqa: E402

PREDICTIONS = ResourceRef("whisperx.io", "v1alpha1", "predictions")
PODS = ResourceRef("", "v1", "pods")
ENDED = ("succeeded", "failed", "canceled")


async def timed(kube: Cluster, name: str, uri: str, hardware: str = "whisperx") -> dict[str, Any]:
    """Creates one Prediction and notes when its pod runs, when it is processing and when
    it ends (seconds from its creation), with the runner's own metrics."""
    body = {
        "apiVersion": "whisperx.io/v1alpha1",
        "kind": "Prediction",
        "metadata": {"name": name},
        "spec": {"hardware": hardware, "input": {"audio_file": uri, "language": "en"}},
    }
    t0 = time.perf_counter()
    await kube.create_object(PREDICTIONS, TENANT, body)
    seen: dict[str, float] = {}
    while True:
        status = (kube.get(PREDICTIONS, TENANT, name) or {}).get("status") or {}
        now = time.perf_counter() - t0
        pod = kube.get(PODS, TENANT, status["podName"]) if status.get("podName") else None
        states = ((pod or {}).get("status") or {}).get("containerStatuses") or []
        if "pod_running" not in seen and any("running" in s["state"] for s in states):
            seen["pod_running"] = now
        if status.get("phase") in ("processing", *ENDED):
            seen.setdefault("processing", now)
        if status.get("phase") in ENDED:
            seen["ended"] = now
            break
        await asyncio.sleep(0.01)
    if status["phase"] != "succeeded":
        raise SystemExit(f"{name} {status['phase']}: {status.get('error')}")
    seen["predict_time"] = status["metrics"]["predictTime"]
    # What the runner did between reporting its start and transcribing: fetching and
    # decoding the audio, and (cold) loading the model.
    seen["setup"] = seen["ended"] - seen["processing"] - seen["predict_time"]
    return seen


async def on_the_node(stack: PodStack, uris: list[str], cold: int) -> dict[str, Any]:
    plane = stack.node.plane
    async with Cluster(plane.url, plane.admin.token, plane.ssl_context()) as kube:
        await kube.track(PREDICTIONS, PODS)
        colds = [await timed(kube, f"cold-{n}", uris[n % len(uris)]) for n in range(cold)]
        stack.configure_operator(kind_profiles(idleSeconds=300, maxRunners=1))
        warm = [await timed(kube, f"warm-{n}", uri) for n, uri in enumerate(uris)]
    return {"cold": colds, "warm": warm}


def stand_in_cold(uris: list[str], workdir: Path) -> list[float]:
    """The same one-shot predictions with the kubelet stand-in (runner as a process)."""
    models = workdir / "models"
    models.mkdir()
    models.chmod(0o755)
    with ControlPlane(workdir / "plane", bin_dir=build_binaries()) as plane:
        deploy_stack(plane, models)
        (workdir / "bench-profiles.yaml").write_text(cluster_profiles(0))
        times: list[float] = asyncio.run(cluster_run(plane, uris, "cold", workdir))["times"]
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold", type=int, default=3, help="one-shot predictions")
    parser.add_argument("--clips", type=int, default=10, help="warm predictions")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pods-") as tmp:
        work = Path(tmp)
        clips = make_clips(max(args.clips, args.cold), work)
        uris = ["data:audio/wav;base64," + base64.b64encode(c.read_bytes()).decode() for c in clips]
        began = time.perf_counter()
        with running_node(work / "node") as node:
            up = time.perf_counter() - began
            stack = deploy(node, work / "stack")
            deployed = time.perf_counter() - began - up
            node_runs = asyncio.run(on_the_node(stack, uris[: args.clips], args.cold))
        (work / "stand-in").mkdir()
        stand_in = stand_in_cold(uris[: args.cold], work / "stand-in")

    def p50(runs: list[dict[str, float]], key: str) -> float:
        return percentile([r[key] for r in runs], 0.5)

    cold, warm = node_runs["cold"], node_runs["warm"]
    report = {
        "control plane and node up (s)": round(up, 1),
        "stack deployed, images imported (s)": round(deployed, 1),
        "one-shot, real node, p50 (s)": {
            k: round(p50(cold, k), 2)
            for k in ("pod_running", "processing", "setup", "predict_time", "ended")
        },
        "one-shot, stand-in, p50 created -> ended (s)": round(percentile(stand_in, 0.5), 2),
        "real node / stand-in, one-shot": round(p50(cold, "ended") / percentile(stand_in, 0.5), 2),
        "warm, real node, p50 created -> ended (s)": round(p50(warm[1:], "ended"), 3),
        "warm, real node, first (cold) (s)": round(warm[0]["ended"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
