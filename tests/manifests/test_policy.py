"""Policy checks on what the overlays render: hardened pods, pinned images, no Secret
values anywhere in the tree, references that resolve, least-privilege RBAC, and
NetworkPolicies that allow exactly the flows of the design."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.manifests import manifest_support as support
from tests.manifests.manifest_support import CONTROL_NS, TENANT_NS, Endpoint
from whisperx_operator.jobs import PredictionRef, runner_labels

# The labels the operator sets on runner pods: a prediction's own Job's, a warm runner's.
ONE_SHOT_LABELS = PredictionRef("ns", "p1", "uid", {}).labels()

Objs = list[dict[str, Any]]
OVERLAYS = sorted(support.OVERLAYS)


# --- pods -----------------------------------------------------------------------------


@pytest.mark.parametrize("root", OVERLAYS)
def test_every_pod_is_hardened(root: str, rendered: dict[str, Objs]) -> None:
    problems = []
    checked = 0
    for obj, pod_spec in support.workloads(rendered[root]):
        checked += 1
        problems += [
            f"{support.ident(obj)}: {p}" for p in support.pod_security_violations(pod_spec)
        ]
    assert checked >= 4  # operator, gateway, Redis, prefetch
    assert problems == []


def test_pod_check_reports_each_violation() -> None:
    bad_pod = {
        "hostNetwork": True,
        "securityContext": {"runAsUser": 0},
        "initContainers": [{"name": "init", "image": "busybox:1.36"}],
        "containers": [
            {
                "name": "app",
                "image": "x:1",
                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 1000,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
                    "readOnlyRootFilesystem": True,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
            }
        ],
    }
    problems = support.pod_security_violations(bad_pod)
    assert problems == [
        "hostNetwork is set",
        "pod runs as uid 0",
        "init: runAsNonRoot is not true",
        "init: no non-zero runAsUser",
        "init: allowPrivilegeEscalation is not false",
        "init: capabilities do not drop ALL",
        "init: root filesystem is writable",
        "init: no RuntimeDefault seccomp profile",
        "init: no cpu request",
        "init: no memory request",
        "init: no memory limit",
        "app: adds capabilities ['NET_ADMIN']",
        "app: no memory limit",
    ]


@pytest.mark.parametrize("root", OVERLAYS)
def test_namespaces_enforce_restricted_pod_security(root: str, rendered: dict[str, Objs]) -> None:
    for ns in (o for o in rendered[root] if o["kind"] == "Namespace"):
        labels = ns["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted", support.ident(ns)


@pytest.mark.parametrize("root", OVERLAYS)
def test_images_are_pinned(root: str, rendered: dict[str, Objs]) -> None:
    objs = rendered[root]
    images = [
        c["image"] for _, spec in support.workloads(objs) for c in support.all_containers(spec)
    ]
    settings = support.find_prefixed(objs, "ConfigMap", "whisperx-operator-settings", CONTROL_NS)
    images.append(settings["data"]["WHISPERX_RUNNER_IMAGE"])  # the image of every Job
    assert [v for image in images for v in support.image_violations(image)] == []


def test_image_check_refuses_floating_tags() -> None:
    assert support.image_violations("redis") != []
    assert support.image_violations("redis:latest") != []
    assert support.image_violations("registry:5000/team/app") != []
    assert support.image_violations("registry:5000/team/app:1.2.3") == []
    assert support.image_violations("app@sha256:" + "0" * 64) == []


@pytest.mark.parametrize("root", OVERLAYS)
def test_api_access_only_where_needed(root: str, rendered: dict[str, Objs]) -> None:
    """Only the operator and the gateway get a service account token."""
    for obj, spec in support.workloads(rendered[root]):
        name = obj["metadata"]["name"]
        mounted = spec.get("automountServiceAccountToken", True)
        assert mounted == (name in ("whisperx-operator", "whisperx-gateway")), name


# --- secrets --------------------------------------------------------------------------

SECRET_TEMPLATES = support.MANIFESTS / "secret-templates"
# Credential shapes that must never be committed outside tests/ (where fake ones live).
TOKEN_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{30,}"),
    re.compile(r"whsec_[A-Za-z0-9+/=]{24,}"),
    re.compile(r"r8_[A-Za-z0-9]{30,}"),
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def repository_files() -> list[Path]:
    """Tracked files and untracked ones that are not ignored: what a commit can carry."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=support.REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [support.REPO / p for p in out.split("\0") if p and (support.REPO / p).is_file()]


def secret_value_problems(path: Path, text: str) -> list[str]:
    problems = []
    if path.suffix in (".yaml", ".yml", ".json"):
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError:
            docs = []
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "Secret":
                for field in ("data", "stringData"):
                    for key, value in (doc.get(field) or {}).items():
                        if value not in (None, ""):
                            problems.append(f"{path}: Secret has a value for {key}")
            is_kustomization = (
                path.name == "kustomization.yaml" or doc.get("kind") == "Kustomization"
            )
            if is_kustomization and doc.get("secretGenerator"):
                problems.append(f"{path}: secretGenerator commits Secret contents")
    if "tests" not in path.relative_to(support.REPO).parts[:1]:
        for pattern in TOKEN_PATTERNS:
            if pattern.search(text):
                problems.append(f"{path}: looks like a credential ({pattern.pattern})")
    return problems


def test_no_secret_values_in_the_tree() -> None:
    problems = []
    files = repository_files()
    assert any(p.suffix == ".yaml" for p in files)
    for path in files:
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        problems += secret_value_problems(path, text)
    assert problems == []


def test_secret_scan_catches_values(tmp_path: Path) -> None:
    path = support.REPO / "manifests" / "leak.yaml"  # never written: only its name is used
    filled = "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\nstringData: {password: hunter2}\n"
    assert secret_value_problems(path, filled) != []
    encoded = "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\ndata: {key: aHVudGVyMg==}\n"
    assert secret_value_problems(path, encoded) != []
    generator = "secretGenerator:\n- name: x\n  literals: [a=b]\n"
    assert secret_value_problems(path.with_name("kustomization.yaml"), generator) != []
    token = "env: hf_" + "a" * 34
    assert secret_value_problems(path.with_name("notes.md"), token) != []
    empty = "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\nstringData: {password: ''}\n"
    assert secret_value_problems(path, empty) == []


def secret_templates() -> dict[tuple[str, str], set[str]]:
    """(namespace, name) -> keys, from manifests/secret-templates/*.yaml."""
    templates = {}
    for path in sorted(SECRET_TEMPLATES.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert doc["kind"] == "Secret"
        keys = set(doc.get("stringData") or {}) | set(doc.get("data") or {})
        templates[(doc["metadata"]["namespace"], doc["metadata"]["name"])] = keys
    return templates


def secret_references(objs: Objs) -> set[tuple[str, str, str | None]]:
    """(namespace, Secret name, key or None for a whole-Secret volume)."""
    refs: set[tuple[str, str, str | None]] = set()
    for obj, spec in support.workloads(objs):
        ns = obj["metadata"]["namespace"]
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                refs.add((ns, volume["secret"]["secretName"], None))
        for c in support.all_containers(spec):
            for item in c.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ns, ref["name"], ref["key"]))
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    refs.add((ns, source["secretRef"]["name"], None))
    return refs


@pytest.mark.parametrize("root", OVERLAYS)
def test_secrets_are_referenced_not_rendered(root: str, rendered: dict[str, Objs]) -> None:
    """No overlay renders a Secret; each Secret it references has a template (name and
    key) documenting it, and each template is referenced."""
    objs = rendered[root]
    assert [o for o in objs if o["kind"] == "Secret"] == []
    templates = secret_templates()
    refs = secret_references(objs)
    for ns, name, key in refs:
        assert (ns, name) in templates, f"{ns}/{name} has no template"
        assert key is None or key in templates[(ns, name)], f"{ns}/{name} has no key {key}"
    assert {(ns, name) for ns, name, _ in refs} == set(templates)
    readme = (SECRET_TEMPLATES / "README.md").read_text()
    for _, name in templates:
        assert f"create secret generic {name}" in readme, f"README says how to create {name}"


# --- references -----------------------------------------------------------------------


@pytest.mark.parametrize("root", OVERLAYS)
def test_references_resolve(root: str, rendered: dict[str, Objs]) -> None:
    """ConfigMaps, PVCs and service accounts that pods use exist in their namespace;
    Services select pods and name ports that exist; bindings name existing roles."""
    objs = rendered[root]
    have = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs}
    problems = []
    for obj, spec in support.workloads(objs):
        ns = obj["metadata"]["namespace"]
        wanted = [("ServiceAccount", spec.get("serviceAccountName", "default"))]
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                wanted.append(("ConfigMap", volume["configMap"]["name"]))
            if "persistentVolumeClaim" in volume:
                wanted.append(
                    ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
                )
        for c in support.all_containers(spec):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    wanted.append(("ConfigMap", source["configMapRef"]["name"]))
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            declared = {v["name"] for v in spec.get("volumes", [])}
            if obj["kind"] == "StatefulSet":
                declared |= {t["metadata"]["name"] for t in obj["spec"]["volumeClaimTemplates"]}
            problems += [f"{support.ident(obj)}: no volume {m}" for m in mounts - declared]
        problems += [
            f"{support.ident(obj)}: {kind} {name} missing"
            for kind, name in wanted
            if (kind, ns, name) not in have
        ]
    for svc in (o for o in objs if o["kind"] == "Service"):
        ns = svc["metadata"]["namespace"]
        pods = [
            spec
            for obj, spec in support.workloads(objs)
            if obj["metadata"]["namespace"] == ns
            and support.selector_matches(
                {"matchLabels": svc["spec"]["selector"]},
                support.pod_template(obj)["metadata"]["labels"],  # type: ignore[index]
            )
        ]
        if not pods:
            problems.append(f"{support.ident(svc)} selects no pods")
        port_names = {
            p.get("name") for s in pods for c in s["containers"] for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str) and target not in port_names:
                problems.append(f"{support.ident(svc)}: no container port {target}")
    for binding in (o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        ns = binding["metadata"].get("namespace")
        role = binding["roleRef"]
        role_ns = ns if role["kind"] == "Role" else None
        if (role["kind"], role_ns, role["name"]) not in have:
            problems.append(f"{support.ident(binding)}: {role['kind']} {role['name']} missing")
        for subject in binding["subjects"]:
            if ("ServiceAccount", subject["namespace"], subject["name"]) not in have:
                problems.append(f"{support.ident(binding)}: subject {subject} missing")
    assert problems == []


# --- RBAC -----------------------------------------------------------------------------


def rights_of(objs: Objs, service_account: str) -> dict[str | None, set[tuple[str, str, str]]]:
    """Binding namespace (None: cluster-wide) -> what the service account may do there."""
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in objs
        if o["kind"] in ("Role", "ClusterRole")
    }
    rights: dict[str | None, set[tuple[str, str, str]]] = {}
    for binding in (o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == service_account
            for s in binding["subjects"]
        ):
            continue
        ns = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        rights.setdefault(ns, set()).update(support.rule_triples(role["rules"]))
    return rights


@pytest.mark.parametrize("root", OVERLAYS)
def test_rbac_is_least_privilege(root: str, rendered: dict[str, Objs]) -> None:
    objs = rendered[root]
    # The operator: reads cluster-wide, writes Jobs and Secrets in tenant namespaces only.
    assert rights_of(objs, "whisperx-operator") == {
        None: support.OPERATOR_CLUSTER_RIGHTS,
        TENANT_NS: support.OPERATOR_TENANT_RIGHTS,
    }
    cluster_wide = {(group, resource) for group, resource, _ in support.OPERATOR_CLUSTER_RIGHTS}
    assert ("", "secrets") not in cluster_wide
    assert (
        not {("batch", "jobs", v) for v in ("create", "delete")} & support.OPERATOR_CLUSTER_RIGHTS
    )
    # The gateway: only in the tenant namespaces it serves, nothing cluster-wide.
    assert rights_of(objs, "whisperx-gateway") == {TENANT_NS: support.GATEWAY_RIGHTS}
    assert rights_of(objs, "whisperx-runner") == {}
    for role in (o for o in objs if o["kind"] in ("Role", "ClusterRole")):
        for group, resource, verb in support.rule_triples(role["rules"]):
            assert "*" not in (group, resource, verb), support.ident(role)
            assert verb not in ("escalate", "bind", "impersonate"), support.ident(role)
            if resource == "secrets":
                # list/watch would expose every Secret's contents.
                assert verb not in ("list", "watch"), support.ident(role)


# --- network --------------------------------------------------------------------------


def _pod(objs: Objs, name: str, ip: str) -> Endpoint:
    for obj, _ in support.workloads(objs):
        if obj["metadata"]["name"] == name:
            labels = support.pod_template(obj)["metadata"]["labels"]  # type: ignore[index]
            return Endpoint(ip, obj["metadata"]["namespace"], labels)
    raise KeyError(name)


# Each overlay's API server (the endpoint after DNAT), as its allow-apiserver patch names it.
API_SERVER = {"kind": Endpoint("172.18.0.2"), "gpu": Endpoint("10.0.0.1")}


@pytest.mark.parametrize("root", OVERLAYS)
def test_network_policies_allow_only_the_designed_flows(
    root: str, rendered: dict[str, Objs]
) -> None:
    objs = rendered[root]
    net = support.NetworkModel(
        objs, extra_namespaces={"kube-system": {}, "default": {}, "other-team": {}}
    )
    operator = _pod(objs, "whisperx-operator", "10.244.0.10")
    gateway = _pod(objs, "whisperx-gateway", "10.244.0.11")
    redis = _pod(objs, "whisperx-redis", "10.244.0.12")
    prefetch = _pod(objs, support.prefetch_job(objs)["metadata"]["name"], "10.244.0.13")
    runner = Endpoint("10.244.0.14", TENANT_NS, ONE_SHOT_LABELS)
    warm_runner = Endpoint("10.244.0.17", TENANT_NS, runner_labels())
    stray = Endpoint("10.244.0.15", "default", {"app": "anything"})
    foreign_runner = Endpoint("10.244.0.16", "other-team", ONE_SHOT_LABELS)
    dns = Endpoint("10.244.0.2", "kube-system", {"k8s-app": "kube-dns"})
    api_endpoint, public_api = API_SERVER[root], Endpoint("34.118.0.5")
    client, public_web = Endpoint("203.0.113.10"), Endpoint("93.184.216.34")
    metadata_server, private_host = Endpoint("169.254.169.254"), Endpoint("10.0.0.5")

    allowed = [
        (client, gateway, 8000),
        (stray, gateway, 8000),
        (gateway, redis, 6379),
        (operator, redis, 6379),
        (runner, operator, 8081),
        (runner, gateway, 8000),  # uploaded files, by their signed links
        (runner, public_web, 443),
        (runner, public_web, 8080),  # audio URLs may name any port
        (warm_runner, operator, 8081),  # its work, and its predictions' reports
        (warm_runner, gateway, 8000),
        (warm_runner, public_web, 443),
        (prefetch, public_web, 443),
        (operator, api_endpoint, 443),
        (operator, api_endpoint, 6443),
        (gateway, api_endpoint, 6443),
        (gateway, public_api, 443),  # a managed cluster's public endpoint
        (operator, public_web, 443),  # webhook delivery
        (operator, public_web, 8080),  # webhook URLs may name any port
    ]
    denied = [
        (client, redis, 6379),
        (stray, redis, 6379),
        (runner, redis, 6379),
        (warm_runner, redis, 6379),
        (warm_runner, private_host, 80),
        (prefetch, redis, 6379),
        (client, operator, 8081),
        (stray, operator, 8081),
        (foreign_runner, operator, 8081),  # not a tenant namespace
        (gateway, operator, 8081),
        (prefetch, operator, 8081),
        (runner, operator, 8080),  # liveness: not the runners' business
        (runner, gateway, 9090),
        (foreign_runner, redis, 6379),
        (prefetch, gateway, 8000),
        (runner, metadata_server, 80),
        (runner, private_host, 80),
        (prefetch, public_web, 80),
        (redis, public_web, 443),
        (redis, api_endpoint, 6443),
        (operator, runner, 8080),
        (client, runner, 8080),
        (client, gateway, 8080),
        (gateway, public_web, 80),
        # Webhook URLs are the clients' choice: never the cluster's internals.
        (operator, metadata_server, 80),
        (operator, private_host, 8080),
        # Nor on the API server's ports: only the API server's own address.
        (operator, metadata_server, 443),
        (operator, private_host, 443),
        (operator, private_host, 6443),
        (gateway, metadata_server, 443),
        (gateway, private_host, 443),
    ]
    wrong = [f"{s} -> {d}:{p} denied" for s, d, p in allowed if not net.allowed(s, d, p)]
    wrong += [f"{s} -> {d}:{p} allowed" for s, d, p in denied if net.allowed(s, d, p)]
    for pod in (operator, gateway, runner, prefetch):
        if not net.allowed(pod, dns, 53, "UDP"):
            wrong.append(f"{pod} cannot resolve names")
    if net.allowed(redis, dns, 53, "UDP"):
        wrong.append("redis may send DNS queries")
    assert wrong == []


COMPONENTS = support.MANIFESTS / "components"
OPERATOR_IP, GATEWAY_IP, RUNNER_IP, REDIS_IP = (
    "10.244.0.10",
    "10.244.0.11",
    "10.244.0.14",
    "10.244.0.12",
)
CORE_DNS = Endpoint("10.244.0.3", "kube-system", {"k8s-app": "coredns"})
NODE_LOCAL_DNS = Endpoint("169.254.20.10")
OPENSHIFT_DNS = Endpoint(
    "10.128.0.5", "openshift-dns", {"dns.operator.openshift.io/daemonset-dns": "default"}
)
# component -> (destination, port, protocol) that it opens to DNS or the API server (None:
# the overlay's API server, whose address the overlay names).
COMPONENT_FLOWS: dict[str, tuple[Endpoint | None, int, str]] = {
    "dns-any-kube-system": (CORE_DNS, 53, "UDP"),
    "dns-node-local": (NODE_LOCAL_DNS, 53, "UDP"),
    "dns-openshift": (OPENSHIFT_DNS, 5353, "UDP"),
    "apiserver-8443": (None, 8443, "TCP"),
}


def render_with_components(overlay: str, components: list[str], workdir: Path) -> Objs:
    """An overlay plus components, as a user's own kustomization would combine them."""
    relative = Path(os.path.relpath(support.OVERLAYS[overlay], workdir))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(relative)],
        "components": [str(Path(os.path.relpath(COMPONENTS / c, workdir))) for c in components],
    }
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return [d for d in yaml.safe_load_all(support.kustomize(workdir)) if d]


def test_every_component_is_tested() -> None:
    assert {p.name for p in COMPONENTS.iterdir() if p.is_dir()} == set(COMPONENT_FLOWS)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("component", sorted(COMPONENT_FLOWS))
def test_components_open_dns_or_api_server_ports(
    overlay: str, component: str, rendered: dict[str, Objs], tmp_path: Path
) -> None:
    """Each component opens its flow for the operator, the gateway and (DNS) runners, not
    for Redis; without it the flow is closed."""
    flow_to, port, protocol = COMPONENT_FLOWS[component]
    destination = flow_to or API_SERVER[overlay]
    extra: dict[str, dict[str, str]] = {"kube-system": {}, "openshift-dns": {}}
    operator = _pod(rendered[overlay], "whisperx-operator", OPERATOR_IP)
    gateway = _pod(rendered[overlay], "whisperx-gateway", GATEWAY_IP)
    redis = _pod(rendered[overlay], "whisperx-redis", REDIS_IP)
    runner = Endpoint(RUNNER_IP, TENANT_NS, ONE_SHOT_LABELS)
    clients = [operator, gateway] + ([runner] if component.startswith("dns-") else [])
    before = support.NetworkModel(rendered[overlay], extra_namespaces=extra)
    after = support.NetworkModel(
        render_with_components(overlay, [component], tmp_path), extra_namespaces=extra
    )
    for pod in clients:
        assert not before.allowed(pod, destination, port, protocol), (pod, "without")
        assert after.allowed(pod, destination, port, protocol), (pod, "with")
    assert not after.allowed(redis, destination, port, protocol)
    if component == "apiserver-8443":
        assert not after.allowed(runner, destination, port, protocol)


def test_components_combine(tmp_path: Path) -> None:
    objs = render_with_components(
        "kind", ["dns-node-local", "dns-any-kube-system", "apiserver-8443"], tmp_path
    )
    net = support.NetworkModel(objs, extra_namespaces={"kube-system": {}})
    operator = _pod(objs, "whisperx-operator", OPERATOR_IP)
    for destination, port, protocol in (
        (CORE_DNS, 53, "UDP"),
        (NODE_LOCAL_DNS, 53, "TCP"),
        (API_SERVER["kind"], 8443, "TCP"),
        (API_SERVER["kind"], 6443, "TCP"),
    ):
        assert net.allowed(operator, destination, port, protocol), destination
    assert not net.allowed(operator, CORE_DNS, 8080, "TCP")
    assert not net.allowed(operator, Endpoint("10.0.0.5"), 8443, "TCP")


def test_network_model_semantics() -> None:
    """The evaluator itself: no policy allows all; a policy denies what it does not list."""
    a = Endpoint("10.0.0.1", "ns", {"app": "a"})
    b = Endpoint("10.0.0.2", "ns", {"app": "b"})
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}}
    assert support.NetworkModel([namespace], {}).allowed(a, b, 80)
    policy = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "b"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": 80}]}
            ],
        },
    }
    net = support.NetworkModel([namespace, policy], {})
    assert net.allowed(a, b, 80)
    assert not net.allowed(a, b, 81)
    assert not net.allowed(b, b, 80)
    assert net.allowed(b, a, 81)
