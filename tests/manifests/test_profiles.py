"""The hardware profiles file (WHISPERX_PROFILES_FILE) and the settings the operator and
gateway read: their format, and their agreement with Kueue, the model cache and the
images."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.manifests import manifest_support as support
from tests.manifests.manifest_support import CONTROL_NS, TENANT_NS

Objs = list[dict[str, Any]]
GPU_PROFILES = ("whisperx", "whisperx-a40-large", "whisperx-a100-80gb")

# The file format the operator reads: profile name -> how the prediction's Job runs.
# Keys are camelCase like the pod fields they become.
PROFILES_SCHEMA = {
    "type": "object",
    "minProperties": 1,
    "propertyNames": {"pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
    "additionalProperties": {
        "type": "object",
        "required": ["resources", "model", "device", "computeType"],
        "additionalProperties": False,
        "properties": {
            "resources": {
                "type": "object",
                "required": ["requests", "limits"],
                "additionalProperties": False,
                "properties": {
                    "requests": {"type": "object", "required": ["cpu", "memory"]},
                    "limits": {"type": "object", "required": ["memory"]},
                },
            },
            "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
            "tolerations": {"type": "array"},
            "model": {"type": "string", "minLength": 1},
            "computeType": {"enum": ["float16", "int8", "int8_float16", "float32"]},
            "device": {"enum": ["cuda", "cpu"]},
            "batchSize": {"type": "integer", "minimum": 1},
            "idleSeconds": {"type": "integer", "minimum": 0},
            "maxPredictions": {"type": "integer", "minimum": 0},
            "maxRunners": {"type": "integer", "minimum": 1},
        },
    },
}


def profiles_of(objs: Objs) -> dict[str, Any]:
    configmap = support.find_prefixed(objs, "ConfigMap", "whisperx-profiles", CONTROL_NS)
    assert list(configmap["data"]) == ["profiles.yaml"]
    return dict(yaml.safe_load(configmap["data"]["profiles.yaml"]))


def settings_of(objs: Objs, name: str) -> dict[str, str]:
    return dict(support.find_prefixed(objs, "ConfigMap", name, CONTROL_NS)["data"])


def profile_problems(profiles: dict[str, Any]) -> list[str]:
    """Format errors, and pod fields Kubernetes would refuse (each profile's resources,
    nodeSelector and tolerations validated in a pod spec)."""
    validator = jsonschema.Draft7Validator(PROFILES_SCHEMA)
    problems = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(profiles)]
    if problems:
        return problems
    for name, profile in profiles.items():
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "probe"},
            "spec": {
                "containers": [
                    {"name": "runner", "image": "x:1", "resources": profile["resources"]}
                ],
                "nodeSelector": profile.get("nodeSelector", {}),
                "tolerations": profile.get("tolerations", []),
            },
        }
        try:
            kubernetes_validate.validate(pod, support.K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{name}: {e.message}")
        gpus = [profile["resources"][k].get("nvidia.com/gpu") for k in ("requests", "limits")]
        if gpus[0] != gpus[1]:
            problems.append(f"{name}: extended resources need requests == limits")
        if (profile["device"] == "cuda") != (gpus[1] is not None):
            problems.append(f"{name}: device {profile['device']} with GPUs {gpus[1]}")
    return problems


@pytest.mark.parametrize("root", ["base", *sorted(support.OVERLAYS)])
def test_profiles_format(root: str, rendered: dict[str, Objs]) -> None:
    profiles = profiles_of(rendered[root])
    assert set(profiles) == set(GPU_PROFILES)
    assert profile_problems(profiles) == []


def test_profile_check_catches_mistakes() -> None:
    good = {
        "model": "large-v3",
        "device": "cuda",
        "computeType": "float16",
        "resources": {
            "requests": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "1Gi", "nvidia.com/gpu": "1"},
        },
    }
    assert profile_problems({"whisperx": good}) == []
    assert profile_problems({"whisperx": {**good, "node_selector": {}}}) != []
    assert profile_problems({"whisperx": {**good, "device": "tpu"}}) != []
    assert profile_problems({"whisperx": {**good, "tolerations": [{"effect": 3}]}}) != []
    cpu_only = {
        **good,
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
    }
    assert profile_problems({"whisperx": cpu_only}) == ["whisperx: device cuda with GPUs None"]


def test_gpu_profiles_pin_gpu_classes_that_kueue_knows(rendered: dict[str, Objs]) -> None:
    objs = rendered["gpu"]
    profiles = profiles_of(objs)
    flavors = {
        o["metadata"]["name"]: o["spec"]["nodeLabels"]
        for o in objs
        if o["kind"] == "ResourceFlavor"
    }
    selectors = [profiles[name]["nodeSelector"] for name in GPU_PROFILES]
    # Three distinct GPU classes, each exactly one Kueue flavor's nodes.
    assert len({tuple(sorted(s.items())) for s in selectors}) == 3
    for selector in selectors:
        assert sum(labels == selector for labels in flavors.values()) == 1, selector
    for name in GPU_PROFILES:
        assert profiles[name]["device"] == "cuda"
        assert profiles[name]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in profiles[
            name
        ]["tolerations"]
    queue = support.find(objs, "ClusterQueue", "whisperx")
    (group,) = queue["spec"]["resourceGroups"]
    assert {f["name"] for f in group["flavors"]} == set(flavors)
    requested = {r for p in profiles.values() for r in p["resources"]["requests"]}
    # Kueue only admits Jobs whose every requested resource the queue covers.
    assert requested <= set(group["coveredResources"])
    for flavor in group["flavors"]:
        assert {r["name"] for r in flavor["resources"]} == set(group["coveredResources"])
    # The queue serves the tenant namespaces.
    tenant = support.find(objs, "Namespace", TENANT_NS)
    assert support.selector_matches(
        queue["spec"]["namespaceSelector"], tenant["metadata"]["labels"]
    )


@pytest.mark.parametrize("root", sorted(support.OVERLAYS))
def test_kueue_queue_setting_names_a_local_queue(root: str, rendered: dict[str, Objs]) -> None:
    objs = rendered[root]
    queue = settings_of(objs, "whisperx-operator-settings")["WHISPERX_KUEUE_QUEUE"]
    local_queues = {
        (o["metadata"]["namespace"], o["metadata"]["name"]): o["spec"]["clusterQueue"]
        for o in objs
        if o["kind"] == "LocalQueue"
    }
    if root == "kind":
        assert queue == "" and local_queues == {}
        return
    assert (TENANT_NS, queue) in local_queues
    cluster_queues = {o["metadata"]["name"] for o in objs if o["kind"] == "ClusterQueue"}
    assert set(local_queues.values()) <= cluster_queues


def test_kind_overlay_runs_without_gpus(rendered: dict[str, Objs]) -> None:
    objs = rendered["kind"]
    for name, profile in profiles_of(objs).items():
        assert profile["device"] == "cpu", name
        assert profile["model"] == "tiny.en", name
        assert "nvidia.com/gpu" not in profile["resources"]["limits"], name
        assert "nodeSelector" not in profile, name
    pvc = support.find(objs, "PersistentVolumeClaim", "whisperx-models", TENANT_NS)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]  # kind/k3d's local-path
    assert support.find(objs, "Deployment", "whisperx-gateway", CONTROL_NS)["spec"]["replicas"] == 1


@pytest.mark.parametrize("root", sorted(support.OVERLAYS))
def test_settings_agree(root: str, rendered: dict[str, Objs]) -> None:
    objs = rendered[root]
    operator = settings_of(objs, "whisperx-operator-settings")
    gateway = settings_of(objs, "whisperx-gateway-settings")
    profiles = profiles_of(objs)
    # Every model the gateway serves (`name=profile,...`) runs on a configured profile.
    models = dict(item.split("=", 1) for item in gateway["WHISPERX_MODELS"].split(","))
    assert set(models) == set(GPU_PROFILES)
    assert set(models.values()) <= set(profiles)
    assert gateway["WHISPERX_BACKEND"] == "kubernetes"
    # The prefetch Job fills the cache with the image the Jobs run and the model the
    # profiles use; the cache PVC is the one the operator mounts.
    prefetch = support.prefetch_job(objs)
    (container,) = prefetch["spec"]["template"]["spec"]["containers"]
    assert container["image"] == operator["WHISPERX_RUNNER_IMAGE"]
    assert {p["model"] for p in profiles.values()} == {
        support.env_value(container, "WHISPERX_MODEL")
    }
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in prefetch["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == [operator["WHISPERX_MODEL_CACHE_PVC"]]
    # Runners reach the report endpoint through the operator's Service.
    service = support.find(objs, "Service", "whisperx-operator", CONTROL_NS)
    assert operator["WHISPERX_REPORT_BASE_URL"] == (
        f"http://whisperx-operator.{CONTROL_NS}.svc:{service['spec']['ports'][0]['port']}"
    )
    assert (
        operator["WHISPERX_PEERING"]
        == support.find(objs, "ClusterKopfPeering", "whisperx")["metadata"]["name"]
    )
    assert int(operator["WHISPERX_DEFAULT_TTL_SECONDS"]) > 0
    assert operator["WHISPERX_HF_TOKEN_SECRET"] == "whisperx-hf-token"


@pytest.mark.parametrize("root", sorted(support.OVERLAYS))
def test_processes_match_the_architecture(root: str, rendered: dict[str, Objs]) -> None:
    """Commands, ports, probes and file paths of docs/architecture.md."""
    objs = rendered[root]
    operator = support.find(objs, "Deployment", "whisperx-operator", CONTROL_NS)
    gateway = support.find(objs, "Deployment", "whisperx-gateway", CONTROL_NS)
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"]["type"] == "Recreate"
    (op,) = operator["spec"]["template"]["spec"]["containers"]
    (gw,) = gateway["spec"]["template"]["spec"]["containers"]
    assert op["command"] == ["whisperx-operator"] and gw["command"] == ["whisperx-gateway"]
    ports = {p["name"]: p["containerPort"] for p in op["ports"]}
    assert ports == {"liveness": 8080, "reports": 8081}
    assert op["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert op["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "reports"}
    assert gw["ports"] == [{"name": "http", "containerPort": 8000}]
    assert gw["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert gw["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert settings_of(objs, "whisperx-gateway-settings")["WHISPERX_GATEWAY_PORT"] == "8000"
    mounts = {m["name"]: m["mountPath"] for m in op["volumeMounts"]}
    assert support.env_value(op, "WHISPERX_PROFILES_FILE") == mounts["profiles"] + "/profiles.yaml"
    mounts = {m["name"]: m["mountPath"] for m in gw["volumeMounts"]}
    assert support.env_value(gw, "WHISPERX_TOKENS_FILE") == mounts["tokens"] + "/tokens.yaml"
    for container in (op, gw):
        assert support.env_value(container, "REDIS_URL") == (
            "redis://:$(REDIS_PASSWORD)@whisperx-redis:6379/0"
        )
        names = [e["name"] for e in container["env"]]
        # $(REDIS_PASSWORD) only expands if defined earlier in the list.
        assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")
    redis = support.find(objs, "StatefulSet", "whisperx-redis", CONTROL_NS)
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
