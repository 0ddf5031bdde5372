"""The real node (tests/cluster/node.py): what a cluster's user relies on works on it, with
the real kubelet, containerd, runc, CNI bridge, kube-proxy, CoreDNS and kube-router.

Every pod uses a busybox image imported into the node (`imagePullPolicy: Never`); every
wait is bounded.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.cluster.controlplane import SERVICE_CIDR
from tests.cluster.node import CLUSTER_DNS, RealNode, wait_for

SLEEP = ["sleep", "3600"]
# busybox httpd serving one page; TCP readiness, so the Service has an endpoint.
WEB = ["sh", "-c", "mkdir -p /tmp/www && echo served-by-web > /tmp/www/index.html && "
       "exec httpd -f -p 8080 -h /tmp/www"]  # fmt: skip
API_SERVICE = str(ipaddress.ip_network(SERVICE_CIDR)[1])


@pytest.fixture
def namespace(real_node: RealNode, request: pytest.FixtureRequest) -> Iterator[str]:
    name = "node-" + request.node.name.removeprefix("test_").replace("_", "-")[:40]
    real_node.kubectl("create", "namespace", name)
    yield name
    real_node.kubectl("delete", "namespace", name, "--wait=false", check=False)


def pod(
    name: str,
    image: str,
    command: list[str],
    *,
    labels: dict[str, str] | None = None,
    container: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": command,
                    **(container or {}),
                }
            ],
            **spec,
        },
    }


def web_pod(image: str, name: str = "web") -> dict[str, Any]:
    probe = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
    return pod(name, image, WEB, container={"readinessProbe": probe})


def apply(node: RealNode, namespace: str, *objects: dict[str, Any]) -> None:
    docs = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
    node.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(docs))


def get_pod(node: RealNode, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = node.plane.get_json(f"/api/v1/namespaces/{namespace}/pods/{name}")
    return found or {}


def until_pod(
    node: RealNode,
    namespace: str,
    name: str,
    what: str,
    check: Callable[[dict[str, Any]], Any],
    timeout: float = 60,
) -> Any:
    return wait_for(f"pod {name}: {what}", lambda: check(get_pod(node, namespace, name)), timeout)


def ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def until_ready(node: RealNode, namespace: str, *names: str) -> None:
    for name in names:
        until_pod(node, namespace, name, "Ready", ready)


def container_state(obj: dict[str, Any]) -> dict[str, Any]:
    statuses = (obj.get("status") or {}).get("containerStatuses") or [{}]
    state: dict[str, Any] = statuses[0].get("state") or {}
    return state


def pod_ip(node: RealNode, namespace: str, name: str) -> str:
    return str(get_pod(node, namespace, name)["status"]["podIP"])


def exec_in(node: RealNode, namespace: str, name: str, *command: str) -> tuple[int, str]:
    done = node.kubectl("exec", "-n", namespace, name, "--", *command, check=False, timeout=30)
    return done.returncode, done.stdout + done.stderr


def fetch(node: RealNode, namespace: str, client: str, url: str) -> tuple[int, str]:
    # busybox 1.35's `wget -T` segfaults: bound it with `timeout` instead.
    return exec_in(node, namespace, client, "timeout", "3", "wget", "-q", "-O", "-", url)


def until_ok(what: str, attempt: Callable[[], tuple[int, str]], timeout: float = 20) -> str:
    """The output of the first `attempt` that exits 0."""

    def succeeded() -> str | None:
        rc, out = attempt()
        return out if rc == 0 else None

    return wait_for(what, succeeded, timeout, interval=0.5)


def test_restricted_pod_runs_as_non_root_with_read_only_root(
    real_node: RealNode,
    busybox: str,
    namespace: str,
) -> None:
    real_node.kubectl("label", "namespace", namespace,
                      "pod-security.kubernetes.io/enforce=restricted")  # fmt: skip
    # Pod Security admission is the API server's; the pod below passes it.
    rejected = real_node.kubectl("apply", "-n", namespace, "-f", "-", check=False,
                                 stdin=json.dumps(pod("as-root", busybox, SLEEP)))  # fmt: skip
    assert rejected.returncode != 0 and "violates PodSecurity" in rejected.stderr
    container = {
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    apply(real_node, namespace, pod(
        "restricted", busybox, SLEEP, container=container,
        securityContext={"runAsNonRoot": True, "runAsUser": 65534,
                         "seccompProfile": {"type": "RuntimeDefault"}},
        volumes=[{"name": "tmp", "emptyDir": {}}],
    ))  # fmt: skip
    until_ready(real_node, namespace, "restricted")

    rc, out = exec_in(real_node, namespace, "restricted", "id")
    assert rc == 0 and out.startswith("uid=65534(nobody)"), out
    rc, out = exec_in(real_node, namespace, "restricted", "touch", "/written")
    assert rc != 0 and "Read-only file system" in out, out
    rc, out = exec_in(real_node, namespace, "restricted", "touch", "/tmp/written")
    assert rc == 0, out
    # runc applied the profile: seccomp in filter mode, no capabilities.
    rc, out = exec_in(real_node, namespace, "restricted", "grep", "-E", "^(Seccomp|CapEff):",
                      "/proc/self/status")  # fmt: skip
    assert rc == 0 and "Seccomp:\t2" in out and "CapEff:\t0000000000000000" in out, out


def test_logs(real_node: RealNode, busybox: str, namespace: str) -> None:
    script = "echo one; echo two; echo on-stderr >&2"
    apply(real_node, namespace, pod("talker", busybox, ["sh", "-c", script],
                                    restartPolicy="Never"))  # fmt: skip
    until_pod(real_node, namespace, "talker", "Succeeded",
              lambda p: (p.get("status") or {}).get("phase") == "Succeeded")  # fmt: skip
    logs = real_node.kubectl("logs", "-n", namespace, "talker").stdout.splitlines()
    # Both streams, each in order (the two pipes are read apart: no order between them).
    assert sorted(logs) == ["on-stderr", "one", "two"] and logs.index("one") < logs.index("two")


def test_service_resolved_by_name_through_coredns(
    real_node: RealNode,
    busybox: str,
    namespace: str,
) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    apply(real_node, namespace, web_pod(busybox), pod("client", busybox, SLEEP), service)
    until_ready(real_node, namespace, "web", "client")
    service_json = real_node.kubectl("get", "service", "web", "-n", namespace, "-o", "json")
    cluster_ip = json.loads(service_json.stdout)["spec"]["clusterIP"]

    # The pod's resolver is CoreDNS's Service, and the short name resolves through the
    # search path (kube-proxy may take a second to program a new Service).
    _, resolv = exec_in(real_node, namespace, "client", "cat", "/etc/resolv.conf")
    assert f"nameserver {CLUSTER_DNS}" in resolv and f"search {namespace}.svc." in resolv
    fqdn = f"web.{namespace}.svc.cluster.local"
    out = until_ok("the Service's name resolved",
                   lambda: exec_in(real_node, namespace, "client", "nslookup", fqdn))  # fmt: skip
    assert cluster_ip in out, out
    out = until_ok("the Service answering by name",
                   lambda: fetch(real_node, namespace, "client", "http://web/"))  # fmt: skip
    assert out.strip() == "served-by-web"


def test_kubernetes_service_reaches_the_api_server(
    real_node: RealNode,
    busybox: str,
    namespace: str,
) -> None:
    apply(real_node, namespace, pod("client", busybox, SLEEP))
    until_ready(real_node, namespace, "client")
    _, env = exec_in(real_node, namespace, "client", "env")
    assert f"KUBERNETES_SERVICE_HOST={API_SERVICE}" in env
    # busybox's TLS client cannot talk to Go's TLS server: plain HTTP gets Go's own answer
    # from the API server's TLS port, through the Service's address and its name.
    for host in (API_SERVICE, "kubernetes.default.svc.cluster.local"):
        script = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 nc {host} 443"
        _, out = exec_in(real_node, namespace, "client", "sh", "-c", script)
        assert "Client sent an HTTP request to an HTTPS server" in out, (host, out)


def test_network_policy_default_deny_then_allow_one_pod(
    real_node: RealNode,
    busybox: str,
    namespace: str,
) -> None:
    apply(real_node, namespace, web_pod(busybox),
          pod("client", busybox, SLEEP, labels={"role": "client"}),
          pod("other", busybox, SLEEP, labels={"role": "other"}))  # fmt: skip
    until_ready(real_node, namespace, "web", "client", "other")
    url = f"http://{pod_ip(real_node, namespace, 'web')}:8080/"

    def reaches(client: str) -> bool:
        return fetch(real_node, namespace, client, url)[0] == 0

    assert reaches("client") and reaches("other")
    deny = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "default-deny-ingress"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    apply(real_node, namespace, deny)
    wait_for("default-deny enforced", lambda: not reaches("client"), 20)
    assert not reaches("other")
    allow = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-client"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                         "ports": [{"protocol": "TCP", "port": 8080}]}],
        },
    }  # fmt: skip
    apply(real_node, namespace, allow)
    wait_for("the allowed pod let in", lambda: reaches("client"), 20)
    assert not reaches("other")
    # The kubelet's probes come from the node itself, which policies never block.
    assert ready(get_pod(real_node, namespace, "web"))


def test_memory_limit_ends_in_oom_killed(
    real_node: RealNode,
    busybox: str,
    namespace: str,
) -> None:
    # dd's 256 MiB buffer, filled from /dev/zero, in a 64 MiB cgroup.
    greedy = pod("greedy", busybox, ["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
                 restartPolicy="Never",
                 container={"resources": {"limits": {"memory": "64Mi"}}})  # fmt: skip
    apply(real_node, namespace, greedy)
    terminated = until_pod(real_node, namespace, "greedy", "terminated",
                           lambda p: container_state(p).get("terminated"))  # fmt: skip
    assert terminated["reason"] == "OOMKilled" and terminated["exitCode"] == 137, terminated


def test_image_not_imported_is_never_pulled(
    real_node: RealNode,
    namespace: str,
) -> None:
    apply(real_node, namespace, pod("absent", "localhost/not-imported:1", SLEEP))
    waiting = until_pod(real_node, namespace, "absent", "waiting on its image",
                        lambda p: (container_state(p).get("waiting") or {}).get("reason")
                        == "ErrImageNeverPull" and container_state(p)["waiting"])  # fmt: skip
    assert "localhost/not-imported:1" in waiting["message"]


def test_a_pull_never_leaves_the_machine(
    real_node: RealNode,
    namespace: str,
) -> None:
    always = {"imagePullPolicy": "Always"}
    apply(real_node, namespace, pod("pulled", "whisperx/absent:1", SLEEP, container=always))

    def pulling(p: dict[str, Any]) -> dict[str, Any] | None:
        waiting: dict[str, Any] = container_state(p).get("waiting") or {}
        return waiting if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff") else None

    waiting = until_pod(real_node, namespace, "pulled", "failing to pull", pulling)
    assert "127.0.0.1:9" in waiting.get("message", ""), waiting


def test_extended_resource_on_the_node_lets_a_pod_schedule(
    real_node: RealNode,
    busybox: str,
    namespace: str,
) -> None:
    limits = {"resources": {"limits": {"nvidia.com/gpu": "1"}}}
    apply(real_node, namespace, pod("gpu-user", busybox, SLEEP, container=limits))

    def unschedulable(p: dict[str, Any]) -> str | None:
        for c in (p.get("status") or {}).get("conditions") or []:
            if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable":
                return str(c["message"])
        return None

    message = until_pod(real_node, namespace, "gpu-user", "unschedulable", unschedulable)
    assert "Insufficient nvidia.com/gpu" in message
    real_node.advertise("nvidia.com/gpu", 1)
    try:
        until_ready(real_node, namespace, "gpu-user")
        assert get_pod(real_node, namespace, "gpu-user")["spec"]["nodeName"] == real_node.name
    finally:
        real_node.kubectl("delete", "pod", "gpu-user", "-n", namespace, "--wait=true",
                          "--timeout=30s", check=False)  # fmt: skip
        real_node.advertise("nvidia.com/gpu", 0)


def test_lost_node_out_of_service_has_its_pods_evicted(
    real_node: RealNode,
    busybox: str,
    namespace: str,
) -> None:
    apply(real_node, namespace, pod("bystander", busybox, SLEEP))
    until_ready(real_node, namespace, "bystander")
    out_of_service = "node.kubernetes.io/out-of-service"
    real_node.stop_kubelet()
    try:
        # NotReady 6 s after the Lease's last renewal (the plane's short node timings).
        wait_for("the Node NotReady", lambda: not real_node.is_ready(), 30)
        # With every node of the cluster down, the node lifecycle controller evicts
        # nothing (full disruption): an admin marks the node out of service, as after a
        # non-graceful shutdown, and its pods are evicted at once.
        real_node.kubectl("taint", "node", real_node.name,
                          f"{out_of_service}=nodeshutdown:NoExecute")  # fmt: skip
        until_pod(real_node, namespace, "bystander", "evicted",
                  lambda p: p["metadata"].get("deletionTimestamp"), 30)  # fmt: skip
    finally:
        real_node.kubectl("taint", "node", real_node.name, f"{out_of_service}-", check=False)
        real_node.start_kubelet()
    # Back, the kubelet stops what was evicted while it was away.
    wait_for("the evicted pod gone", lambda: not get_pod(real_node, namespace, "bystander"), 60)
    assert real_node.is_ready()
