#!/usr/bin/env bash
# Snapshot costs on the store (release build): create on 1 GiB vs 1 TiB,
# first write after a snapshot vs a plain write, diff on a 1 TiB image.
#   bench/snap-costs.sh [results-file]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/snap-costs.txt}
# The results file names the code that made it.
echo "# commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates bench Cargo.lock 2>/dev/null || echo '+uncommitted'), $(date -u +%Y-%m-%d), $(basename "$0")" >"$out"
TMPDIR=${TMPDIR:-$PWD/target} cargo bench -q -p tern-store --bench snap_costs 2>/dev/null | tee -a "$out"
