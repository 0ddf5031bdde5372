"""End to end on a real cluster: the API server applies the CRD schema, the operator runs
the real runner image as a Job, and kubectl's view (wait, describe) is what users see."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import KUBECTL

NAMESPACE = os.environ.get("WHISPERX_E2E_NAMESPACE", "whisperx-demo")
# Model download and a CPU transcription on a small kind node take a while.
WAIT = os.environ.get("WHISPERX_E2E_TIMEOUT", "900s")


def kubectl(
    *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [KUBECTL, "-n", NAMESPACE, *args], input=stdin, capture_output=True, text=True, timeout=1200
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result


def manifest(name: str, audio: str, **spec: Any) -> str:
    body = {
        "apiVersion": "whisperx.io/v1alpha1",
        "kind": "Prediction",
        "metadata": {"name": name},
        "spec": {"input": {"audio_file": audio}, **spec},
    }
    return json.dumps(body)


def get(name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(kubectl("get", "prediction", name, "-o", "json").stdout)
    return result


@pytest.fixture
def names() -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    for name in created:
        kubectl("delete", "prediction", name, "--ignore-not-found", "--wait=false", check=False)


def fresh(names: list[str], prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    names.append(name)
    return name


@pytest.fixture(scope="module", autouse=True)
def stack_is_deployed() -> None:
    if kubectl("get", "crd", "predictions.whisperx.io", check=False).returncode != 0:
        pytest.fail("the Prediction CRD is missing: deploy manifests/overlays/kind first")


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ({"input": {"audio_file": "ftp://example.com/a.wav"}}, "audio_file"),
        ({"input": {"audio_file": "https://example.com/a.wav", "batch_size": "big"}}, "batch_size"),
        ({"input": {"audio_file": "https://example.com/a.wav", "min_speakers": 3,
                    "max_speakers": 1}}, "min_speakers must not be greater"),
    ],
)  # fmt: skip
def test_the_api_server_refuses_what_the_schema_can_say(
    spec: dict[str, Any], complaint: str
) -> None:
    body = json.loads(manifest("refused", "https://example.com/a.wav"))
    body["spec"] = spec
    result = kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(body), check=False)
    assert result.returncode != 0 and complaint in result.stderr


def test_a_prediction_succeeds_and_kubectl_sees_it(names: list[str], fox_wav: Path) -> None:
    name = fresh(names, "e2e-fox")
    audio = "data:audio/wav;base64," + base64.b64encode(fox_wav.read_bytes()).decode()
    kubectl(
        "create",
        "-f",
        "-",
        stdin=manifest(name, audio, input={"audio_file": audio, "language": "en"}),
    )
    kubectl("wait", f"prediction/{name}", "--for=condition=Succeeded", f"--timeout={WAIT}")
    status = get(name)["status"]
    assert status["phase"] == "succeeded" and status["detectedLanguage"] == "en"
    assert status["output"]["store"] == "redis" and status["metrics"]["predictTime"] > 0
    job = json.loads(kubectl("get", "job", status["jobName"], "-o", "json").stdout)
    assert job["metadata"]["ownerReferences"][0]["name"] == name
    described = kubectl("describe", "prediction", name).stdout
    assert "Started" in described and "Succeeded" in described


def test_an_unknown_hardware_profile_fails_with_a_warning_and_expires(names: list[str]) -> None:
    name = fresh(names, "e2e-hw")
    spec = {"hardware": "no-such-gpu", "ttlSecondsAfterFinished": 5}
    kubectl("create", "-f", "-", stdin=manifest(name, "https://example.com/a.wav", **spec))
    kubectl("wait", f"prediction/{name}", "--for=condition=Failed", "--timeout=60s")
    assert get(name)["status"]["reason"] == "UnknownHardware"
    events = kubectl("get", "events", "--field-selector", f"involvedObject.name={name}").stdout
    assert "Warning" in events and "UnknownHardware" in events
    kubectl("wait", f"prediction/{name}", "--for=delete", "--timeout=60s")


def test_cancel_deletes_the_job(names: list[str]) -> None:
    name = fresh(names, "e2e-cancel")
    # An address nothing answers at: the runner is still fetching when the cancel comes.
    kubectl("create", "-f", "-", stdin=manifest(name, "https://10.255.255.1/a.wav"))
    kubectl("patch", "prediction", name, "--type=merge", "-p", '{"spec": {"cancel": true}}')
    kubectl("wait", f"prediction/{name}", "--for=condition=Canceled", "--timeout=60s")
    kubectl("wait", f"job/{name}", "--for=delete", "--timeout=120s")
    assert get(name)["status"]["phase"] == "canceled"
