#!/usr/bin/env bash
# Quickstart on a fresh machine: set up, start local mode (the Replicate-compatible API
# with the runner as local processes), transcribe a spoken sample with the official
# `replicate` client, print the transcript with its timings, and stop local mode.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
PY=.venv/bin/python
work=$(mktemp -d)
local_pid=""
cleanup() {
  if [ -n "$local_pid" ] && kill -0 "$local_pid" 2>/dev/null; then
    kill -TERM "$local_pid"
    wait "$local_pid" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Word timings come from the English alignment model (wav2vec2) when the model cache has
# it: fetch it once. Without network access the runner uses Whisper's own word timings.
models=${WHISPERX_MODEL_DIR:-$HOME/.cache/whisperx/models}
mkdir -p "$models"
if [ ! -e "$models/align/torchaudio" ] && [ ! -e "$models/align/en/config.json" ]; then
  echo "== fetching the English alignment model into $models (for word timings)"
  if ! timeout 300 .venv/bin/whisperx-runner prefetch --align-language en \
    --model-dir "$models" >"$work/prefetch.log" 2>&1; then
    echo "   not available ($(tail -n1 "$work/prefetch.log")): using Whisper's word timings"
  fi
fi

echo "== making a sample with espeak-ng"
espeak-ng -w "$work/sample.wav" "the quick brown fox jumps over the lazy dog"

port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
token="quickstart-$($PY -c 'import secrets; print(secrets.token_hex(8))')"
echo "== starting local mode on http://127.0.0.1:$port"
# The token goes in the environment, not the command line (`ps` shows arguments).
WHISPERX_LOCAL_TOKEN="$token" .venv/bin/whisperx-local --port "$port" --model-dir "$models" \
  --data-dir "$work/redis" >"$work/local.log" 2>&1 &
local_pid=$!
for _ in $(seq 1 120); do
  if $PY -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:$port/ready', timeout=1)" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$local_pid" 2>/dev/null; then
    cat "$work/local.log"
    echo "local mode exited" >&2
    exit 1
  fi
  sleep 0.5
done

echo "== transcribing with the replicate client (base URL and token are all that change)"
BASE_URL="http://127.0.0.1:$port" TOKEN="$token" SAMPLE="$work/sample.wav" $PY - <<'EOF'
import os

import replicate

client = replicate.Client(api_token=os.environ["TOKEN"], base_url=os.environ["BASE_URL"])
with open(os.environ["SAMPLE"], "rb") as audio:  # uploaded, as to Replicate
    output = client.run(
        "whisperx/whisperx",
        input={"audio_file": audio, "align_output": True},
    )
print()
print("Transcript:", " ".join(s["text"].strip() for s in output["segments"]))
print("Language:  ", output["detected_language"])
for segment in output["segments"]:
    print(f"[{segment['start']:6.2f} - {segment['end']:6.2f}] {segment['text'].strip()}")
    for word in segment.get("words") or []:
        if word.get("start") is not None:
            print(f"    {word['start']:6.2f} - {word['end']:6.2f}  {word['word']}")
EOF

echo
echo "== local mode's log"
sed 's/^/   /' "$work/local.log"
echo "== stopping local mode"
