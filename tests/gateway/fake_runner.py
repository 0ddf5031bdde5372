"""A stand-in for `whisperx-runner run` with the same environment and report contract.

It makes the lifecycle tests fast and lets them provoke what the real runner rarely does
(crash without a report, hang until SIGTERM). The input's `initial_prompt` picks the
behaviour: `stand-in:fail`, `stand-in:crash`, `stand-in:hang`, `stand-in:slow`;
anything else succeeds with a transcript naming the audio's length (an http(s) audio
URL is downloaded first).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from typing import Any

from whisperx_api.reports import SIGNATURE_HEADER, sign

URL = os.environ["WHISPERX_REPORT_URL"]
TOKEN = os.environ["WHISPERX_REPORT_TOKEN"]
seq = 0


def report(event: str, **fields: Any) -> None:
    global seq
    seq += 1
    body = json.dumps({"event": event, "seq": seq, **fields}).encode()
    request = urllib.request.Request(
        URL,
        data=body,
        headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(TOKEN, body)},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def on_sigterm(signum: int, frame: object) -> None:
    report("completed", status="canceled", reason="Canceled", logs="stand-in: canceled\n")
    sys.exit(143)


def main() -> int:
    with open(os.environ["WHISPERX_INPUT_FILE"]) as file:
        data = json.load(file)
    mode = str(data.get("initial_prompt") or "").removeprefix("stand-in:")
    signal.signal(signal.SIGTERM, on_sigterm)
    report("start")
    report("logs", logs=f"stand-in runner: model {os.environ['WHISPERX_MODEL']}\n", progress=0.5)
    if mode == "crash":
        print("stand-in: simulated crash", file=sys.stderr, flush=True)
        return 3
    if mode == "hang":
        time.sleep(120)
    if mode == "slow":
        time.sleep(1.5)
    if mode == "fail":
        report("completed", status="failed", error="stand-in: simulated failure")
        return 1
    source = str(data["audio_file"])
    if source.startswith("http"):
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
        logs=f"stand-in: done (token given: {secret})\n",
        metrics={"predict_time": 0.01, "audio_duration": 1.0},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
