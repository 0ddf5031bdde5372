"""The emulated API server's extensions to kmock: the behaviour the operator relies on."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.kube_fixtures import (
    JOBS,
    PODS,
    PREDICTIONS,
    SECRETS,
    Emulator,
    emulator_url,
    label_selector_matches,
    running_emulator,
)
from whisperx_api.kube import ApiError, KubeClient, resource_path

PRED = resource_path("default")


@pytest.fixture
async def kube() -> AsyncIterator[Emulator]:
    """The emulator itself, whichever backend the operator's suites run on."""
    async with running_emulator() as emulator:
        yield emulator


@pytest.fixture
async def client(kube: Emulator) -> AsyncIterator[KubeClient]:
    client = KubeClient(emulator_url(kube))
    yield client
    await client.close()


def prediction(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"input": {"audio_file": "https://x/a.wav"}}}


async def test_create_stamps_metadata_answers_201_and_refuses_duplicates(
    kube: Emulator,
) -> None:
    async with aiohttp.ClientSession() as session:
        url = emulator_url(kube) + PRED
        async with session.post(url, json={**prediction("a"), "status": {"phase": "x"}}) as resp:
            assert resp.status == 201
            body = await resp.json()
        async with session.post(url, json=prediction("a")) as resp:
            assert resp.status == 409
    meta = body["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
    assert meta["generation"] == 1 and meta["namespace"] == "default"
    assert body["kind"] == "Prediction" and body["apiVersion"] == "whisperx.io/v1alpha1"
    assert "status" not in body  # the status subresource ignores status on create


async def test_status_subresource_and_generation(client: KubeClient) -> None:
    await client.create(PRED, prediction("a"))
    path = resource_path("default", "a")
    # The main resource ignores status; the status subresource ignores everything else.
    obj = await client.merge_patch(path, {"status": {"phase": "failed"}, "spec": {"cancel": True}})
    assert "status" not in obj and obj["metadata"]["generation"] == 2
    obj = await client.merge_patch(f"{path}/status", {"status": {"phase": "failed"}, "spec": {}})
    assert obj["status"] == {"phase": "failed"} and obj["spec"]["cancel"] is True
    assert obj["metadata"]["generation"] == 2  # status changes do not bump it
    obj = await client.merge_patch(path, {"metadata": {"labels": {"a": "b"}}})
    assert obj["metadata"]["generation"] == 2


async def test_stale_resource_version_conflicts_and_failed_json_patch_test_is_422(
    client: KubeClient,
) -> None:
    created = await client.create(PRED, prediction("a"))
    path = resource_path("default", "a")
    stale = created["metadata"]["resourceVersion"]
    await client.merge_patch(path, {"spec": {"cancel": True}})
    with pytest.raises(ApiError) as conflict:
        await client.merge_patch(path, {"metadata": {"resourceVersion": stale}, "spec": {}})
    assert conflict.value.status == 409
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": stale},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x"]},
    ]
    with pytest.raises(ApiError) as unprocessable:
        await client.request("PATCH", path, body=ops, content_type="application/json-patch+json")
    assert unprocessable.value.status == 422


async def test_noop_patch_changes_nothing(kube: Emulator, client: KubeClient) -> None:
    created = await client.create(PRED, prediction("a"))
    again = await client.merge_patch(resource_path("default", "a"), {"spec": {}})
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


async def test_label_and_field_selectors(client: KubeClient) -> None:
    for name, labels in (("a", {"app": "x", "tier": "1"}), ("b", {"app": "y"}), ("c", {})):
        await client.create(
            resource_path("default", group="", version="v1", plural="secrets"),
            {"metadata": {"name": name, "labels": labels}},
        )
    path = resource_path("default", group="", version="v1", plural="secrets")

    async def names(**params: str) -> list[str]:
        return sorted(o["metadata"]["name"] for o in await client.list(path, **params))

    assert await names(labelSelector="app") == ["a", "b"]
    assert await names(labelSelector="!app") == ["c"]
    assert await names(labelSelector="app=x") == ["a"]
    assert await names(labelSelector="app!=x") == ["b", "c"]
    assert await names(labelSelector="app in (x,y),tier") == ["a"]
    assert await names(labelSelector="app notin (x)") == ["b", "c"]
    assert await names(fieldSelector="metadata.name=b") == ["b"]
    assert label_selector_matches("a in (1, 2)", {"a": "2"})


async def test_watch_streams_filtered_events_and_misses_nothing(kube: Emulator) -> None:
    url = emulator_url(kube) + resource_path("default", group="", version="v1", plural="secrets")
    seen: list[tuple[str, str]] = []
    params = {"watch": "true", "labelSelector": "keep"}
    async with aiohttp.ClientSession() as session, session.get(url, params=params) as resp:
        # Created right as the stream opens: the real API server would deliver it.
        await kube.create_object(
            SECRETS, "default", {"metadata": {"name": "early", "labels": {"keep": ""}}}
        )
        await kube.create_object(SECRETS, "default", {"metadata": {"name": "other"}})
        await kube.create_object(
            SECRETS, "default", {"metadata": {"name": "late", "labels": {"keep": ""}}}
        )
        await kube.delete_object(SECRETS, "default", "late")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                async for line in resp.content:
                    if line.strip():
                        event = json.loads(line)
                        seen.append((event["type"], event["object"]["metadata"]["name"]))
                    if len(seen) == 3:
                        break
    assert seen == [("ADDED", "early"), ("ADDED", "late"), ("DELETED", "late")]


async def test_owner_deletion_collects_dependents_and_honours_finalizers(
    kube: Emulator, client: KubeClient
) -> None:
    owner = await kube.create_object(PREDICTIONS, "default", prediction("a"))
    ref = {"apiVersion": "whisperx.io/v1alpha1", "kind": "Prediction", "name": "a",
           "uid": owner["metadata"]["uid"]}  # fmt: skip
    job = await kube.create_object(
        JOBS, "default", {"metadata": {"name": "a", "ownerReferences": [ref]}}
    )
    pod_ref = {"apiVersion": "batch/v1", "kind": "Job", "name": "a", "uid": job["metadata"]["uid"]}
    await kube.create_object(
        PODS, "default", {"metadata": {"name": "a-x", "ownerReferences": [pod_ref]}}
    )
    await kube.create_object(SECRETS, "default", {"metadata": {"name": "keep"}})
    await client.merge_patch(resource_path("default", "a"), {"metadata": {"finalizers": ["f"]}})

    await client.delete(resource_path("default", "a"))
    blocked = kube.get(PREDICTIONS, "default", "a")
    assert blocked is not None and blocked["metadata"]["deletionTimestamp"]
    assert kube.get(JOBS, "default", "a") is not None

    await client.merge_patch(resource_path("default", "a"), {"metadata": {"finalizers": None}})
    assert kube.get(PREDICTIONS, "default", "a") is None
    assert kube.get(JOBS, "default", "a") is None and kube.get(PODS, "default", "a-x") is None
    assert kube.get(SECRETS, "default", "keep") is not None


async def test_generate_name_and_typed_lists(client: KubeClient) -> None:
    path = resource_path("default", group="", version="v1", plural="events")
    created = await client.create(path, {"metadata": {"generateName": "a."}, "reason": "R"})
    assert created["metadata"]["name"].startswith("a.") and len(created["metadata"]["name"]) == 7
    listing = await client.request("GET", path)
    assert listing["kind"] == "EventList" and listing["metadata"]["resourceVersion"]
