"""A stand-in for `whisperx-runner run`: the same environment interface, the same signed
report protocol and exit codes, with no ML stack. The audio URL's path scripts it:

- `/succeed` (`?seconds=N` to take N seconds): start, logs, completed(succeeded), exit 0
- `/env`: like succeed; the output also shows what reached the process (model settings,
  whether the input file and the Hugging Face token arrived)
- `/fail`: completed(failed), exit 1; `/invalid`: completed(failed), exit 2
- `/hang`: start, then wait; SIGTERM reports completed(canceled) and exits 143
- `/crash`: start, then exit 3 with no terminal report; `/noreport`: start, exit 0

With WHISPERX_WORK_URL (a warm runner: local mode's, or a cluster's runner Job) it asks
for predictions and serves them one after another, as `whisperx-runner run` does, until
no work comes within WHISPERX_IDLE_SECONDS (0: after the first), after
WHISPERX_MAX_PREDICTIONS, on a 410, or when a prediction crashes it. SIGTERM while idle
exits 0 at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from whisperx_api.reports import SIGNATURE_HEADER, sign

OUTPUT = {
    "segments": [{"start": 0.0, "end": 1.5, "text": " the quick brown fox"}],
    "detected_language": "en",
}


class Reporter:
    def __init__(self, url: str, token: str, attempt: str) -> None:
        self.url = url
        self.token = token
        self.attempt = attempt
        self.seq = 0

    def send(self, event: dict[str, Any], *, budget: float = 15.0) -> int:
        """Posts one report, retrying 5xx and connection errors; exits 4 if refused."""
        self.seq += 1
        body = json.dumps({**event, "seq": self.seq, "attempt": self.attempt}).encode()
        deadline = time.monotonic() + budget
        while True:
            request = urllib.request.Request(
                self.url,
                data=body,
                headers={
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: sign(self.token, body),
                },
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or time.monotonic() > deadline:
                    print(
                        f"report {event['event']} refused: {exc.code} {exc.read()!r}",
                        file=sys.stderr,
                    )
                    sys.exit(4)
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)


def one_shot() -> tuple[dict[str, Any], Reporter]:
    """The input and a reporter of a Job of its own (WHISPERX_INPUT_FILE)."""
    with open(os.environ["WHISPERX_INPUT_FILE"]) as f:
        given = json.load(f)
    env = os.environ
    reporter = Reporter(
        env["WHISPERX_REPORT_URL"],
        env["WHISPERX_REPORT_TOKEN"],
        env.get("WHISPERX_RUNNER_ATTEMPT", ""),
    )
    return given, reporter


def claim(work_url: str, wait: float) -> tuple[dict[str, Any], Reporter] | None:
    """The next prediction from the work endpoint; None: no work, or stop."""
    body = json.dumps({"wait": wait}).encode()
    signature = sign(os.environ["WHISPERX_RUNNER_TOKEN"], body)
    request = urllib.request.Request(work_url, data=body, headers={SIGNATURE_HEADER: signature})
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(request, timeout=wait + 15) as resp:
                if resp.status != 200:
                    return None
                work = json.load(resp)
            break
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or time.monotonic() > deadline:
                return None
        except OSError:
            if time.monotonic() > deadline:
                return None
        time.sleep(0.5)
    reporter = Reporter(work["report_url"], work["report_token"], work["attempt"])
    return work["input"], reporter


def idle_exit(signum: int, frame: object) -> None:
    sys.exit(0)


def main() -> int:
    work_url = os.environ.get("WHISPERX_WORK_URL")
    if work_url is None:
        return serve(*one_shot())
    idle = min(float(os.environ.get("WHISPERX_IDLE_SECONDS") or 0), 60.0)
    most = int(os.environ.get("WHISPERX_MAX_PREDICTIONS") or 0)
    served, wait = 0, 30.0
    while True:
        signal.signal(signal.SIGTERM, idle_exit)
        work = claim(work_url, wait)
        if work is None:
            return 0
        code = serve(*work)
        served += 1
        print(f"served {served} prediction(s) in pid {os.getpid()}", flush=True)
        if code not in (0, 1, 2):
            return code  # a crash ends the runner
        if idle <= 0 or (most and served >= most):
            return 0
        wait = idle


def serve(given: dict[str, Any], reporter: Reporter) -> int:
    """Runs one prediction as its audio URL scripts it; the exit code it stands for."""
    url = urllib.parse.urlparse(given["audio_file"])
    behavior = url.path.strip("/")
    params = dict(urllib.parse.parse_qsl(url.query))

    def canceled(signum: int, frame: object) -> None:
        reporter.send({"event": "completed", "status": "canceled", "reason": "Canceled"})
        sys.exit(143)

    signal.signal(signal.SIGTERM, canceled)
    reporter.send({"event": "start"})
    reporter.send({"event": "logs", "logs": "loading model\n", "progress": 0.1})
    if behavior in ("succeed", "env"):
        time.sleep(float(params.get("seconds", 0)))
        output: dict[str, Any] = dict(OUTPUT)
        if behavior == "env":
            output["env"] = {
                "model": os.environ.get("WHISPERX_MODEL"),
                "device": os.environ.get("WHISPERX_DEVICE"),
                "compute_type": os.environ.get("WHISPERX_COMPUTE_TYPE"),
                "model_dir": os.environ.get("WHISPERX_MODEL_DIR"),
                "hf_token": os.environ.get("WHISPERX_HF_TOKEN"),
                "input": given,
            }
        reporter.send(
            {
                "event": "completed",
                "status": "succeeded",
                "output": output,
                "logs": "transcribed\n",
                "metrics": {"predict_time": 0.25, "audio_duration": 1.5},
            }
        )
        return 0
    if behavior in ("fail", "invalid"):
        error = "CUDA error: out of luck" if behavior == "fail" else "the audio cannot be decoded"
        reason = "RunnerFailed" if behavior == "fail" else "InvalidAudio"
        reporter.send({"event": "completed", "status": "failed", "error": error, "reason": reason})
        return 1 if behavior == "fail" else 2
    if behavior == "hang":
        while True:
            time.sleep(1)
    if behavior == "crash":
        print("Segmentation fault (core dumped)", file=sys.stderr)
        return 3
    if behavior == "noreport":
        return 0
    print(f"fake runner: unknown behavior {behavior!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
