#!/usr/bin/env bash
# Two changes to the runner stack that uv.lock installed (`--extra runner`), in the
# environment of $PYTHON, on the machines and in the runner images alike:
# - torchaudio 2.11 is a CUDA build whose compiled extensions do not load beside torch
#   2.13: without them it runs in pure-Python mode, all whisperx and pyannote use of it;
# - senko's feature extractor is rebuilt for baseline x86-64 (runner/rebuild-senko.sh).
# Quick when done: both are checked first.
set -euo pipefail
PY=${PYTHON:-python}
here=$(cd "$(dirname "$0")/.." && pwd)

done_already() {
  "$PY" - <<'PYEOF'
import base64, hashlib, importlib.metadata as md, importlib.util, os, sys
origin = importlib.util.find_spec("torchaudio").origin
for _, _, files in os.walk(os.path.dirname(origin)):
    if any(f.endswith(".so") for f in files):
        sys.exit(1)
# senko's library counts as rebuilt once it is no longer the wheel's (RECORD's hash).
for f in md.files("senko") or []:
    if f.name == "libfbank_extractor.so" and f.hash is not None:
        digest = hashlib.sha256(f.locate().read_bytes()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == f.hash.value:
            sys.exit(1)
PYEOF
}

if done_already; then
  exit 0
fi
ta_dir=$("$PY" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torchaudio").origin))')
find "$ta_dir" -name '*.so' -delete
PYTHON="$PY" LOCK="$here/uv.lock" bash "$here/runner/rebuild-senko.sh"
"$PY" -c 'import torchaudio, faster_whisper, whisperx.asr, senko' >/dev/null
done_already || { echo "runner-fixups: the runner stack is not as expected after the fix-ups" >&2; exit 1; }
echo "runner-fixups: torchaudio in pure-Python mode, senko rebuilt for baseline x86-64"
