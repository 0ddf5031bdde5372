"""Argo CD: the Prediction health check (Lua, run here as Argo CD runs it) and the
Application."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from lupa import lua51

from tests.manifests import manifest_support as support

ARGOCD = support.MANIFESTS / "argocd"
LUA_FILE = ARGOCD / "prediction-health.lua"
HEALTH_KEY = "resource.customizations.health.whisperx.io_Prediction"
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def run_health(obj: dict[str, Any]) -> dict[str, Any]:
    """Runs the script the way Argo CD does: Lua 5.1 with only the base, table, package
    and a reduced os library, the object as the global `obj`, the chunk's return value
    as the result."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    g = lua.globals()
    for name in ("string", "math", "io", "debug", "coroutine", "os"):
        g[name] = None
    g.obj = lua.table_from(obj, recursive=True)
    result = lua.execute(LUA_FILE.read_text())
    return {key: result[key] for key in ("status", "message")}


def prediction(
    phase: str | None = None,
    conditions: list[dict[str, str]] | None = None,
    cancel: bool = False,
    **status: Any,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "whisperx.io/v1alpha1",
        "kind": "Prediction",
        "metadata": {"name": "p1", "namespace": "whisperx-demo", "generation": 1},
        "spec": {"input": {"audio_file": "https://example.com/a.wav"}},
    }
    if cancel:
        obj["spec"]["cancel"] = True
    if phase is not None or conditions is not None or status:
        obj["status"] = dict(status)
        if phase is not None:
            obj["status"]["phase"] = phase
        if conditions is not None:
            obj["status"]["conditions"] = [
                {"status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z", **c}
                for c in conditions
            ]
    return obj


QUEUED = {"type": "Queued", "reason": "Suspended", "message": "Waiting for Kueue admission"}
RUNNING = {"type": "Running", "reason": "Started", "message": "Transcribing (42%)"}
SUCCEEDED = {"type": "Succeeded", "reason": "Completed", "message": "Transcribed 61.2 s of en"}
FAILED = {"type": "Failed", "reason": "OOMKilled", "message": "The runner ran out of memory"}
CANCELED = {"type": "Canceled", "reason": "Canceled", "message": "Canceled by the user"}

WAITING = "Waiting for the operator to accept the prediction"
CASES = [
    ("no status yet", prediction(), "Progressing", WAITING),
    ("empty status", prediction(observedGeneration=1), "Progressing", WAITING),
    ("queued", prediction("starting", [QUEUED]), "Progressing", "Waiting for Kueue admission"),
    ("starting, no conditions", prediction("starting"), "Progressing", "Starting"),
    (
        "processing",
        prediction("processing", [QUEUED, RUNNING]),
        "Progressing",
        "Transcribing (42%)",
    ),
    (
        "canceling",
        prediction("processing", [RUNNING], cancel=True),
        "Progressing",
        "Cancellation requested",
    ),
    ("succeeded", prediction("succeeded", [SUCCEEDED]), "Healthy", "Transcribed 61.2 s of en"),
    ("succeeded, bare", prediction("succeeded"), "Healthy", "Prediction succeeded"),
    (
        "failed",
        prediction("failed", [RUNNING, FAILED], error="OOM"),
        "Degraded",
        "The runner ran out of memory",
    ),
    (
        "failed, error only",
        prediction("failed", error="Audio is not decodable"),
        "Degraded",
        "Audio is not decodable",
    ),
    (
        "failed, reason only",
        prediction("failed", reason="DeadlineExceeded"),
        "Degraded",
        "DeadlineExceeded",
    ),
    ("failed, bare", prediction("failed"), "Degraded", "Prediction failed"),
    ("canceled", prediction("canceled", [CANCELED]), "Suspended", "Canceled by the user"),
    (
        "condition without message",
        prediction("failed", [{"type": "Failed", "reason": "ImagePullBackOff"}]),
        "Degraded",
        "ImagePullBackOff",
    ),
]


@pytest.mark.parametrize(("case", "obj", "status", "message"), CASES, ids=[c[0] for c in CASES])
def test_health(case: str, obj: dict[str, Any], status: str, message: str) -> None:
    # The samples are real Predictions: valid against the CRD.
    assert list(support.prediction_validator().iter_errors(obj)) == [], case
    assert run_health(obj) == {"status": status, "message": message}


def test_health_of_an_unknown_phase() -> None:
    # Not a valid Prediction (the CRD forbids it), but Argo CD must not crash on it.
    result = run_health(prediction("paused"))
    assert result == {"status": "Unknown", "message": "Unknown phase: paused"}
    assert result["status"] in ARGO_STATUSES


def test_cancel_annotation_counts_as_a_request() -> None:
    obj = prediction("starting", [QUEUED])
    obj["metadata"]["annotations"] = {"whisperx.io/cancel": "true"}
    assert run_health(obj)["message"] == "Cancellation requested"


def _lua_literal(value: Any) -> str:
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"[{json.dumps(k)}] = {_lua_literal(v)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, list):
        return "{" + ", ".join(_lua_literal(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


@pytest.mark.skipif(shutil.which("lua5.1") is None, reason="Debian lua5.1 not installed")
def test_health_under_the_reference_interpreter(tmp_path: Path) -> None:
    """The same cases under PUC Lua 5.1 (lua5.1), independently of lupa's conversion."""
    for case, obj, status, message in CASES:
        script = tmp_path / "check.lua"
        script.write_text(
            "string, math, io, debug, coroutine, os = nil, nil, nil, nil, nil, nil\n"
            f"obj = {_lua_literal(obj)}\n"
            f"local hs = (function() {LUA_FILE.read_text()} end)()\n"
            'print(hs.status .. "\\n" .. hs.message)\n'
        )
        out = subprocess.run(["lua5.1", str(script)], capture_output=True, text=True, check=True)
        assert out.stdout.splitlines() == [status, message], case


def test_argocd_cm_embeds_the_lua_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["argocd"]
    configmap = support.find(objs, "ConfigMap", "argocd-cm", "argocd")
    assert configmap["data"] == {HEALTH_KEY: LUA_FILE.read_text()}
    assert configmap["metadata"]["labels"]["app.kubernetes.io/part-of"] == "argocd"


def test_application_points_at_a_buildable_overlay(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    application = support.find(rendered["argocd"], "Application", "whisperx", "argocd")
    spec = application["spec"]
    path = support.REPO / spec["source"]["path"]
    assert path in support.OVERLAYS.values()
    assert support.render(path)
    assert spec["destination"]["server"] == "https://kubernetes.default.svc"
    options = spec["syncPolicy"]["syncOptions"]
    assert "ServerSideApply=true" in options
    # Deleting the Application must not cascade into namespaces holding data.
    assert "resources-finalizer.argocd.argoproj.io" not in application["metadata"].get(
        "finalizers", []
    )
    for ns in (o for o in rendered["gpu"] if o["kind"] == "Namespace"):
        options = ns["metadata"]["annotations"]["argocd.argoproj.io/sync-options"]
        assert "Delete=false" in options and "Prune=false" in options


@pytest.mark.parametrize("root", ["base", *sorted(support.OVERLAYS)])
def test_the_prefetch_job_is_named_by_its_spec(
    root: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """Same spec, same name: a sync applies it unchanged and it does not run again; a
    changed spec (immutable in a Job) is a new Job that runs once, the old one pruned."""
    job = support.prefetch_job(rendered[root])
    expected = f"{support.PREFETCH}-{support.spec_hash(job)}"
    assert job["metadata"]["name"] == expected, (
        f"the prefetch Job's spec changed: name it {expected} in {root}"
    )


def test_a_changed_prefetch_spec_changes_the_name(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    job = support.prefetch_job(rendered["gpu"])
    changed = json.loads(json.dumps(job))
    changed["spec"]["template"]["spec"]["containers"][0]["args"].append("fr")
    assert support.spec_hash(changed) != support.spec_hash(job)
    kind = support.prefetch_job(rendered["kind"])
    assert kind["metadata"]["name"] != job["metadata"]["name"]  # its patch renames it


@pytest.mark.parametrize("root", sorted(support.OVERLAYS))
def test_the_prefetch_job_neither_reruns_nor_holds_a_sync(
    root: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objs = rendered[root]
    job = support.prefetch_job(objs)
    annotations = job["metadata"].get("annotations") or {}
    # Not a hook: hooks run on every sync, and a sync waits for them (a PVC that cannot
    # bind held it for the Job's whole deadline).
    assert not any(key.startswith("argocd.argoproj.io/hook") for key in annotations)
    # Deleted after finishing, self-heal would re-create it and it would run again.
    assert "ttlSecondsAfterFinished" not in job["spec"]
    # In the last sync wave (with its PVC): nothing waits for it to finish, and it does
    # not wait for a PVC that binds only once its pod is scheduled.
    waves = {
        int((o["metadata"].get("annotations") or {}).get("argocd.argoproj.io/sync-wave", 0))
        for o in objs
    }
    claim = support.find(objs, "PersistentVolumeClaim", "whisperx-models", support.TENANT_NS)
    for obj in (job, claim):
        wave = int(
            (obj["metadata"].get("annotations") or {}).get("argocd.argoproj.io/sync-wave", 0)
        )
        assert wave == max(waves), support.ident(obj)
