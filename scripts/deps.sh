#!/usr/bin/env bash
# Installs what tern's tests, benchmarks and lab need on a Debian machine
# (DESIGN §10). Safe to run again: it installs only what is missing.
set -euo pipefail
# prometheus brings promtool (the alert rules' tests); chromium renders the
# status page for its screenshot test; systemd brings systemd-analyze.
pkgs=(fio libnbd-bin nbdkit fuse3 jq bc iperf3 nftables ethtool protobuf-compiler qemu-utils
      prometheus chromium systemd man-db)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  # No recommends: prometheus would pull exporters, chromium a desktop's worth.
  # No services either: only promtool is wanted from the prometheus package,
  # so a policy-rc.d keeps its server from being started during the install.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    trap '$sudo rm -f "$policy"' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
