"""kubectl as people use it, on the real control plane, asserted on what it prints.

The stack was applied with `kubectl apply --server-side` (the CRDs, then the kind overlay)
by the `stack` fixture; the operator runs with its own ServiceAccount's token, the runner
is the real one (tiny.en on CPU) in pods the real Job controller created in the tenant
namespace, which enforces the restricted Pod Security level.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.client import Cluster
from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import JOBS, PODS, PREDICTIONS, SECRETS, TENANT
from tests.cluster.kubelet import Kubelet, wait_until
from tests.kube_fixtures import OperatorProcess
from whisperx_api.schema import SECRET_INPUT_FIELDS, PredictionInput

pytestmark = pytest.mark.whisperx


def prediction(name: str, **spec: Any) -> str:
    return json.dumps({
        "apiVersion": "whisperx.io/v1alpha1",
        "kind": "Prediction",
        "metadata": {"name": name, "namespace": TENANT},
        "spec": spec,
    })  # fmt: skip


async def read_bytes(path: Path) -> bytes:
    return await asyncio.to_thread(path.read_bytes)


def kubectl(plane: ControlPlane, *args: str, stdin: str | None = None, check: bool = True) -> Any:
    return plane.kubectl("-n", TENANT, *args, stdin=stdin, check=check, timeout=300)


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ({"input": {"audio_file": "https://example.com/a.wav", "batch_size": "big"}},
         'spec.input.batch_size: Invalid value: "string": spec.input.batch_size in body '
         "must be of type integer"),
        ({"input": {"audio_file": "ftp://example.com/a.wav"}}, "spec.input.audio_file"),
        ({"input": {"audio_file": "https://example.com/a.wav", "min_speakers": 3,
                    "max_speakers": 1}}, "min_speakers must not be greater than max_speakers"),
        ({"input": {"audio_file": "https://example.com/a.wav", "temperature": 1.5,
                    "no_such_field": 1}}, 'unknown field "spec.input.no_such_field"'),
    ],
    ids=["wrong-type", "url-scheme", "speakers", "unknown-field"],
)  # fmt: skip
def test_the_api_server_refuses_bad_predictions_naming_the_field(
    stack: ControlPlane, spec: dict[str, Any], complaint: str
) -> None:
    refused = kubectl(stack, "create", "--validate=strict", "-f", "-",
                      stdin=prediction("refused", **spec), check=False)  # fmt: skip
    assert refused.returncode != 0, refused.stdout
    assert complaint in refused.stderr, refused.stderr


def test_null_optional_inputs_are_dropped_not_refused(stack: ControlPlane) -> None:
    """What a client writes for "unset": `null`, for every optional input (the server
    used to answer `Unsupported value: null` for `language`). It is stored as unset."""
    optional = [
        name
        for name, field in PredictionInput.model_fields.items()
        if field.default is None and name not in SECRET_INPUT_FIELDS
    ]
    assert "language" in optional
    given = {"audio_file": "https://example.com/a.wav", **dict.fromkeys(optional)}
    created = kubectl(stack, "create", "--validate=strict", "-o", "json", "-f", "-",
                      stdin=prediction("nulls", input=given))  # fmt: skip
    try:
        stored = json.loads(created.stdout)["spec"]["input"]
        assert stored["audio_file"] == given["audio_file"]
        assert not set(optional) & set(stored), stored
    finally:
        kubectl(stack, "delete", "prediction", "nulls", "--wait=false", check=False)


async def test_create_get_wait_describe_delete(
    stack: ControlPlane,
    cluster: Cluster,
    node_agent: Kubelet,
    cluster_operator: OperatorProcess,
    fox_wav: Path,
) -> None:
    audio = "data:audio/wav;base64," + base64.b64encode(await read_bytes(fox_wav)).decode()
    spec = {"input": {"audio_file": audio, "language": "en", "align_output": True}}
    created = kubectl(stack, "create", "-f", "-", stdin=prediction("fox", **spec))
    assert created.stdout.strip() == "prediction.whisperx.io/fox created"

    waited = await asyncio.to_thread(
        kubectl, stack, "wait", "pred/fox", "--for=condition=Succeeded", "--timeout=240s"
    )
    assert waited.stdout.strip() == "prediction.whisperx.io/fox condition met"

    header, row = kubectl(stack, "get", "pred", "fox").stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "LANGUAGE", "DURATION", "AGE"]
    name, phase, language, duration, _ = row.split()
    assert (name, phase, language) == ("fox", "succeeded", "en")
    assert 1.5 < float(duration) < 4
    wide = kubectl(stack, "get", "pred", "fox", "-o", "wide").stdout.splitlines()[0]
    assert "HARDWARE" in wide and "REASON" in wide

    described = kubectl(stack, "describe", "pred", "fox").stdout
    events = described.split("Events:", 1)[1]
    for reason in ("JobCreated", "Started", "Succeeded"):
        assert reason in events, described
    status = cluster.get(PREDICTIONS, TENANT, "fox")
    assert status is not None
    job = status["status"]["jobName"]
    assert cluster.get(JOBS, TENANT, job) is not None
    pods = cluster.list(PODS, TENANT, labels={"batch.kubernetes.io/job-name": job})
    assert pods and node_agent.runs(job)
    # Where it ran, in its status and in `kubectl describe`.
    pod = status["status"]["podName"]
    assert pod in {p["metadata"]["name"] for p in pods}
    assert "RunnerAssigned" in events and f"runs on pod {pod} of Job {job}" in events, described
    secrets = [
        s
        for s in cluster.list(SECRETS, TENANT)
        if (s["metadata"].get("labels") or {}).get("whisperx.io/prediction") == "fox"
    ]
    assert secrets  # fmt: skip

    deleted = kubectl(stack, "delete", "pred", "fox")
    assert deleted.stdout.strip() == f'prediction.whisperx.io "fox" deleted from {TENANT} namespace'
    # The garbage collector takes the Job, its pods and the prediction's Secrets with it.
    await wait_until(lambda: cluster.get(JOBS, TENANT, job) is None, within=60)
    await wait_until(
        lambda: not cluster.list(PODS, TENANT, labels={"batch.kubernetes.io/job-name": job}),
        within=60,
    )
    await wait_until(lambda: all(cluster.get(SECRETS, TENANT, s["metadata"]["name"]) is None
                                 for s in secrets), within=60)  # fmt: skip


async def test_apply_server_side_is_idempotent_and_owned(stack: ControlPlane) -> None:
    again = stack.apply("-f", str(Path(__file__).parents[2] / "crds" / "prediction.yaml"))
    assert "serverside-applied" in again
    managed = json.loads(
        stack.kubectl("get", "crd", "predictions.whisperx.io", "-o", "json",
                      "--show-managed-fields").stdout
    )["metadata"]["managedFields"]  # fmt: skip
    assert any(m["manager"] == "kubectl" and m["operation"] == "Apply" for m in managed)
