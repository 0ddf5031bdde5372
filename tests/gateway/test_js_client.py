"""The official `replicate` JavaScript client (npm, pinned in tests/js/package.json)
pointed at the gateway, as the Python client is in test_replicate_client.py.

Each test runs a section of tests/js/client.mjs under Node against a gateway served on
this test's event loop (local backend, stand-in runner) and asserts the JSON line it
prints. scripts/setup.sh installs the client; without it these tests fail, not skip.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.gateway.conftest import OTHER_TOKEN, TOKEN, Gateway, serve_local

JS_DIR = REPO_ROOT / "tests" / "js"
SETUP = "npm ci --prefix tests/js --no-audit --no-fund"
NODE_SECONDS = 90
AUDIO = "data:audio/wav;base64,UklGRg=="


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (Node 18 or later): run scripts/setup.sh")
    pinned = json.loads((JS_DIR / "package.json").read_text())["dependencies"]["replicate"]
    installed = JS_DIR / "node_modules" / "replicate" / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != pinned:
        pytest.fail(
            f"replicate {pinned} is not installed in tests/js: run scripts/setup.sh, "
            f"or from the repository root: {SETUP}"
        )
    return node


async def run_client(
    gw: Gateway, section: str, audio: Path | None = None, **extra: str
) -> dict[str, Any]:
    """`node client.mjs SECTION` against `gw`; its result for that section. `extra`:
    more environment for the section (WHISPERX_...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPLICATE_", "WHISPERX_"))}
    env |= {
        "WHISPERX_BASE_URL": f"{gw.url}/v1",
        "WHISPERX_TOKEN": TOKEN,
        "WHISPERX_OTHER_TOKEN": OTHER_TOKEN,
        "WHISPERX_AUDIO_FILE": str(audio or ""),
        **extra,
    }
    process = await asyncio.create_subprocess_exec(
        _node(), "client.mjs", section,
        cwd=JS_DIR, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), NODE_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"node client.mjs {section} ran past {NODE_SECONDS} s")
    assert process.returncode == 0, f"node client.mjs {section} failed:\n{stderr.decode()}"
    result: dict[str, Any] = json.loads(stdout)[section]
    return result


def sent(
    method: str, path: str, *, prefer: str | None, status: int, applied: str | None = None
) -> dict[str, Any]:
    """A request the client made, as client.mjs records it."""
    return {
        "method": method,
        "path": path,
        "prefer": prefer,
        "status": status,
        "preference_applied": applied,
    }


def transcript(text: str, language: str = "en") -> dict[str, Any]:
    return {
        "segments": [{"start": 0.0, "end": 1.0, "text": text}],
        "detected_language": language,
    }


async def test_models_and_run(gateway: Gateway) -> None:
    result = await run_client(gateway, "models_and_run")
    model = gateway.config.models.get("acme", "whisperx")
    assert model is not None
    version = model.version
    assert result["model"] == {
        "owner": "acme",
        "name": "whisperx",
        "url": f"{gateway.url}/v1/models/acme/whisperx",
    }
    assert result["latest_version"] == version
    assert "audio_file" in result["input_properties"]
    assert result["versions"] == [version] and result["version"] == version
    assert result["models"] == ["whisperx", "whisperx-a40-large", "whisperx-a100-80gb"]

    create = "/v1/models/acme/whisperx/predictions"
    # run(): `Prefer: wait` held until the end; the final answer needs no polling.
    run = result["run"]
    assert run["output"] == transcript(f"audio of {len(AUDIO)} characters")
    assert run["calls"] == [sent("POST", create, prefer="wait", status=201, applied="wait=60")]
    # A wait that runs out answers `starting`; the client then polls to the end.
    short = result["short_wait"]
    assert short["output"]["segments"][0]["text"].startswith("audio of")
    assert short["calls"][0] == sent("POST", create, prefer="wait=1", status=201, applied="wait=1")
    polls = short["calls"][1:]
    assert polls and {(c["method"], c["status"]) for c in polls} == {("GET", 200)}
    assert short["statuses"][0] == "starting" and short["statuses"][-1] == "succeeded"
    # wait: {mode: "poll"}: no Prefer header.
    poll = result["poll"]
    assert poll["output"]["segments"][0]["text"].startswith("audio of")
    assert poll["calls"][0] == sent("POST", create, prefer=None, status=201)
    assert len(poll["calls"]) > 1
    # owner/name:version goes to POST /v1/predictions with the version id.
    by_version = result["by_version"]
    assert by_version["output"] == transcript(f"audio of {len(AUDIO)} characters", "fr")
    assert by_version["calls"] == [
        sent("POST", "/v1/predictions", prefer="wait", status=201, applied="wait=60")
    ]


async def test_predictions_and_webhooks(gateway: Gateway) -> None:
    result = await run_client(gateway, "predictions")
    hanging, created = result["hanging"], result["created"]
    assert hanging["status"] == "starting"
    assert created["status"] == "starting"
    assert created["urls"]["get"] == f"{gateway.url}/v1/predictions/{created['id']}"
    assert created["urls"]["cancel"] == f"{gateway.url}/v1/predictions/{created['id']}/cancel"
    assert created["input"]["audio_file"] == AUDIO
    waited = result["waited"]
    assert waited["status"] == "succeeded"
    assert waited["output"] == transcript(f"audio of {len(AUDIO)} characters")
    assert waited["metrics"]["predict_time"] == 0.01
    assert result["fetched_equals_waited"] is True
    assert result["list"] == {
        "keys": ["next", "previous", "results"],
        "ids": [created["id"], hanging["id"]],
        "next": None,
    }
    assert result["canceled"] == {"id": hanging["id"], "status": "canceled"}
    assert result["wait_after_cancel"] == "canceled"
    ended = result["cancel_ended"]
    assert (ended["name"], ended["status"]) == ("ApiError", 409)
    assert "already ended" in ended["message"]
    aborted = result["aborted"]
    assert aborted["output"] is None
    assert aborted["first"]["prefer"] is None and aborted["first"]["status"] == 201
    assert aborted["last"]["method"] == "POST" and aborted["last"]["status"] == 200
    assert aborted["last"]["path"].endswith("/cancel")

    hooks = result["webhooks"]
    assert hooks["secret_prefix"] == "whsec_"
    # webhook_events_filter ["start", "completed"]: no `logs` events.
    assert hooks["statuses"] == ["processing", "succeeded"]
    assert hooks["ids"] == [created["id"]] * 2
    assert hooks["validations"] == [[True, True], [True, True]]
    assert hooks["last_equals_get"] is True
    assert hooks["max_clock_skew"] < 60
    assert hooks["forged_body"] is False and hooks["other_secret"] is False


async def test_paginate_and_namespaces(redis_url: str) -> None:
    async with serve_local(redis_url, page_size=2) as gw:
        result = await run_client(gw, "pagination")
    created = result["created"]
    assert len(set(created)) == 5
    assert result["ended"] == ["succeeded"] * 5
    newest_first = created[::-1]
    assert result["pages"] == [newest_first[0:2], newest_first[2:4], newest_first[4:]]
    assert result["next_is_absolute"] is True
    foreign = result["foreign_get"]
    assert (foreign["name"], foreign["status"]) == ("ApiError", 404)


async def test_local_files_are_uploaded_and_fetched_by_the_runner(
    gateway: Gateway, fox_wav: Path
) -> None:
    result = await run_client(gateway, "files", fox_wav)
    content = await asyncio.to_thread(fox_wav.read_bytes)
    size = len(content)
    assert result["size"] == size
    # "bytes": the stand-in runner downloaded an http(s) URL, not a data URI.
    assert result["from_buffer"] == transcript(f"audio of {size} bytes")
    assert result["from_file"] == transcript(f"audio of {size} bytes")
    assert result["created_input"].startswith(f"{gateway.url}/v1/files/alpha/")
    assert result["created_output"] == transcript(f"audio of {size} bytes")
    assert result["from_big"] == transcript("audio of 3000000 bytes")
    direct = result["direct"]
    assert direct["name"].startswith("buffer_") and direct["size"] == size
    assert direct["metadata"] == {"purpose": "js-client-test"}
    assert direct["checksums"]["sha256"] == hashlib.sha256(content).hexdigest()
    # Newest first: files.create, the big buffer, the prediction's, the File, run()'s.
    files = result["files"]
    assert [f["size"] for f in files] == [size, 3_000_000, size, size, size]
    assert files[3] == {"name": "fox.wav", "content_type": "audio/wav", "size": size}
    for buffer in files[:3] + files[4:]:
        assert buffer["name"].startswith("buffer_")
        assert buffer["content_type"] == "application/octet-stream"
    assert result["got_equals_listed"] is True
    assert result["download"] == {"status": 200, "same_bytes": True}
    assert result["deleted"] is True
    assert result["after_delete"]["status"] == 404


async def test_errors_carry_status_and_detail(gateway: Gateway) -> None:
    result = await run_client(gateway, "errors")
    for case in ("bad_token", "bad_token_run"):
        error = result[case]
        assert (error["name"], error["status"]) == ("ApiError", 401), case
        assert "missing or invalid token" in error["message"], case
    invalid = result["invalid_input"]
    assert (invalid["name"], invalid["status"]) == ("ApiError", 422)
    assert "input.batch_size" in invalid["message"]
    missing = result["missing_input"]
    assert missing["status"] == 422 and "input.audio_file" in missing["message"]
    for case in ("unknown_model", "unknown_prediction"):
        assert result[case]["status"] == 404, case
    assert "acme/unknown" in result["unknown_model"]["message"]
    failed = result["failed_prediction"]
    assert failed == {
        "name": "Error",
        "status": None,
        "message": "Prediction failed: stand-in: simulated failure",
    }
