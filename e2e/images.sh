#!/usr/bin/env bash
# Build (or reuse) the project's images from docker/*.Dockerfile without a daemon, for the
# test cluster's real node: buildah bud with a Python base made by debootstrap, written
# as OCI archives (layers uncompressed: they stay on this machine) into a cache outside the repo:
#   ${INFERENCEFLEET_IMAGE_CACHE:-~/.cache/inferencefleet/images}/<name>-<key>.tar
# where <key> hashes the Dockerfile, every file it copies and the base, so an edit
# rebuilds and anything else reuses. buildah keeps its layer cache (overlay storage): an edit
# of the code rebuilds only the code layer, and the dependency layer keeps its digest, so the
# node's containerd does not unpack it again.
#
#   e2e/images.sh operator|worker...   build what is missing; print "<name> <archive> <ref>"
#   e2e/images.sh --key NAME           print the key NAME would have (no build)
#
# The base is Debian bookworm minbase + python3.11 (python3, python3-venv) + this
# machine's CA bundle (pip inside the build reaches PyPI through the same TLS as the
# host) as /etc/ssl/certs/ca-certificates.crt, which /etc/pip.conf names.
set -euo pipefail

# Bump when the recipe (base packages, build flags) changes: it is part of every key.
RECIPE=2
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates
MIRROR="${INFERENCEFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

e2e="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$e2e")"
cache="${INFERENCEFLEET_IMAGE_CACHE:-$HOME/.cache/inferencefleet/images}"
# buildah's own storage, apart from any other containers-storage on the machine.
mkdir -p "$cache"
# overlay where the kernel can stack it on the cache's filesystem; vfs (full copies, slower)
# where the cache itself sits on overlayfs, as inside a container.
default_driver() {
  [[ "$(stat -f -c %T "$cache" 2>/dev/null)" == overlayfs ]] && echo vfs || echo overlay
}
driver="${INFERENCEFLEET_BUILDAH_DRIVER:-$(default_driver)}"
store=(--root "$cache/storage-$driver" --runroot "/run/inferencefleet-buildah-$driver" --storage-driver "$driver")
chart_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$repo/charts/inferencefleet/Chart.yaml")"

log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[images] ERROR: %s\n' "$*" >&2; exit 1; }

ref_of() {  # the name the chart and the operator use by default
  case "$1" in
    operator) echo "ghcr.io/inferencefleet/operator:${chart_version}" ;;
    worker) echo "ghcr.io/inferencefleet/worker:${chart_version}" ;;
    *) die "unknown image '$1' (operator or worker)" ;;
  esac
}

base_key() { echo "recipe=$RECIPE suite=$SUITE packages=$BASE_PACKAGES" | cat - /etc/ssl/certs/ca-certificates.crt | sha256sum | cut -c1-16; }

context_paths() {  # what .dockerignore lets into the build context, as git pathspecs
  sed -n 's/^!\(.*\)$/\1/p' "$repo/.dockerignore" | sed 's#/\*\*$##'
}

image_key() {  # the Dockerfile and what its COPY lines can read (tracked files in the context)
  local name="$1"
  local paths; mapfile -t paths < <(context_paths)
  { echo "recipe=$RECIPE base=$(base_key) ref=$(ref_of "$name")"
    cat "$repo/docker/$name.Dockerfile" "$repo/.dockerignore"
    (cd "$repo" && git ls-files -z -- "${paths[@]}" | LC_ALL=C sort -z | xargs -0 sha256sum)
  } | sha256sum | cut -c1-16
}

ensure_base() {  # prints the base image's name in buildah's storage
  exec 7>"$cache/.base.lock"; flock 7
  local key ref rootfs
  key="$(base_key)"; ref="localhost/inferencefleet-python-base:$key"
  if buildah "${store[@]}" inspect --type image "$ref" >/dev/null 2>&1; then echo "$ref"; return; fi
  command -v debootstrap >/dev/null || die "debootstrap not found (Debian: apt-get install debootstrap)"
  log "making the Python base ($SUITE minbase + $BASE_PACKAGES) ..."
  local t0=$SECONDS
  rootfs="$cache/base-$key.tmp"; rm -rf "$rootfs"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$cache/base-$key.log" 2>&1 \
    || { tail -n 20 "$cache/base-$key.log" >&2; die "debootstrap failed; log: $cache/base-$key.log"; }
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$rootfs/etc/pip.conf"
  ln -sf python3 "$rootfs/usr/bin/python"
  # What python:3.11-slim leaves out too: apt lists, docs, caches.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*
  local c; c="$(buildah "${store[@]}" from scratch)"
  local mnt; mnt="$(buildah "${store[@]}" mount "$c")"
  tar -C "$rootfs" -cf - . | tar -C "$mnt" -xf -
  buildah "${store[@]}" umount "$c" >/dev/null
  buildah "${store[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd python3 "$c"
  buildah "${store[@]}" commit --rm -q "$c" "$ref" >/dev/null
  rm -rf "$rootfs"
  log "base $ref in $((SECONDS - t0)) s"
  echo "$ref"
}

wheel_dir="${INFERENCEFLEET_WHEEL_CACHE:-$HOME/.cache/inferencefleet/wheels}"
ensure_wheels() {  # the worker extra's wheels at the locked versions, downloaded once
  local stamp; stamp="$wheel_dir/.lock-$(sha256sum "$repo/requirements.lock" | cut -c1-16)"
  [[ -f "$stamp" ]] && return
  log "downloading the worker's wheels into $wheel_dir ..."
  mkdir -p "$wheel_dir"
  local deps; deps="$(cd "$repo" && python3 -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb")); p = d["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["worker"] + d["build-system"]["requires"]))')"
  # shellcheck disable=SC2086
  python3 -m pip download -q --constraint "$repo/requirements.lock" -d "$wheel_dir" $deps \
    >"$wheel_dir/download.log" 2>&1 || { tail -n 20 "$wheel_dir/download.log" >&2; die "pip download failed"; }
  touch "$stamp"
}

build() {  # build <name>: prints "<name> <archive> <ref>"
  local name="$1" key ref archive base t0
  key="$(image_key "$name")"; ref="$(ref_of "$name")"
  archive="$cache/$name-$key.tar"
  if [[ -f "$archive" ]]; then log "reusing $archive"; echo "$name $archive $ref"; return; fi
  command -v buildah >/dev/null || die "buildah not found (Debian: apt-get install buildah)"
  base="$(ensure_base)"
  t0=$SECONDS
  log "building $ref from docker/$name.Dockerfile (key $key) ..."
  local wheels=()
  if [[ "$name" == worker ]]; then  # the CUDA wheels (~3 GB) come from a local cache
    ensure_wheels
    wheels=(-v "$wheel_dir:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_NO_INDEX=1)
  fi
  # --isolation chroot: RUN steps use the host's network (pip reaches PyPI as the host does).
  buildah "${store[@]}" bud --isolation chroot --pull=never --layers "${wheels[@]}" \
    --build-arg "PYTHON_IMAGE=$base" \
    -f "$repo/docker/$name.Dockerfile" -t "localhost/inferencefleet-$name:$key" "$repo" \
    >"$cache/$name-$key.log" 2>&1 \
    || { tail -n 30 "$cache/$name-$key.log" >&2; die "building $name failed; log: $cache/$name-$key.log"; }
  buildah "${store[@]}" push -q --disable-compression "localhost/inferencefleet-$name:$key" \
    "oci-archive:$archive.tmp:$ref" >/dev/null
  mv "$archive.tmp" "$archive"
  # Keep the cache small: this image's older archives go (buildah's layer cache stays).
  local old
  for old in "$cache/$name"-*.tar; do
    [[ "$old" == "$archive" ]] || rm -f "$old" "${old%.tar}.log"
  done
  buildah "${store[@]}" rmi "localhost/inferencefleet-$name:$key" >/dev/null 2>&1 || true
  log "built $name in $((SECONDS - t0)) s: $(du -h "$archive" | cut -f1) ($archive)"
  echo "$name $archive $ref"
}

mkdir -p "$cache"
if [[ "${1:-}" == "--key" ]]; then image_key "${2:?--key NAME}"; exit 0; fi
(( $# > 0 )) || die "name the images to build: operator, worker"
for name in "$@"; do
  # One build per image at a time (another waits, then reuses); the base has its own lock.
  ( exec 9>"$cache/.$name.lock"; flock 9; build "$name" )
done
