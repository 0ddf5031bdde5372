"""A real Kubernetes control plane as local processes, the way envtest and kwok run one.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler, built from the Go
module proxy at pinned versions by `scripts/build-control-plane.sh` (cached by version),
started here with:

- RBAC (and the Node authorizer) on, so the manifests' own Roles authorize every call;
- the default admission plugins, PodSecurity among them;
- ServiceAccount tokens signed by a key of this cluster (TokenRequest works);
- every default controller (Jobs, garbage collection, TTL-after-finished, namespaces,
  node lifecycle, pod GC), each with its own ServiceAccount credentials;
- short node-failure timings, so a lost node shows in seconds rather than minutes.

No kubelet runs: `tests.cluster.kubelet` registers Nodes and runs bound pods as local
processes. `python -m tests.cluster.controlplane` starts one by hand and prints its
kubeconfig (Ctrl-C stops it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-control-plane.sh"
KUBECTL = str(Path(sys.executable).parent / "kubectl")
SERVICE_CIDR = "10.96.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
# A node whose Lease stops being renewed reads NotReady after this, and its pods are
# evicted after the default toleration below (production: 50 s and 300 s).
NODE_GRACE_SECONDS = 6
NOT_READY_TOLERATION_SECONDS = 3


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def build_binaries(part: str = "k8s") -> Path:
    """The folder with the control plane's binaries (`part`: k8s, kueue or all), built
    on the first call and cached by version."""
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT), part], capture_output=True, text=True, timeout=3600
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the control plane failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


# --- certificates ---


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    *,
    organization: str | None = None,
    sans: list[x509.GeneralName] | None = None,
    server: bool = False,
) -> x509.Certificate:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, subject)]
    if organization:
        names.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    name = x509.Name(names)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    else:
        usage = x509.oid.ExtendedKeyUsageOID
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([usage.SERVER_AUTH if server else usage.CLIENT_AUTH]),
            critical=False,
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Identity:
    """A user of the API server with a bearer token from its static token file."""

    name: str
    groups: tuple[str, ...] = ()
    token: str = field(default_factory=lambda: secrets.token_hex(24))


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler, on loopback."""

    workdir: Path
    bin_dir: Path = field(default_factory=build_binaries)
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    admin: Identity = field(default_factory=lambda: Identity("admin", ("system:masters",)))
    identities: dict[str, Identity] = field(default_factory=dict)
    started_in: float = 0.0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    # --- start and stop ---

    def start(self, timeout: float = 120.0) -> ControlPlane:
        began = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_pki()
        # Users known to the API server by static token; the kubelet stand-in's nodes get
        # theirs through `node_identity` (the file is read at start only).
        for ident in (
            Identity("system:kube-controller-manager"),
            Identity("system:kube-scheduler"),
            *(Identity(f"system:node:{n}", ("system:nodes",)) for n in NODE_NAMES),
        ):
            self.identities[ident.name] = ident
        self._write_tokens()
        self._start_etcd()
        self._start_apiserver()
        self._wait_ready(timeout)
        self.kubeconfig(self.admin.token, self.admin_kubeconfig)
        self._start_controllers()
        self._wait_for_default_service_account(timeout)
        self.started_in = time.monotonic() - began
        return self

    def stop(self) -> None:
        # Controllers first, etcd last, each given a moment to exit cleanly.
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def __enter__(self) -> ControlPlane:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _spawn(self, name: str, *args: str) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        with (logs / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _write_pki(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        ca_key = _key()
        ca = _cert("whisperx-test-ca", ca_key)
        serving_key = _key()
        sans: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes.default.svc"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
            x509.IPAddress(ipaddress.ip_network(SERVICE_CIDR)[1]),
        ]
        serving = _cert("kube-apiserver", serving_key, (ca, ca_key), sans=sans, server=True)
        (pki / "ca.crt").write_bytes(_pem_cert(ca))
        (pki / "ca.key").write_bytes(_pem_key(ca_key))
        (pki / "apiserver.crt").write_bytes(_pem_cert(serving))
        (pki / "apiserver.key").write_bytes(_pem_key(serving_key))
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (pki / "sa.key").write_bytes(_pem_key(sa_key))
        (pki / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        for path in pki.iterdir():
            path.chmod(0o600)

    def _write_tokens(self) -> None:
        rows = [
            f'{i.token},{i.name},{i.name},"{",".join(i.groups)}"'
            for i in (self.admin, *self.identities.values())
        ]
        (self.workdir / "pki" / "tokens.csv").write_text("\n".join(rows) + "\n")

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn(
            "etcd",
            "--name=default",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
            # A test cluster: speed over durability (as envtest runs it).
            "--unsafe-no-fsync",
            "--log-level=warn",
        )

    def _start_apiserver(self) -> None:
        pki = self.workdir / "pki"
        self._spawn(
            "kube-apiserver",
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # The `kubernetes` Service's endpoints may not be a loopback address: no
            # reconciler (nothing here reaches the API server through that Service).
            "--endpoint-reconciler-type=none",
            f"--secure-port={self.port}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # As kubeadm and managed clusters run it: Pod Security decides, not this flag.
            "--allow-privileged=true",
            # Beside the defaults (PodSecurity, ServiceAccount, NamespaceLifecycle...):
            # what keeps a kubelet's identity to its own node and pods.
            "--enable-admission-plugins=NodeRestriction",
            f"--default-not-ready-toleration-seconds={NOT_READY_TOLERATION_SECONDS}",
            f"--default-unreachable-toleration-seconds={NOT_READY_TOLERATION_SECONDS}",
            "--profiling=false",
            "--v=1",
        )

    def _start_controllers(self) -> None:
        pki = self.workdir / "pki"
        kcm = self.kubeconfig(
            self.identities["system:kube-controller-manager"].token,
            self.workdir / "controller-manager.kubeconfig",
        )
        self._spawn(
            "kube-controller-manager",
            f"--kubeconfig={kcm}",
            f"--authentication-kubeconfig={kcm}",
            f"--authorization-kubeconfig={kcm}",
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            f"--cert-dir={self.workdir / 'kcm-certs'}",
            f"--node-monitor-grace-period={NODE_GRACE_SECONDS}s",
            "--node-monitor-period=1s",
            # Claims created before their volume bind within a second, not fifteen.
            "--pvclaimbinder-sync-period=1s",
            "--v=1",
        )
        scheduler = self.kubeconfig(
            self.identities["system:kube-scheduler"].token,
            self.workdir / "scheduler.kubeconfig",
        )
        self._spawn(
            "kube-scheduler",
            f"--kubeconfig={scheduler}",
            f"--authentication-kubeconfig={scheduler}",
            f"--authorization-kubeconfig={scheduler}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            f"--cert-dir={self.workdir / 'scheduler-certs'}",
            "--v=1",
        )

    def _get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {token or self.admin.token}"}
        )
        try:
            with urllib.request.urlopen(request, context=self.ssl_context(), timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}):\n{self.log_tail(name)}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._alive()
            with contextlib.suppress(OSError):
                if self._get("/readyz")[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"kube-apiserver not ready:\n{self.log_tail('kube-apiserver')}")
            time.sleep(0.2)

    def _wait_for_default_service_account(self, timeout: float) -> None:
        """Pods can be created once the ServiceAccount controller has made `default`."""
        deadline = time.monotonic() + timeout
        while self._get("/api/v1/namespaces/default/serviceaccounts/default")[0] != 200:
            self._alive()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    "no default ServiceAccount:\n" + self.log_tail("kube-controller-manager")
                )
            time.sleep(0.2)

    # --- what tests use ---

    def kubeconfig(self, token: str, path: Path, *, namespace: str | None = None) -> Path:
        """A kubeconfig for this cluster authenticating with `token`."""
        context: dict[str, str] = {"cluster": "test", "user": "test"}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": context}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def node_identity(self, node: str) -> Identity:
        return self.identities[f"system:node:{node}"]

    def kubectl(
        self,
        *args: str,
        stdin: str | None = None,
        kubeconfig: Path | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [KUBECTL, f"--kubeconfig={kubeconfig or self.admin_kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result

    def service_account_token(self, namespace: str, name: str, seconds: int = 7200) -> str:
        """A bound token for a ServiceAccount, through the TokenRequest API."""
        result = self.kubectl("create", "token", name, "-n", namespace, f"--duration={seconds}s")
        return result.stdout.strip()

    def apply(self, *args: str, kubeconfig: Path | None = None) -> str:
        return self.kubectl("apply", "--server-side", *args, kubeconfig=kubeconfig).stdout


# The kubelet stand-in's nodes: one CPU node, one advertising a GPU.
CPU_NODE = "cpu-node"
GPU_NODE = "gpu-node"
NODE_NAMES = (CPU_NODE, GPU_NODE)


@contextlib.contextmanager
def running_control_plane(workdir: Path | None = None) -> Iterator[ControlPlane]:
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kcp-")))
        plane = stack.enter_context(ControlPlane(workdir))
        yield plane


def main() -> None:
    """Starts a control plane by hand: `python -m tests.cluster.controlplane [DIR]`."""
    # SIGTERM stops the plane too (its processes run in sessions of their own).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="kcp-"))
    if workdir.exists() and any(workdir.iterdir()):
        shutil.rmtree(workdir)
    with running_control_plane(workdir) as plane:
        print(json.dumps({"kubeconfig": str(plane.admin_kubeconfig), "url": plane.url,
                          "started_in_s": round(plane.started_in, 1)}), flush=True)  # fmt: skip
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
