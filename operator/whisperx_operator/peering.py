"""Whether this replica is the one that acts, by the rule of kopf's peering.

kopf pauses its handlers while a live peer of higher or equal priority exists. The
operator also acts outside kopf handlers (runner reports, deadlines), so it reads the
same peering object and applies the same rule, keeping a standby replica fully passive:
its report endpoint answers 503 and its readiness probe fails, so the Service sends
runners to the active replica.

Watching only some namespaces (`WHISPERX_NAMESPACES`), kopf peers through a `KopfPeering`
object in each of them and stays paused in a namespace without one; it never creates
them, so the operator does at start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from whisperx_api.kube import ApiError, KubeClient
from whisperx_api.lifecycle import parse_time

log = logging.getLogger(__name__)


def is_active(status: Mapping[str, Any], identity: str, priority: int, now: datetime) -> bool:
    """False while another live peer has a priority at least ours (kopf's rule)."""
    for peer, info in status.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        seen = parse_time(info.get("lastseen")) or now
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=UTC)
        alive = seen + timedelta(seconds=int(info.get("lifetime", 60))) > now
        if alive and int(info.get("priority", 0)) >= priority:
            return False
    return True


def peering_paths(name: str, namespaces: tuple[str, ...]) -> list[str]:
    if not namespaces:
        return [f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}"]
    return [f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings/{name}" for ns in namespaces]


class PeeringGate:
    """Polls the peering object(s); standalone operators are always active."""

    def __init__(
        self,
        kube: KubeClient | None,
        *,
        name: str,
        identity: str,
        priority: int,
        namespaces: tuple[str, ...] = (),
        interval: float = 2.0,
    ) -> None:
        self.kube = kube
        self.name = name
        self.namespaces = namespaces if name else ()
        self.paths = peering_paths(name, namespaces) if name else []
        self.identity = identity
        self.priority = priority
        self.interval = interval
        self.active = not self.paths

    async def ensure(self) -> None:
        """Creates the KopfPeering object of each watched namespace that lacks one."""
        assert self.kube is not None
        for namespace in self.namespaces:
            collection = f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings"
            body = {
                "apiVersion": "kopf.dev/v1",
                "kind": "KopfPeering",
                "metadata": {"name": self.name, "namespace": namespace},
            }
            try:
                await self.kube.create(collection, body)
            except ApiError as exc:
                if exc.status == 409:
                    continue  # it exists
                if exc.status == 404:
                    log.warning(
                        "namespace %s does not exist: kopf pauses until it has a KopfPeering "
                        "%s; create the namespace and restart the operator",
                        namespace,
                        self.name,
                    )
                    continue
                if exc.status == 403 and await self._exists(f"{collection}/{self.name}"):
                    continue  # not ours to create, and there already
                raise RuntimeError(
                    f"cannot create KopfPeering {namespace}/{self.name} ({exc}): kopf needs "
                    "one in each namespace of WHISPERX_NAMESPACES"
                ) from exc

    async def _exists(self, path: str) -> bool:
        assert self.kube is not None
        try:
            await self.kube.get(path)
        except ApiError as exc:
            if exc.status in (403, 404):
                return False
            raise
        return True

    async def check(self) -> bool:
        assert self.kube is not None
        active = True
        for path in self.paths:
            try:
                obj = await self.kube.get(path)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                return False  # kopf, too, stays paused without its peering object
            status = obj.get("status") or {}
            active = active and is_active(status, self.identity, self.priority, datetime.now(UTC))
        return active

    async def run(self) -> None:
        first = True
        while self.paths:
            try:
                active = await self.check()
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("peering check failed: %s", exc)
                active = False
            if active != self.active or first:
                log.info("this replica is now %s", "active" if active else "standby")
                self.active = active
                first = False
            await asyncio.sleep(self.interval)
