"""Kueue's real controller against the real control plane, as a local process.

What Kueue's own install applies (`kubectl kustomize config/default` of the module the
binary was built from: its CRDs, namespace, ServiceAccount, RBAC, webhook configurations,
webhook Secret) is applied here too, except what needs a pod network: the Deployment
(the `kueue` binary runs here instead), the Services and the visibility APIServices. So:

- Kueue runs as its own ServiceAccount, `kueue-controller-manager`, with its own
  ClusterRole: the real RBAC authorizes every call it makes;
- the API server calls Kueue's own admission webhooks and the CRDs' conversion webhook
  (the project's kueue.yaml is `v1beta1`, stored as `v1beta2`), each `clientConfig`
  rewritten from its Service to `url: https://127.0.0.1:<port>/<path>`;
- Kueue's internal certificate management stays on, as installed by default: its rotator
  finds the Secret already holding a CA and a serving certificate (made here, valid for
  the Service's DNS name and for 127.0.0.1), keeps them and injects the CA into the
  webhook configurations and CRDs; the files are written to its cert dir as the Secret's
  volume mount would be. (With internal certificates off, Kueue reads its metrics
  certificate from the fixed path /etc/kueue/metrics/certs and exits if it is missing.)

The Configuration is the install's own (its ConfigMap), with loopback ports, no leader
election, and only the batch/job integration.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as dt
import ipaddress
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.cluster.controlplane import KUBECTL, ControlPlane, free_port

NAMESPACE = "kueue-system"
SERVICE_ACCOUNT = "kueue-controller-manager"
# What needs a pod network or a visibility API server this setup does not run.
NOT_APPLIED = {"Deployment", "Service", "APIService"}
WEBHOOK_KINDS = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
# Kueue's cert rotator checks its CA against this name (pkg/util/cert: caName).
CA_NAME = "kueue-ca"
CERT_VALIDITY = dt.timedelta(days=365)  # beyond the rotator's 90-day look-ahead


def kueue_version(bin_dir: Path) -> str:
    """The Kueue version of a build folder (`.../k8s-<v>-kueue-<v>/bin`)."""
    return bin_dir.parent.name.rsplit("-kueue-", 1)[1]


def module_dir(version: str) -> Path:
    """Kueue's module source, which the build downloaded into Go's module cache."""
    cache = subprocess.run(
        ["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True
    ).stdout.strip()
    path = Path(cache) / "sigs.k8s.io" / f"kueue@{version}"
    if not (path / "config" / "default").is_dir():
        raise RuntimeError(f"Kueue's module source is not at {path}: build it first")
    return path


def install_manifests(module: Path) -> list[dict[str, Any]]:
    """Kueue's own install, as `kubectl kustomize config/default` renders it."""
    rendered = subprocess.run(
        [KUBECTL, "kustomize", str(module / "config" / "default")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


# --- certificates ---


@dataclass(frozen=True)
class WebhookCerts:
    ca: bytes
    ca_key: bytes
    cert: bytes
    key: bytes


def webhook_certs(service_dns_name: str) -> WebhookCerts:
    """A CA and serving certificate as Kueue's rotator accepts them (RSA keys in PKCS#1,
    the CA named `kueue-ca`), the serving one also valid for 127.0.0.1."""
    now = dt.datetime.now(dt.UTC)

    def build(
        subject: str,
        key: rsa.RSAPrivateKey,
        issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer[0].subject if issuer else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + CERT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
        )
        if issuer is None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), False
            ).add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                True,
            )  # fmt: skip
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(subject),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        return builder.sign(issuer[1] if issuer else key, hashes.SHA256())

    def pem_key(key: rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1, what the rotator parses
            serialization.NoEncryption(),
        )

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = build(CA_NAME, ca_key, None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = build(service_dns_name, key, (ca, ca_key))
    pem = serialization.Encoding.PEM
    return WebhookCerts(ca.public_bytes(pem), pem_key(ca_key), cert.public_bytes(pem), pem_key(key))


# --- the install, adapted to a local process ---


def _url_client_config(client_config: dict[str, Any], port: int, ca: bytes) -> dict[str, Any]:
    path = client_config["service"].get("path", "/")
    return {"url": f"https://127.0.0.1:{port}{path}", "caBundle": base64.b64encode(ca).decode()}


def manager_args(docs: list[dict[str, Any]]) -> list[str]:
    """The install's own arguments of the manager container, less its config file."""
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return [a for a in container.get("args") or () if not a.startswith("--config=")]


def _conversion_webhook(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] != "CustomResourceDefinition":
        return None
    webhook: dict[str, Any] | None = (doc["spec"].get("conversion") or {}).get("webhook")
    return webhook


def local_install(
    docs: list[dict[str, Any]], *, webhook_port: int, certs: WebhookCerts
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(what to apply, the Configuration) from the rendered install: webhooks called at
    `webhook_port` on loopback, the webhook Secret holding `certs`."""
    applied: list[dict[str, Any]] = []
    config: dict[str, Any] | None = None
    for doc in copy.deepcopy(docs):
        kind = doc["kind"]
        if kind in NOT_APPLIED:
            continue
        if kind in WEBHOOK_KINDS:
            for hook in doc["webhooks"]:
                hook["clientConfig"] = _url_client_config(
                    hook["clientConfig"], webhook_port, certs.ca
                )
        elif (webhook := _conversion_webhook(doc)) is not None:
            webhook["clientConfig"] = _url_client_config(
                webhook["clientConfig"], webhook_port, certs.ca
            )
        elif kind == "Secret":
            doc["data"] = {
                name: base64.b64encode(value).decode()
                for name, value in (("ca.crt", certs.ca), ("ca.key", certs.ca_key),
                                    ("tls.crt", certs.cert), ("tls.key", certs.key))
            }  # fmt: skip
        elif kind == "ConfigMap" and "controller_manager_config.yaml" in doc.get("data", {}):
            config = yaml.safe_load(doc["data"]["controller_manager_config.yaml"])
        applied.append(doc)
    if config is None:
        raise RuntimeError("Kueue's install has no controller_manager_config.yaml ConfigMap")
    return applied, config


def webhook_secret(docs: list[dict[str, Any]]) -> str:
    return str(next(d["metadata"]["name"] for d in docs if d["kind"] == "Secret"))


def webhook_service(docs: list[dict[str, Any]]) -> str:
    """The Service the webhooks name (its DNS name is in the serving certificate)."""
    for doc in docs:
        if doc["kind"] in WEBHOOK_KINDS:
            return str(doc["webhooks"][0]["clientConfig"]["service"]["name"])
    raise RuntimeError("Kueue's install has no webhook configuration")


@dataclass
class KueueController:
    """Kueue's controller manager, a local process against `plane` (module docstring)."""

    plane: ControlPlane
    workdir: Path
    webhook_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    # Seconds from the process start to its readiness (webhooks served, CA injected).
    started_in: float = 0.0
    applied: list[dict[str, Any]] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.workdir / "kueue.log"

    def start(self, timeout: float = 120.0) -> KueueController:
        self.workdir.mkdir(parents=True, exist_ok=True)
        docs = install_manifests(module_dir(kueue_version(self.plane.bin_dir)))
        service = webhook_service(docs)
        certs = webhook_certs(f"{service}.{NAMESPACE}.svc")
        self.applied, config = local_install(docs, webhook_port=self.webhook_port, certs=certs)
        self.plane.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-",
            stdin="\n---\n".join(json.dumps(d) for d in self.applied),
        )  # fmt: skip
        self.plane.kubectl("wait", "--for=condition=Established", "crd",
                           "-l", "app.kubernetes.io/name=kueue", "--timeout=60s")  # fmt: skip
        cert_dir = self.workdir / "webhook-certs"
        cert_dir.mkdir(exist_ok=True)
        # What the Secret's volume mount gives the pod.
        (cert_dir / "tls.crt").write_bytes(certs.cert)
        (cert_dir / "tls.key").write_bytes(certs.key)
        config_file = self.workdir / "config.yaml"
        config_file.write_text(yaml.safe_dump(self._configuration(config, cert_dir, docs)))
        kubeconfig = self.plane.kubeconfig(
            self.plane.service_account_token(NAMESPACE, SERVICE_ACCOUNT),
            self.workdir / "kueue.kubeconfig",
        )
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.plane.bin_dir / "kueue"), f"--config={config_file}",
                 *manager_args(docs)],
                env={"KUBECONFIG": str(kubeconfig), "HOME": str(self.workdir)},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self._wait_ready(timeout)
        self.started_in = time.monotonic() - began
        return self

    def _configuration(
        self, install: dict[str, Any], cert_dir: Path, docs: list[dict[str, Any]]
    ) -> dict[str, Any]:
        config = dict(install)
        config.update(
            {
                "namespace": NAMESPACE,
                "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
                "metrics": {"bindAddress": f"127.0.0.1:{self.metrics_port}"},
                "webhook": {"host": "127.0.0.1", "port": self.webhook_port,
                            "certDir": str(cert_dir)},
                "leaderElection": {"leaderElect": False},
                "internalCertManagement": {
                    "enable": True,
                    "webhookServiceName": webhook_service(docs),
                    "webhookSecretName": webhook_secret(docs),
                },
                "integrations": {"frameworks": ["batch/job"]},
                # Its API server is reached through an APIService and a Service: not here.
                "featureGates": {"VisibilityOnDemand": False},
            }
        )  # fmt: skip
        return config

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.health_port}/readyz"
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"kueue exited ({self.process.returncode}):\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=2) as response,
            ):
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"kueue not ready within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """The webhooks go first (failurePolicy Fail would refuse every Job without
        Kueue), then Kueue's objects while it can still release their finalizers, then
        Kueue itself; its CRDs, RBAC and namespace stay, inert."""
        plane = self.plane
        for kind in WEBHOOK_KINDS:
            for doc in self.applied:
                if doc["kind"] == kind:
                    plane.kubectl("delete", kind.lower(), doc["metadata"]["name"],
                                  "--ignore-not-found", check=False)  # fmt: skip
        if self.process is not None and self.process.poll() is None:
            plane.kubectl("delete", "workloads,localqueues", "--all", "-A",
                          "--timeout=30s", check=False)  # fmt: skip
            plane.kubectl("delete", "clusterqueues,resourceflavors", "--all",
                          "--timeout=30s", check=False)  # fmt: skip
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # CRDs whose conversion webhook is gone would fail every conversion request.
        for doc in self.applied:
            if _conversion_webhook(doc) is not None:
                plane.kubectl("patch", "crd", doc["metadata"]["name"], "--type=json", "-p",
                              '[{"op": "replace", "path": "/spec/conversion", '
                              '"value": {"strategy": "None"}}]', check=False)  # fmt: skip

    def __enter__(self) -> KueueController:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
