"""The environment the manifests give the operator and the gateway, checked against the
code that reads it: every variable set is one the code reads (no stale or misspelt
names), required ones come from Secrets, the code accepts the values, and what the
settings imply holds in the rendered cluster: the Jobs the operator would create from
them pass the same policy checks as the rest, and runner pods can fetch uploaded files
from the public URL (runner allow-list, NetworkPolicies)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from tests.manifests import manifest_support as support
from tests.manifests.manifest_support import CONTROL_NS, TENANT_NS, Endpoint
from whisperx_api import netguard
from whisperx_gateway.config import GatewayConfig
from whisperx_gateway.files import FILES_PATH
from whisperx_operator import jobs
from whisperx_operator.config import OperatorConfig
from whisperx_runner.config import HostAllowList, RunnerConfig
from whisperx_runner.errors import InputError
from whisperx_runner.fetch import check_address

Objs = list[dict[str, Any]]
OVERLAYS = sorted(support.OVERLAYS)
REPO = support.REPO
POD_NAME = "whisperx-operator-7d9c5b6f4-x2x7q"
TOKEN = "test-token-0123456789"
# Variables holding credentials: never in a ConfigMap.
CREDENTIALS = {
    "WHISPERX_REPORT_KEY",
    "WHISPERX_WEBHOOK_SECRET",
    "WHISPERX_FILES_KEY",
    "REDIS_PASSWORD",
    "REDIS_URL",
}
# Where a runner pod may see the gateway's Service (a ClusterIP: private).
CLUSTER_IP = ipaddress.ip_address("10.96.12.34")


class Recording(dict[str, str]):
    """An environment that notes every name the code looks up."""

    def __init__(self, data: dict[str, str]) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)


def fake_secret(name: str, key: str) -> str:
    # Distinct per Secret and key, long enough for every minimum length.
    return f"{name}.{key}.0123456789abcdef"


def fake_field(path: str) -> str:
    return {
        "metadata.name": POD_NAME,
        "metadata.namespace": CONTROL_NS,
        "status.podIP": "fd00:10:244::7",
    }[path]


def deployment(objs: Objs, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, the one container) of a control-plane Deployment."""
    obj = support.find(objs, "Deployment", name, CONTROL_NS)
    spec = obj["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def environment(objs: Objs, name: str, tmp_path: Path) -> dict[str, str]:
    """The container's environment, with its ConfigMap and Secret volumes written under
    tmp_path and the paths in its values pointing there."""
    spec, container = deployment(objs, name)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        where = tmp_path / name / mount["name"]
        where.mkdir(parents=True)
        if "configMap" in volume:
            data = support.find(objs, "ConfigMap", volume["configMap"]["name"], CONTROL_NS)["data"]
        elif volume.get("secret", {}).get("secretName") == "whisperx-gateway-tokens":
            data = {"tokens.yaml": yaml.safe_dump({TOKEN: TENANT_NS})}
        else:
            data = {}
        for key, text in data.items():
            (where / key).write_text(text)
        mounts[mount["mountPath"].rstrip("/")] = where
    env = support.container_environment(
        objs, CONTROL_NS, container, secret=fake_secret, field=fake_field
    )
    for key, value in env.items():
        for mount_path, where in mounts.items():
            if value.startswith(mount_path + "/"):
                env[key] = str(where) + value[len(mount_path) :]
    return env


def names_read_by_main(path: Path) -> set[str]:
    """Variables a process's entry point reads itself (`os.environ.get("NAME"...)`)."""
    pattern = r"os\.environ(?:\.get\(|\[)\s*\"([A-Z][A-Z0-9_]*)\""
    return set(re.findall(pattern, path.read_text()))


def secret_ref(container: dict[str, Any], name: str) -> tuple[str, str] | None:
    for item in container.get("env", []):
        if item["name"] == name:
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            return (ref["name"], ref["key"]) if ref else None
    raise KeyError(f"{container['name']}: no env {name}")


READERS: dict[str, tuple[Callable[[Recording], Any], Path]] = {
    "whisperx-operator": (
        OperatorConfig.from_env,
        REPO / "operator" / "whisperx_operator" / "main.py",
    ),
    "whisperx-gateway": (
        GatewayConfig.from_env,
        REPO / "gateway" / "whisperx_gateway" / "main.py",
    ),
}


def unread_variables(objs: Objs, name: str, tmp_path: Path) -> set[str]:
    """Variables the Deployment `name` sets that its code never reads."""
    _, container = deployment(objs, name)
    env = Recording(environment(objs, name, tmp_path))
    from_env, main = READERS[name]
    from_env(env)
    read = env.read | names_read_by_main(main)
    # A variable nobody reads is fine only as a $(NAME) in another (REDIS_PASSWORD).
    return set(env) - read - support.referenced_vars(container)


@pytest.mark.parametrize("name", sorted(READERS))
@pytest.mark.parametrize("root", OVERLAYS)
def test_every_variable_set_is_read_by_the_code(
    root: str, name: str, rendered: dict[str, Objs], tmp_path: Path
) -> None:
    assert unread_variables(rendered[root], name, tmp_path) == set()


def test_the_reading_check_sees_a_misspelt_name(rendered: dict[str, Objs], tmp_path: Path) -> None:
    objs = rendered["kind"]
    settings = support.find_prefixed(objs, "ConfigMap", "whisperx-operator-settings", CONTROL_NS)
    settings["data"]["WHISPERX_RUNNER_SERVICEACCOUNT"] = "whisperx-runner"
    _, gateway = deployment(objs, "whisperx-gateway")
    gateway["env"].append({"name": "WHISPERX_FILE_KEY", "value": "x"})
    assert unread_variables(objs, "whisperx-operator", tmp_path / "o") == {
        "WHISPERX_RUNNER_SERVICEACCOUNT"
    }
    assert unread_variables(objs, "whisperx-gateway", tmp_path / "g") == {"WHISPERX_FILE_KEY"}
    # Known to the code: the names main.py reads itself count.
    assert {"POD_ID", "WHISPERX_LOG_LEVEL"} <= names_read_by_main(READERS["whisperx-operator"][1])


@pytest.mark.parametrize("root", OVERLAYS)
def test_credentials_come_from_secrets(root: str, rendered: dict[str, Objs]) -> None:
    objs = rendered[root]
    _, operator = deployment(objs, "whisperx-operator")
    _, gateway = deployment(objs, "whisperx-gateway")
    assert secret_ref(operator, "WHISPERX_REPORT_KEY") == ("whisperx-report-key", "key")
    assert secret_ref(operator, "WHISPERX_WEBHOOK_SECRET") == ("whisperx-webhook-secret", "secret")
    # The gateway hands clients the operator's signing secret: the same Secret and key.
    assert secret_ref(gateway, "WHISPERX_WEBHOOK_SECRET") == secret_ref(
        operator, "WHISPERX_WEBHOOK_SECRET"
    )
    assert secret_ref(gateway, "WHISPERX_FILES_KEY") == ("whisperx-files-key", "key")
    for container in (operator, gateway):
        # REDIS_URL embeds the password from the Secret; no plain credential anywhere.
        assert secret_ref(container, "REDIS_PASSWORD") == ("whisperx-redis", "password")
        assert "$(REDIS_PASSWORD)" in support.env_value(container, "REDIS_URL")
        for source in container.get("envFrom", []):
            configmap = support.find(objs, "ConfigMap", source["configMapRef"]["name"], CONTROL_NS)
            assert CREDENTIALS.isdisjoint(configmap["data"]), support.ident(configmap)


@pytest.mark.parametrize("root", OVERLAYS)
def test_operator_identity_is_the_pod_name(root: str, rendered: dict[str, Objs]) -> None:
    _, operator = deployment(rendered[root], "whisperx-operator")
    (item,) = [e for e in operator["env"] if e["name"] == "POD_ID"]
    assert item["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def configs(objs: Objs, tmp_path: Path) -> tuple[OperatorConfig, GatewayConfig]:
    operator = OperatorConfig.from_env(environment(objs, "whisperx-operator", tmp_path))
    gateway = GatewayConfig.from_env(environment(objs, "whisperx-gateway", tmp_path))
    return operator, gateway


@pytest.mark.parametrize("root", OVERLAYS)
def test_the_code_accepts_the_settings(
    root: str, rendered: dict[str, Objs], tmp_path: Path
) -> None:
    objs = rendered[root]
    operator, gateway = configs(objs, tmp_path)
    # One public URL: the gateway's answers and the operator's webhook bodies agree.
    assert gateway.public_url is not None
    assert operator.public_url.rstrip("/") == gateway.public_url
    # The same webhook secret (fake_secret is distinct per Secret and key).
    assert operator.webhook_secret == gateway.webhook_secret
    assert operator.webhook_secret == fake_secret("whisperx-webhook-secret", "secret")
    assert gateway.files_key is not None
    assert gateway.tokens.namespace_for(TOKEN) == TENANT_NS
    # Cluster-wide, as its ClusterRole; peering on, with the pod name as identity.
    assert operator.namespaces == () and operator.peering
    # The ports the code listens on are the ones the containers declare and probe.
    _, op = deployment(objs, "whisperx-operator")
    _, gw = deployment(objs, "whisperx-gateway")
    ports = {p["name"]: p["containerPort"] for p in op["ports"]}
    assert (operator.liveness_port, operator.report_port) == (ports["liveness"], ports["reports"])
    assert [gateway.port] == [p["containerPort"] for p in gw["ports"]]
    # Every interface of both families (single-stack IPv4 or IPv6, dual-stack clusters);
    # kopf's liveness endpoint binds the wildcard of the pod IP's family.
    assert operator.listen_host == gateway.host == ""
    assert operator.liveness_endpoint == f"http://[::]:{operator.liveness_port}/healthz"
    # The runner identity exists in the tenant namespace, without an API token.
    account = support.find(objs, "ServiceAccount", operator.runner_service_account, TENANT_NS)
    assert account["automountServiceAccountToken"] is False
    # Extra runner environment: settings the runner reads, no credentials.
    runner_env = Recording(dict(operator.runner_env))
    RunnerConfig.from_env(runner_env)
    assert "WHISPERX_ALLOW_HOSTS" in operator.runner_env
    assert set(runner_env) <= runner_env.read
    assert not any(re.search(r"TOKEN|KEY|SECRET|PASSWORD", k) for k in runner_env)


def runner_job(objs: Objs, operator: OperatorConfig, hardware: str) -> dict[str, Any]:
    """The Job the operator creates for a prediction with these settings."""
    body = {
        "metadata": {"name": "p-" + hardware, "namespace": TENANT_NS, "uid": "1234"},
        "spec": {"hardware": hardware, "input": {"audio_file": "https://example.com/a.wav"}},
    }
    ref = jobs.PredictionRef.from_body(body)
    return jobs.runner_job(ref, operator.profiles[hardware], operator)


@pytest.mark.parametrize("root", OVERLAYS)
def test_runner_jobs_pass_the_policies(
    root: str, rendered: dict[str, Objs], tmp_path: Path
) -> None:
    """The Jobs the operator will create from these settings: valid, hardened (their
    namespace enforces the restricted Pod Security Standard), and using only what the
    tenant namespace has."""
    objs = rendered[root]
    operator, _ = configs(objs, tmp_path)
    prefetch = support.prefetch_job(objs)
    for hardware in operator.profiles:
        job = runner_job(objs, operator, hardware)
        kubernetes_validate.validate(job, support.K8S_VERSION, strict=True)
        pod = job["spec"]["template"]["spec"]
        assert support.pod_security_violations(pod) == [], hardware
        assert pod["automountServiceAccountToken"] is False
        support.find(objs, "ServiceAccount", pod["serviceAccountName"], TENANT_NS)
        for volume in pod["volumes"]:
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                support.find(objs, "PersistentVolumeClaim", claim, TENANT_NS)
        (container,) = pod["containers"]
        assert container["image"] == prefetch["spec"]["template"]["spec"]["containers"][0]["image"]


@pytest.mark.parametrize("root", OVERLAYS)
def test_the_prefetch_job_writes_the_cache_as_the_runners_read_it(
    root: str, rendered: dict[str, Objs], tmp_path: Path
) -> None:
    """The prefetch Job, the cache's one writer, makes it the runners' group's (fsGroup),
    changing ownership only when the volume's root does not match: a cache of many GB is
    not walked at every run. Runners mount it read-only, without an fsGroup."""
    objs = rendered[root]
    operator, _ = configs(objs, tmp_path)
    prefetch = support.prefetch_job(objs)["spec"]["template"]["spec"]
    writer = prefetch["securityContext"]
    assert writer["fsGroupChangePolicy"] == "OnRootMismatch"
    assert writer["fsGroup"] == writer["runAsGroup"]
    for hardware in operator.profiles:
        pod = runner_job(objs, operator, hardware)["spec"]["template"]["spec"]
        reader = pod["securityContext"]
        assert "fsGroup" not in reader and reader["runAsGroup"] == writer["fsGroup"], hardware
        (container,) = pod["containers"]
        (cache,) = [m for m in container["volumeMounts"] if m["mountPath"] == jobs.MODEL_DIR]
        assert cache["readOnly"] is True, hardware


def runner_endpoint(objs: Objs, operator: OperatorConfig) -> Endpoint:
    labels = runner_job(objs, operator, "whisperx")["spec"]["template"]["metadata"]["labels"]
    return Endpoint("10.244.0.14", TENANT_NS, labels)


def in_cluster_service(objs: Objs, host: str) -> dict[str, Any] | None:
    """The Service a `name.namespace.svc[.cluster.local]` host names, else None."""
    match = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.cluster\.local)?", host)
    if match is None:
        return None
    return support.find(objs, "Service", match.group(1), match.group(2))


@pytest.mark.parametrize("root", OVERLAYS)
def test_runners_reach_the_report_endpoint_and_uploaded_files(
    root: str, rendered: dict[str, Objs], tmp_path: Path
) -> None:
    objs = rendered[root]
    operator, gateway = configs(objs, tmp_path)
    net = support.NetworkModel(objs, extra_namespaces={"kube-system": {}})
    runner = runner_endpoint(objs, operator)
    job = runner_job(objs, operator, "whisperx")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    runner_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    allow = RunnerConfig.from_env(runner_env).allow_hosts

    # Reports: the operator's Service, on a port its pods accept from runners.
    report = urlsplit(runner_env["WHISPERX_REPORT_URL"])
    assert report.hostname is not None
    service = in_cluster_service(objs, report.hostname)
    assert service is not None and service["metadata"]["name"] == "whisperx-operator"
    assert report.port in [p["port"] for p in service["spec"]["ports"]]
    operator_pod = Endpoint(
        "10.244.0.10", CONTROL_NS, {"app.kubernetes.io/name": "whisperx-operator"}
    )
    assert net.allowed(runner, operator_pod, operator.report_port)

    # Uploaded files: their links start with the public URL.
    assert gateway.public_url is not None
    public = urlsplit(gateway.public_url)
    assert public.hostname is not None
    host = public.hostname
    assert host != "localhost" and not host.startswith("127."), (
        "runners would fetch from themselves"
    )
    service = in_cluster_service(objs, host)
    if service is None:
        # An ingress (gpu overlay): runners go through it like any client; see
        # manifests/README.md for ingresses on private addresses.
        assert root == "gpu"
        return
    # The gateway's Service, on its port, to gateway pods that runners may reach.
    assert service["metadata"]["name"] == "whisperx-gateway"
    port = public.port or (443 if public.scheme == "https" else 80)
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    _, gw = deployment(objs, "whisperx-gateway")
    target = {p["name"]: p["containerPort"] for p in gw["ports"]}[service_port["targetPort"]]
    gateway_pod = Endpoint(
        "10.244.0.11", CONTROL_NS, {"app.kubernetes.io/name": "whisperx-gateway"}
    )
    assert net.allowed(runner, gateway_pod, target)
    # And the runner's own checks let a download link there resolve to a ClusterIP.
    fetches_uploads(allow, gateway.public_url)


def fetches_uploads(allow: HostAllowList, base_url: str) -> None:
    """A runner with `allow` may fetch an uploaded file's link under `base_url`, whose
    host resolves to a ClusterIP."""
    link = urlsplit(f"{base_url}{FILES_PATH}upload-id?expires=1&signature=abc")
    assert link.hostname is not None and link.port is not None
    netguard.check_url(link.geturl(), allow)
    netguard.check_address(link.hostname, CLUSTER_IP, allow, link.port)


@pytest.mark.parametrize("root", OVERLAYS)
def test_runner_allow_list_is_the_gateway_only(
    root: str, rendered: dict[str, Objs], tmp_path: Path
) -> None:
    objs = rendered[root]
    operator, gateway = configs(objs, tmp_path)
    allow = HostAllowList.parse(operator.runner_env["WHISPERX_ALLOW_HOSTS"])
    # Where runners fetch uploaded files (the links' rewrite target), by both names.
    assert gateway.internal_url is not None
    internal = urlsplit(gateway.internal_url)
    assert internal.hostname is not None and internal.port is not None
    for host in (internal.hostname, internal.hostname + ".cluster.local"):
        base = f"http://{host}:{internal.port}"
        fetches_uploads(allow, base)
        # Not the gateway's other routes, nor its other ports, nor the host on any port.
        for path in ("/metrics", "/v1/predictions", "/v1/files", "/v1/files/../../metrics"):
            with pytest.raises(netguard.PathRefused):
                netguard.check_url(base + path, allow)
        for port in (internal.port + 1, None):
            with pytest.raises(netguard.AddressRefused):
                netguard.check_address(host, CLUSTER_IP, allow, port)
    # No address ranges, and no other in-cluster name: Redis, the operator, the API
    # server and cloud metadata stay refused.
    assert allow.networks == () and allow.suffixes == ()
    for host, address in (
        ("whisperx-redis.whisperx-system.svc", "10.96.0.20"),
        ("whisperx-operator.whisperx-system.svc", "10.96.0.21"),
        ("kubernetes.default.svc", "10.96.0.1"),
        ("metadata.google.internal", "169.254.169.254"),
    ):
        with pytest.raises(InputError):
            check_address(host, ipaddress.ip_address(address), allow)
