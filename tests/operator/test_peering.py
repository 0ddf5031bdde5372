"""The peering rule (kopf's): a live peer with a priority at least ours pauses us."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from whisperx_operator.peering import is_active

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
