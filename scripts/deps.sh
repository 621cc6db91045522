#!/usr/bin/env bash
# Installs what tern's tests, benchmarks and lab need on a Debian machine
# (DESIGN §10). Safe to run again: it installs only what is missing.
set -euo pipefail
pkgs=(fio libnbd-bin nbdkit fuse3 jq bc iperf3 nftables ethtool protobuf-compiler qemu-utils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
