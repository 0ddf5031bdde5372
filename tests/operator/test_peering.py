"""The peering rule (kopf's): a live peer with a priority at least ours pauses us."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from whisperx_api.kube import ApiError, KubeClient
from whisperx_operator.peering import PeeringGate, is_active

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def peer(priority: int, seen_ago: float = 1, lifetime: int = 60) -> dict[str, Any]:
    seen = (NOW - timedelta(seconds=seen_ago)).isoformat()
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen}


def test_alone_or_above_every_live_peer_is_active() -> None:
    assert is_active({}, "me", 0, NOW)
    assert is_active({"me": peer(0)}, "me", 0, NOW)
    assert is_active({"me": peer(5), "other": peer(4)}, "me", 5, NOW)


def test_a_higher_or_equal_live_peer_pauses() -> None:
    assert not is_active({"me": peer(5), "other": peer(6)}, "me", 5, NOW)
    # Equal priorities: kopf pauses both, so neither acts.
    assert not is_active({"me": peer(5), "other": peer(5)}, "me", 5, NOW)


def test_dead_peers_do_not_count() -> None:
    assert is_active({"other": peer(9, seen_ago=61)}, "me", 0, NOW)
    assert is_active({"other": peer(9, lifetime=0)}, "me", 0, NOW)


class FakeKube(KubeClient):
    """Answers create with the status given per namespace (201 when none), get with 404
    unless the object was seeded."""

    def __init__(self, refusals: dict[str, int], existing: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.refusals = refusals
        self.existing = existing
        self.created: list[str] = []

    async def create(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        namespace = obj["metadata"]["namespace"]
        if namespace in self.refusals:
            raise ApiError(self.refusals[namespace], "refused")
        self.created.append(namespace)
        return obj

    async def get(self, path: str) -> dict[str, Any]:
        if path.split("/")[5] not in self.existing:
            raise ApiError(404, "not found")
        return {}


def gate(kube: KubeClient, *namespaces: str) -> PeeringGate:
    return PeeringGate(kube, name="wx", identity="me", priority=0, namespaces=namespaces)


async def test_the_peering_of_each_watched_namespace_is_created_when_missing() -> None:
    # "made": created now; "there": exists (409); "absent": no such namespace (404, a
    # warning); "theirs": not ours to create (403) but there.
    kube = FakeKube({"there": 409, "absent": 404, "theirs": 403}, existing=frozenset({"theirs"}))
    await gate(kube, "made", "there", "absent", "theirs").ensure()
    assert kube.created == ["made"]
    # Cluster-wide, the ClusterKopfPeering comes with the manifests.
    await gate(kube).ensure()
    assert kube.created == ["made"]
    with pytest.raises(RuntimeError, match="KopfPeering forbidden/wx"):
        await gate(FakeKube({"forbidden": 403}), "forbidden").ensure()
