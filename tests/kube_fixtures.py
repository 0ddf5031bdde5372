"""A Kubernetes API for tests: kmock's emulator, extended; a fake kubelet; the operator.

Three pieces, usable as pytest fixtures or as plain async context managers:

- `Emulator`: kmock's `KubernetesEmulator` (objects in memory, served over real HTTP with
  watch streams), extended with what the real API server does and the operator relies on:
  server-side metadata (uid, resourceVersion, creationTimestamp, generation, generateName),
  201 on create, the status subresource, resourceVersion conflicts (409) and JSON-patch
  `test` failures (422), no-op patches that change nothing, label and field selectors on
  list and watch, owner-reference garbage collection, PUT, typed lists, and watch streams
  that do not miss objects created while they open.
- `Kubelet`: plays the Job controller, the scheduler and the kubelet. For each Job it
  creates a pod and runs the container's command as a local process with the container's
  environment (secretKeyRef resolved, Secret volumes written to temporary files, container
  paths rewritten to them), and writes pod and Job status as Kubernetes would, following
  `podFailurePolicy`, `backoffLimit`, `activeDeadlineSeconds` and `suspend`. Per-Job
  plans inject what a cluster does to pods: OOM kills, evictions, image pull failures,
  unschedulable pods.
- `OperatorProcess`: the real `whisperx-operator` entry point as a child process pointed
  at the emulator through a kubeconfig, so a test can SIGKILL and restart it.

Fixtures: `kube` (an `Emulator` on loopback with the CRDs declared and the peering object
created), `kubelet` (a running `Kubelet`), `operator_env` (the operator's environment, a
dict a test module may override), `operator` (a started `OperatorProcess`). In another
test area's conftest.py: `from tests.kube_fixtures import kube, kubelet, operator,
operator_env  # noqa: F401`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
import os
import random
import re
import signal
import string
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import jsonpointer
import kmock
import pytest
import yaml
from kmock._internal import apps, parsing, rendering

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import RealKube, node_agent_for, real_kube, service_account_kubeconfig
from tests.cluster.kubelet import Kubelet as NodeAgent
from tests.cluster.kubelet import PodPlan
from tests.conftest import REPO_ROOT, free_port
from whisperx_api.crd import GROUP, PLURAL, VERSION

PREDICTIONS = kmock.resource(GROUP, VERSION, PLURAL)
JOBS = kmock.resource("batch", "v1", "jobs")
PODS = kmock.resource("", "v1", "pods")
SECRETS = kmock.resource("", "v1", "secrets")
EVENTS = kmock.resource("", "v1", "events")
NAMESPACES = kmock.resource("", "v1", "namespaces")
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
CLUSTER_PEERINGS = kmock.resource("kopf.dev", "v1", "clusterkopfpeerings")
PEERINGS = kmock.resource("kopf.dev", "v1", "kopfpeerings")
SERVICE_ACCOUNTS = kmock.resource("", "v1", "serviceaccounts")
CLAIMS = kmock.resource("", "v1", "persistentvolumeclaims")

ALL_VERBS = ["list", "watch", "get", "create", "patch", "update", "delete"]
# resource -> (kind, namespaced, status subresource)
DECLARED: dict[kmock.resource, tuple[str, bool, bool]] = {
    PREDICTIONS: ("Prediction", True, True),
    JOBS: ("Job", True, True),
    PODS: ("Pod", True, True),
    SECRETS: ("Secret", True, False),
    EVENTS: ("Event", True, False),
    NAMESPACES: ("Namespace", False, True),
    CRDS: ("CustomResourceDefinition", False, True),
    CLUSTER_PEERINGS: ("ClusterKopfPeering", False, False),
    PEERINGS: ("KopfPeering", True, False),
    SERVICE_ACCOUNTS: ("ServiceAccount", True, False),
    CLAIMS: ("PersistentVolumeClaim", True, True),
}

Key = tuple[kmock.resource, str | None, str]


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# kmock reads /api/v1/namespaces[/{name}] as a namespace prefix without a resource (and
# fails on the list): it is the Namespace resource itself, which kopf lists and watches
# when it serves only some namespaces.
_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (3, 4):
        name = parts[3] if len(parts) == 4 else None
        return parsing.ParsedPath("", "v1", "namespaces", None, name, None)
    return _kmock_parse_path(path)


parsing.parse_path = _parse_path


# --- selectors ---

_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9_.-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


def _split_selector(selector: str) -> list[str]:
    """Splits at commas outside parentheses (`a in (x,y),b`)."""
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def label_selector_matches(selector: str | None, labels: dict[str, str]) -> bool:
    for requirement in _split_selector(selector or ""):
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise kmock.KubernetesError(400, "BadRequest", f"bad label selector {requirement!r}")
        key = match["key"]
        if match["neg"]:
            ok = key not in labels
        elif match["op"] in ("=", "=="):
            ok = labels.get(key) == match["value"]
        elif match["op"] == "!=":
            ok = labels.get(key) != match["value"]
        elif match["setop"]:
            values = {v.strip() for v in match["values"].split(",")}
            ok = (labels.get(key) in values) == (match["setop"] == "in") and (
                key in labels or match["setop"] == "notin"
            )
        else:
            ok = key in labels
        if not ok:
            return False
    return True


def field_selector_matches(selector: str | None, obj: dict[str, Any]) -> bool:
    for requirement in _split_selector(selector or ""):
        path, op, value = re.split(r"(!=|==|=)", requirement.strip(), maxsplit=1)
        current: Any = obj
        for part in path.split("."):
            current = current.get(part) if isinstance(current, dict) else None
        actual = "" if current is None else str(current)
        if (actual == value) != (op != "!="):
            return False
    return True


# --- the API server ---


@dataclass
class WatchStats:
    open: Counter[kmock.resource] = field(default_factory=Counter)


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API server semantics the operator relies on."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[kmock.method.PUT] << self._serve_replace
        # `kmock.requests` history for assertions; off by default (see `_handle`).
        self.keep_requests = False
        self._rv = itertools.count(1)
        self._index: dict[kmock.resource, dict[tuple[str | None, str], dict[str, Any]]] = (
            defaultdict(dict)
        )
        self._dependents: defaultdict[str, set[Key]] = defaultdict(set)
        self.watches = WatchStats()
        # How often each object was created (exactly-once checks).
        self.creations: Counter[Key] = Counter()
        for resource, (kind, namespaced, status) in DECLARED.items():
            self.declare(resource, kind, namespaced=namespaced, status=status)

    def declare(
        self, resource: kmock.resource, kind: str, *, namespaced: bool, status: bool
    ) -> None:
        self.resources[resource] = kmock.ResourceInfo(
            kind=kind,
            namespaced=namespaced,
            singular=kind.lower(),
            verbs=ALL_VERBS,
            subresources={"status"} if status else set(),
        )

    def _has_status(self, resource: kmock.resource) -> bool:
        return "status" in self.resources[resource].subresources

    # kmock's emulator mutates objects before its reactions run; here the mutations are
    # the fallback reactions themselves, so an injected reaction (a test's fault) wins.
    async def _handle(self, request: rendering.Request) -> Any:
        if not self.keep_requests:
            # kmock matches each request against every request seen so far (quadratic):
            # keep only the current one, which matching needs (it is the last, appended
            # just before this call).
            del self._requests[:-1]
        return await apps.RawHandler._handle(self, request)

    # --- state, shared by HTTP requests and in-process actors (the kubelet) ---

    # Replaces kmock's `get(url)` HTTP shortcut (use `emulator.request("GET", url)`).
    def get(  # type: ignore[override]
        self, resource: kmock.resource, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        obj = self._index[resource].get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(
        self,
        resource: kmock.resource,
        namespace: str | None = None,
        *,
        labels: str | None = None,
        fields: str | None = None,
    ) -> list[dict[str, Any]]:
        return [
            obj
            for (ns, _), obj in self._index[resource].items()
            if (namespace is None or ns == namespace)
            and label_selector_matches(labels, obj["metadata"].get("labels") or {})
            and field_selector_matches(fields, obj)
        ]

    async def subscribe(self, resource: kmock.resource) -> AsyncIterator[dict[str, Any]]:
        """Every change to `resource` from now on, as watch events."""
        bus = self._buses[resource]
        mark = await bus.mark()
        try:
            async for event in bus.stream(since=mark):
                yield event
        finally:
            await bus.unmark(mark)

    def _stamp_new(
        self, resource: kmock.resource, namespace: str | None, body: dict[str, Any]
    ) -> dict[str, Any]:
        kind, namespaced, _ = DECLARED.get(resource, (None, True, False))
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise kmock.KubernetesError(
                    422, "Invalid", "metadata.name or generateName is required"
                )
            meta["name"] = prefix + "".join(
                random.choices(string.ascii_lowercase + string.digits, k=5)
            )
        if namespaced:
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=now_iso(),
            generation=1,
            resourceVersion=str(next(self._rv)),
        )
        group = resource.group
        obj.setdefault("apiVersion", f"{group}/{resource.version}" if group else resource.version)
        if kind:
            obj.setdefault("kind", kind)
        if self._has_status(resource):
            obj.pop("status", None)  # the status subresource ignores status on create
        return obj

    async def create_object(
        self, resource: kmock.resource, namespace: str | None, body: dict[str, Any]
    ) -> dict[str, Any]:
        async with self._lock:
            obj = self._stamp_new(resource, namespace, body)
            meta = obj["metadata"]
            key = (resource, meta.get("namespace"), meta["name"])
            if (key[1], key[2]) in self._index[resource]:
                raise kmock.KubernetesError(
                    409, "AlreadyExists", f'{resource.plural} "{key[2]}" already exists'
                )
            self._store(key, obj, created=True)
            self.creations[key] += 1
            await self._buses[resource].put({"type": "ADDED", "object": obj})
            return copy.deepcopy(obj)

    def _store(self, key: Key, obj: dict[str, Any], *, created: bool = False) -> None:
        resource, namespace, name = key
        old = self._index[resource].get((namespace, name))
        if old is not None:
            for owner in old["metadata"].get("ownerReferences") or ():
                self._dependents[owner.get("uid", "")].discard(key)
        self._index[resource][(namespace, name)] = obj
        for owner in obj["metadata"].get("ownerReferences") or ():
            self._dependents[owner.get("uid", "")].add(key)
        if created and (key in self._objects) and self._objects[key].deleted:
            self._objects[key].create(obj)
        elif created and key not in self._objects:
            self._objects[key] = obj
        else:
            self._objects[key].history.append(obj)

    async def patch_object(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        subresource: str | None = None,
        replace: bool = False,
    ) -> dict[str, Any]:
        """Merge patch (a dict), JSON patch (a list), or with `replace` a PUT body."""
        async with self._lock:
            old = self._index[resource].get((namespace, name))
            if old is None:
                raise kmock.KubernetesError(
                    404, "NotFound", f'{resource.plural} "{name}" not found'
                )
            if isinstance(patch, dict):
                wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
                if wanted_rv is not None and wanted_rv != old["metadata"]["resourceVersion"]:
                    raise kmock.KubernetesError(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on {resource.plural} "{name}": '
                        "the object has been modified; please apply your changes to the "
                        "latest version and try again",
                    )
            try:
                if replace:
                    candidate = copy.deepcopy(patch)
                elif isinstance(patch, list):
                    candidate = jsonpatch.apply_patch(old, patch, in_place=False)
                else:
                    candidate = _merge(old, patch)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                raise kmock.KubernetesError(422, "Invalid", f"patch failed: {exc}") from exc
            new = copy.deepcopy(old)
            if subresource == "status":
                if "status" in candidate:
                    new["status"] = candidate["status"]
                else:
                    new.pop("status", None)
            else:
                status = new.get("status")
                immutable = {k: old["metadata"][k] for k in _IMMUTABLE_META if k in old["metadata"]}
                new = candidate
                new.setdefault("metadata", {}).update(immutable)
                if self._has_status(resource):
                    if status is None:
                        new.pop("status", None)
                    else:
                        new["status"] = status
                if _spec_of(new) != _spec_of(old):
                    new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if new == old:
                return copy.deepcopy(old)  # a no-op changes nothing and notifies nobody
            new["metadata"]["resourceVersion"] = str(next(self._rv))
            key = (resource, namespace, name)
            meta = new["metadata"]
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                await self._remove(key, new)
            else:
                self._store(key, new)
                await self._buses[resource].put({"type": "MODIFIED", "object": new})
            return copy.deepcopy(new)

    async def delete_object(
        self, resource: kmock.resource, namespace: str | None, name: str, *, orphan: bool = False
    ) -> dict[str, Any]:
        async with self._lock:
            obj = self._index[resource].get((namespace, name))
            if obj is None:
                raise kmock.KubernetesError(
                    404, "NotFound", f'{resource.plural} "{name}" not found'
                )
            key = (resource, namespace, name)
            if obj["metadata"].get("finalizers"):
                if not obj["metadata"].get("deletionTimestamp"):
                    obj = copy.deepcopy(obj)
                    obj["metadata"]["deletionTimestamp"] = now_iso()
                    obj["metadata"]["resourceVersion"] = str(next(self._rv))
                    self._store(key, obj)
                    await self._buses[resource].put({"type": "MODIFIED", "object": obj})
                return copy.deepcopy(obj)
            await self._remove(key, obj, orphan=orphan)
            return copy.deepcopy(obj)

    async def _remove(self, key: Key, obj: dict[str, Any], *, orphan: bool = False) -> None:
        """Deletes `obj` and, as the garbage collector does, its dependents."""
        resource, namespace, name = key
        del self._index[resource][(namespace, name)]
        for owner in obj["metadata"].get("ownerReferences") or ():
            self._dependents[owner.get("uid", "")].discard(key)
        self._objects[key].history.append(obj)
        self._objects[key].delete()
        await self._buses[resource].put({"type": "DELETED", "object": obj})
        dependents = self._dependents.pop(obj["metadata"]["uid"], set())
        if orphan:
            return
        for dep_key in sorted(dependents, key=str):
            dep = self._index[dep_key[0]].get((dep_key[1], dep_key[2]))
            if dep is None:
                continue
            if dep["metadata"].get("finalizers"):
                if not dep["metadata"].get("deletionTimestamp"):
                    dep = copy.deepcopy(dep)
                    dep["metadata"]["deletionTimestamp"] = now_iso()
                    dep["metadata"]["resourceVersion"] = str(next(self._rv))
                    self._store(dep_key, dep)
                    await self._buses[dep_key[0]].put({"type": "MODIFIED", "object": dep})
            else:
                await self._remove(dep_key, dep)

    # --- HTTP: kmock's fallback reactions, overridden ---

    async def _serve_create(self, request: rendering.Request) -> rendering.Response:
        resource = self._check_known(request)
        obj = await self.create_object(resource, request.namespace, request.data or {})
        return rendering.Response(status=201, payload=obj)

    async def _serve_update(self, request: rendering.Request) -> dict[str, Any]:
        resource = self._check_known(request)
        assert request.name is not None
        return await self.patch_object(
            resource,
            request.namespace,
            request.name,
            request.data,
            subresource=request.subresource,
        )

    async def _serve_replace(self, request: rendering.Request) -> dict[str, Any]:
        resource = self._check_known(request)
        if request.name is None:
            raise kmock.KubernetesError(405, "MethodNotAllowed", "PUT needs an object URL")
        return await self.patch_object(
            resource,
            request.namespace,
            request.name,
            request.data,
            subresource=request.subresource,
            replace=True,
        )

    async def _serve_delete(self, request: rendering.Request) -> dict[str, Any]:
        resource = self._check_known(request)
        assert request.name is not None
        options = request.data if isinstance(request.data, dict) else {}
        orphan = (
            options.get("propagationPolicy") == "Orphan"
            or request.params.get("propagationPolicy") == "Orphan"
        )
        return await self.delete_object(resource, request.namespace, request.name, orphan=orphan)

    async def _serve_fetch(self, request: rendering.Request) -> dict[str, Any]:
        resource = self._check_known(request)
        assert request.name is not None
        obj = self.get(resource, request.namespace, request.name)
        if obj is None:
            raise kmock.KubernetesError(
                404, "NotFound", f'{resource.plural} "{request.name}" not found'
            )
        return obj

    def _check_known(self, request: rendering.Request) -> kmock.resource:
        resource = request.resource
        if resource is None or resource not in self.resources:
            raise kmock.KubernetesResourceNotFoundError()
        return resource

    async def _serve_list(self, request: rendering.Request) -> dict[str, Any]:
        resource = self._check_known(request)
        kind = self.resources[resource].kind or "Object"
        items = self.list(
            resource,
            request.namespace,
            labels=request.params.get("labelSelector"),
            fields=request.params.get("fieldSelector"),
        )
        group = resource.group
        return {
            "apiVersion": f"{group}/{resource.version}" if group else resource.version,
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(next(self._rv))},
            "items": items,
        }

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        resource = self._check_known(request)
        labels = request.params.get("labelSelector")
        fields = request.params.get("fieldSelector")
        if request.name:
            fields = ",".join(filter(None, [fields, f"metadata.name={request.name}"]))
        yield b""  # send the headers now, even if nothing happens for a while
        bus = self._buses[resource]
        # Mark the bus before the snapshot: nothing created meanwhile can slip between.
        async with self._lock:
            mark = await bus.mark()
            snapshot = [
                {"type": "ADDED", "object": obj}
                for obj in self.list(resource, request.namespace, labels=labels, fields=fields)
            ]
        self.watches.open[resource] += 1
        try:
            for event in snapshot:
                yield event
            async for event in bus.stream(since=mark):
                obj = event["object"]
                meta = obj.get("metadata") or {}
                if request.namespace is not None and meta.get("namespace") != request.namespace:
                    continue
                if label_selector_matches(labels, meta.get("labels") or {}) and (
                    field_selector_matches(fields, obj)
                ):
                    yield event
        finally:
            self.watches.open[resource] -= 1
            await bus.unmark(mark)


_IMMUTABLE_META = ("uid", "creationTimestamp", "name", "namespace", "deletionTimestamp")


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _spec_of(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


@contextlib.asynccontextmanager
async def running_emulator(*, peering: str | None = "whisperx") -> AsyncIterator[Emulator]:
    """An `Emulator` on a loopback port with the CRDs and the peering object in place."""
    async with Emulator() as emulator, kmock.Server(emulator):
        for path in (REPO_ROOT / "crds" / "prediction.yaml",):
            await emulator.create_object(CRDS, None, yaml.safe_load(path.read_text()))
        await emulator.create_object(NAMESPACES, None, {"metadata": {"name": "default"}})
        if peering:
            await emulator.create_object(CLUSTER_PEERINGS, None, {"metadata": {"name": peering}})
        yield emulator


def write_kubeconfig(url: str, path: Path) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def emulator_url(emulator: Emulator) -> str:
    return str(emulator.url).rstrip("/")


async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]], within: float = 10.0, interval: float = 0.05
) -> Any:
    """Polls until `predicate` returns something truthy; returns it, or fails after `within`
    seconds."""
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


# --- the kubelet (and Job controller, and scheduler) ---


@dataclass
class PodRun:
    namespace: str
    name: str
    job: str
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    exit_code: int | None = None


class Kubelet:
    """Runs Jobs in the emulator as local processes (see the module docstring)."""

    def __init__(
        self,
        emulator: Emulator,
        workdir: Path,
        *,
        host_volumes: dict[str, Path] | None = None,
        extra_env: dict[str, str] | None = None,
        kill_grace: float = 3.0,
        retry_delay: float = 0.2,
    ) -> None:
        self.emulator = emulator
        self.workdir = workdir
        # PersistentVolumeClaim name -> local directory (e.g. the model cache).
        self.host_volumes = host_volumes or {}
        self.extra_env = extra_env or {}
        self.kill_grace = kill_grace
        self.retry_delay = retry_delay
        self.plans: defaultdict[str, list[PodPlan]] = defaultdict(list)
        self.pods: dict[tuple[str, str], PodRun] = {}
        self._jobs: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._resumed: defaultdict[tuple[str, str], asyncio.Event] = defaultdict(asyncio.Event)
        self._suspended: defaultdict[tuple[str, str], asyncio.Event] = defaultdict(asyncio.Event)
        self._tasks: list[asyncio.Task[None]] = []
        self._terminating: set[asyncio.Task[None]] = set()

    def plan(self, job: str, *plans: PodPlan) -> None:
        """Plans for the next pods of Job `job` (in order); later pods run normally."""
        self.plans[job].extend(plans)

    def runs(self, job: str) -> list[PodRun]:
        return [run for run in self.pods.values() if run.job == job]

    def logs(self, job: str) -> str:
        return "".join(r.log_path.read_text() for r in self.runs(job) if r.log_path.exists())

    async def __aenter__(self) -> Kubelet:
        self._tasks = [
            asyncio.create_task(self._watch_jobs(), name="kubelet jobs"),
            asyncio.create_task(self._watch_pods(), name="kubelet pods"),
        ]
        await asyncio.sleep(0)  # let both subscribe before anything is created
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in [*self._tasks, *self._jobs.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._jobs.values(), return_exceptions=True)
        for run in self.pods.values():
            if run.process is not None and run.process.returncode is None:
                run.process.kill()
                await run.process.wait()

    async def _watch_jobs(self) -> None:
        for job in self.emulator.list(JOBS):
            self._start_job(job)
        async for event in self.emulator.subscribe(JOBS):
            job = event["object"]
            key = (job["metadata"]["namespace"], job["metadata"]["name"])
            if event["type"] == "ADDED":
                self._start_job(job)
            elif event["type"] == "DELETED":
                task = self._jobs.pop(key, None)
                if task is not None:
                    task.cancel()
            elif not (job.get("spec") or {}).get("suspend"):
                self._resumed[key].set()
                self._suspended[key].clear()
            else:  # suspended (again: Kueue preempts by setting spec.suspend)
                self._suspended[key].set()
                self._resumed[key].clear()

    async def _watch_pods(self) -> None:
        async for event in self.emulator.subscribe(PODS):
            if event["type"] != "DELETED":
                continue
            meta = event["object"]["metadata"]
            run = self.pods.get((meta["namespace"], meta["name"]))
            if run is not None and run.process is not None:
                task = asyncio.create_task(self._terminate(run))
                self._terminating.add(task)
                task.add_done_callback(self._terminating.discard)

    def _start_job(self, job: dict[str, Any]) -> None:
        key = (job["metadata"]["namespace"], job["metadata"]["name"])
        if key not in self._jobs:
            self._jobs[key] = asyncio.create_task(self._run_job(job), name=f"job {key[1]}")

    async def _terminate(self, run: PodRun) -> None:
        process = run.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.kill_grace)
        except TimeoutError:
            process.kill()
            await process.wait()
        run.exit_code = _shell_code(process.returncode)

    async def _job_status(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        meta = job["metadata"]
        with contextlib.suppress(kmock.KubernetesError):  # the Job is gone
            await self.emulator.patch_object(
                JOBS, meta["namespace"], meta["name"], {"status": status}, subresource="status"
            )

    async def _pod_status(self, run: PodRun, status: dict[str, Any]) -> None:
        with contextlib.suppress(kmock.KubernetesError):
            await self.emulator.patch_object(
                PODS, run.namespace, run.name, {"status": status}, subresource="status"
            )

    async def _run_job(self, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job.get("spec") or {}
        key = (meta["namespace"], meta["name"])
        conditions: list[dict[str, Any]] = []

        def condition(type_: str, reason: str, message: str = "", status: str = "True") -> None:
            conditions[:] = [c for c in conditions if c["type"] != type_]
            conditions.append(
                {
                    "type": type_,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now_iso(),
                    "lastProbeTime": now_iso(),
                }
            )

        if spec.get("suspend"):
            condition("Suspended", "JobSuspended", "Job suspended")
            await self._job_status(job, {"conditions": conditions})
            await self._resumed[key].wait()
            condition("Suspended", "JobResumed", "Job resumed", status="False")
        start = time.monotonic()
        await self._job_status(job, {"startTime": now_iso(), "active": 0, "conditions": conditions})
        deadline = spec.get("activeDeadlineSeconds")
        failed = 0
        attempt = 0
        while True:
            plan = self.plans[meta["name"]].pop(0) if self.plans[meta["name"]] else PodPlan()
            await self._admitted(job)
            run = await self._create_pod(job, attempt)
            attempt += 1
            await self._job_status(job, {"active": 1, "failed": failed})
            remaining = None if deadline is None else deadline - (time.monotonic() - start)
            try:
                pod = await self._unless_suspended(
                    key, asyncio.wait_for(self._run_pod(job, run, plan), remaining)
                )
                if pod is None:
                    # Suspended while running: the Job controller deletes the active pod
                    # (not a failure) and creates a new one once resumed, with startTime
                    # (the activeDeadlineSeconds clock) reset.
                    await self._delete_pod(run)
                    condition("Suspended", "JobSuspended", "Job suspended")
                    await self._job_status(job, {"active": 0, "conditions": conditions})
                    await self._resumed[key].wait()
                    condition("Suspended", "JobResumed", "Job resumed", status="False")
                    start = time.monotonic()
                    await self._job_status(job, {"startTime": now_iso(), "conditions": conditions})
                    continue
            except TimeoutError:
                await self._terminate(run)
                pod = await self._finish_pod(run, "DeadlineExceeded")
                condition(
                    "FailureTarget",
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline",
                )
                condition(
                    "Failed", "DeadlineExceeded", "Job was active longer than specified deadline"
                )
                await self._job_status(
                    job, {"active": 0, "failed": failed + 1, "conditions": conditions}
                )
                return
            if pod["status"]["phase"] == "Succeeded":
                condition(
                    "SuccessCriteriaMet",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                )
                condition(
                    "Complete", "CompletionsReached", "Reached expected number of succeeded pods"
                )
                await self._job_status(
                    job,
                    {
                        "active": 0,
                        "succeeded": 1,
                        "completionTime": now_iso(),
                        "conditions": conditions,
                    },
                )
                return
            action, index = _policy_action(spec.get("podFailurePolicy"), pod)
            if action == "Ignore":
                await self._job_status(job, {"active": 0})
                await asyncio.sleep(self.retry_delay)
                continue
            failed += 1
            if action == "FailJob":
                code = _exit_code(pod)
                message = (
                    f"Container runner for pod {run.namespace}/{run.name} failed with exit "
                    f"code {code} matching FailJob rule at index {index}"
                )
                condition("FailureTarget", "PodFailurePolicy", message)
                condition("Failed", "PodFailurePolicy", message)
            elif failed > int(spec.get("backoffLimit", 6)):
                message = "Job has reached the specified backoff limit"
                condition("FailureTarget", "BackoffLimitExceeded", message)
                condition("Failed", "BackoffLimitExceeded", message)
            else:
                await self._job_status(job, {"active": 0, "failed": failed})
                await asyncio.sleep(self.retry_delay)
                continue
            await self._job_status(job, {"active": 0, "failed": failed, "conditions": conditions})
            return

    async def _admitted(self, job: dict[str, Any]) -> None:
        """Until the API server would admit the Job's pod: without its ServiceAccount it
        refuses it, and the Job controller records a FailedCreate Event and retries."""
        meta = job["metadata"]
        namespace = meta["namespace"]
        account = job["spec"]["template"]["spec"].get("serviceAccountName")
        recorded = False
        while account and self.emulator.get(SERVICE_ACCOUNTS, namespace, account) is None:
            if not recorded:
                message = (
                    f'Error creating: pods "{meta["name"]}-" is forbidden: error looking up '
                    f'service account {namespace}/{account}: serviceaccount "{account}" not found'
                )
                await self.emulator.create_object(
                    EVENTS,
                    namespace,
                    {
                        "metadata": {"generateName": f"{meta['name']}."},
                        "involvedObject": {
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "name": meta["name"],
                            "namespace": namespace,
                            "uid": meta["uid"],
                        },
                        "type": "Warning",
                        "reason": "FailedCreate",
                        "message": message,
                        "source": {"component": "job-controller"},
                        "count": 1,
                        "firstTimestamp": now_iso(),
                        "lastTimestamp": now_iso(),
                    },
                )
                recorded = True
            await asyncio.sleep(self.retry_delay)

    def _missing_claim(self, job: dict[str, Any]) -> str | None:
        """The first PersistentVolumeClaim of the pod that is neither mapped to a local
        folder nor an object in the API server."""
        namespace = job["metadata"]["namespace"]
        for volume in job["spec"]["template"]["spec"].get("volumes") or ():
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            mapped = claim in self.host_volumes
            if claim and not mapped and self.emulator.get(CLAIMS, namespace, claim) is None:
                return str(claim)
        return None

    async def _unless_suspended(
        self, key: tuple[str, str], work: Awaitable[dict[str, Any]]
    ) -> dict[str, Any] | None:
        """`work`'s result, or None (work cancelled) if the Job is suspended first."""
        task = asyncio.ensure_future(work)
        suspended = asyncio.ensure_future(self._suspended[key].wait())
        try:
            await asyncio.wait({task, suspended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            suspended.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return None if task.cancelled() else task.result()

    async def _delete_pod(self, run: PodRun) -> None:
        with contextlib.suppress(kmock.KubernetesError):
            await self.emulator.delete_object(PODS, run.namespace, run.name)
        await self._terminate(run)

    async def _create_pod(self, job: dict[str, Any], attempt: int) -> PodRun:
        meta, template = job["metadata"], job["spec"]["template"]
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        labels = {
            **(template.get("metadata") or {}).get("labels", {}),
            "batch.kubernetes.io/job-name": meta["name"],
            "batch.kubernetes.io/controller-uid": meta["uid"],
        }
        pod = {
            "metadata": {
                "name": f"{meta['name']}-{suffix}",
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": {
                    **(template.get("metadata") or {}).get("annotations", {}),
                    "batch.kubernetes.io/job-completion-index": str(attempt),
                },
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": copy.deepcopy(template["spec"]),
        }
        created = await self.emulator.create_object(PODS, meta["namespace"], pod)
        name = created["metadata"]["name"]
        run = PodRun(meta["namespace"], name, meta["name"], self.workdir / name / "log.txt")
        run.log_path.parent.mkdir(parents=True)
        self.pods[(run.namespace, run.name)] = run
        await self._pod_status(run, {"phase": "Pending"})
        return run

    async def _run_pod(self, job: dict[str, Any], run: PodRun, plan: PodPlan) -> dict[str, Any]:
        container = job["spec"]["template"]["spec"]["containers"][0]
        pending: dict[str, Any] = {"phase": "Pending"}
        unschedulable = plan.unschedulable
        claim = self._missing_claim(job)
        if claim is not None:
            unschedulable = (
                f'0/1 nodes are available: persistentvolumeclaim "{claim}" not found. '
                "preemption: 0/1 nodes are available: 1 Preemption is not helpful for "
                "scheduling."
            )
        if unschedulable is not None:
            pending["conditions"] = [_cond("PodScheduled", "False", "Unschedulable", unschedulable)]
            await self._pod_status(run, pending)
            await asyncio.Event().wait()  # until the Job is deleted or its deadline passes
        pending["conditions"] = [_cond("PodScheduled", "True")]
        await self._pod_status(run, pending)
        if plan.hold is not None:
            await plan.hold.wait()
        waiting = (plan.waiting_reason, plan.waiting_message)
        try:
            env, cwd = await self._container_env(job, run, container)
        except _ConfigError as exc:
            waiting = ("CreateContainerConfigError", str(exc))
        if waiting[0] is not None:
            pending["containerStatuses"] = [
                {
                    "name": container["name"],
                    "image": container.get("image"),
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": waiting[0], "message": waiting[1]}},
                }
            ]
            await self._pod_status(run, pending)
            if plan.waiting_seconds is not None and waiting[0] == plan.waiting_reason:
                await asyncio.sleep(plan.waiting_seconds)
            else:
                await asyncio.Event().wait()
        log = run.log_path.open("wb")
        run.process = await asyncio.create_subprocess_exec(
            *container["command"], *container.get("args", []),
            env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        started = now_iso()
        await self._pod_status(
            run,
            {
                "phase": "Running",
                "startTime": started,
                "conditions": [_cond("PodScheduled", "True"), _cond("Ready", "True")],
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "image": container.get("image"),
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": started}},
                    }
                ],
            },
        )
        await self._job_status(job, {"ready": 1})
        reason: str | None = None
        for after, why in ((plan.oom_kill_after, "OOMKilled"), (plan.evict_after, "Evicted")):
            if after is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(run.process.wait()), after)
                if run.process.returncode is None:
                    reason = why
                    if why == "OOMKilled":
                        run.process.kill()
                    else:
                        await self._terminate(run)
        if plan.evict_when is not None:
            exited = asyncio.ensure_future(run.process.wait())
            evicted = asyncio.ensure_future(plan.evict_when.wait())
            await asyncio.wait({exited, evicted}, return_when=asyncio.FIRST_COMPLETED)
            evicted.cancel()
            if run.process.returncode is None:
                reason = "Evicted"
                await self._terminate(run)
        await run.process.wait()
        return await self._finish_pod(run, reason, container=container, started=started)

    async def _finish_pod(
        self,
        run: PodRun,
        reason: str | None,
        *,
        container: dict[str, Any] | None = None,
        started: str | None = None,
    ) -> dict[str, Any]:
        process = run.process
        code = _shell_code(process.returncode) if process is not None else None
        run.exit_code = code
        status: dict[str, Any] = {
            "phase": "Succeeded" if code == 0 and reason is None else "Failed",
            "conditions": [_cond("PodScheduled", "True"), _cond("Ready", "False", "PodCompleted")],
        }
        if reason == "Evicted":
            status["reason"] = "Evicted"
            status["message"] = "The node was low on resource: memory."
            status["conditions"].append(
                _cond("DisruptionTarget", "True", "TerminationByKubelet", status["message"])
            )
        elif reason == "DeadlineExceeded":
            status["reason"] = "DeadlineExceeded"
            status["message"] = "Pod was active on the node longer than the specified deadline"
        if process is not None:
            terminated = {
                "exitCode": code,
                "reason": reason
                if reason == "OOMKilled"
                else ("Completed" if code == 0 else "Error"),
                "startedAt": started or now_iso(),
                "finishedAt": now_iso(),
            }
            if code != 0 and container is not None:
                # terminationMessagePolicy: FallbackToLogsOnError
                tail = run.log_path.read_bytes()[-2048:].decode(errors="replace")
                if tail.strip():
                    terminated["message"] = "\n".join(tail.splitlines()[-80:])
            status["containerStatuses"] = [
                {
                    "name": (container or {}).get("name", "runner"),
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ]
        await self._pod_status(run, status)
        pod = self.emulator.get(PODS, run.namespace, run.name)
        return pod if pod is not None else {"metadata": {"name": run.name}, "status": status}

    async def _container_env(
        self, job: dict[str, Any], run: PodRun, container: dict[str, Any]
    ) -> tuple[dict[str, str], str]:
        """The container's environment, with mounts mapped to local directories."""
        namespace = job["metadata"]["namespace"]
        pod_spec = job["spec"]["template"]["spec"]
        root = run.log_path.parent
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or ()}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or ():
            volume = volumes[mount["name"]]
            local = root / "mounts" / mount["name"]
            if "secret" in volume:
                local.mkdir(parents=True, exist_ok=True)
                secret = self._secret(namespace, volume["secret"]["secretName"])
                data = secret.get("data") or {}
                items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    if item["key"] not in data:
                        raise _ConfigError(f"couldn't find key {item['key']} in Secret")
                    (local / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                local = self.host_volumes.get(claim, local)
                local.mkdir(parents=True, exist_ok=True)
            else:
                local.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = local

        def local_path(value: str) -> str:
            for mount_path, local in sorted(mounts.items(), key=lambda m: -len(m[0])):
                if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                    return str(local) + value[len(mount_path.rstrip("/")) :]
            return value

        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            **self.extra_env,
        }
        for item in container.get("env") or ():
            if "value" in item:
                env[item["name"]] = local_path(item["value"])
                continue
            if "fieldRef" in item["valueFrom"]:
                # The downward API: a field of the pod itself (metadata.uid, ...).
                value: Any = self.emulator.get(PODS, run.namespace, run.name)
                for part in item["valueFrom"]["fieldRef"]["fieldPath"].split("."):
                    value = (value or {}).get(part)
                env[item["name"]] = "" if value is None else str(value)
                continue
            ref = item["valueFrom"]["secretKeyRef"]
            found = self.emulator.get(SECRETS, namespace, ref["name"])
            data = (found or {}).get("data") or {}
            if ref["key"] in data:
                env[item["name"]] = base64.b64decode(data[ref["key"]]).decode()
            elif not ref.get("optional"):
                where = "secret" if found is None else f"key {ref['key']} in secret"
                raise _ConfigError(f'{where} "{ref["name"]}" not found')
        return env, str(root)

    def _secret(self, namespace: str, name: str) -> dict[str, Any]:
        secret = self.emulator.get(SECRETS, namespace, name)
        if secret is None:
            raise _ConfigError(f'secret "{name}" not found')
        return secret


class _ConfigError(Exception):
    """The container cannot be created (the kubelet's CreateContainerConfigError)."""


def _shell_code(returncode: int | None) -> int | None:
    """A container's exit code: 128 + N when killed by signal N."""
    return 128 - returncode if returncode is not None and returncode < 0 else returncode


def _cond(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now_iso(),
    }


def _exit_code(pod: dict[str, Any]) -> int | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or ():
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            return int(terminated["exitCode"])
    return None


def _policy_action(policy: dict[str, Any] | None, pod: dict[str, Any]) -> tuple[str, int]:
    """The podFailurePolicy action for a failed pod: Ignore, FailJob or Count."""
    conditions = {
        c["type"]
        for c in (pod.get("status") or {}).get("conditions") or ()
        if c["status"] == "True"
    }
    code = _exit_code(pod)
    for index, rule in enumerate((policy or {}).get("rules") or ()):
        for pattern in rule.get("onPodConditions") or ():
            if pattern["type"] in conditions:
                return rule["action"], index
        on_codes = rule.get("onExitCodes")
        if on_codes and code is not None:
            inside = code in on_codes["values"]
            if inside == (on_codes["operator"] == "In"):
                return rule["action"], index
    return "Count", -1


# --- the operator as a process ---

OPERATOR_BIN = Path(sys.executable).parent / "whisperx-operator"
TEST_REPORT_KEY = "test-report-key-0123456789abcdef"


@dataclass
class ChildProcess:
    """A server run as a child process a test can crash (SIGKILL) or stop (SIGTERM)."""

    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    async def _wait(self, within: float) -> bool:
        # Never block the event loop: the emulator the child talks to is served from it.
        deadline = time.monotonic() + within
        while self.process is not None and self.process.poll() is None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def kill(self) -> None:
        """SIGKILL: a crash, with no cleanup at all."""
        if self.process is not None:
            self.process.kill()
            await self._wait(10)
            self.process = None

    async def stop(self) -> None:
        """SIGTERM, as Kubernetes stops a pod; SIGKILL after 15 s."""
        if self.process is not None:
            self.process.terminate()
            if not await self._wait(15):
                await self.kill()
            self.process = None


@dataclass
class OperatorProcess(ChildProcess):
    """`whisperx-operator` against the emulator; kill, restart and read its log."""

    starts: int = 0

    @property
    def report_url(self) -> str:
        return f"http://127.0.0.1:{self.env['WHISPERX_REPORT_PORT']}"

    @property
    def liveness_url(self) -> str:
        return f"http://127.0.0.1:{self.env['WHISPERX_LIVENESS_PORT']}/healthz"

    def start(self) -> None:
        assert self.process is None, "already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            self.process = subprocess.Popen(
                [str(OPERATOR_BIN)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def watching(self) -> bool:
        """Whether kopf, since this process started, opened its watches of Predictions,
        Jobs and pods (from its own log; on the real API server, where no test sees the
        server's side of a watch)."""
        if not self.log_path.exists():
            return False
        log = self.log_path.read_text(errors="replace").rsplit("===== start ", 1)[-1]
        return all(
            f"Starting the watch-stream for {plural} " in log
            for plural in (f"{PLURAL}.{VERSION}.{GROUP}", "jobs.v1.batch", "pods.v1")
        )

    async def wait_ready(self, emulator: Kube | None = None, within: float = 30.0) -> None:
        """Until it watches Predictions, Jobs and pods and its report endpoint is ready."""

        async def ready() -> bool:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"the operator exited:\n{self.log_tail()}")
            watching = (
                all(emulator.watches.open[r] > 0 for r in (PREDICTIONS, JOBS, PODS))
                if isinstance(emulator, Emulator)
                else self.watching()
            )
            if not watching:
                return False
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"{self.report_url}/readyz") as resp,
                ):
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        try:
            await wait_for(ready, within=within, interval=0.1)
        except TimeoutError:
            raise TimeoutError(f"operator not ready in {within} s:\n{self.log_tail()}") from None

    async def restart(self, emulator: Kube | None = None) -> None:
        await self.kill()
        self.start()
        await self.wait_ready(emulator)

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def operator_environment(
    emulator: Emulator | RealKube, redis_url: str, workdir: Path, **overrides: str
) -> dict[str, str]:
    """Environment for `whisperx-operator` against `emulator` (or the real API server,
    with a token of the operator's own ServiceAccount), with free ports."""
    if isinstance(emulator, RealKube):
        kubeconfig = service_account_kubeconfig(
            emulator.plane, "whisperx-operator", workdir / "kubeconfig"
        )
    else:
        kubeconfig = write_kubeconfig(emulator_url(emulator), workdir / "kubeconfig")
    report_port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(workdir),
        "KUBECONFIG": str(kubeconfig),
        "REDIS_URL": redis_url,
        "WHISPERX_REPORT_KEY": TEST_REPORT_KEY,
        "WHISPERX_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"w" * 32).decode(),
        "WHISPERX_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",  # the tests' webhook receivers
        "WHISPERX_REPORT_BASE_URL": f"http://127.0.0.1:{report_port}",
        "WHISPERX_REPORT_PORT": str(report_port),
        "WHISPERX_LIVENESS_PORT": str(free_port()),
        "WHISPERX_LISTEN_HOST": "127.0.0.1",
        "WHISPERX_PUBLIC_URL": "http://gateway.test",
        "WHISPERX_RUNNER_IMAGE": "whisperx/runner:test",
        "WHISPERX_RUNNER_COMMAND": json.dumps([sys.executable, str(FAKE_RUNNER)]),
        "WHISPERX_PEERING": "whisperx",
        # The peering identity, kept across restarts as a pod's name is across container
        # restarts: a restarted operator must not wait for its own ghost to expire.
        "POD_ID": f"operator-{report_port}",
        "WHISPERX_LOG_LEVEL": "DEBUG",
        "PYTHONUNBUFFERED": "1",
    }
    if "PYTHONPATH" in os.environ:
        # A checkout other than the one installed (a git worktree) runs its own code.
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    if isinstance(emulator, RealKube):
        # The hardware profiles the deployed (kind) overlay ships: CPU pods, which the
        # real scheduler places on the CPU node (the defaults ask for GPUs); and one that
        # asks for more GPUs than any node has.
        profiles = workdir / "deployed-profiles.yaml"
        kind = REPO_ROOT / "manifests" / "overlays" / "kind" / "profiles.yaml"
        profiles.write_text(kind.read_text() + GPU_HUNGRY_PROFILE)
        env["WHISPERX_PROFILES_FILE"] = str(profiles)
    env.update(overrides)
    return env


GPU_HUNGRY = "gpu-x8"
GPU_HUNGRY_PROFILE = f"""
{GPU_HUNGRY}:
  model: tiny.en
  device: cpu
  computeType: int8
  resources: {{limits: {{nvidia.com/gpu: "8"}}}}
  tolerations: [{{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}}]
"""

FAKE_RUNNER = REPO_ROOT / "tests" / "operator" / "fake_runner.py"


@contextlib.asynccontextmanager
async def running_operator(
    emulator: Emulator | RealKube, env: dict[str, str], log_path: Path
) -> AsyncIterator[OperatorProcess]:
    operator = OperatorProcess(env=env, log_path=log_path)
    operator.start()
    try:
        await operator.wait_ready(emulator if isinstance(emulator, Emulator) else None)
        yield operator
    finally:
        await operator.stop()


# --- pytest fixtures ---


# The operator's suites run on the real control plane (tests/cluster); with
# WHISPERX_KUBE_BACKEND=emulator they run on the emulator instead (fast, but no behaviour
# is claimed on it alone).
KUBE_BACKEND = os.environ.get("WHISPERX_KUBE_BACKEND", "real")
Kube = Emulator | RealKube
AnyKubelet = Kubelet | NodeAgent


@pytest.fixture
def kube_plane(request: pytest.FixtureRequest) -> ControlPlane | None:
    """The real control plane with the stack deployed, or None on the emulator."""
    if KUBE_BACKEND == "emulator":
        return None
    plane: ControlPlane = request.getfixturevalue("stack")
    return plane


@pytest.fixture
async def kube(kube_plane: ControlPlane | None) -> AsyncIterator[Kube]:
    if kube_plane is None:
        async with running_emulator() as emulator:
            yield emulator
        return
    async with real_kube(kube_plane) as cluster:
        yield cluster


@pytest.fixture
async def kubelet(kube: Kube, tmp_path: Path) -> AsyncIterator[AnyKubelet]:
    if isinstance(kube, Emulator):
        async with Kubelet(kube, tmp_path / "kubelet") as kubelet:
            yield kubelet
        return
    async with node_agent_for(kube, tmp_path / "kubelet") as agent:
        yield agent


@pytest.fixture
def operator_env(kube: Kube, redis_url: str, tmp_path: Path) -> dict[str, str]:
    return operator_environment(kube, redis_url, tmp_path)


@pytest.fixture
async def operator(
    kube: Kube, operator_env: dict[str, str], tmp_path: Path
) -> AsyncIterator[OperatorProcess]:
    async with running_operator(kube, operator_env, tmp_path / "operator.log") as operator:
        yield operator
        print(f"--- operator log (tail) ---\n{operator.log_tail(200)}")


def prediction_body(name: str, audio: str, **spec: Any) -> dict[str, Any]:
    """A Prediction as `kubectl create -f` would send it."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Prediction",
        "metadata": {"name": name},
        "spec": {"input": {"audio_file": audio}, **spec},
    }


async def wait_for_phase(
    emulator: Kube,
    name: str,
    phases: Iterable[str] = ("succeeded", "failed", "canceled"),
    *,
    namespace: str = "default",
    within: float = 20.0,
) -> dict[str, Any]:
    """The Prediction once its status.phase is one of `phases`."""
    wanted = set(phases)

    def reached() -> dict[str, Any] | None:
        obj = emulator.get(PREDICTIONS, namespace, name)
        phase = ((obj or {}).get("status") or {}).get("phase")
        return obj if phase in wanted else None

    try:
        result: dict[str, Any] = await wait_for(reached, within=within)
    except TimeoutError:
        obj = emulator.get(PREDICTIONS, namespace, name)
        raise TimeoutError(f"{name} not in {wanted} after {within} s: {obj}") from None
    return result


def iter_events(emulator: Kube, name: str) -> Iterator[dict[str, Any]]:
    """Kubernetes Events about the Prediction `name`."""
    for event in emulator.list(EVENTS):
        involved = event.get("involvedObject") or {}
        # Not the Job's (of the same name): the real Job controller posts its own.
        if involved.get("name") == name and involved.get("kind") == "Prediction":
            yield event


__all__ = [
    "CLUSTER_PEERINGS",
    "CRDS",
    "EVENTS",
    "JOBS",
    "PODS",
    "PREDICTIONS",
    "SECRETS",
    "Emulator",
    "Kubelet",
    "OperatorProcess",
    "PodPlan",
    "iter_events",
    "kube",
    "kubelet",
    "operator",
    "operator_env",
    "operator_environment",
    "prediction_body",
    "running_emulator",
    "running_operator",
    "wait_for",
    "wait_for_phase",
    "write_kubeconfig",
]
