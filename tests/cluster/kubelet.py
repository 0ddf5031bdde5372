"""A kubelet stand-in for the real control plane: pods as local processes.

It registers Nodes (one CPU node, one advertising `nvidia.com/gpu`) under each node's own
identity (`system:node:<name>`, so the Node authorizer and NodeRestriction admission
apply), renews their Leases, and runs the containers of pods that the real scheduler
bound to them:

- command, args and env, with `valueFrom` Secret and ConfigMap keys and the downward API
  (`fieldRef`) resolved as a kubelet resolves them (a missing key leaves the container
  waiting in `CreateContainerConfigError`);
- Secret, ConfigMap, emptyDir and PVC volumes mapped to local folders (a PVC to the
  `hostPath` of the PersistentVolume bound to it), container paths in env values
  rewritten to those folders (command and args run as given: this machine's programs);
  a `readOnly` mount is a read-only bind mount of its folder, in a mount namespace of
  the container's process alone (`unshare`), so even root cannot write there;
- deletion: SIGTERM, the grace period, SIGKILL, then the final status and delete;
- pod status as a kubelet writes it: phase, conditions, containerStatuses with exit codes
  and reasons, the termination message (`FallbackToLogsOnError`).

Faults a kubelet reports, injected per Job through `plan()`: OOMKilled, image pull
back-off, eviction with `DisruptionTarget`; and per node, `lose_node()`: the node stops
renewing its Lease and its processes die, so the node lifecycle controller marks it
NotReady and the taint eviction controller evicts its pods.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import os
import signal
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from tests.cluster.client import LEASES, NODES, ApiError, Cluster, ResourceRef
from tests.cluster.controlplane import CPU_NODE, GPU_NODE, ControlPlane

log = logging.getLogger(__name__)

# About a minute of retries for one status report.
STATUS_ATTEMPTS = 40


def _log_crash(task: asyncio.Task[None]) -> None:
    """A pod's run that died of an error would leave the pod as last reported: say so."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("%s: the stand-in's run failed", task.get_name(), exc_info=error)


PODS = ResourceRef("", "v1", "pods")
SECRETS = ResourceRef("", "v1", "secrets")
CONFIGMAPS = ResourceRef("", "v1", "configmaps")
PVCS = ResourceRef("", "v1", "persistentvolumeclaims")
PVS = ResourceRef("", "v1", "persistentvolumes", namespaced=False)
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
GPU = "nvidia.com/gpu"
LEASE_SECONDS = 4
# How long a pod's Secrets may stay forbidden to its node (the Node authorizer not yet
# knowing the pod) before the container reads as CreateContainerConfigError.
FORBIDDEN_GRACE_SECONDS = 5.0


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PodPlan:
    """What happens to one pod of a Job; the default runs the container command. Shared
    by this kubelet stand-in and the emulator's (tests/kube_fixtures.py)."""

    # The container never starts, waiting with this reason (e.g. "ImagePullBackOff").
    waiting_reason: str | None = None
    waiting_message: str = ""
    # The pod is never scheduled (PodScheduled=False, Unschedulable) with this message.
    # The emulator's only: on the real control plane the scheduler decides (ask for more
    # GPUs than a node has).
    unschedulable: str | None = None
    # With `waiting_reason`: the wait lasts this many seconds, then the container starts
    # (a kubelet's retry that succeeds); without, it lasts forever.
    waiting_seconds: float | None = None
    # The process is killed this many seconds after it started, as the kernel's OOM
    # killer would (exit 137, reason OOMKilled).
    oom_kill_after: float | None = None
    # The pod is evicted this many seconds after it started (DisruptionTarget).
    evict_after: float | None = None
    # The pod is evicted once this event is set (a test's own moment).
    evict_when: asyncio.Event | None = None
    # The pod stays Pending (scheduled) until this event is set.
    hold: asyncio.Event | None = None


@dataclass
class PodRun:
    namespace: str
    name: str
    uid: str
    job: str
    node: str
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    exit_code: int | None = None
    task: asyncio.Task[None] | None = None
    deleting: asyncio.Event = field(default_factory=asyncio.Event)


class _ConfigError(Exception):
    """The container cannot be created (the kubelet's CreateContainerConfigError)."""


def _condition(
    type_: str, status: str = "True", reason: str = "", message: str = ""
) -> dict[str, Any]:
    cond = {"type": type_, "status": status, "lastProbeTime": None, "lastTransitionTime": now()}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


class Kubelet:
    """Runs the pods bound to its Nodes as local processes (see the module docstring)."""

    def __init__(
        self,
        plane: ControlPlane,
        workdir: Path,
        *,
        extra_env: dict[str, str] | None = None,
        gpus: int = 2,
        nodes: tuple[str, ...] = (CPU_NODE, GPU_NODE),
    ) -> None:
        self.plane = plane
        self.workdir = workdir
        self.extra_env = extra_env or {}
        self.gpus = gpus
        self.node_names = nodes
        self.plans: defaultdict[str, list[PodPlan]] = defaultdict(list)
        self.pods: dict[tuple[str, str], PodRun] = {}
        self._clients: dict[str, Cluster] = {}
        self._version = ""  # the API server's, read when the first node registers
        self._tasks: list[asyncio.Task[None]] = []
        self._lost: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()

    # --- what tests use ---

    def plan(self, job: str, *plans: PodPlan) -> None:
        """Plans for the next pods of Job `job`, in order; later pods run normally."""
        self.plans[job].extend(plans)

    def runs(self, job: str) -> list[PodRun]:
        return [run for run in self.pods.values() if run.job == job]

    def logs(self, job: str) -> str:
        return "".join(r.log_path.read_text() for r in self.runs(job) if r.log_path.exists())

    async def lose_node(self, node: str) -> None:
        """The node goes dark: no Lease renewals, no status, its processes gone."""
        self._lost.add(node)
        for run in self.pods.values():
            if run.node == node and run.process is not None and run.process.returncode is None:
                run.process.kill()

    # --- lifecycle ---

    async def __aenter__(self) -> Kubelet:
        for node in self.node_names:
            ident = self.plane.node_identity(node)
            client = Cluster(self.plane.url, ident.token, self.plane.ssl_context())
            self._clients[node] = client
            await self._register(node, client)
            self._tasks += [
                asyncio.create_task(self._heartbeat(node, client), name=f"lease {node}"),
                asyncio.create_task(self._watch_pods(node, client), name=f"pods {node}"),
            ]
        for node, client in self._clients.items():
            await self._until_healthy(node, client)
        return self

    async def _until_healthy(self, node: str, client: Cluster, within: float = 60) -> None:
        """Until the node lifecycle controller has lifted what it put on a node that an
        earlier test lost (not-ready/unreachable taints evict pods within seconds)."""

        def healthy(obj: dict[str, Any] | None) -> bool:
            taints = ((obj or {}).get("spec") or {}).get("taints") or ()
            conditions = ((obj or {}).get("status") or {}).get("conditions") or ()
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
            return ready and not any(t["key"].startswith("node.kubernetes.io/") for t in taints)

        deadline = time.monotonic() + within
        while not healthy(await client.read(NODES, None, node)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node} not healthy within {within} s")
            await asyncio.sleep(0.2)

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        runs = [r.task for r in self.pods.values() if r.task is not None]
        for task in runs:
            task.cancel()
        await asyncio.gather(*self._tasks, *runs, return_exceptions=True)
        for run in self.pods.values():
            if run.process is not None and run.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.process.pid, signal.SIGKILL)
                await run.process.wait()
        for client in self._clients.values():
            await client.close()

    async def _register(self, node: str, client: Cluster) -> None:
        # A kubelet runs the API server's release (the version skew policy allows older).
        self._version = (await client.request("GET", "/version"))["gitVersion"]
        capacity = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        labels = {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64"}  # fmt: skip
        taints: list[dict[str, str]] = []
        if node == GPU_NODE:
            capacity[GPU] = str(self.gpus)
            # What GPU Feature Discovery and the GPU operator put on a GPU node.
            labels["nvidia.com/gpu.product"] = "Tesla-T4"
            labels["nvidia.com/gpu.present"] = "true"
            taints.append({"key": GPU, "value": "present", "effect": "NoSchedule"})
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node, "labels": labels},
            "spec": {"taints": taints},
        }
        with contextlib.suppress(ApiError):  # registered already (a re-registration)
            await client.create_object(NODES, None, body)
        await client.patch_object(
            NODES, None, node, {"status": self._node_status(capacity)}, subresource="status"
        )

    def _node_status(self, capacity: dict[str, str] | None = None) -> dict[str, Any]:
        beat = now()
        status: dict[str, Any] = {
            "conditions": [
                {"type": t, "status": "False", "reason": f"KubeletHas{r}", "message": r,
                 "lastHeartbeatTime": beat, "lastTransitionTime": beat}
                for t, r in (("MemoryPressure", "SufficientMemory"),
                             ("DiskPressure", "NoDiskPressure"), ("PIDPressure", "SufficientPID"))
            ] + [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                  "message": "kubelet is posting ready status (stand-in)",
                  "lastHeartbeatTime": beat, "lastTransitionTime": beat}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "nodeInfo": {"kubeletVersion": f"{self._version}-standin", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "process://",
                         "kernelVersion": "", "osImage": "", "machineID": "", "systemUUID": "",
                         "bootID": "", "kubeProxyVersion": ""},
        }  # fmt: skip
        if capacity is not None:
            status["capacity"] = capacity
            status["allocatable"] = capacity
        return status

    async def _heartbeat(self, node: str, client: Cluster) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node}"
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": node, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": LEASE_SECONDS},
        }
        created = False
        beats = 0
        while True:
            if node not in self._lost:
                renew = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                try:
                    if not created:
                        with contextlib.suppress(ApiError):
                            await client.create_object(LEASES, "kube-node-lease", lease)
                        created = True
                    await client.request(
                        "PATCH", path, {"spec": {"renewTime": renew}},
                        content_type="application/merge-patch+json",
                    )  # fmt: skip
                    if beats % 5 == 0:
                        await client.patch_object(
                            NODES, None, node, {"status": self._node_status()},
                            subresource="status",
                        )  # fmt: skip
                    beats += 1
                except ApiError:
                    pass
            await asyncio.sleep(1)

    async def _watch_pods(self, node: str, client: Cluster) -> None:
        params = {"fieldSelector": f"spec.nodeName={node}"}
        while True:
            try:
                listed = await client.request("GET", "/api/v1/pods", params=params)
                for pod in listed.get("items") or ():
                    self._see(node, client, pod, "ADDED")
                version = listed["metadata"]["resourceVersion"]
                async for event in client.watch("/api/v1/pods", version, params):
                    self._see(node, client, event["object"], event["type"])
            except asyncio.CancelledError:
                raise
            except Exception:  # a dropped watch: list again
                await asyncio.sleep(0.5)

    def _see(self, node: str, client: Cluster, pod: dict[str, Any], kind: str) -> None:
        if node in self._lost:
            return
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        run = self.pods.get(key)
        if run is not None and run.uid != meta["uid"]:
            run = None  # a new pod of the same name
        if run is None:
            if kind == "DELETED" or (pod.get("status") or {}).get("phase") in (
                "Succeeded", "Failed"
            ):  # fmt: skip
                return
            labels = meta.get("labels") or {}
            run = PodRun(
                namespace=meta["namespace"],
                name=meta["name"],
                uid=meta["uid"],
                job=labels.get(JOB_NAME_LABEL, ""),
                node=node,
                log_path=self.workdir / meta["namespace"] / meta["name"] / "log.txt",
            )
            self.pods[key] = run
            run.task = asyncio.create_task(self._run(client, run, pod), name=f"pod {key[1]}")
            run.task.add_done_callback(_log_crash)
        if meta.get("deletionTimestamp"):
            run.deleting.set()

    # --- running one pod ---

    async def _status(self, client: Cluster, run: PodRun, status: dict[str, Any]) -> None:
        """Reports the pod's status as a kubelet does: retried while the API server is
        busy or unreachable (priority and fairness answer 429 on two loaded cores), given
        up only once the pod is gone or replaced. A dropped final status would leave the
        pod Running and its Job unfinished for good."""
        for attempt in range(STATUS_ATTEMPTS):
            if run.node in self._lost:
                return
            try:
                await client.request(
                    "PATCH",
                    f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status",
                    {"metadata": {"uid": run.uid}, "status": status},
                    content_type="application/strategic-merge-patch+json",
                )
                return
            except ApiError as exc:
                if exc.status in (404, 409):  # gone, or another pod of the same name
                    return
                problem: Exception = exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = exc
            log.warning("pod %s/%s: status not taken (%s); retrying", run.namespace,
                        run.name, problem)  # fmt: skip
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
        log.error("pod %s/%s: status %s never taken", run.namespace, run.name,
                  status.get("phase"))  # fmt: skip

    async def _run(self, client: Cluster, run: PodRun, pod: dict[str, Any]) -> None:
        plan = self.plans[run.job].pop(0) if self.plans.get(run.job) else PodPlan()
        assert plan.unschedulable is None, "the real scheduler decides what is unschedulable"
        container = pod["spec"]["containers"][0]
        run.log_path.parent.mkdir(parents=True, exist_ok=True)
        base = {"hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": now(),
                "podIPs": [{"ip": "127.0.0.1"}], "hostIPs": [{"ip": "127.0.0.1"}]}  # fmt: skip
        scheduled = _condition("PodScheduled")
        initialized = _condition("Initialized")

        def waiting(reason: str, message: str) -> dict[str, Any]:
            return {
                **base,
                "phase": "Pending",
                "conditions": [scheduled, initialized,
                               _condition("Ready", "False", "ContainersNotReady"),
                               _condition("ContainersReady", "False", "ContainersNotReady")],
                "containerStatuses": [{
                    "name": container["name"], "image": container.get("image", ""),
                    "imageID": "", "ready": False, "restartCount": 0, "started": False,
                    "state": {"waiting": {"reason": reason, "message": message}},
                }],
            }  # fmt: skip

        try:
            await self._status(client, run, waiting("ContainerCreating", ""))
            if plan.hold is not None:
                await self._until_deleted(run, plan.hold.wait())
            if plan.waiting_reason is not None:
                await self._status(client, run, waiting(plan.waiting_reason, plan.waiting_message))
                wait = (
                    asyncio.sleep(plan.waiting_seconds)
                    if plan.waiting_seconds is not None
                    else (asyncio.Event().wait())
                )
                await self._until_deleted(run, wait)
            forbidden_until = time.monotonic() + FORBIDDEN_GRACE_SECONDS
            while True:
                try:
                    env, args = await self._container(client, run, pod, container)
                    break
                except _ConfigError as exc:
                    # A kubelet retries until the Secret or key appears, or the pod goes.
                    await self._status(client, run, waiting("CreateContainerConfigError", str(exc)))
                    await self._until_deleted(run, asyncio.sleep(1))
                except ApiError as exc:
                    if exc.status != 403:
                        raise
                    if time.monotonic() > forbidden_until:
                        await self._status(
                            client, run, waiting("CreateContainerConfigError", str(exc))
                        )
                        await self._until_deleted(run, asyncio.sleep(1))
                        continue
                    # The Node authorizer learns of a newly bound pod's Secrets and claims
                    # a moment after the node sees the pod: until then it refuses the node,
                    # and a kubelet waits for its Secret cache quietly.
                    await self._until_deleted(run, asyncio.sleep(0.2))
        except _Deleted:
            await self._finish(client, run, container, None, reason=None)
            return
        with run.log_path.open("wb") as log:
            try:
                run.process = await asyncio.create_subprocess_exec(
                    *args, env=env, cwd=str(run.log_path.parent), stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                # What a runtime reports for a command it cannot start.
                await self._status(client, run, waiting("RunContainerError", str(exc)))
                raise
        started = now()
        await self._status(client, run, {
            **base, "phase": "Running",
            "conditions": [scheduled, initialized, _condition("Ready"),
                           _condition("ContainersReady"), _condition("PodReadyToStartContainers")],
            "containerStatuses": [{
                "name": container["name"], "image": container.get("image", ""), "imageID": "",
                "containerID": f"process://{run.process.pid}", "ready": True, "started": True,
                "restartCount": 0, "state": {"running": {"startedAt": started}},
            }],
        })  # fmt: skip
        reason = await self._supervise(client, run, pod, plan)
        await self._finish(client, run, container, started, reason=reason)

    async def _until_deleted(self, run: PodRun, awaitable: Any) -> None:
        waiter = asyncio.ensure_future(awaitable)
        deleted = asyncio.ensure_future(run.deleting.wait())
        done, _ = await asyncio.wait({waiter, deleted}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, deleted):
            if task not in done:
                task.cancel()
        if deleted in done:
            raise _Deleted

    async def _supervise(
        self, client: Cluster, run: PodRun, pod: dict[str, Any], plan: PodPlan
    ) -> str | None:
        """Waits for the process; returns a reason when something other than its own
        exit ended it (OOMKilled, Evicted, or a deletion)."""
        assert run.process is not None
        process = run.process
        exited = asyncio.ensure_future(process.wait())
        deleted = asyncio.ensure_future(run.deleting.wait())
        timers: dict[asyncio.Future[Any], str] = {}
        for after, why in ((plan.oom_kill_after, "OOMKilled"), (plan.evict_after, "Evicted")):
            if after is not None:
                timers[asyncio.ensure_future(asyncio.sleep(after))] = why
        if plan.evict_when is not None:
            timers[asyncio.ensure_future(plan.evict_when.wait())] = "Evicted"
        reason: str | None = None
        try:
            done, _ = await asyncio.wait(
                {exited, deleted, *timers}, return_when=asyncio.FIRST_COMPLETED
            )
            if exited in done:
                return None
            if deleted in done:
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                await self._terminate(run, 30 if grace is None else int(grace))
                return None
            reason = next(timers[t] for t in done if t in timers)
            if reason == "OOMKilled":
                os.killpg(process.pid, signal.SIGKILL)
            else:
                # A kubelet's node-pressure eviction: the pod is marked as disrupted
                # first, then its containers are stopped.
                await self._status(client, run, {"conditions": [_condition(
                    "DisruptionTarget", "True", "TerminationByKubelet",
                    "The node was low on resource: memory.",
                )]})  # fmt: skip
                await self._terminate(
                    run, int(pod["spec"].get("terminationGracePeriodSeconds", 30))
                )
            await process.wait()
            return reason
        finally:
            for task in (exited, deleted, *timers):
                if not task.done():
                    task.cancel()

    async def _terminate(self, run: PodRun, grace: int) -> None:
        process = run.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), max(grace, 0.1))
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    async def _finish(
        self,
        client: Cluster,
        run: PodRun,
        container: dict[str, Any],
        started: str | None,
        *,
        reason: str | None,
    ) -> None:
        if run.node in self._lost:
            return
        process = run.process
        code = None
        if process is not None and process.returncode is not None:
            code = 128 - process.returncode if process.returncode < 0 else process.returncode
        run.exit_code = code
        succeeded = code == 0 and reason is None
        status: dict[str, Any] = {
            "phase": "Succeeded" if succeeded else "Failed",
            "conditions": [
                _condition("PodScheduled"),
                _condition("Ready", "False", "PodCompleted"),
                _condition("ContainersReady", "False", "PodCompleted"),
                _condition("PodReadyToStartContainers", "False"),
            ],
        }
        if reason == "Evicted":
            status["reason"] = "Evicted"
            status["message"] = "The node was low on resource: memory."
        if code is not None:
            terminated: dict[str, Any] = {
                "exitCode": code,
                "reason": reason
                if reason == "OOMKilled"
                else ("Completed" if code == 0 else "Error"),
                "startedAt": started or now(),
                "finishedAt": now(),
                "containerID": f"process://{process.pid if process else 0}",
            }
            policy = container.get("terminationMessagePolicy", "File")
            if code != 0 and policy == "FallbackToLogsOnError" and run.log_path.exists():
                tail = run.log_path.read_bytes()[-2048:].decode(errors="replace")
                if tail.strip():
                    terminated["message"] = "\n".join(tail.splitlines()[-80:])
        else:
            # Deleted before it started: the kubelet reports the container as never run.
            terminated = {
                "exitCode": 137,
                "reason": "ContainerStatusUnknown",
                "message": "The container could not be located when the pod was terminated",
                "startedAt": None,
                "finishedAt": now(),
            }
            status["phase"] = "Failed"
        status["containerStatuses"] = [{
            "name": container["name"], "image": container.get("image", ""), "imageID": "",
            "ready": False, "started": False, "restartCount": 0,
            "state": {"terminated": terminated},
        }]  # fmt: skip
        await self._status(client, run, status)
        if run.deleting.is_set():
            # The kubelet's last word on a deleted pod: remove it for good.
            await client.delete_object(PODS, run.namespace, run.name, grace_seconds=0, uid=run.uid)

    async def _container(
        self, client: Cluster, run: PodRun, pod: dict[str, Any], container: dict[str, Any]
    ) -> tuple[dict[str, str], list[str]]:
        """The container's environment and argv, with its mounts as local folders."""
        spec = pod["spec"]
        root = run.log_path.parent
        volumes = {v["name"]: v for v in spec.get("volumes") or ()}
        mounts: dict[str, Path] = {}
        read_only: list[tuple[Path, Path]] = []  # (folder, its read-only view)
        for mount in container.get("volumeMounts") or ():
            local = await self._volume(
                client, run, volumes[mount["name"]], root / "volumes" / mount["name"]
            )
            if mount.get("readOnly"):
                view = _folder(root / "read-only" / mount["name"])
                read_only.append((local, view))
                local = view
            mounts[mount["mountPath"]] = local

        def local_path(value: str) -> str:
            for mount_path, local in sorted(mounts.items(), key=lambda m: -len(m[0])):
                prefix = mount_path.rstrip("/")
                if value == mount_path or value.startswith(prefix + "/"):
                    return str(local) + value[len(prefix) :]
            return value

        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "LANG": os.environ.get("LANG", "C.UTF-8"), **self.extra_env}  # fmt: skip
        for item in container.get("env") or ():
            if "value" in item:
                env[item["name"]] = local_path(item.get("value", ""))
                continue
            value = await self._value_from(client, run, pod, item["valueFrom"])
            if value is not None:
                env[item["name"]] = value
        # The command and args run as given: they name this machine's programs (the
        # project's venv, which may itself live under /tmp), not the image's.
        argv = [*container.get("command", []), *container.get("args", [])]
        if read_only and not can_make_mount_namespaces():
            # Not enforced where mount namespaces cannot be made: the views are bind
            # mounts only; the pod still runs, on the folders themselves.
            log.warning("readOnly mounts of %s are writable here (no unshare)", run.name)
            for folder, view in read_only:
                view.rmdir()
                view.symlink_to(folder)
            return env, argv
        return env, _with_read_only_views(read_only, argv) if read_only else argv

    async def _value_from(
        self, client: Cluster, run: PodRun, pod: dict[str, Any], source: dict[str, Any]
    ) -> str | None:
        if "fieldRef" in source:
            return _field(pod, source["fieldRef"]["fieldPath"])
        for kind, ref_key in (("secret", "secretKeyRef"), ("configmap", "configMapKeyRef")):
            if ref_key not in source:
                continue
            ref = source[ref_key]
            data = await self._data(client, run.namespace, kind, ref["name"])
            if data is not None and ref["key"] in data:
                return data[ref["key"]].decode()
            if ref.get("optional"):
                return None
            where = (
                f'{kind} "{ref["name"]}" not found'
                if data is None
                else (
                    f"couldn't find key {ref['key']} in {kind.capitalize()} "
                    f"{run.namespace}/{ref['name']}"
                )
            )
            raise _ConfigError(where)
        raise _ConfigError(f"unsupported env source {sorted(source)}")

    async def _data(
        self, client: Cluster, namespace: str, kind: str, name: str
    ) -> dict[str, bytes] | None:
        resource = SECRETS if kind == "secret" else CONFIGMAPS
        try:
            obj = await client.read(resource, namespace, name)
        except ApiError as exc:
            if exc.status == 403:
                raise  # the Node authorizer may not know the pod yet: retried quietly
            raise _ConfigError(f"{kind} {namespace}/{name}: {exc}") from exc
        if obj is None:
            return None
        if kind == "secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        return {k: v.encode() for k, v in (obj.get("data") or {}).items()}

    async def _volume(
        self, client: Cluster, run: PodRun, volume: dict[str, Any], local: Path
    ) -> Path:
        for kind, name_key in (("secret", "secretName"), ("configMap", "name")):
            if kind not in volume:
                continue
            source = volume[kind]
            data = await self._data(client, run.namespace, kind.lower(), source[name_key])
            if data is None:
                if source.get("optional"):
                    data = {}
                else:
                    raise _ConfigError(f'{kind.lower()} "{source[name_key]}" not found')
            _folder(local)
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                if item["key"] not in data:
                    raise _ConfigError(f"couldn't find key {item['key']} in {kind}")
                (local / item["path"]).write_bytes(data[item["key"]])
            return local
        if "persistentVolumeClaim" in volume:
            claim = await client.read(
                PVCS, run.namespace, volume["persistentVolumeClaim"]["claimName"]
            )
            bound = ((claim or {}).get("spec") or {}).get("volumeName")
            # The Node authorizer lets a node read the volumes of its own pods' claims.
            pv = await client.read(PVS, None, bound) if bound else None
            host = ((pv or {}).get("spec") or {}).get("hostPath", {}).get("path")
            if host is None:
                raise _ConfigError(f"volume {volume['name']} has no bound hostPath volume")
            return Path(host)
        return _folder(local)  # emptyDir and anything else: a folder


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# Binds each (folder, view) pair read-only, then execs the command: the same process, so
# signals and the exit code are the command's. A failed mount exits 125.
_BIND_READ_ONLY = (
    'while [ "$1" != -- ]; do mount --bind -o ro "$1" "$2" || exit 125; shift 2; done; '
    'shift; exec "$@"'
)


def _namespace_prefix() -> list[str]:
    # Not root: a user namespace (mapped to root inside) grants the mounts.
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", "--mount", "--propagation", "private", *user]


@functools.cache
def can_make_mount_namespaces() -> bool:
    """Whether this machine lets the stand-in give a process a mount namespace (a
    container sandbox may not)."""
    try:
        done = subprocess.run([*_namespace_prefix(), "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _with_read_only_views(views: list[tuple[Path, Path]], argv: list[str]) -> list[str]:
    """`argv` in a mount namespace of its own where each view is its folder, read-only."""
    pairs = [str(path) for pair in views for path in pair]
    return [*_namespace_prefix(), "sh", "-c", _BIND_READ_ONLY, "sh", *pairs, "--", *argv]


class _Deleted(Exception):
    """The pod was deleted before its container started."""


def _field(pod: dict[str, Any], path: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    if path.startswith(("metadata.labels['", "metadata.annotations['")):
        which, key = path.split("['", 1)
        return str((meta.get(which.split(".")[1]) or {}).get(key.rstrip("']"), ""))
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    if path not in values:
        raise _ConfigError(f"unsupported fieldRef {path}")
    return str(values[path])


async def wait_until(predicate: Any, within: float = 30.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within} s")
        await asyncio.sleep(interval)
