#!/usr/bin/env bash
# Rebuilds senko's feature extractor in the Python environment of $PYTHON for baseline
# x86-64. senko's wheel ships libfbank_extractor.so built with -march=native on an
# AVX-512 host: on a CPU without AVX-512 (AMD EPYC before Zen 4, many cloud GPU nodes) the
# first diarization dies with SIGILL (vmovdqu8, AVX-512BW). Built from senko's own sources
# as upstream's CMakeLists does, but without -march=native (the features are a small part
# of diarization's time) and without -ffast-math, which with GCC before 13 links
# crtfastmath into the library, which then flushes denormals to zero for the whole
# process. The sources are the sdist uv.lock names, checked against its hash (and kept in
# $SDIST_CACHE). Used by scripts/runner-fixups.sh, on machines and in the runner images.
set -euo pipefail
PY=${PYTHON:-python}
CXX=${CXX:-c++}
LOCK=${LOCK:-$(cd "$(dirname "$0")/.." && pwd)/uv.lock}
SDIST_CACHE=${SDIST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whisperx-operator/sdists}
mkdir -p "$SDIST_CACHE"
sdist=$("$PY" - "$LOCK" "$SDIST_CACHE" <<'PYEOF'
import hashlib, importlib.metadata as md, pathlib, sys, tomllib, urllib.request
lock, cache = tomllib.load(open(sys.argv[1], "rb")), pathlib.Path(sys.argv[2])
version = md.version("senko")
entry = next(p for p in lock["package"] if p["name"] == "senko")
if entry["version"] != version:
    sys.exit(f"rebuild-senko: senko {version} is installed but uv.lock has {entry['version']}")
algorithm, digest = entry["sdist"]["hash"].split(":")
path = cache / f"senko-{version}-{digest[:16]}.tar.gz"
if not path.exists() or hashlib.new(algorithm, path.read_bytes()).hexdigest() != digest:
    with urllib.request.urlopen(entry["sdist"]["url"], timeout=300) as answer:
        data = answer.read()
    if hashlib.new(algorithm, data).hexdigest() != digest:
        sys.exit("rebuild-senko: the downloaded sdist does not match uv.lock's hash")
    path.with_suffix(".part").write_bytes(data)
    path.with_suffix(".part").rename(path)
print(path)
PYEOF
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xzf "$sdist" -C "$work" --wildcards '*/senko/fbank_extractor'
fb=$(echo "$work"/*/senko/fbank_extractor)
senko_dir=$("$PY" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("senko").origin))')
"$CXX" -std=c++20 -O3 -funroll-loops -fPIC -pthread -shared \
  -I"$fb/include" -I"$fb/cpp" -I"$fb/cpp/feature" $(find "$fb/cpp" -name '*.cpp') \
  -o "$senko_dir/.libfbank_extractor.so.new"
# A rename, not an overwrite: a process that has the old library mapped keeps it intact.
mv -f "$senko_dir/.libfbank_extractor.so.new" "$senko_dir/libfbank_extractor.so"
