#!/usr/bin/env bash
# Builds the project's container images with podman, without any registry: the base is
# Debian made here with debootstrap, Python packages come from uv.lock (PyPI), Debian
# packages from the apt mirror. Each image is cached by the content of what makes it (its
# Containerfile, build arguments, uv.lock, pyproject.toml, the sources it copies,
# versions.env and its base's key): an unchanged image takes well under a second.
#
#   scripts/build-images.sh [--no-report] [NAME...]   NAME: base redis control-plane
#                                                           runner-cpu runner-gpu (default: all)
#
# Writes, under $WHISPERX_IMAGES_DIR (default ~/.cache/whisperx-operator/images):
#   NAME-TAG-KEY.tar       an OCI archive (podman save --format oci-archive) whose index
#                          names the image fully (org.opencontainers.image.ref.name
#                          docker.io/whisperx/runner:0.1.0-cpu), so that
#                          `ctr -n k8s.io images import FILE` gives the name the kubelet
#                          looks up for `whisperx/runner:0.1.0-cpu`
#   NAME-TAG-KEY.tar.json  what index.json says about it
#   index.json             {"format": 1, "images": {"docker.io/whisperx/runner:0.1.0-cpu":
#                          {"name", "ref", "ref_name_annotation", "archive", "key",
#                          "manifest_digest", "config_digest", "image_id",
#                          "uncompressed_size", "compressed_size" (gzip, as pushed),
#                          "archive_size", "layers": [{"digest", "size", "gzip_size",
#                          "media_type"}], "built_seconds", "composition": {"layers",
#                          "top_dirs", "site_packages", "site_packages_total"}}}}
#   podman/                podman's storage and settings for these builds (never the host's)
# and prints each image's size and what makes it up (largest layers, folders, packages).
# Older archives of an image go when it is rebuilt.
#
# Needs (Debian): podman buildah skopeo umoci runc debootstrap fuse-overlayfs uidmap
# containernetworking-plugins; root. The Containerfiles also build elsewhere from a public
# base: `podman build -f images/runner/Containerfile --build-arg BASE_IMAGE=debian:bookworm-slim
# --build-arg UV_VERSION=... --build-arg FLAVOUR=cpu .` (docs in each Containerfile).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=../versions.env
. ./versions.env
: "${UV_VERSION:?versions.env: UV_VERSION}" "${DEBIAN_SUITE:?versions.env: DEBIAN_SUITE}"

CACHE=${WHISPERX_IMAGES_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/whisperx-operator/images}
UV_CACHE=${UV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uv}
# Changes to how this script builds that its inputs do not show: bump to rebuild all.
RECIPE=1
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)
BASE_REF=localhost/whisperx-base:$DEBIAN_SUITE
# Debian packages the base gets beyond debootstrap's minbase (none: like debian:*-slim,
# so that the Containerfiles install what they need and build from either).
BASE_PACKAGES=""
# Where this machine's apt gets Debian from (its sources), else Debian's own mirror.
mirror() {
  local m
  m=$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | head -n1 | tr -d ' ')
  echo "${m:-http://deb.debian.org/debian}"
}
MIRROR=${DEBIAN_MIRROR:-$(mirror)}
MIRROR=${MIRROR%/}

# name -> image reference (as the kubelet names it), Containerfile, build arguments,
# and the inputs from the repository the build reads (hashed for the key).
declare -A REF FILE ARGS INPUTS
SOURCES="pyproject.toml uv.lock README.md api operator runner gateway"
REF[redis]=docker.io/whisperx/redis:$VERSION
FILE[redis]=images/redis/Containerfile
ARGS[redis]=""
INPUTS[redis]=""
REF[control-plane]=docker.io/whisperx/control-plane:$VERSION
FILE[control-plane]=images/control-plane/Containerfile
ARGS[control-plane]="UV_VERSION=$UV_VERSION"
INPUTS[control-plane]=$SOURCES
REF[runner-cpu]=docker.io/whisperx/runner:$VERSION-cpu
FILE[runner-cpu]=images/runner/Containerfile
ARGS[runner-cpu]="UV_VERSION=$UV_VERSION FLAVOUR=cpu"
INPUTS[runner-cpu]="$SOURCES scripts/runner-fixups.sh"
REF[runner-gpu]=docker.io/whisperx/runner:$VERSION
FILE[runner-gpu]=images/runner/Containerfile
ARGS[runner-gpu]="UV_VERSION=$UV_VERSION FLAVOUR=gpu"
INPUTS[runner-gpu]="$SOURCES scripts/runner-fixups.sh"
ALL=(base redis control-plane runner-cpu runner-gpu)

report=1
names=()
for arg in "$@"; do
  case $arg in
    --no-report) report=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    base|redis|control-plane|runner-cpu|runner-gpu) names+=("$arg") ;;
    *) echo "build-images: unknown image $arg (one of: ${ALL[*]})" >&2; exit 2 ;;
  esac
done
((${#names[@]})) || names=("${ALL[@]}")

log() { printf '%s build-images: %s\n' "$(date +%T)" "$*" >&2; }

# --- keys --------------------------------------------------------------------------------
# The files of the given paths as the build context sends them (.containerignore leaves out
# caches): each one's path, mode and content.
hash_tree() {
  local files
  files=$(for p in "$@"; do
    if [ -d "$p" ]; then
      find "$p" \( -name __pycache__ -o -name '*.egg-info' -o -name .mypy_cache \
        -o -name .pytest_cache -o -name .ruff_cache \) -prune -o -type f ! -name '*.pyc' -print
    elif [ -e "$p" ]; then echo "$p"
    else echo "missing:$p"
    fi
  done | LC_ALL=C sort)
  local missing
  missing=$(grep '^missing:' <<<"$files" || true)
  files=$(grep -v '^missing:' <<<"$files" || true)
  echo "$missing"
  [ -z "$files" ] && return 0
  tr '\n' '\0' <<<"$files" | xargs -0 stat -c '%a %n'
  tr '\n' '\0' <<<"$files" | xargs -0 sha256sum
}

base_key() {
  { echo "recipe $RECIPE"; echo "suite $DEBIAN_SUITE"; echo "mirror $MIRROR"
    echo "packages $BASE_PACKAGES"; declare -f make_base; } | sha256sum | cut -c1-16
}

image_key() {
  local name=$1
  { echo "recipe $RECIPE"; echo "name $name ref ${REF[$name]}"; echo "args ${ARGS[$name]}"
    echo "base $(base_key)"
    # shellcheck disable=SC2086
    hash_tree "${FILE[$name]}" .containerignore versions.env ${INPUTS[$name]}
  } | sha256sum | cut -c1-16
}

# --- podman, private to these builds -----------------------------------------------------
PODMAN_DIR=$CACHE/podman
mkdir -p "$PODMAN_DIR/tmp"
# One build at a time (setup, the tests and people may start it together).
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
  log "waiting for another build-images.sh to finish"
  flock 9
fi
# What an interrupted build or save left in podman's temporary folder (GBs for a runner);
# buildah-cache holds the cache mounts.
find "$PODMAN_DIR/tmp" -mindepth 1 -maxdepth 1 ! -name buildah-cache -exec rm -rf {} +
export CONTAINERS_CONF=$PODMAN_DIR/containers.conf
export CONTAINERS_STORAGE_CONF=$PODMAN_DIR/storage.conf
export CONTAINERS_REGISTRIES_CONF=$PODMAN_DIR/registries.conf
export TMPDIR=$PODMAN_DIR/tmp
write_if_changed() {  # path, content
  [ "$(cat "$1" 2>/dev/null)" = "$2" ] || printf '%s\n' "$2" > "$1"
}
# runc: crun refuses these machines' hybrid cgroups; explicit limits: without them every
# container fails in setrlimit; the host network: builds reach the mirrors without
# podman changing the host's iptables.
write_if_changed "$CONTAINERS_CONF" '[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "host"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"'
write_if_changed "$CONTAINERS_STORAGE_CONF" "[storage]
driver = \"overlay\"
graphroot = \"$PODMAN_DIR/storage\"
runroot = \"$PODMAN_DIR/run\""
# No registry is searched for short names: the bases are made here.
write_if_changed "$CONTAINERS_REGISTRIES_CONF" 'unqualified-search-registries = []
short-name-mode = "disabled"'

# --- base ----------------------------------------------------------------------------------
# debootstrap minbase, slimmed as Debian's own container images are (no docs, man pages or
# locales; apt keeps no packages or lists), imported as one layer.
make_base() {
  local rootfs=$1
  if ! debootstrap --variant=minbase ${BASE_PACKAGES:+--include=${BASE_PACKAGES// /,}} \
      "$DEBIAN_SUITE" "$rootfs" "$MIRROR" > "$rootfs.log" 2>&1; then
    tail -n 30 "$rootfs.log" >&2
    return 1
  fi
  rm -f "$rootfs.log"
  cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $DEBIAN_SUITE main
deb $MIRROR $DEBIAN_SUITE-updates main
deb ${MIRROR%/debian}/debian-security $DEBIAN_SUITE-security main
EOF
  cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
  cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  printf 'Acquire::GzipIndexes "true";\nAcquire::CompressionTypes::Order:: "gz";\n' \
    > "$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
  printf 'Acquire::Languages "none";\n' > "$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  printf 'APT::AutoRemove::SuggestsImportant "false";\n' > "$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
  # Services never start from a package's postinst in an image build.
  printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
  chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  chroot "$rootfs" apt-get clean
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/{man,info,groff,linda,lintian}/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log \
    "$rootfs"/var/log/apt/* "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old \
    "$rootfs"/etc/hostname "$rootfs"/etc/resolv.conf "$rootfs"/etc/machine-id
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  : > "$rootfs/etc/resolv.conf"
}

image_label() {  # image, label
  podman image inspect --format "{{index .Labels \"$2\"}}" "$1" 2>/dev/null || true
}

build_base() {
  local key archive start
  key=$(base_key)
  archive=$CACHE/whisperx-base-$DEBIAN_SUITE-$key.tar
  if [ "$(image_label "$BASE_REF" io.whisperx.build-key)" = "$key" ]; then
    return 0
  fi
  start=$SECONDS
  if [ -s "$archive" ]; then
    log "base: loading $BASE_REF from $archive"
    podman load -q -i "$archive" >/dev/null
  else
    log "base: debootstrap $DEBIAN_SUITE from $MIRROR"
    local old
    old=$(podman image inspect --format '{{.Id}}' "$BASE_REF" 2>/dev/null || true)
    local rootfs=$PODMAN_DIR/tmp/rootfs-$key
    rm -rf "$rootfs"
    mkdir -p "$rootfs"
    make_base "$rootfs"
    tar --numeric-owner --xattrs -C "$rootfs" -c . | podman import -q \
      --change 'CMD ["/bin/bash"]' \
      --change "LABEL io.whisperx.build-key=$key" \
      --change "LABEL org.opencontainers.image.description=Debian $DEBIAN_SUITE minbase ($MIRROR)" \
      - "$BASE_REF" >/dev/null
    rm -rf "$rootfs"
    # The base it replaces goes unless images built on it still use it.
    [ -z "$old" ] || podman rmi "$old" >/dev/null 2>&1 || true
    podman save -q --format oci-archive -o "$archive.part" "$BASE_REF"
    mv "$archive.part" "$archive"
    find "$CACHE" -maxdepth 1 -name "whisperx-base-$DEBIAN_SUITE-*.tar" ! -name "${archive##*/}" -delete
  fi
  log "base: $BASE_REF ready in $((SECONDS - start)) s"
}

# --- images --------------------------------------------------------------------------------
archive_of() {  # name, key
  local ref=${REF[$1]}
  local repo=${ref##*/}
  echo "$CACHE/${repo%%:*}-${ref##*:}-$2.tar"
}

CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

declare -A KEY_USED  # name -> the key this run built or found, for the index

build_image() {
  local name=$1 key archive ref start
  key=$(image_key "$name")
  KEY_USED[$name]=$key
  archive=$(archive_of "$name" "$key")
  ref=${REF[$name]}
  if [ -s "$archive" ] && [ -s "$archive.json" ]; then
    log "$name: $ref cached ($key)"
    return 0
  fi
  build_base
  start=$SECONDS
  log "$name: building $ref ($key)"
  local args=(--build-arg "BASE_IMAGE=$BASE_REF")
  local a
  for a in ${ARGS[$name]}; do args+=(--build-arg "$a"); done
  # The host's CA bundle reaches only the steps that download (a secret, never a layer);
  # uv's cache is the host's, so wheels are downloaded once for the machine.
  if [[ " ${ARGS[$name]} " == *" UV_VERSION="* ]]; then
    mkdir -p "$UV_CACHE"
    args+=(--build-arg UV_CACHE_DIR=/var/cache/host-uv -v "$UV_CACHE:/var/cache/host-uv")
  fi
  # Stages that only other stages use (build, tools) are tagged
  # (localhost/whisperx-cache/DIR:STAGE): the prune below then keeps them, and with them
  # the layer cache of the dependencies, while what older builds left goes.
  local stage
  for stage in $(sed -n 's/^FROM .* AS \(build\|tools\)$/\1/p' "${FILE[$name]}"); do
    nice -n 19 podman build --network host --pull=never --layers \
      -f "${FILE[$name]}" "${args[@]}" --secret "id=hostca,src=$CA_BUNDLE" --target "$stage" \
      -t "localhost/whisperx-cache/$(basename "$(dirname "${FILE[$name]}")"):$stage" . >&2
  done
  nice -n 19 podman build --network host --pull=never --layers \
    -f "${FILE[$name]}" "${args[@]}" \
    --secret "id=hostca,src=$CA_BUNDLE" \
    --label "io.whisperx.build-key=$key" \
    --label "org.opencontainers.image.version=$VERSION" \
    -t "$ref" . >&2
  podman image prune -f >/dev/null
  local seconds=$((SECONDS - start))
  log "$name: built in $seconds s; saving $archive"
  nice -n 19 podman save -q --format oci-archive -o "$archive.part" "$ref"
  # What makes the image up, for the report: its layers' steps, and the sizes of its
  # top folders and of the Python packages in it.
  local info=$PODMAN_DIR/tmp/info-$name mnt
  podman history --format json "$ref" > "$info.history"
  mnt=$(podman image mount "$ref")
  (cd "$mnt" && du -x -k -d1 . && if [ -d opt/whisperx/lib ]; then
     du -k -d1 opt/whisperx/lib/python3*/site-packages; fi) > "$info.du" 2>/dev/null || true
  podman image unmount "$ref" >/dev/null
  python3 - "$archive.part" "$archive" "$name" "$ref" "$key" "$seconds" \
    "$(podman image inspect --format '{{.Id}}' "$ref")" "$info" > "$archive.json.part" <<'PYEOF'
import json, os, re, sys, tarfile, zlib
part, archive, name, ref, key, seconds, image_id, info = sys.argv[1:]
sizes = os.path.join(os.path.dirname(archive), "layer-gzip-sizes")
def measure(f, gzipped):
    """The length of f's content gunzipped if gzipped, else gzipped at level 6."""
    z = zlib.decompressobj(31) if gzipped else zlib.compressobj(6, zlib.DEFLATED, 31)
    step = z.decompress if gzipped else z.compress
    n = 0
    while chunk := f.read(1 << 20):
        n += len(step(chunk))
    return n + len(z.flush())
def composition():
    history = json.load(open(info + ".history"))
    def step(h):  # the instruction, without build arguments, mounts and the shell
        text = re.sub(r"^\|\d+ (\S+=\S* )*", "", h.get("CreatedBy") or h.get("createdBy") or "")
        return " ".join(re.sub(r"--mount=\S+|#\(nop\)|/bin/sh -c", "", text).split())[:240]
    steps = sorted(({"size": h.get("size", 0), "created_by": step(h)}
                    for h in history if h.get("size", 0) > 0), key=lambda h: -h["size"])
    top, site = [], []
    for line in open(info + ".du"):
        kib, path = line.rstrip("\n").split("\t", 1)
        path = path.removeprefix("./")
        if path in (".", "") or path.endswith("site-packages"):
            continue
        (site if "/site-packages/" in path else top).append(["/" + path if "/site-packages/" not in path else path.rsplit("/", 1)[1], int(kib) * 1024])
    top.sort(key=lambda e: -e[1])
    site.sort(key=lambda e: -e[1])
    return {"layers": steps, "top_dirs": top[:8], "site_packages": site[:15],
            "site_packages_total": sum(e[1] for e in site)}
with tarfile.open(part) as tar:
    members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
    read = lambda n: tar.extractfile(members[n]).read()
    index = json.loads(read("index.json"))
    (desc,) = index["manifests"]
    digest = desc["digest"]
    manifest = json.loads(read("blobs/" + digest.replace(":", "/")))
    layers = []
    for layer in manifest["layers"]:
        # Each layer's size uncompressed and gzipped (what a registry would hold, as
        # podman push writes it, level 6), whichever of the two the archive holds;
        # remembered by digest: the runner images share their big layers.
        known = os.path.join(sizes, layer["digest"].replace(":", "-"))
        try:
            other = int(open(known).read())
        except (OSError, ValueError):
            other = measure(tar.extractfile(members["blobs/" + layer["digest"].replace(":", "/")]),
                            layer["mediaType"].endswith("+gzip"))
            os.makedirs(sizes, exist_ok=True)
            open(known, "w").write(str(other))
        if layer["mediaType"].endswith("+gzip"):
            layers.append({"digest": layer["digest"], "size": other, "gzip_size": layer["size"],
                           "media_type": layer["mediaType"]})
        else:
            layers.append({"digest": layer["digest"], "size": layer["size"], "gzip_size": other,
                           "media_type": layer["mediaType"]})
print(json.dumps({
    "name": name,
    "ref": ref,
    "ref_name_annotation": desc.get("annotations", {}).get("org.opencontainers.image.ref.name"),
    "archive": archive,
    "key": key,
    "manifest_digest": digest,
    "config_digest": manifest["config"]["digest"],
    "image_id": "sha256:" + image_id.removeprefix("sha256:"),
    "uncompressed_size": sum(l["size"] for l in layers),
    "compressed_size": sum(l["gzip_size"] for l in layers),
    "archive_size": os.path.getsize(part),
    "layers": layers,
    "built_seconds": int(seconds),
    "composition": composition(),
}, indent=2))
PYEOF
  rm -f "$info.history" "$info.du"
  mv "$archive.part" "$archive"
  mv "$archive.json.part" "$archive.json"
  # Older builds of the same image go (NAME-TAG- then a key: not runner-0.1.0-cpu-KEY for
  # runner-0.1.0-KEY).
  local stem=${archive%-"$key".tar} hex16
  stem=${stem##*/}
  hex16=$(printf '[0-9a-f]%.0s' {1..16})
  find "$CACHE" -maxdepth 1 \( -name "$stem-$hex16.tar" -o -name "$stem-$hex16.tar.json" \) \
    ! -name "${archive##*/}" ! -name "${archive##*/}.json" -delete
  log "$name: done in $((SECONDS - start)) s"
}

# index.json from the sidecars of the current keys of every image (built now or before).
write_index() {
  local name key archive jsons=()
  for name in "${ALL[@]}"; do
    [ "$name" = base ] && continue
    # What this run built (its inputs may have changed since), else what they say now.
    key=${KEY_USED[$name]:-$(image_key "$name")}
    archive=$(archive_of "$name" "$key")
    [ -s "$archive.json" ] && jsons+=("$archive.json")
  done
  python3 - "$CACHE/index.json" "${jsons[@]}" <<'PYEOF'
import json, os, sys
out, *files = sys.argv[1:]
images = {}
for f in files:
    entry = json.load(open(f))
    images[entry["ref"]] = entry
tmp = out + ".part"
with open(tmp, "w") as fh:
    json.dump({"format": 1, "images": images}, fh, indent=2)
os.replace(tmp, out)
PYEOF
}

# Each image: its size, where it comes from, and what makes it up.
print_report() {
  python3 - "$CACHE/index.json" "$@" <<'PYEOF'
import json, re, sys
index, *refs = sys.argv[1:]
images = json.load(open(index))["images"]
def h(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
for ref in refs:
    e = images.get(ref)
    if not e:
        continue
    c = e.get("composition", {})
    print(f"{ref}: {h(e['uncompressed_size'])} ({h(e['compressed_size'])} gzipped), "
          f"{len(e['layers'])} layers, built in {e['built_seconds']} s")
    print(f"  archive {e['archive']} ({h(e['archive_size'])}), manifest {e['manifest_digest'][:19]}")
    for layer in c.get("layers", [])[:4]:
        step = re.sub(r"^\|\d+ (\S+=\S* )*", "", layer["created_by"])
        step = " ".join(re.sub(r"--mount=\S+|#\(nop\)|/bin/sh -c", "", step).split())[:90]
        print(f"  layer {h(layer['size']):>9}  {step}")
    if c.get("top_dirs"):
        print("  folders: " + ", ".join(f"{p} {h(n)}" for p, n in c["top_dirs"][:6]))
    if c.get("site_packages"):
        print(f"  site-packages {h(c['site_packages_total'])}: "
              + ", ".join(f"{p} {h(n)}" for p, n in c["site_packages"][:12]))
PYEOF
}

for name in "${names[@]}"; do
  if [ "$name" = base ]; then build_base; else build_image "$name"; fi
done
write_index
if ((report)); then
  refs=()
  for name in "${names[@]}"; do [ "$name" = base ] || refs+=("${REF[$name]}"); done
  print_report "${refs[@]}"
fi
