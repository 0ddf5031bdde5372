#!/usr/bin/env bash
# Rebuilds senko's feature extractor in the Python environment of $PYTHON for baseline
# x86-64. senko's wheel ships libfbank_extractor.so built with -march=native on an
# AVX-512 host: on a CPU without AVX-512 (AMD EPYC before Zen 4, many cloud GPU nodes) the
# first diarization dies with SIGILL (vmovdqu8, AVX-512BW). Built from senko's own sources
# as upstream's CMakeLists does, but without -march=native (the features are a small part
# of diarization's time) and without -ffast-math, which with GCC before 13 links
# crtfastmath into the library, which then flushes denormals to zero for the whole
# process. Used by scripts/install-runner-cpu.sh and runner/Dockerfile.
set -euo pipefail
PY=${PYTHON:-python}
CXX=${CXX:-c++}
version=$("$PY" -c 'import importlib.metadata as md; print(md.version("senko"))')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-binary senko "senko==$version" -d "$work"
tar -xzf "$work/senko-$version.tar.gz" -C "$work" "senko-$version/senko/fbank_extractor"
fb="$work/senko-$version/senko/fbank_extractor"
senko_dir=$("$PY" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("senko").origin))')
"$CXX" -std=c++20 -O3 -funroll-loops -fPIC -pthread -shared \
  -I"$fb/include" -I"$fb/cpp" -I"$fb/cpp/feature" $(find "$fb/cpp" -name '*.cpp') \
  -o "$senko_dir/.libfbank_extractor.so.new"
# A rename, not an overwrite: a process that has the old library mapped keeps it intact.
mv -f "$senko_dir/.libfbank_extractor.so.new" "$senko_dir/libfbank_extractor.so"
