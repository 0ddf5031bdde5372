"""`whisperx-runner` as the operator and users run it: separate processes, real reports,
exit codes, SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiohttp import web

from whisperx_api.schema import PredictionOutput

if TYPE_CHECKING:
    from tests.runner.conftest import AudioServer, ReportServer


def runner_command() -> list[str]:
    # The console script pyproject.toml installs, as the image's entry point runs it.
    script = shutil.which("whisperx-runner", path=str(Path(sys.executable).parent))
    assert script is not None, "whisperx-runner is not installed in this environment"
    return [script]


def prediction_env(
    runner_env: dict[str, str], tmp_path: Path, report: ReportServer, inp: dict[str, object]
) -> dict[str, str]:
    (tmp_path / "input.json").write_text(json.dumps(inp))
    return {
        **runner_env,
        "WHISPERX_INPUT_FILE": str(tmp_path / "input.json"),
        "WHISPERX_REPORT_URL": report.url,
        "WHISPERX_REPORT_TOKEN": report.token,
    }


async def start_run(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *runner_command(),
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


def test_help_and_import_stay_light() -> None:
    code = (
        "import sys, contextlib\n"
        "from whisperx_runner import cli\n"
        "with contextlib.suppress(SystemExit):\n"
        "    cli.main(['transcribe', '--help'])\n"
        "heavy = {'torch', 'whisperx', 'faster_whisper', 'numpy', 'ctranslate2', 'aiohttp'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("[]"), out.stdout
    # Every schema input field is an option (the CLI cannot drift from the schema).
    for flag in ("--language-detection-min-prob", "--align-output", "--min-speakers", "--task"):
        assert flag in out.stdout
    assert "--huggingface-access-token" not in out.stdout  # secrets come from the env


async def test_run_reports_invalid_input_and_exits_2(
    runner_env: dict[str, str], tmp_path: Path, report_server: ReportServer
) -> None:
    env = prediction_env(
        runner_env,
        tmp_path,
        report_server,
        {"audio_file": "https://a.example/x.wav", "language": "xx"},
    )
    started = time.monotonic()
    proc = await start_run(env)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2, out.decode()
    assert time.monotonic() - started < 10  # fails before any model is loaded
    assert report_server.events() == ["start", "completed"]
    assert "input.language" in report_server.completed()["error"]


async def test_run_reports_a_missing_model_naming_its_path(
    runner_env: dict[str, str], tmp_path: Path, report_server: ReportServer, fox_bytes: bytes
) -> None:
    audio = "data:audio/wav;base64," + base64.b64encode(fox_bytes).decode()
    env = prediction_env(runner_env, tmp_path, report_server, {"audio_file": audio})
    env.update(WHISPERX_MODEL="large-v3", WHISPERX_MODEL_DIR=str(tmp_path / "models"))
    proc = await start_run(env)
    await asyncio.wait_for(proc.communicate(), 30)
    done = report_server.completed()
    assert proc.returncode == 1 and done["reason"] == "ModelNotFound"
    assert str(tmp_path / "models" / "large-v3" / "model.bin") in done["error"]


@pytest.mark.whisperx
async def test_run_transcribes_and_reports(
    runner_env: dict[str, str],
    tmp_path: Path,
    report_server: ReportServer,
    audio_server: AudioServer,
) -> None:
    inp = {"audio_file": audio_server.url("/fox.wav"), "align_output": True, "debug": True}
    proc = await start_run(prediction_env(runner_env, tmp_path, report_server, inp))
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode()

    assert report_server.refused == 0
    events = report_server.events()
    assert events[0] == "start" and events[-1] == "completed" and "logs" in events
    assert [r["seq"] for r in report_server.reports] == list(range(1, len(events) + 1))
    done = report_server.completed()
    assert done["status"] == "succeeded" and done["detected_language"] == "en"
    output = PredictionOutput.model_validate(done["output"])
    assert "fox" in " ".join(s.text for s in output.segments).lower()
    assert all(s.words for s in output.segments)
    metrics = done["metrics"]
    assert metrics["audio_duration"] == pytest.approx(2.8, abs=0.2)
    assert 0 < metrics["transcribe_time"] < metrics["predict_time"]
    logs = report_server.logs_text()
    assert "Fetching http://127.0.0.1" in logs and "Duration to transcribe" in logs
    assert any(r.get("progress") for r in report_server.reports if r["event"] == "logs")


@pytest.mark.whisperx
async def test_sigterm_mid_transcription_reports_canceled_and_exits_143(
    runner_env: dict[str, str],
    tmp_path: Path,
    report_server: ReportServer,
    audio_server: AudioServer,
    two_voice_wav: Path,
) -> None:
    async def two_voices(_: web.Request) -> web.FileResponse:
        return web.FileResponse(two_voice_wav)

    audio_server.routes["/two.wav"] = two_voices
    inp = {
        "audio_file": audio_server.url("/two.wav"),
        "diarization": True,
        "align_output": True,
        "batch_size": 1,
    }
    proc = await start_run(prediction_env(runner_env, tmp_path, report_server, inp))
    await report_server.wait_for(
        lambda: (
            "Transcribing" in report_server.logs_text() or "completed" in report_server.events()
        ),
        90,
    )
    assert "completed" not in report_server.events(), report_server.completed()
    await asyncio.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 143, out.decode()
    assert time.monotonic() - started < 3
    done = report_server.completed()
    assert (done["status"], done["reason"]) == ("canceled", "Canceled")
    assert "Canceled (SIGTERM)" in report_server.logs_text()


@pytest.mark.whisperx
def test_transcribe_prints_subtitles(runner_env: dict[str, str], fox_wav: Path) -> None:
    out = subprocess.run(
        [*runner_command(), "transcribe", str(fox_wav), "--format", "vtt", "--quiet"],
        env=runner_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "WEBVTT" and "-->" in lines[2]
    assert "quick brown fox" in out.stdout.lower()


def test_transcribe_refuses_a_bad_option_value(runner_env: dict[str, str], fox_wav: Path) -> None:
    out = subprocess.run(
        [*runner_command(), "transcribe", str(fox_wav), "--batch-size", "0"],
        env=runner_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "input.batch_size" in out.stderr


def test_prefetch_fills_a_model_directory(runner_env: dict[str, str], tmp_path: Path) -> None:
    target = tmp_path / "models"
    env = {**runner_env, "WHISPERX_MODEL_DIR": str(target)}
    out = subprocess.run(
        [*runner_command(), "prefetch", "--model", "tiny.en"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (target / "tiny.en" / "model.bin").is_file()
    assert (target / "nltk_data" / "tokenizers" / "punkt_tab" / "english").is_dir()
    # The gated diarization pipeline needs a token: a clear error, before any download.
    env.pop("WHISPERX_HF_TOKEN", None)
    out = subprocess.run(
        [*runner_command(), "prefetch", "--diarization"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "gated" in out.stderr
    assert os.listdir(target / "tiny.en")
