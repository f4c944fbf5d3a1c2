#!/usr/bin/env bash
# Installs the Debian packages the test cluster's real node and its image builds need
# (containerd, runc, CNI plugins, iptables, buildah, debootstrap, util-linux's unshare).
# Does nothing when they are present; says what is missing when it cannot install (not root,
# no apt-get): `e2e/cluster up` then runs with kwok nodes only (INFERENCEFLEET_REAL_NODE=auto).
set -euo pipefail

packages=(containerd runc containernetworking-plugins iptables buildah debootstrap util-linux)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "node-deps: missing ${missing[*]} (install them as root for the real node)" >&2
    exit 0
fi
echo "node-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
# Debian starts containerd's own service on install; the test cluster runs its own instance.
if command -v systemctl >/dev/null && systemctl is-active -q containerd 2>/dev/null; then
    systemctl stop containerd || true
fi
