"""A real single node for the real control plane: kubelet, containerd, runc, the CNI
bridge, kube-proxy, CoreDNS and kube-router's NetworkPolicy controller, as on a kubeadm
node, all on this machine (root, Debian packages below).

- `NodeControlPlane` is the control plane of `tests.cluster.controlplane` moved to the
  node's address: pods reach it through the `kubernetes` Service (10.96.0.1), which a
  loopback API server cannot back, and it calls the kubelet (logs, exec) with a client
  certificate instead of anonymously.
- `RealNode` starts the node against it and undoes on the host everything the node
  changes: processes, mounts, cgroups, links, iptables/nftables rules, ipsets, sysctls,
  and the few hard-coded paths the kubelet and containerd write. What it records before
  it starts is kept on disk, so a run killed before its teardown is undone by the next.
- Images come from OCI archives (`import_image`), never a registry: pods use
  `imagePullPolicy: Never`. containerd's image store lives in the machine's cache and
  outlives the node, so an image imported once (runner images are several GB) is not
  imported again.
- Nothing leaves the machine: a guard drops pod traffic forwarded anywhere but the
  bridge, and the Service range is routed to a device that drops what kube-proxy did not
  translate (the default route leads off the machine).

`python -m tests.cluster.node DIR` starts a control plane and a node by hand and prints
the admin kubeconfig (Ctrl-C or SIGTERM stops both).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.cluster import controlplane as cpm
from tests.cluster.controlplane import (
    REPO_ROOT,
    SERVICE_CIDR,
    ControlPlane,
    build_binaries,
    free_port,
)

T = TypeVar("T")

NODE_NAME = "whisperx-node"
# Pods get addresses on this bridge; nothing is masqueraded, so they have no way out.
POD_CIDR = "10.244.77.0/24"
BRIDGE = "wxnode0"
CNI_NETWORK = "whisperx-node"
# The Service range's route leads here (an ifb drops what is not redirected to it: this
# kernel has no `dummy` driver), not to the default gateway.
SERVICE_GUARD_LINK = "wxsvc0"
GUARD_TABLE = "whisperx_node_guard"
CLUSTER_DOMAIN = "cluster.local"
CLUSTER_DNS = str(ipaddress.ip_network(SERVICE_CIDR)[10])
PAUSE_IMAGE = "localhost/pause:3.10"
BUSYBOX_IMAGE = "localhost/busybox:test"
# Where containerd is told every registry is: the discard port on loopback.
NO_REGISTRY = "http://127.0.0.1:9"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "whisperx-operator"
IMAGE_CACHE = CACHE / "node-images"
# containerd's root (content, snapshots, image metadata) persists across runs; its
# state, sockets and everything per pod stay in the run's folder.
CONTAINERD_ROOT = CACHE / "containerd"
HOST_STATE = CACHE / "real-node" / "host-state.json"
LOCK = CACHE / "real-node" / "lock"
NETWORK_BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-node-network.sh"
# What the node runs on; `gcc` and `libc6-dev` build the static pause binary.
APT_PACKAGES = (
    "containerd", "runc", "containernetworking-plugins", "iptables", "busybox-static",
    "umoci", "ipset", "nftables", "gcc", "libc6-dev",
)  # fmt: skip
# The kubelet sets these once at start (and the bridge plugin turns on forwarding); they
# are put back as they were right after the node is Ready, forwarding at teardown.
KUBELET_SYSCTLS = ("vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops")
SYSCTLS = ("net.ipv4.ip_forward", *KUBELET_SYSCTLS)
# Written by the kubelet, containerd and CNI whatever their configuration says.
HARD_CODED_PATHS = (
    Path("/var/lib/kubelet/device-plugins"),
    Path("/var/log/containers"),
    Path("/var/lib/cni"),
    Path("/run/containerd"),
)
CGROUP_ROOT = Path("/sys/fs/cgroup")

PAUSE_C = r"""
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void die(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction term = {.sa_handler = die};
  struct sigaction chld = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  sigaction(SIGINT, &term, NULL); sigaction(SIGTERM, &term, NULL);
  sigaction(SIGCHLD, &chld, NULL);
  for (;;) pause();
}
"""

# No `forward`: names outside the cluster's zones get SERVFAIL, and nothing leaves.
COREFILE = f""".:53 {{
    errors
    health :8080
    ready :8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }}
    cache 30
}}
"""


# --- small helpers ---


def _run(
    *argv: str, check: bool = True, timeout: float = 60, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return done


def wait_for(
    what: str,
    check: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 0.2,
    alive: Callable[[], None] | None = None,
) -> T:
    """The first truthy result of `check`, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if alive:
            alive()
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def host_address() -> tuple[str, str]:
    """The default route's interface and its IPv4 address: the node IP (the kubelet
    rejects a loopback one), and the interface pod traffic must never leave through."""
    routes = json.loads(_run("ip", "-j", "-4", "route", "show", "default").stdout)
    if not routes:
        raise RuntimeError("no IPv4 default route: the node takes that route's address")
    dev: str = routes[0]["dev"]
    for link in json.loads(_run("ip", "-j", "-4", "addr", "show", "dev", dev).stdout):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet":
                return dev, str(info["local"])
    raise RuntimeError(f"{dev} has no IPv4 address")


def missing_packages() -> list[str]:
    query = _run("dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *APT_PACKAGES,
                 check=False)  # fmt: skip
    installed = {
        line.split()[0] for line in query.stdout.splitlines() if line.endswith(" installed")
    }
    return [p for p in APT_PACKAGES if p not in installed]


def build_network_binaries() -> dict[str, Path]:
    """CoreDNS and kube-router, built on the first call and cached by version."""
    done = subprocess.run(
        ["bash", str(NETWORK_BUILD_SCRIPT), "all"], capture_output=True, text=True, timeout=3600
    )
    if done.returncode != 0:
        raise RuntimeError(f"building CoreDNS and kube-router failed:\n{done.stderr[-4000:]}")
    coredns, kube_router = (Path(line) for line in done.stdout.strip().splitlines()[-2:])
    return {"coredns": coredns / "coredns", "kube-router": kube_router / "kube-router"}


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def _first_missing(path: Path) -> Path | None:
    """The topmost folder of `path` that does not exist yet: what to remove at the end."""
    for candidate in (*reversed(path.parents), path):
        if not candidate.exists():
            return candidate
    return None


# --- images without a registry ---


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def oci_image(name: str, tag: str, key: bytes, fill: Callable[[Path], None], *config: str) -> Path:
    """An OCI archive of a one-layer image whose root filesystem `fill` writes, made with
    umoci and cached by `key` (what the image is made of). Its index names it `tag` only;
    `RealNode.import_image` gives it a repository."""
    digest = hashlib.sha256(b"oci-image/1\0" + tag.encode() + b"\0" + key + repr(config).encode())
    archive = IMAGE_CACHE / f"{name}-{tag}-{digest.hexdigest()[:16]}.tar"
    if archive.exists():
        return archive
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=IMAGE_CACHE) as tmp:
        layout, bundle, image = Path(tmp, "layout"), Path(tmp, "bundle"), f"{tmp}/layout:{tag}"
        _run("umoci", "init", "--layout", str(layout))
        _run("umoci", "new", "--image", image)
        _run("umoci", "unpack", "--image", image, str(bundle))
        fill(bundle / "rootfs")
        _run("umoci", "repack", "--image", image, str(bundle))
        _run("umoci", "config", "--image", image, "--os", "linux", "--architecture", _arch(),
             *config)  # fmt: skip
        _run("umoci", "gc", "--layout", str(layout))
        _run("tar", "-C", str(layout), "-cf", f"{tmp}/image.tar", ".")
        os.replace(f"{tmp}/image.tar", archive)
    return archive


def pause_image() -> Path:
    """The pod sandbox image: a static binary that waits, reaps children and exits on
    TERM (the registry's pause image cannot be pulled here)."""

    def fill(rootfs: Path) -> None:
        source = rootfs.parent.parent / "pause.c"
        source.write_text(PAUSE_C)
        _run("gcc", "-Os", "-static", "-s", "-o", str(rootfs / "pause"), str(source))
        source.unlink()

    return oci_image("pause", "3.10", PAUSE_C.encode(), fill,
                     "--config.entrypoint", "/pause", "--config.user", "65535:65535")  # fmt: skip


def busybox_image() -> Path:
    """A small image for tests: Debian's static busybox with one link per applet, root
    and nobody (65534) in /etc/passwd, /tmp world-writable. Tag `test`."""
    busybox = Path("/bin/busybox").read_bytes()

    def fill(rootfs: Path) -> None:
        for folder in ("bin", "etc", "tmp"):
            (rootfs / folder).mkdir(exist_ok=True)
        (rootfs / "bin" / "busybox").write_bytes(busybox)
        (rootfs / "bin" / "busybox").chmod(0o755)
        for applet in _run("/bin/busybox", "--list").stdout.split():
            if applet != "busybox":
                (rootfs / "bin" / applet).symlink_to("busybox")
        (rootfs / "etc" / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        )
        (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (rootfs / "tmp").chmod(0o1777)

    return oci_image("busybox", "test", busybox, fill,
                     "--config.cmd", "/bin/sh", "--config.env", "PATH=/bin")  # fmt: skip


def coredns_version(binary: Path) -> str:
    """From the build cache's folder name (scripts/build-node-network.sh)."""
    return binary.parent.parent.name.removeprefix("coredns-v")


def coredns_image(binary: Path) -> Path:
    def fill(rootfs: Path) -> None:
        shutil.copy2(binary, rootfs / "coredns")

    return oci_image("coredns", coredns_version(binary), binary.read_bytes(), fill,
                     "--config.entrypoint", "/coredns")  # fmt: skip


def archive_index(archive: Path) -> dict[str, Any]:
    """The first entry of an OCI archive's index: the image's digest and ref annotation."""
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.name.removeprefix("./") == "index.json" and (file := tar.extractfile(member)):
                entry: dict[str, Any] = json.load(file)["manifests"][0]
                return entry
    raise ValueError(f"{archive}: no index.json (not an OCI archive)")


# --- the control plane, on the node's address ---


@dataclass
class NodeControlPlane(ControlPlane):
    """The control plane a real kubelet, kube-proxy and pods can use.

    kube-apiserver listens on and advertises the node's address, with the `lease`
    endpoint reconciler writing the `kubernetes` Service's endpoints (a loopback endpoint
    is refused, and DNATed pod packets could not reach it). Its certificate names that
    address and the Service's names, and it calls kubelets with a client certificate of
    this CA and prefers their InternalIP (the node's name does not resolve here).
    """

    node_ip: str = field(default_factory=lambda: host_address()[1])

    @property
    def url(self) -> str:
        return f"https://{self.node_ip}:{self.port}"

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    def _write_pki(self) -> None:
        super()._write_pki()
        names = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 f"kubernetes.default.svc.{CLUSTER_DOMAIN}"]  # fmt: skip
        ips = ["127.0.0.1", "::1", str(ipaddress.ip_network(SERVICE_CIDR)[1]), self.node_ip]
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        self._issue("apiserver", "kube-apiserver", sans=sans, server=True)
        self._issue("kubelet-client", "kube-apiserver-kubelet-client",
                    organization="system:masters")  # fmt: skip

    def _issue(
        self,
        stem: str,
        subject: str,
        *,
        organization: str | None = None,
        sans: list[x509.GeneralName] | None = None,
        server: bool = False,
        folder: Path | None = None,
    ) -> tuple[Path, Path]:
        ca = x509.load_pem_x509_certificate((self.pki / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((self.pki / "ca.key").read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = cpm._key()
        cert = cpm._cert(subject, key, (ca, ca_key), organization=organization, sans=sans,
                         server=server)  # fmt: skip
        folder = folder or self.pki
        folder.mkdir(parents=True, exist_ok=True)
        crt_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
        crt_path.write_bytes(cpm._pem_cert(cert))
        key_path.write_bytes(cpm._pem_key(key))
        key_path.chmod(0o600)
        return crt_path, key_path

    def certificate_kubeconfig(
        self, user: str, path: Path, *, organization: str | None = None
    ) -> Path:
        """A kubeconfig for `user` (and `organization` as its group) holding a client
        certificate of this cluster's CA, for components that start after the API server
        (its static token file is read at start only)."""
        crt, key = self._issue(path.stem, user, organization=organization, folder=path.parent)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url,
                                                      "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": user, "user": {"client-certificate": str(crt),
                                              "client-key": str(key)}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        }  # fmt: skip
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def _spawn(self, name: str, *args: str) -> None:
        if name == "kube-apiserver":
            # pflag keeps a repeated flag's last value: these override the harness's.
            args = (
                *args,
                f"--bind-address={self.node_ip}",
                f"--advertise-address={self.node_ip}",
                "--endpoint-reconciler-type=lease",
                f"--kubelet-client-certificate={self.pki / 'kubelet-client.crt'}",
                f"--kubelet-client-key={self.pki / 'kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP,Hostname,ExternalIP",
            )
        super()._spawn(name, *args)

    def kubectl(
        self,
        *args: str,
        stdin: str | None = None,
        kubeconfig: Path | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        # Discovery is cached per server address: keep it out of ~/.kube.
        cache = f"--cache-dir={self.workdir / 'kube-cache'}"
        return super().kubectl(cache, *args, stdin=stdin, kubeconfig=kubeconfig, check=check,
                               timeout=timeout)  # fmt: skip

    def get_json(self, path: str) -> Any:
        """The object at an API path, as the admin; None where the answer is not 200."""
        status, body = self._get(path)
        return json.loads(body) if status == 200 else None


# --- what the node changes on the host, and undoing it ---


@dataclass
class HostState:
    """What the host looked like before the node started, and what the node runs. Saved
    to HOST_STATE while the node runs, so a later run can undo a killed one."""

    sysctls: dict[str, str]
    new_paths: list[str]
    nft_tables: list[str]
    ipsets: list[str]
    workdir: str
    containerd_socket: str
    kube_proxy_cleanup: list[str] = field(default_factory=list)
    pids: dict[str, tuple[int, str]] = field(default_factory=dict)

    def save(self) -> None:
        HOST_STATE.write_text(json.dumps(asdict(self)))

    @classmethod
    def record(cls, workdir: Path, containerd_socket: Path) -> HostState:
        return cls(
            sysctls={name: _sysctl_path(name).read_text().strip() for name in SYSCTLS},
            new_paths=[str(p) for p in map(_first_missing, HARD_CODED_PATHS) if p],
            nft_tables=_nft_tables(),
            ipsets=_run("ipset", "list", "-n").stdout.split(),
            workdir=str(workdir),
            containerd_socket=str(containerd_socket),
        )

    @classmethod
    def load(cls) -> HostState | None:
        try:
            data = json.loads(HOST_STATE.read_text())
        except FileNotFoundError:
            return None
        data["pids"] = {k: tuple(v) for k, v in data["pids"].items()}
        return cls(**data)


def _nft_tables() -> list[str]:
    listed = json.loads(_run("nft", "-j", "list", "tables").stdout)["nftables"]
    return [f"{t['table']['family']} {t['table']['name']}" for t in listed if "table" in t]


def _kube_chains() -> list[str]:
    """The chains of Kubernetes components in iptables (kubelet, kube-proxy, kube-router
    all name theirs KUBE-...)."""
    found = []
    for tool in ("iptables-save", "ip6tables-save"):
        for line in _run(tool, check=False).stdout.splitlines():
            if line.startswith(":KUBE-"):
                found.append(f"{tool}: {line.split()[0][1:]}")
    return found


def _kubepods_cgroups() -> list[Path]:
    return sorted(p for p in (*CGROUP_ROOT.glob("*/kubepods"), CGROUP_ROOT / "kubepods")
                  if p.is_dir())  # fmt: skip


def _leftovers() -> list[str]:
    """What a node of ours, or another kubelet, would have left on the host."""
    links = {link["ifname"] for link in json.loads(_run("ip", "-j", "link").stdout)}
    found = [f"link {name}" for name in (BRIDGE, SERVICE_GUARD_LINK) if name in links]
    found += [f"nft table {t}" for t in _nft_tables() if t.endswith(f" {GUARD_TABLE}")]
    found += _kube_chains()
    found += [f"cgroup {p}" for p in _kubepods_cgroups()]
    return found


def _pid_alive(pid: int, exe: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe") == exe
    except OSError:
        return False


def _kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _shim_pids(socket: str) -> list[int]:
    """containerd's shims for our socket: they outlive containerd by design."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"containerd-shim" in argv[0] and socket.encode() in argv:
            pids.append(int(proc.name))
    return pids


def _unmount_under(*roots: str) -> list[str]:
    """Unmounts everything mounted under `roots`, deepest first; what stays mounted."""

    def mounted() -> list[str]:
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if any(point == r or point.startswith(r.rstrip("/") + "/") for r in roots):
                points.append(point)
        return sorted(set(points), key=len, reverse=True)

    for _ in range(5):
        points = mounted()
        if not points:
            return []
        for point in points:
            if _run("umount", point, check=False).returncode != 0:
                _run("umount", "-l", point, check=False)
    return mounted()


def _remove_kube_chains() -> None:
    """The KUBE-* chains of the kubelet and kube-router (kube-proxy removes its own) and
    the jumps to them. Only called where none existed before the node started."""
    for tool in ("iptables", "ip6tables"):
        table = ""
        chains: dict[str, list[str]] = {}
        rules: dict[str, list[list[str]]] = {}
        for line in _run(f"{tool}-save", check=False).stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
                chains[table], rules[table] = [], []
            elif line.startswith(":KUBE-"):
                chains[table].append(line.split()[0][1:])
            elif line.startswith("-A "):
                rules[table].append(shlex.split(line)[1:])
        for table, ours in chains.items():
            for rule in rules[table]:
                jumps = [rule[i + 1] for i, arg in enumerate(rule[:-1]) if arg in ("-j", "-g")]
                if not rule[0].startswith("KUBE-") and set(jumps) & set(ours):
                    _run(tool, "-w", "-t", table, "-D", *rule, check=False)
            for chain in ours:
                _run(tool, "-w", "-t", table, "-F", chain, check=False)
            for chain in ours:
                _run(tool, "-w", "-t", table, "-X", chain, check=False)


def _bound_sockets() -> set[str]:
    return {line.split()[-1] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
            if len(line.split()) == 8}  # fmt: skip


def _prune(folder: Path, workdir: str) -> list[str]:
    """Removes from a hard-coded folder the node created what is the node's, then the
    folders that leaves empty: sockets nothing listens on any more (the kubelet's, the
    shims'), links into the run's folder (/var/log/containers), the CNI plugins' results
    for the node's network. Others' files stay (another containerd's or podman's, made
    since the node started); what stays is returned, less sockets in use."""
    if not folder.exists():
        return []
    bound = _bound_sockets()
    entries = sorted(folder.rglob("*"), key=lambda p: -len(p.parts))
    network, loopback = f"{CNI_NETWORK}-", "cni-loopback-"  # then <container id>-<interface>
    ours = {p.name.removeprefix(network).split("-")[0] for p in entries
            if p.name.startswith(network)}  # fmt: skip
    for path in entries:
        if path.is_symlink():
            if os.readlink(path).startswith(workdir.rstrip("/") + "/"):
                path.unlink()
        elif path.is_socket():
            if str(path) not in bound:
                path.unlink()
        elif path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()
        elif path.name.startswith(network) or (
            path.name.startswith(loopback)
            and path.name.removeprefix(loopback).split("-")[0] in ours
        ):
            path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
    return [str(p) for p in folder.rglob("*") if not p.is_dir() and str(p) not in bound]


def restore_host(state: HostState) -> list[str]:
    """Undoes what a node changed on the host (its pods already gone, or not: their
    processes are killed here); returns what could not be undone."""
    problems: list[str] = []
    for name, (pid, exe) in state.pids.items():
        if _pid_alive(pid, exe):
            _kill(pid)
            problems.append(f"{name} ({pid}) was still running: killed")
    for pid in _shim_pids(state.containerd_socket):
        _kill(pid)
    # Containers whose shim is gone run on in their cgroups: those are ours too.
    for group in _kubepods_cgroups():
        for procs in group.rglob("cgroup.procs"):
            for member in procs.read_text().split():
                _kill(int(member))
    if state.kube_proxy_cleanup:
        done = _run(*state.kube_proxy_cleanup, check=False, timeout=60)
        if done.returncode != 0:
            problems.append(f"kube-proxy --cleanup: {done.stderr[-500:]}")
    roots = [state.workdir, str(CONTAINERD_ROOT)]
    problems += [f"still mounted: {p}" for p in _unmount_under(*roots)]
    deadline = time.monotonic() + 10
    for group in _kubepods_cgroups():
        folders = sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for folder in folders:
            while True:
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        problems.append(f"cgroup not removed: {folder}")
                        break
                    time.sleep(0.1)
        with contextlib.suppress(OSError):
            group.rmdir()
    for link in json.loads(_run("ip", "-j", "link", "show", "master", BRIDGE, check=False).stdout
                           or "[]"):  # fmt: skip
        _run("ip", "link", "del", link["ifname"], check=False)
    _run("ip", "link", "del", BRIDGE, check=False)
    _run("ip", "route", "del", SERVICE_CIDR, "dev", SERVICE_GUARD_LINK, check=False)
    _run("ip", "link", "del", SERVICE_GUARD_LINK, check=False)
    _run("nft", "delete", "table", "inet", GUARD_TABLE, check=False)
    _remove_kube_chains()
    # The tables iptables-nft made for the kubelet's chains (empty now), where the host
    # had none: only while nothing else put rules there.
    for table in set(_nft_tables()) - set(state.nft_tables):
        family, name = table.split()
        listed = _run("nft", "-j", "list", "table", family, name, check=False).stdout
        if listed and not any("rule" in i for i in json.loads(listed)["nftables"]):
            _run("nft", "delete", "table", family, name, check=False)
    for ipset in set(_run("ipset", "list", "-n").stdout.split()) - set(state.ipsets):
        if ipset.removeprefix("inet6:").upper().startswith("KUBE-"):
            _run("ipset", "destroy", ipset, check=False)
    for name, value in state.sysctls.items():
        _sysctl_path(name).write_text(value)
    for path in state.new_paths:
        problems += [f"left in {path}: {item}" for item in _prune(Path(path), state.workdir)]
    problems += [f"left on the host: {item}" for item in _leftovers()]
    return problems


# --- the node ---


@dataclass
class RealNode:
    """kubelet + containerd + runc + CNI bridge + kube-proxy + CoreDNS + kube-router,
    registered to `plane` as the Node `name`. A context manager; `start()`/`stop()`."""

    plane: NodeControlPlane
    workdir: Path
    name: str = NODE_NAME
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Seconds each start step took (reported by `python -m tests.cluster.node`).
    timings: dict[str, float] = field(default_factory=dict)
    bin: dict[str, Path] = field(default_factory=dict)
    coredns_image: str = ""
    _state: HostState | None = None
    _lock: IO[str] | None = None
    _last: float = 0.0

    @property
    def node_ip(self) -> str:
        return self.plane.node_ip

    @property
    def containerd_socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.plane.kubectl(*args, **kwargs)

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        argv = ("ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args)
        return _run(*argv, check=check, timeout=timeout).stdout

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # --- start and stop ---

    def __enter__(self) -> RealNode:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 120) -> RealNode:
        began = time.monotonic()
        self._preflight()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bin = {
            **{b: build_binaries("node") / b for b in ("kubelet", "kube-proxy")},
            **build_network_binaries(),
        }
        self._step("binaries", began)
        self._state = HostState.record(self.workdir, self.containerd_socket)
        self._state.save()
        self._guard()
        images = [pause_image(), coredns_image(self.bin["coredns"])]
        self._step("images")
        self._start_containerd(timeout)
        self.import_image(images[0], PAUSE_IMAGE)
        version = coredns_version(self.bin["coredns"])
        self.coredns_image = self.import_image(images[1], f"localhost/coredns:{version}")
        self._step("imports")
        self._apply_cluster_objects()
        self.start_kubelet(timeout)
        self._step("kubelet Ready")
        self._start_kube_proxy()
        self._start_kube_router(timeout)
        self._wait_for_dns(timeout)
        self._step("network")
        self.timings["total"] = time.monotonic() - began
        return self

    def _step(self, name: str, since: float | None = None) -> None:
        now = time.monotonic()
        self.timings[name] = now - (since if since is not None else self._last)
        self._last = now

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("a real node needs root (containerd, runc, iptables, cgroups)")
        if missing := missing_packages():
            raise RuntimeError(
                "a real node needs these Debian packages: apt-get install -y "
                "--no-install-recommends " + " ".join(missing)
            )
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self._lock = LOCK.open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise RuntimeError("another real node runs on this machine (one at a time)") from None
        if previous := HostState.load():
            # A run that was killed before its teardown: undo it first.
            restore_host(previous)
            HOST_STATE.unlink()
        if found := _leftovers():
            raise RuntimeError("the host has a node's leftovers not recorded by this harness "
                               "(another kubelet?): " + "; ".join(found))  # fmt: skip

    def _guard(self) -> None:
        """Keeps every packet of the cluster on the machine (before anything forwards)."""
        _run("ip", "link", "add", SERVICE_GUARD_LINK, "type", "ifb")
        _run("ip", "link", "set", SERVICE_GUARD_LINK, "up")
        _run("ip", "route", "add", SERVICE_CIDR, "dev", SERVICE_GUARD_LINK)
        rules = (
            f"add table inet {GUARD_TABLE}\n"
            f"add chain inet {GUARD_TABLE} guard "
            "{ type filter hook forward priority -10; policy accept; }\n"
            # Pods reach each other over the bridge and the node's own addresses locally:
            # nothing of theirs is forwarded anywhere else (the external interface above all).
            f'add rule inet {GUARD_TABLE} guard iifname "{BRIDGE}" oifname != "{BRIDGE}" '
            "counter drop\n"
        )
        _run("nft", "-f", "-", stdin=rules)

    def _spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        with (logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self.processes[name] = process
        assert self._state
        self._state.pids[name] = (process.pid, os.path.realpath(shutil.which(argv[0]) or argv[0]))
        self._state.save()
        return process

    def _stop_process(self, name: str, grace: float = 10) -> None:
        process = self.processes.pop(name, None)
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._state:
            self._state.pids.pop(name, None)
            self._state.save()

    def _alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}):\n{self.log_tail(name)}")

    def stop(self) -> None:
        """Deletes the node's pods (so the kubelet tears their sandboxes down through CNI),
        stops every process, and restores the host."""
        problems: list[str] = []
        if self._state is not None:
            try:
                self._delete_pods()
            except Exception as exc:  # the plane may be gone: the host is restored anyway
                problems.append(f"pods not deleted through the API: {exc}")
            self._stop_process("kube-router")
            self._stop_process("kube-proxy")
            self._stop_process("kubelet")
            if "containerd" in self.processes:
                self._remove_containers()
            self._stop_process("containerd")
            problems += restore_host(self._state)
            # What containerd kept per container in its lasting root (metadata is gone).
            for kind in ("containers", "sandboxes"):
                folder = CONTAINERD_ROOT / "io.containerd.grpc.v1.cri" / kind
                shutil.rmtree(folder, ignore_errors=True)
            if not problems:
                # Else kept: the next run tries again before it starts.
                HOST_STATE.unlink(missing_ok=True)
            self._state = None
        if self._lock:
            self._lock.close()
            self._lock = None
        if problems:
            raise RuntimeError("the real node's teardown left: " + "; ".join(problems))

    def _delete_pods(self) -> None:
        if self.plane.get_json(f"/api/v1/nodes/{self.name}") is None:
            return
        if "kubelet" not in self.processes and "containerd" in self.processes:
            self.start_kubelet()  # only a running kubelet tears pods down cleanly
        # No new pods here (controllers would replace the ones deleted).
        self.kubectl("cordon", self.name, check=False)
        on_node = f"spec.nodeName={self.name}"

        def gone() -> bool:
            listed = self.kubectl("get", "pods", "-A", "--field-selector", on_node, "-o",
                                  "name", check=False)  # fmt: skip
            if listed.returncode == 0 and not listed.stdout.strip():
                return True
            self.kubectl("delete", "pods", "-A", "--field-selector", on_node,
                         "--grace-period=1", "--wait=false", check=False)  # fmt: skip
            return False

        wait_for("the node's pods deleted", gone, 90, interval=1)

    def _remove_containers(self) -> None:
        """What the kubelet's garbage collection would remove later: stopped sandboxes and
        containers (their snapshots too), so the lasting root keeps images only."""
        for task in self.ctr("tasks", "ls", check=False).splitlines()[1:]:
            self.ctr("tasks", "delete", "--force", task.split()[0], check=False)
        if containers := self.ctr("containers", "ls", "-q", check=False).split():
            self.ctr("containers", "delete", *containers, check=False)

    # --- containerd and images ---

    @staticmethod
    def _registry_hosts(folder: Path) -> Path:
        hosts = (
            f'server = "{NO_REGISTRY}"\n'
            f'[host."{NO_REGISTRY}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        for registry in ("_default", "docker.io"):
            (folder / registry).mkdir(parents=True, exist_ok=True)
            (folder / registry / "hosts.toml").write_text(hosts)
        return folder

    def _start_containerd(self, timeout: float) -> None:
        base = self.workdir / "containerd"
        cni = self.workdir / "cni"
        for folder in (base / "state", base / "tmp", base / "opt", cni / "net.d", cni / "ipam"):
            folder.mkdir(parents=True, exist_ok=True)
        CONTAINERD_ROOT.mkdir(parents=True, exist_ok=True)
        q = json.dumps
        config = f"""version = 2
root = {q(str(CONTAINERD_ROOT))}
state = {q(str(base / "state"))}
temp = {q(str(base / "tmp"))}
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = {q(str(self.containerd_socket))}

[plugins."io.containerd.internal.v1.opt"]
  path = {q(str(base / "opt"))}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {q(PAUSE_IMAGE)}
  netns_mounts_under_state_dir = true
  # Root here lacks CAP_SYS_RESOURCE, so runc cannot set a negative oom_score_adj:
  # clamp it to containerd's own (0).
  restrict_oom_score_adj = true
  enable_unprivileged_ports = false
  enable_unprivileged_icmp = false
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/bin/runc"
        Root = {q(str(base / "runc"))}
        SystemdCgroup = false

  # Every registry is this machine's discard port: a pull (a tag that was not imported,
  # `imagePullPolicy: Always`) fails at once instead of leaving the machine.
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = {q(str(self._registry_hosts(base / "certs.d")))}

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {q(str(cni / "net.d"))}
    max_conf_num = 1
"""
        (base / "config.toml").write_text(config)
        conflist = {
            "cniVersion": "1.0.0",
            "name": CNI_NETWORK,
            "plugins": [{
                "type": "bridge", "bridge": BRIDGE, "isGateway": True,
                # Nothing NATed: pods cannot leave the machine through the host.
                "ipMasq": False, "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": str(cni / "ipam"),
                         "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}]},
            }],
        }  # fmt: skip
        (cni / "net.d" / "10-whisperx-node.conflist").write_text(json.dumps(conflist, indent=2))

        def serving() -> bool:
            self._alive()
            return _run("ctr", "--address", str(self.containerd_socket), "version",
                        check=False).returncode == 0  # fmt: skip

        self._spawn("containerd", "containerd", "--config", str(base / "config.toml"))
        wait_for("containerd serving", serving, timeout, interval=0.05)
        if self.ctr("containers", "ls", "-q").split():
            # Left by a run killed before its teardown: the CRI plugin has loaded them,
            # so it is restarted once they are removed.
            self._remove_containers()
            self._stop_process("containerd")
            self._spawn("containerd", "containerd", "--config", str(base / "config.toml"))
            wait_for("containerd serving", serving, timeout, interval=0.05)

    def _image_digest(self, name: str) -> str | None:
        for line in self.ctr("images", "ls", f"name=={name}").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == name:
                return fields[2]
        return None

    def import_image(self, archive: Path, name: str | None = None) -> str:
        """Imports an OCI archive (`podman save --format oci-archive`, umoci) into the
        node's image store as `name`, or the name its index annotates; returns the name.
        An image of that name and digest already there (the store outlives runs) is kept
        as it is."""
        entry = archive_index(archive)
        ref = entry.get("annotations", {}).get("org.opencontainers.image.ref.name", "")
        full_ref = "/" in ref or "@" in ref
        name = name or (ref if full_ref else "")
        if not ref or not name:
            raise ValueError(f"{archive} names no image (ref {ref!r}): pass a name")
        before = self._image_digest(name)
        if before == entry["digest"]:
            return name
        # ctr names an image by its ref annotation: a full one as it is, a bare tag
        # under --base-name. Then the image takes the name asked for.
        imported = ref if full_ref else f"localhost/import-{os.getpid()}:{ref}"
        existed = self._image_digest(imported) is not None
        base = [] if full_ref else ["--base-name", imported.rsplit(":", 1)[0]]
        self.ctr("images", "import", *base, str(archive))
        if imported != name:
            self.ctr("images", "tag", "--force", imported, name)
            if not existed:
                self.ctr("images", "rm", imported)
        if before:
            self._forget(before)
        return name

    def _forget(self, manifest: str) -> None:
        """Lets containerd collect an image no name points at any more: the CRI plugin
        keeps a `sha256:<config>` name for each image it saw, which would otherwise keep
        every replaced version (several GB for a runner image) in the lasting store."""
        listed = [line.split() for line in self.ctr("images", "ls").splitlines()[1:]]
        pointing = [f[0] for f in listed if f and f[2] == manifest]
        if any(not name.startswith("sha256:") for name in pointing):
            return
        # Found by what they point at: the manifest's own content may be gone already.
        for name in pointing:
            self.ctr("images", "rm", "--sync", name, check=False)

    # --- the kubelet ---

    def _apply_cluster_objects(self) -> None:
        """CoreDNS (a Deployment, as kubeadm runs it: the manifests' NetworkPolicies allow
        DNS to pods `k8s-app: kube-dns` in kube-system) and kube-router's access."""
        self.kubectl("apply", "--server-side", "-f", "-",
                     stdin=yaml.safe_dump_all(_cluster_objects(self.coredns_image)))  # fmt: skip

    def start_kubelet(self, timeout: float = 60) -> None:
        """Starts the kubelet (again, after `stop_kubelet`) and waits for the Node to be
        Ready; the sysctls it sets at start are put back right away."""
        folder = self.workdir / "kubelet"
        config = folder / "config.yaml"
        if not config.exists():
            self._write_kubelet_config(folder)
        self._spawn(
            "kubelet", str(self.bin["kubelet"]), f"--config={config}",
            f"--kubeconfig={folder / 'kubeconfig'}", f"--root-dir={folder / 'root'}",
            f"--cert-dir={folder / 'pki'}", f"--hostname-override={self.name}",
            f"--node-ip={self.node_ip}", "--v=2",
        )  # fmt: skip
        wait_for(f"Node {self.name} Ready", self.is_ready, timeout, alive=self._alive)
        assert self._state
        for name in KUBELET_SYSCTLS:
            _sysctl_path(name).write_text(self._state.sysctls[name])

    def stop_kubelet(self) -> None:
        """Stops the kubelet only, as a crash would: containers keep running, the Node's
        Lease stops being renewed (NotReady after the plane's grace period)."""
        self._stop_process("kubelet")

    @contextlib.contextmanager
    def standing_peer(self, name: str = "standing-peer") -> Iterator[str]:
        """A second Node that stays Ready (its Lease renewed from here) and takes no pods
        (a NoSchedule taint). With it, this node going dark is a partial disruption of
        the zone, in which the node lifecycle controller evicts its pods as in any
        cluster of several nodes; with every node down it evicts nothing."""

        def now() -> str:
            return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())

        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                "spec": {"taints": [{"key": "whisperx.test/standing-peer",
                                     "effect": "NoSchedule"}]}}  # fmt: skip
        self.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(node))
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "renewed by the tests", "lastHeartbeatTime": now()[:19] + "Z",
                 "lastTransitionTime": now()[:19] + "Z"}  # fmt: skip
        self.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p",
                     json.dumps({"status": {"conditions": [ready]}}))  # fmt: skip

        def renew() -> None:
            lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                     "metadata": {"name": name, "namespace": "kube-node-lease"},
                     "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                              "renewTime": now()}}  # fmt: skip
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                         stdin=json.dumps(lease), check=False)  # fmt: skip

        renew()
        stop = threading.Event()

        def keep_renewing() -> None:
            while not stop.wait(2):
                renew()

        renewing = threading.Thread(target=keep_renewing, daemon=True)
        renewing.start()
        try:
            yield name
        finally:
            stop.set()
            renewing.join()
            self.kubectl("delete", "node", name, "--wait=false", check=False)
            self.kubectl("delete", "lease", "-n", "kube-node-lease", name, check=False)

    def is_ready(self) -> bool:
        """Whether the Node's Ready condition is True."""
        node = self.plane.get_json(f"/api/v1/nodes/{self.name}")
        conditions = ((node or {}).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _write_kubelet_config(self, folder: Path) -> None:
        for sub in ("root", "pki", "pod-logs", "volume-plugins"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        self.plane.certificate_kubeconfig(f"system:node:{self.name}", folder / "kubeconfig",
                                          organization="system:nodes")  # fmt: skip
        # The host's resolver is off the machine: pods with `dnsPolicy: Default` (and
        # CoreDNS's upstream, had it one) get a loopback one that answers nothing.
        (folder / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        socket = f"unix://{self.containerd_socket}"
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # this host mounts cgroup v1: 1.35 refuses it otherwise
            "cgroupDriver": "cgroupfs",  # containerd 1.6 cannot report its driver
            "containerRuntimeEndpoint": socket,
            "imageServiceEndpoint": socket,
            "failSwapOn": False,
            "address": self.node_ip,
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            # Logs, exec and port-forward only for the API server's client certificate
            # (and whoever it authorizes).
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.plane.ca_file)}},
            "authorization": {"mode": "Webhook"},
            "podLogsDir": str(folder / "pod-logs"),
            "volumePluginDir": str(folder / "volume-plugins"),
            "clusterDNS": [CLUSTER_DNS],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(folder / "resolv.conf"),
            # The plane marks a node NotReady 6 s after its Lease's last renewal; a lease
            # is renewed every quarter of its duration.
            "nodeLeaseDurationSeconds": 4,
            "nodeStatusUpdateFrequency": "2s",
            "nodeStatusReportFrequency": "10s",
            "syncFrequency": "10s",
            # Never garbage-collect imported images: they cannot be pulled again.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
        }  # fmt: skip
        (folder / "config.yaml").write_text(yaml.safe_dump(config))

    # --- cluster network ---

    def _start_kube_proxy(self) -> None:
        folder = self.workdir / "kube-proxy"
        folder.mkdir(exist_ok=True)
        kubeconfig = self.plane.certificate_kubeconfig("system:kube-proxy", folder / "kubeconfig")
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": self.name,
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "bindAddress": self.node_ip,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "nodePortAddresses": [f"{self.node_ip}/32"],
            "oomScoreAdj": 0,  # no CAP_SYS_RESOURCE here: no negative oom_score_adj
            # All 0: the host's conntrack sysctls stay as they are.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s", "udpTimeout": "0s",
                          "udpStreamTimeout": "0s"},
            # true would set net.ipv4.conf.all.route_localnet=1.
            "iptables": {"localhostNodePorts": False, "masqueradeAll": False,
                         "syncPeriod": "30s", "minSyncPeriod": "1s"},
        }  # fmt: skip
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        argv = [str(self.bin["kube-proxy"]), f"--config={folder / 'config.yaml'}"]
        assert self._state
        self._state.kube_proxy_cleanup = [*argv, "--cleanup"]
        self._spawn("kube-proxy", *argv, "--v=2")

    def _start_kube_router(self, timeout: float) -> None:
        folder = self.workdir / "kube-router"
        folder.mkdir(exist_ok=True)
        kubeconfig = self.plane.certificate_kubeconfig("kube-router", folder / "kubeconfig")
        self._spawn(
            "kube-router", str(self.bin["kube-router"]), f"--kubeconfig={kubeconfig}",
            # NetworkPolicy only: routes, Services and the CNI are others' here.
            "--run-firewall=true", "--run-router=false", "--run-service-proxy=false",
            "--run-loadbalancer=false", "--enable-cni=false", "--enable-pod-egress=false",
            f"--hostname-override={self.name}", "--health-port=0", "--metrics-port=0",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--iptables-sync-period=1m", "--v=2",
        )  # fmt: skip

        def chains() -> bool:
            return _run("iptables", "-w", "-S", "KUBE-ROUTER-FORWARD",
                        check=False).returncode == 0  # fmt: skip

        wait_for("kube-router's chains", chains, timeout, alive=self._alive)

    def _wait_for_dns(self, timeout: float) -> None:
        """CoreDNS Ready (its readiness needs its first list through 10.96.0.1, so this
        also shows the `kubernetes` Service works), and kube-proxy's rules to it."""

        def available() -> bool:
            path = "/apis/apps/v1/namespaces/kube-system/deployments/coredns"
            status = (self.plane.get_json(path) or {}).get("status") or {}
            return bool(status.get("availableReplicas"))

        def dns_rules() -> bool:
            rules = _run("iptables", "-w", "-t", "nat", "-S", "KUBE-SERVICES", check=False)
            return f"-d {CLUSTER_DNS}/32" in rules.stdout

        wait_for("CoreDNS available", available, timeout, alive=self._alive)
        wait_for("kube-proxy's rules for the cluster DNS", dns_rules, timeout, alive=self._alive)

    # --- what tests use ---

    def advertise(self, resource: str, count: int) -> None:
        """Sets an extended resource (e.g. nvidia.com/gpu) in the Node's capacity, as a
        device plugin would (none runs: pods get no device); 0 removes it."""
        value = str(count) if count > 0 else None
        patch = {"status": {"capacity": {resource: value}, "allocatable": {resource: value}}}
        self.kubectl("patch", "node", self.name, "--subresource=status", "--type=merge",
                     "-p", json.dumps(patch))  # fmt: skip


def _cluster_objects(coredns_image: str) -> list[dict[str, Any]]:
    ns = "kube-system"
    dns_labels = {"k8s-app": "kube-dns"}
    read = ["list", "watch"]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "coredns", "namespace": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods",
                                                      "namespaces"], "verbs": read},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": read}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": ns}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": ns},
         "data": {"Corefile": COREFILE}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "coredns", "namespace": ns, "labels": dns_labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": dns_labels},
                  "template": {"metadata": {"labels": dns_labels}, "spec": {
                      "serviceAccountName": "coredns",
                      "priorityClassName": "system-cluster-critical",
                      "dnsPolicy": "Default",
                      # Kept through a lost kubelet (`stop_kubelet`): its container runs on.
                      "tolerations": [{"operator": "Exists", "effect": "NoExecute"}],
                      "terminationGracePeriodSeconds": 1,
                      "containers": [{
                          "name": "coredns", "image": coredns_image,
                          "imagePullPolicy": "Never",
                          "args": ["-conf", "/etc/coredns/Corefile"],
                          "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}],
                          "resources": {"limits": {"memory": "170Mi"},
                                        "requests": {"cpu": "50m", "memory": "70Mi"}},
                          "securityContext": {"allowPrivilegeEscalation": False,
                                              "readOnlyRootFilesystem": True,
                                              "capabilities": {"add": ["NET_BIND_SERVICE"],
                                                               "drop": ["ALL"]}},
                          "livenessProbe": {"httpGet": {"path": "/health", "port": 8080},
                                            "initialDelaySeconds": 10, "periodSeconds": 10},
                          "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181},
                                             "periodSeconds": 1},
                          "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns",
                                            "readOnly": True}],
                      }],
                      "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                  }}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": ns, "labels": dns_labels},
         "spec": {"clusterIP": CLUSTER_DNS, "selector": dns_labels,
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "whisperx-node:kube-router"},
         "rules": [
             {"apiGroups": [""], "resources": ["namespaces", "pods", "services", "nodes",
                                               "endpoints"], "verbs": ["list", "get", "watch"]},
             {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
              "verbs": ["list", "get", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
              "verbs": ["list", "get", "watch"]},
             {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
              "verbs": ["get", "create", "update"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "whisperx-node:kube-router"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "whisperx-node:kube-router"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                       "name": "kube-router"}]},
    ]  # fmt: skip


@contextlib.contextmanager
def running_node(workdir: Path) -> Iterator[RealNode]:
    """A control plane on the node's address and a real node registered to it."""
    plane = NodeControlPlane(workdir / "control-plane", bin_dir=build_binaries())
    with plane, RealNode(plane, workdir / "node") as node:
        yield node


def main() -> None:
    """Starts a control plane and a real node by hand: `python -m tests.cluster.node DIR`."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="knode-"))
    if workdir.exists() and any(workdir.iterdir()):
        shutil.rmtree(workdir)
    with running_node(workdir) as node:
        print(json.dumps({"kubeconfig": str(node.plane.admin_kubeconfig), "url": node.plane.url,
                          "node": node.name, "plane_started_in_s": round(node.plane.started_in, 1),
                          "node_timings_s": {k: round(v, 2) for k, v in node.timings.items()}}),
              flush=True)  # fmt: skip
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
