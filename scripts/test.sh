#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, builds
# the binaries the real-process tests spawn, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
# Integration tests spawn ternd/tern from target/: build them first, since
# `nextest run` alone builds only test targets.
cargo build --workspace --bins
profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo nextest run --workspace --profile "$profile" "$@"
