#!/usr/bin/env bash
# Builds tern and runs `tern lab` (two sites + mirror daemons on loopback, under ./lab).
#   scripts/lab.sh up | down | status
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bins --quiet
exec target/debug/tern lab "${1:-up}" --dir "$PWD/lab"
