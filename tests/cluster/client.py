"""An async client for tests against the real API server, with watch-fed caches.

`Cluster` offers the same small surface the operator tests use on the emulator
(`get`, `list`, `subscribe`, `create_object`, `patch_object`, `delete_object`,
`creations`), so one test body runs on either: reads come from caches that watches keep
current (as an informer's), writes go to the API server and update the cache with the
object the server returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, Self

import aiohttp

Key = tuple[Any, str | None, str]


class Resource(Protocol):
    """What names a resource: kmock's `resource` and `ResourceRef` both fit."""

    @property
    def group(self) -> str | None: ...

    @property
    def version(self) -> str | None: ...

    @property
    def plural(self) -> str | None: ...


@dataclass(frozen=True)
class ResourceRef:
    group: str
    version: str
    plural: str
    namespaced: bool = True


NODES = ResourceRef("", "v1", "nodes", namespaced=False)
LEASES = ResourceRef("coordination.k8s.io", "v1", "leases")
NAMESPACES_REF = ResourceRef("", "v1", "namespaces", namespaced=False)
CLUSTER_SCOPED = {"nodes", "namespaces", "customresourcedefinitions", "clusterkopfpeerings",
                  "persistentvolumes", "clusterqueues", "resourceflavors"}  # fmt: skip


ResourceId = tuple[str, str, str]


def resource_id(resource: Resource) -> ResourceId:
    """What tells resources apart, whichever object names them (kmock's or ours)."""
    return (resource.group or "", resource.version or "", resource.plural or "")


class Creations(Counter[Key]):
    """How often each object was created, keyed by (resource, namespace, name), with the
    resource named by any object that has a group, a version and a plural."""

    def __getitem__(self, key: Key) -> int:
        resource, *rest = key
        if not isinstance(resource, tuple):
            resource = resource_id(resource)
        return super().__getitem__((resource, *rest))


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.reason = str(body.get("reason", ""))
        self.message = str(body.get("message", body))
        super().__init__(f"{status} {self.reason}: {self.message}")


def path_of(
    resource: Resource,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    base = (
        f"/api/{resource.version}"
        if not resource.group
        else (f"/apis/{resource.group}/{resource.version}")
    )
    if namespace and resource.plural not in CLUSTER_SCOPED:
        base += f"/namespaces/{namespace}"
    path = f"{base}/{resource.plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def _rv(obj: dict[str, Any]) -> int:
    return int(obj.get("metadata", {}).get("resourceVersion") or 0)


def _key(resource: Resource, obj: dict[str, Any]) -> tuple[str | None, str]:
    meta = obj["metadata"]
    return meta.get("namespace"), meta["name"]


class Cluster:
    """An authenticated session with the API server, and watch-fed caches."""

    def __init__(self, url: str, token: str, ssl_context: ssl.SSLContext) -> None:
        self.url = url
        self._session = aiohttp.ClientSession(
            base_url=url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            connector=aiohttp.TCPConnector(ssl=ssl_context, limit=50),
        )
        self._cache: defaultdict[Any, dict[tuple[str | None, str], dict[str, Any]]] = defaultdict(
            dict
        )
        self._uids: defaultdict[Key, set[str]] = defaultdict(set)
        # How often each object was created: distinct uids seen under one name.
        self.creations = Creations()
        self._synced: dict[Any, asyncio.Event] = {}
        self._listeners: defaultdict[Any, list[asyncio.Queue[dict[str, Any]]]] = defaultdict(list)
        self._tasks: list[asyncio.Task[None]] = []

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- plain requests ---

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self._session.request(
            method, path, data=data, headers=headers, params=params
        ) as resp:
            text = await resp.text()
            try:
                parsed = json.loads(text) if text else {}
            except ValueError:
                parsed = {"message": text}
            if resp.status >= 400:
                raise ApiError(resp.status, parsed if isinstance(parsed, dict) else {})
            return parsed if isinstance(parsed, dict) else {}

    async def create_object(
        self, resource: Resource, namespace: str | None, body: dict[str, Any]
    ) -> dict[str, Any]:
        created = await self.request("POST", path_of(resource, namespace), body)
        self._remember(resource, created)
        return created

    async def patch_object(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch: dict[str, Any] | list[dict[str, Any]],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        kind = "json-patch+json" if isinstance(patch, list) else "merge-patch+json"
        patched = await self.request(
            "PATCH",
            path_of(resource, namespace, name, subresource),
            patch,
            content_type=f"application/{kind}",
        )
        self._remember(resource, patched)
        return patched

    async def delete_object(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        *,
        propagation: str = "Background",
        grace_seconds: int | None = None,
        uid: str | None = None,
    ) -> None:
        options: dict[str, Any] = {"propagationPolicy": propagation}
        if grace_seconds is not None:
            options["gracePeriodSeconds"] = grace_seconds
        if uid is not None:
            options["preconditions"] = {"uid": uid}
        with contextlib.suppress(ApiError):
            await self.request("DELETE", path_of(resource, namespace, name), options)

    async def read(
        self, resource: Resource, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        """The object as the API server has it now (no cache)."""
        try:
            return await self.request("GET", path_of(resource, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    # --- caches ---

    async def track(self, *resources: Resource) -> None:
        """Keeps a cache of each resource, and waits until each is listed once."""
        for resource in resources:
            if resource_id(resource) in self._synced:
                continue
            self._synced[resource_id(resource)] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._inform(resource)))
        await asyncio.gather(*(self._synced[resource_id(r)].wait() for r in resources))

    def get(self, resource: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        assert resource_id(resource) in self._synced, f"{resource} is not tracked"
        obj = self._cache[resource_id(resource)].get((namespace, name))
        return json.loads(json.dumps(obj)) if obj is not None else None

    def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        labels: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        assert resource_id(resource) in self._synced, f"{resource} is not tracked"
        return [
            obj
            for (ns, _), obj in self._cache[resource_id(resource)].items()
            if (namespace is None or ns == namespace)
            and all((obj["metadata"].get("labels") or {}).get(k) == v
                    for k, v in (labels or {}).items())
        ]  # fmt: skip

    async def subscribe(self, resource: Resource) -> AsyncIterator[dict[str, Any]]:
        """Every change to a tracked resource from now on, as watch events."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._listeners[resource_id(resource)].append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._listeners[resource_id(resource)].remove(queue)

    def _remember(self, resource: Resource, obj: dict[str, Any]) -> None:
        if resource_id(resource) not in self._synced or "metadata" not in obj:
            return
        key = _key(resource, obj)
        known = self._cache[resource_id(resource)].get(key)
        if known is None or _rv(obj) > _rv(known):
            self._apply(resource, "MODIFIED" if known else "ADDED", obj)

    def _apply(self, resource: Resource, kind: str, obj: dict[str, Any]) -> None:
        key = _key(resource, obj)
        rid = resource_id(resource)
        uid = obj["metadata"].get("uid")
        if kind == "DELETED":
            self._cache[rid].pop(key, None)
        else:
            self._cache[rid][key] = obj
            seen = self._uids[(rid, *key)]
            if uid and uid not in seen:
                seen.add(uid)
                self.creations[(rid, *key)] += 1
        for queue in self._listeners[rid]:
            queue.put_nowait({"type": kind, "object": obj})

    async def _inform(self, resource: Resource) -> None:
        path = path_of(resource)
        while True:
            try:
                listed = await self.request("GET", path)
                version = listed["metadata"]["resourceVersion"]
                fresh = {_key(resource, o): o for o in listed.get("items") or ()}
                cached = self._cache[resource_id(resource)]
                for key in set(cached) - set(fresh):
                    self._apply(resource, "DELETED", cached[key])
                for obj in fresh.values():
                    obj.setdefault("metadata", {})
                    self._remember(resource, obj)
                self._synced[resource_id(resource)].set()
                await self._watch(resource, path, version)
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, ApiError, TimeoutError, ValueError):
                await asyncio.sleep(0.5)

    async def watch(
        self, path: str, version: str, params: dict[str, str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events from `version` on, until the server ends the watch (an ERROR event,
        e.g. 410 Gone, ends it too: list again)."""
        query = {**(params or {}), "watch": "true", "resourceVersion": version,
                 "allowWatchBookmarks": "true", "timeoutSeconds": "240"}  # fmt: skip
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        async with self._session.get(path, params=query, timeout=timeout) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, {"message": await resp.text()})
            async for line in resp.content:
                event = json.loads(line)
                if event["type"] == "ERROR":
                    return
                if event["type"] != "BOOKMARK":
                    yield event

    async def _watch(self, resource: Resource, path: str, version: str) -> None:
        async for event in self.watch(path, version):
            if event["type"] == "DELETED":
                self._apply(resource, "DELETED", event["object"])
            else:
                self._remember(resource, event["object"])
