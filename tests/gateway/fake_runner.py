"""A stand-in for a warm `whisperx-runner run`, with the same environment, work and report
contract (WHISPERX_WORK_URL, WHISPERX_RUNNER_TOKEN, WHISPERX_IDLE_SECONDS,
WHISPERX_MAX_PREDICTIONS).

It makes the lifecycle tests fast and lets them provoke what the real runner rarely does
(crash without a report, hang until SIGTERM). The input's `initial_prompt` picks the
behaviour: `stand-in:fail`, `stand-in:crash`, `stand-in:hang`, `stand-in:slow`,
`stand-in:stubborn` (hangs, ignoring SIGTERM), `stand-in:fetch` (downloads the audio as
the real runner does, under its address guard and WHISPERX_ALLOW_HOSTS);
anything else succeeds with a transcript naming the audio's length (an http(s) audio
URL is downloaded first) and the runner's pid, so tests can tell warm runs apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from whisperx_api.reports import SIGNATURE_HEADER, sign

WORK_URL = os.environ["WHISPERX_WORK_URL"]
RUNNER_TOKEN = os.environ["WHISPERX_RUNNER_TOKEN"]
IDLE_SECONDS = float(os.environ.get("WHISPERX_IDLE_SECONDS") or 0)
MAX_PREDICTIONS = int(os.environ.get("WHISPERX_MAX_PREDICTIONS") or 0)
FIRST_WAIT_SECONDS = 30.0


class Current:
    """The prediction held now: its reports are numbered from 1."""

    assignment: dict[str, Any] | None = None
    seq = 0


def post(url: str, token: str, payload: dict[str, Any], timeout: float) -> tuple[int, bytes]:
    body = json.dumps(payload).encode()
    request = urllib.request.Request(
        url,
        data=body,
        headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(token, body)},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def report(event: str, **fields: Any) -> None:
    given = Current.assignment
    assert given is not None
    Current.seq += 1
    payload = {"event": event, "seq": Current.seq, "attempt": given["attempt"], **fields}
    post(given["report_url"], given["report_token"], payload, 10)


def on_sigterm(signum: int, frame: object) -> None:
    if Current.assignment is None:
        sys.exit(0)  # idle: at once
    report("completed", status="canceled", reason="Canceled", logs="stand-in: canceled\n")
    sys.exit(143)


def run(data: dict[str, Any]) -> int | None:
    """One prediction; an exit code where the process must end now."""
    mode = str(data.get("initial_prompt") or "").removeprefix("stand-in:")
    report("start")
    report("logs", logs=f"stand-in runner: model {os.environ['WHISPERX_MODEL']}\n", progress=0.5)
    if mode == "crash":
        print("stand-in: simulated crash", file=sys.stderr, flush=True)
        return 3
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode in ("hang", "stubborn"):
        time.sleep(120)
    if mode == "slow":
        time.sleep(1.5)
    if mode == "fail":
        report("completed", status="failed", error="stand-in: simulated failure")
        return None
    source = str(data["audio_file"])
    if mode == "fetch":
        # Imported here: the other behaviours start faster without the runner's modules.
        from whisperx_runner.config import RunnerConfig
        from whisperx_runner.errors import RunnerError
        from whisperx_runner.fetch import fetch_audio

        with tempfile.TemporaryDirectory() as folder:
            try:
                fetched = asyncio.run(fetch_audio(source, Path(folder), RunnerConfig.from_env()))
            except RunnerError as exc:
                report("completed", status="failed", error=str(exc), reason=exc.reason)
                return None
            text = f"audio of {fetched.stat().st_size} bytes"
    elif source.startswith("http"):
        with urllib.request.urlopen(source, timeout=10) as response:
            text = f"audio of {len(response.read())} bytes"
    else:
        text = f"audio of {len(source)} characters"
    output = {
        "segments": [{"start": 0.0, "end": 1.0, "text": text}],
        "detected_language": data.get("language") or "en",
    }
    secret = "yes" if data.get("huggingface_access_token") else "no"
    report(
        "completed",
        status="succeeded",
        output=output,
        logs=f"stand-in: done (token given: {secret}, pid {os.getpid()})\n",
        metrics={"predict_time": 0.01, "audio_duration": 1.0},
    )
    return None


def main() -> int:
    signal.signal(signal.SIGTERM, on_sigterm)
    served = 0
    idle_until = time.monotonic() + max(IDLE_SECONDS, FIRST_WAIT_SECONDS)
    while (remaining := idle_until - time.monotonic()) > 0:
        wait = min(remaining, 20.0)
        status, body = post(WORK_URL, RUNNER_TOKEN, {"wait": wait, "served": served}, wait + 15)
        if status == 410:
            return 0
        if status == 204:
            continue
        given = json.loads(body)
        Current.assignment, Current.seq = given, 0
        code = run(given["input"])
        if code is not None:
            return code
        Current.assignment = None
        served += 1
        if MAX_PREDICTIONS and served >= MAX_PREDICTIONS:
            return 0
        idle_until = time.monotonic() + IDLE_SECONDS
    return 0


if __name__ == "__main__":
    sys.exit(main())
